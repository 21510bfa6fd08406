"""Streaming GGUF writer: plan every tensor's type from shapes alone, write the header, then read,
convert and write one tensor at a time, 2-D weights in row chunks, so peak memory stays near one
packed tensor beside the libraries and the tokenizer metadata."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V
from gguf import GGUFWriter

from . import __version__
from .atomic import atomic_output
from .errors import NpftError, UsageError
from .grids import get_grid
from .grids.mix import Choice, ModelShape, choose, file_type, llama_ftype
from .progress import bar
from .signals import pause_for_tests
from .sources import Source, check_tensors

log = logging.getLogger("npft_gguf")


@dataclass(frozen=True)
class ExportSettings:
    type: str = "q4_0"
    pure: bool = False
    imatrix: str | None = None  # an imatrix file, its entries given to llama.cpp's quantizer (imatrix.py)


@dataclass
class PlannedTensor:
    hf_name: str | None  # None: a tensor the family computes (llama3's rope_freqs), held in `data`
    name: str
    shape: tuple[int, ...]  # HF / numpy order: (rows, cols)
    choice: Choice
    qw: np.ndarray | None = field(default=None, repr=False, compare=False)  # its imatrix entry, if the file has one
    data: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        c = self.choice
        return int(np.prod(self.shape)) // c.block * c.block_bytes


@dataclass
class ExportReport:
    path: str
    type: str
    pure: bool
    n_tensors: int
    size_bytes: int
    types: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)


def plan(source: Source, settings: ExportSettings) -> list[PlannedTensor]:
    """Every tensor's GGUF name, shape and type (grids/mix.py, llama.cpp's choice) and imatrix
    entry, before any weight is read; shapes that the config disagrees with (or zero-sized ones)
    fail here, and so does a type llama.cpp quantizes only with an imatrix when there is none."""
    from .llamacpp import ggml_requires_imatrix

    if not file_type(settings.type).written:
        raise UsageError(f"--type {settings.type} is written only by llama.cpp's own quantizer: pass --quantizer llama.cpp")
    cfg = source.config
    check_tensors(source.arch, cfg, source.shapes(), source.spec)
    shape = ModelShape.of(cfg, source.arch.name)
    out = [PlannedTensor(None, name, tuple(a.shape), choose(settings.type, name, tuple(a.shape), shape, settings.pure),
                         data=np.asarray(a, np.float32))
           for name, a in source.extra_tensors().items()]  # first, where llama.cpp's converter puts them
    for hf_name, dims in source.shapes().items():
        name = source.arch.gguf_name(hf_name)
        out.append(PlannedTensor(hf_name, name, dims, choose(settings.type, name, dims, shape, settings.pure,
                                                             imatrix=settings.imatrix is not None)))
    if settings.imatrix is not None:
        from .imatrix import attach_entries

        attach_entries(out, settings.imatrix)
    for t in out:
        if t.qw is None and t.choice.type not in ("f32", "f16", "bf16") and ggml_requires_imatrix(t.choice.type):
            raise UsageError(f"llama.cpp quantizes {t.name} as {t.choice.type} only with an importance matrix; pass --imatrix")
    return out


def metadata(source: Source, settings: ExportSettings, provenance: dict) -> list[tuple[str, object, V, V | None]]:
    name = getattr(source.config, "_name_or_path", "") or Path(source.spec).stem
    made = made_by(settings, provenance)
    items = [
        ("general.name", Path(str(name)).name or source.spec, V.STRING, None),
        ("general.file_type", int(llama_ftype(settings.type)), V.UINT32, None),
        ("general.quantization_version", 2, V.UINT32, None),
        ("general.source.npft.spec", source.spec, V.STRING, None),
        ("general.source.npft.kind", source.kind, V.STRING, None),
        ("general.npft.tool", made["general.npft.tool"], V.STRING, None),
        ("general.npft.method", provenance.get("method", "rtn"), V.STRING, None),
        ("general.npft.settings", made["general.npft.settings"], V.STRING, None),
    ]
    items += hparams(source)
    items += [(f.key, f.value, f.vtype, f.sub_type) for f in source.tokenizer_fields()]
    if settings.imatrix is not None:  # the keys llama-quantize --imatrix adds
        from .imatrix import quantize_metadata

        items += [(k, v, vt, None) for k, v, vt in quantize_metadata(settings.imatrix)]
    return items


def made_by(settings: ExportSettings, provenance: dict) -> dict[str, str]:
    """The keys that say what wrote a file and how: the tool's version, and the export settings
    with the caller's provenance (for the run directory's references, the source's fingerprint)."""
    return {"general.npft.tool": f"npft-gguf {__version__}",
            "general.npft.settings": json.dumps({**asdict(settings), **provenance}, sort_keys=True, default=str)}


def written_as(path: Path, settings: ExportSettings, provenance: dict) -> bool:
    """Whether `path` is a complete GGUF file this version wrote with these settings and provenance
    (its record may say more, as a file llama.cpp quantized from our F32 export does), so that
    writing it again would give the same file; False for anything else, unreadable included."""
    from .gguf_header import read_header

    try:
        fields = read_header(path).fields
        tool, recorded = fields["general.npft.tool"].value, json.loads(fields["general.npft.settings"].value)
    except Exception:  # noqa: BLE001 - absent, torn, foreign or unrecorded: not reusable, whatever the reason
        return False
    wanted = json.loads(made_by(settings, provenance)["general.npft.settings"])
    return tool == f"npft-gguf {__version__}" and all(k in recorded and recorded[k] == v for k, v in wanted.items())


def hparams(source: Source) -> list[tuple[str, object, V, V | None]]:
    """The family's `<arch>.*` keys, as its typed GGUFWriter calls write them (recorded on a
    writer with no file, so the plan holds them before anything is opened)."""
    rec = GGUFWriter(None, source.arch.name)
    source.arch.write_hparams(rec, source.config)
    return [(k, v.value, v.type, v.sub_type) for k, v in rec.kv_data[0].items() if k != "general.architecture"]


def _packed(source: Source, t: PlannedTensor) -> np.ndarray:
    """One tensor's GGUF bytes: llama.cpp's own quantizer (ggml_quantize_chunk with the tensor's
    imatrix entry, on every core) for the quantized types, our float conversions for f32/f16/bf16.
    A 2-D weight whose rows keep their order streams from the source in row chunks, so it is never
    whole in memory as floats; q/k projections (rows reordered within heads) and 1-D tensors are
    loaded whole, and freed on return, before the next one is loaded. Every value is checked to be
    finite on the way."""
    from .llamacpp import GgmlQuantizer

    kind = t.choice.type
    packer = get_grid(kind) if kind in ("f32", "f16", "bf16") else GgmlQuantizer(kind, t.qw)
    if t.hf_name is None:
        import torch

        return packer.pack(torch.from_numpy(np.ascontiguousarray(t.data)))
    if len(t.shape) == 2 and not source.arch.permutes(t.hf_name):
        chunks = source.row_chunks(t.hf_name, packer.chunk_rows(t.shape[1]) * (1 if kind in ("f32", "f16", "bf16") else 4))
        data = packer.pack_rows(_finite(source, t.hf_name, chunks), t.shape)
    else:
        (w,) = _finite(source, t.hf_name, [source.load(t.hf_name)])
        data = packer.pack(source.arch.to_gguf_layout(t.hf_name, w, source.config))
    assert data.nbytes == t.nbytes, (t.name, data.nbytes, t.nbytes)
    return data


def _finite(source: Source, name: str, chunks):
    """The chunks of one tensor, each checked for NaN and infinity on the way (llama.cpp would
    compute garbage with them); the error names the tensor and its first bad row."""
    import torch

    row = 0
    for c in chunks:
        ok = torch.isfinite(c)
        if not bool(ok.all()):
            at = f" (row {row + int((~ok).reshape(len(c), -1).any(1).nonzero()[0])})" if c.ndim > 1 else ""
            error = UsageError if getattr(source, "kind", "") in ("hf", "meta", "gguf") else NpftError
            raise error(f"tensor {name} of {source.spec} holds NaN or infinite values{at}; nothing was written")
        row += len(c) if c.ndim else 0
        yield c


@contextmanager
def _one_torch_thread():
    """Grid.pack runs many small elementwise ops on cache-sized chunks: one thread is faster there
    than torch's thread pool, which also stalls badly when another process holds a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Prepared:
    """What an export writes, settled from headers alone before any tensor is read."""
    settings: ExportSettings
    tensors: list[PlannedTensor]
    meta: list


def prepare(source: Source, settings: ExportSettings, provenance: dict | None = None) -> Prepared:
    """Plan and metadata (every check that needs no tensor data), with the fallback warnings."""
    tensors = plan(source, settings)
    meta = metadata(source, settings, provenance or {})
    by_note: dict[str, list[str]] = {}
    for t in tensors:
        if t.choice.note.startswith("rows of"):  # a fallback; the mix's own choices are no surprise
            by_note.setdefault(t.choice.note, []).append(t.name)
    for note, names in by_note.items():  # one line per reason, however many layers it concerns
        which = names[0] if len(names) == 1 else f"{len(names)} tensors ({names[0]} ... {names[-1]})"
        print(f"warning: {which}: {note}", file=sys.stderr)
    return Prepared(settings, tensors, meta)


def write(source: Source, path: Path, job: Prepared, progress: bool = True) -> None:
    """Write the prepared file at `path` as it is (callers make it atomic); the file is closed
    however this ends."""
    writer = GGUFWriter(path, source.arch.name)
    try:
        for key, value, vtype, sub in job.meta:
            if key not in writer.kv_data[0]:
                writer.add_key_value(key, value, vtype, sub)
        for t in job.tensors:
            g = t.choice
            dtype = {"f32": np.float32, "f16": np.float16}.get(g.type, np.uint8)
            byte_shape = t.shape if dtype is not np.uint8 else (*t.shape[:-1], t.shape[-1] // g.block * g.block_bytes)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(dtype), t.nbytes, raw_dtype=None if dtype is not np.uint8 else g.ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _one_torch_thread():
            for t in bar(job.tensors, desc=f"export {job.settings.type}", unit="tensor", disable=not progress):
                writer.write_tensor_data(_packed(source, t))
                pause_for_tests("export:tensor")
        writer.close()
    except BaseException:
        for f in writer.fout or ():  # closed even when its last flush fails (a full disk)
            with suppress(OSError):
                f.close()
        raise


def export(source: Source, out: Path, settings: ExportSettings, force: bool = False,
           provenance: dict | None = None, progress: bool = True) -> ExportReport:
    """Write `source` as a GGUF file at `out` (atomically). Returns what was written."""
    out = Path(out)
    job = prepare(source, settings, provenance)
    with atomic_output(out, force) as tmp:
        write(source, tmp, job, progress)
    report = ExportReport(str(out), settings.type, settings.pure, len(job.tensors), out.stat().st_size)
    for t in job.tensors:
        report.types[t.choice.type] = report.types.get(t.choice.type, 0) + 1
        if t.choice.note:
            report.fallbacks[t.name] = t.choice.note
    return report
