"""llama.cpp's importance matrix: collected in torch, stored in llama-imatrix's GGUF format.

For every decoder linear the importance matrix holds, per input column j, the sum over calibration
tokens of x_j^2 (the squared activation entering the matrix) and the number of tokens; the mean,
sum / count, is what llama-quantize weighs each weight's rounding error by (llama.cpp's quantizer, llamacpp.GgmlQuantizer).

Collection follows llama-imatrix: the text is tokenized (BOS first when the vocabulary adds one),
cut into consecutive windows of `ctx` tokens (the last partial one dropped; at least two needed),
each window's first token replaced by BOS where the vocabulary adds it, and every token of every
window is counted. These are the windows `npft-gguf eval` and llama-perplexity use. The float
model runs in torch; forward pre-hooks add each linear's input squares up in float64.

The file is what llama.cpp's llama-imatrix writes by default (a GGUF file, tools/imatrix):
general.type = "imatrix", imatrix.datasets (strings), imatrix.chunk_count and imatrix.chunk_size
(u32), and per weight, in name order, `<GGUF tensor name>.in_sum2` (F32, ne = [n_cols, n_mat]) and
`<name>.counts` (F32, ne = [1, n_mat]). `read_imatrix` reads that and llama-imatrix's older .dat
format (sums pre-divided, one call count per entry).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .choices import TUNED_WITH_IMATRIX as IMATRIX_TYPES  # noqa: F401 - what npft+imatrix tunes for (convert.py)
from .errors import UsageError

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Entry:
    sums: np.ndarray    # float32 (n_mat, n_cols): sum over tokens of x^2, per input column
    counts: np.ndarray  # float32 (n_mat,): tokens counted


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # GGUF tensor name -> entry
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are already means times the call count

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def weights(self, name: str) -> np.ndarray | None:
        """The per-column importance llama-quantize passes to the quantizer for tensor `name`
        (float32, (n_mat * n_cols,)): sums / round(count) in float32, 1 where nothing was counted;
        None when the file has no entry for it."""
        e = self.entries.get(name)
        if e is None:
            return None
        sums = e.sums.astype(np.float32, copy=False)
        if self.legacy:
            n = float(e.counts[0]) if e.counts.size else 0.0
            return (sums / np.float32(n) if n > 0 else sums).reshape(-1)
        out = np.ones_like(sums)
        for j, c in enumerate(e.counts):
            count = np.float32(_lround(float(c)))
            if count > 0:
                out[j] = sums[j] / count
        return out.reshape(-1)

    def summary(self) -> dict:
        tokens = max((float(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0.0)
        return {"entries": len(self.entries), "chunk_count": self.chunk_count, "chunk_size": self.chunk_size,
                "tokens": int(tokens), "datasets": list(self.datasets)}


def _lround(x: float) -> int:
    """C's lround: half away from zero."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


# --- the file --------------------------------------------------------------------------------------

def write_imatrix(path: Path, im: Imatrix, force: bool = False) -> Path:
    """Write `im` as llama-imatrix's GGUF file at `path` (atomically)."""
    from gguf import GGUFWriter

    from .atomic import atomic_output

    path = Path(path)
    with atomic_output(path, force) as tmp:
        w = GGUFWriter(tmp, "")
        w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
        w.add_type("imatrix")
        w.add_array(KV_DATASETS, list(im.datasets))
        w.add_uint32(KV_CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(KV_CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.entries):
            e = im.entries[name]
            sums = np.ascontiguousarray(e.sums, np.float32).reshape(len(e.counts), -1)
            w.add_tensor(name + SUMS, sums)
            w.add_tensor(name + COUNTS, np.ascontiguousarray(e.counts, np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: Path) -> Imatrix:
    """An importance matrix from llama-imatrix's GGUF file (ours too) or its legacy .dat file, its
    shapes and values checked (check_values): every command that reads one reads it here."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"imatrix {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        im = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - struct/ValueError/IndexError from a damaged file
        raise UsageError(f"{path} is not a readable imatrix file ({type(e).__name__}: {e}); "
                         "make one with `npft-gguf imatrix` or llama-imatrix") from None
    check_values(path, im)
    return im


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    r = GGUFReader(path)

    def value(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    for key in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE):
        if key not in r.fields:  # llama-quantize refuses such a file too
            raise UsageError(f"{path} has no {key}: not an imatrix file (llama-quantize would refuse it)")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise UsageError(f"{path}: tensor {t.name} is {t.tensor_type.name}; imatrix sums and counts are F32")
        ne = [int(d) for d in t.shape]  # GGUF order: ne[0] values per matrix, then the matrices
        if 0 in ne:
            raise UsageError(f"{path}: tensor {t.name} is empty (ne {ne}); the file is damaged: compute it again")
        data = np.array(t.data, np.float32).reshape(math.prod(ne[1:]), ne[0])
        if t.name.endswith(SUMS):
            sums[t.name[: -len(SUMS)]] = data
        elif t.name.endswith(COUNTS):
            if ne[0] != 1:
                raise UsageError(f"{path}: tensor {t.name} has ne {ne}; counts are one per matrix (ne [1, n_mat])")
            counts[t.name[: -len(COUNTS)]] = data.reshape(-1)
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise UsageError(f"{path}: {odd} has sums without counts or counts without sums")
    if not sums:
        raise UsageError(f"{path} holds no imatrix entries")
    for n in sums:
        if len(sums[n]) != len(counts[n]):
            raise UsageError(f"{path}: {n} has sums for {len(sums[n])} matrices and counts for {len(counts[n])}; "
                             "the file is damaged: compute it again")
    entries = {n: Entry(sums[n], counts[n]) for n in sums}
    return Imatrix(entries, [str(d) for d in value(KV_DATASETS, [])], int(value(KV_CHUNK_COUNT, 0)),
                   int(value(KV_CHUNK_SIZE, 0)))


def _read_dat(path: Path) -> Imatrix:
    """llama-imatrix --output-format dat: n, then per entry name, ncall, nval, values; then optionally
    the chunk count and the dataset name."""
    buf = path.read_bytes()
    at = 0

    def take(fmt):
        nonlocal at
        v = struct.unpack_from(fmt, buf, at)
        at += struct.calcsize(fmt)
        return v

    (n,) = take("<i")
    if n < 1:
        raise UsageError(f"{path} holds no imatrix entries")
    im = Imatrix(legacy=True)
    for _ in range(n):
        (length,) = take("<i")
        name = buf[at:at + length].decode("utf-8")
        at += length
        ncall, nval = take("<ii")
        if nval < 1:  # numpy would read the rest of the file for -1
            raise UsageError(f"{path}: the entry for {name} holds {nval} values; the file is damaged: compute it again")
        vals = np.frombuffer(buf, np.float32, nval, at).copy()
        at += 4 * nval
        im.entries[name] = Entry(vals.reshape(1, -1), np.array([ncall], np.float32))
    if at + 4 <= len(buf):
        (im.chunk_count,) = take("<i")
        if at + 4 <= len(buf):
            (length,) = take("<i")
            if length > 0:
                im.datasets.append(buf[at:at + length].decode("utf-8", "replace"))
    return im


def check_values(path, im: Imatrix) -> None:
    """Refuse what would make llama.cpp's quantizer write NaN scales or weigh by garbage: sums of
    squares and token counts are finite and non-negative; a matrix with no tokens counted has
    nothing summed (llama.cpp then uses 1 for it, as `weights` does); something was counted. The
    first bad entry, in file order, is named."""
    what = "value" if im.legacy else "sum"
    for name, e in im.entries.items():
        n_mat = len(e.counts)
        for label, a in ((what, e.sums), ("count", e.counts.reshape(-1, 1))):
            bad = np.argwhere(~np.isfinite(a) | (a < 0))
            if len(bad):
                mat, col = bad[0]
                at = (f" at column {col}" if label != "count" else "") + (f" of matrix {mat}" if n_mat > 1 else "")
                raise UsageError(f"imatrix {path}: the entry for {name} has {label} {a[mat, col]}{at}; sums of squared "
                                 "activations and token counts are finite and not negative: the file is damaged, compute it again")
        if not im.legacy:
            idle = np.flatnonzero((e.counts == 0) & e.sums.any(axis=-1))
            if idle.size:
                raise UsageError(f"imatrix {path}: the entry for {name} counts 0 tokens but has non-zero sums"
                                 + (f" (matrix {idle[0]})" if n_mat > 1 else "") + "; the file is damaged: compute it again")
    if not im.legacy and not any(e.counts.any() for e in im.entries.values()):
        raise UsageError(f"imatrix {path} counts no tokens in any entry: it holds no importance; compute it again")


# --- collection ----------------------------------------------------------------------------------

class Collector:
    """Forward pre-hooks on the decoder linears that add up, per input column, x^2 over tokens."""

    def __init__(self, model, arch):
        import torch

        from .sensitivity import target_linears

        self.names: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        self.counting = True  # off: a pass that only keeps a sharded run's processes in step
        for hf, mod in target_linears(model).items():
            name = arch.gguf_name(hf + ".weight")
            if name is None:
                continue
            self.names[hf] = name
            self.sums[name] = torch.zeros(mod.in_features, dtype=torch.float64, device=mod.weight.device)
            self.counts[name] = 0
            self._hooks.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_mod, args):
            if not self.counting:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(self.sums[name].dtype)
            self.sums[name].add_((x * x).sum(0))
            self.counts[name] += x.shape[0]
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def result(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        entries = {n: Entry(self.sums[n].cpu().numpy().astype(np.float32).reshape(1, -1),
                            np.array([self.counts[n]], np.float32)) for n in sorted(self.sums)}
        return Imatrix(entries, datasets, chunk_count, chunk_size)


def collect(model, arch, windows, datasets: list[str], batch: int = 1, progress: bool = True) -> Imatrix:
    """The importance matrix of `model` over `windows` (LongTensor (n, ctx), or a list of equal-length
    token lists), every token counted; chunk size = the window length. Several processes: each runs
    its share of the windows, and the sums and counts are added over them (distributed.py). The
    model may be sharded (FSDP2, distributed.shard): the hooks read the linears' inputs, not their
    weights; every process then runs as many forwards as the one with the most windows (each forward
    gathers the layers with every process), the extra ones counted by none."""
    import torch

    from . import distributed
    from .progress import bar
    from .sensitivity import is_sharded

    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise UsageError("imatrix collection needs at least one window of tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    col = Collector(model, arch)
    if not col.sums:
        col.remove()
        raise UsageError("the model has no decoder linears to collect an importance matrix for")
    mine = windows[distributed.share(len(windows))]
    sharded = any(is_sharded(p) for p in model.parameters())
    most = math.ceil(len(windows) / distributed.world()) if sharded else len(mine)  # windows of the busiest process
    passes = math.ceil(most / batch)
    try:
        with torch.no_grad():
            for i in bar(range(passes), desc="imatrix", unit="batch", disable=not progress):
                x = mine[i * batch:(i + 1) * batch]
                col.counting = len(x) > 0
                x = x if len(x) else windows[:1]  # sharded, a process past its share: in step, not counted
                model(input_ids=x.to(device), use_cache=False, logits_to_keep=1)  # no logits needed
    finally:
        col.remove()
        model.train(was_training)
    if distributed.active():
        names = sorted(col.sums)
        counts = torch.tensor([col.counts[n] for n in names], dtype=torch.float64, device=col.sums[names[0]].device)
        distributed.all_reduce_sum([col.sums[n] for n in names] + [counts])
        col.counts = {n: int(c) for n, c in zip(names, counts.tolist())}
    return col.result(datasets, int(windows.shape[0]), int(windows.shape[1]))


@dataclass(frozen=True)
class ImatrixSettings:
    calib: str = "wiki"
    ctx: int = 512
    chunks: int | None = None  # None: every window of the text, as llama-imatrix
    batch: int = 1


def text_windows(source, text: str, ctx: int, chunks: int | None) -> list[list[int]]:
    """llama-imatrix's windows of `text` (those of llama-perplexity, validate.perplexity.windows),
    from `source`'s tokenizer and config: a text too short for them fails before the model loads."""
    from .validate.models import TokenizerBackend
    from .validate.perplexity import EvalSettings, windows

    vocab = TokenizerBackend(source.tokenizer(), source.config, label="imatrix")
    return windows(vocab.tokenize(text), vocab, EvalSettings(ctx=ctx, chunks=chunks))


def compute_imatrix(source, settings: ImatrixSettings, device: str = "cpu", progress: bool = True,
                    text: str | None = None) -> Imatrix:
    """The importance matrix of `source`'s float model on its calibration text (settings.calib,
    or `text` when given), chunked as llama-imatrix does; the windows are cut before the model loads."""
    import torch

    from .calib import calibration_text

    body = calibration_text(settings.calib) if text is None else text
    wins = text_windows(source, body, settings.ctx, settings.chunks)
    model = source.load_model(dtype=torch.float32, device=device)
    return collect(model, source.arch, wins, [settings.calib], batch=settings.batch, progress=progress)


# --- export with an imatrix ----------------------------------------------------------------------

@lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int) -> Imatrix:
    return read_imatrix(Path(path))


def load_imatrix(path) -> Imatrix:
    """read_imatrix, once per file version (an export's plan and metadata both ask)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"imatrix {p}: no such file")
    st = p.stat()
    return _cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def check_widths(path, im: Imatrix, widths: dict[str, int]) -> set[str]:
    """llama-quantize's rule for an imatrix against a model, given each matrix's GGUF name and row
    length (from headers, before any weight is read): an entry naming a matrix must be as wide as
    its rows (token_embd excepted: llama.cpp then quantizes it without one), and some entry must
    name one. Returns the names whose entry applies."""
    used = set()
    for name, width in widths.items():
        e = im.entries.get(name)
        if e is None:
            continue
        if e.sums.size != width:  # what `weights` gives llama.cpp: n_mat x n_cols values
            if name == "token_embd.weight":
                continue
            raise UsageError(f"imatrix {path}: the entry for {name} has {e.sums.size} columns, the tensor {width}; "
                             "was it made for another model?")
        used.add(name)
    if not used:
        raise UsageError(f"imatrix {path} has no entry for any of the {len(widths)} matrices here "
                         f"(it names {', '.join(sorted(im.entries)[:2])}, ...); was it made for another model?")
    return used


def row_lengths(source) -> dict[str, int]:
    """GGUF name -> row length of each matrix of `source`, from its config and header alone."""
    out = {}
    for hf, dims in source.shapes().items():
        name = source.arch.gguf_name(hf)
        if name is not None and len(dims) == 2:
            out[name] = dims[-1]
    return out


def check_imatrix_for(path, source) -> Imatrix:
    """The imatrix at `path`, read, checked and matched against `source`'s matrices before any
    weight is loaded."""
    im = load_imatrix(path)
    check_widths(path, im, row_lengths(source))
    return im


def tuning_quantizers(path, grid_name: str, linears: dict, arch, config) -> dict:
    """HF linear name -> the function NPFT's rtn noise quantizes that linear's merged weight with,
    so that the tuning meets the error of the file that will be written as `grid_name`, tensor by
    tensor: the type the writer gives the tensor and the rule that writes it, both from
    grids/mix.py (choose, tuning_rule), with the linear's entry of the imatrix at `path` (None: a
    file written without one). `grid_name` is a file type: a grid, or a mix (q4_k_m). A linear left out
    of the result is quantized by the RTN of the type's base grid (q4_k_m: q4_k), which is then what
    llama.cpp writes."""
    from .choices import base_type
    from .grids.mix import ModelShape, choose, tuning_rule

    plain = base_type(grid_name)  # what the noise rounds to for a linear left out
    im = load_imatrix(path) if path else None
    shape = ModelShape.of(config, getattr(arch, "name", ""))
    gguf_names = {name: arch.gguf_name(name + ".weight") for name in linears}
    used = set() if im is None else check_widths(
        path, im, {g: linears[name].in_features for name, g in gguf_names.items() if g is not None})
    out = {}
    for name, lin in linears.items():
        gguf = gguf_names[name]
        if gguf is None:
            continue
        kind = choose(grid_name, gguf, (lin.out_features, lin.in_features), shape, imatrix=im is not None).type
        rule = tuning_rule(kind, im.weights(gguf) if gguf in used else None, plain=plain)
        if rule is not None:
            out[name] = rule
    return out


def attach_entries(tensors, path) -> None:
    """Give each planned tensor (writer.PlannedTensor) its entry of the imatrix at `path`, as
    llama-quantize --imatrix passes it to ggml_quantize_chunk: where the file has the tensor (its
    width must match, except token_embd's, which llama.cpp then quantizes without one). Types that
    ignore an imatrix (Q8_0, floats) ignore it here too."""
    im = load_imatrix(path)
    used = check_widths(path, im, {t.name: t.shape[-1] for t in tensors if len(t.shape) == 2})
    for t in tensors:
        if t.name in used and t.choice.type not in ("f32", "f16", "bf16"):
            t.qw = im.weights(t.name)


def quantize_metadata(path) -> list[tuple]:
    """The keys llama-quantize adds when given an imatrix: (key, value, GGUFValueType)."""
    from gguf import GGUFValueType as V

    im = load_imatrix(path)
    items = [("quantize.imatrix.file", str(path), V.STRING)]
    if im.datasets:
        items.append(("quantize.imatrix.dataset", im.datasets[0], V.STRING))
    items.append(("quantize.imatrix.entries_count", len(im), V.INT32))
    if im.chunk_count > 0:
        items.append(("quantize.imatrix.chunks_count", int(im.chunk_count), V.INT32))
    return items


# --- convert --method imatrix / npft+imatrix --------------------------------------------------------

def calibration_imatrix(plan, progress: bool = True, log=print) -> tuple[Path, dict]:
    """The importance matrix of the float (untuned) model on the run's calibration segments (the
    same tokens NPFT tunes on; every token of every segment counted, no BOS inserted), written to
    <run dir>/imatrix.gguf. Returns the path and what the run record says about it."""
    import gc

    from . import distributed
    from .calib import load_calibration
    from .convert import tuning_dtype

    # in the tuning's precision, so that the default method needs no more memory than the tuning
    # itself; the sums are float64 either way. --shard (several processes): sharded as the tuning is
    # (FSDP2, loaded on rank 0's CPU alone, each process's GPU holding 1/N of the weights)
    shard = plan.npft is not None and plan.npft.shard
    model = distributed.load(plan.source, tuning_dtype(plan.device), plan.device, shard)
    tokens = plan.tokens
    if tokens is None:  # --calib self: the same seeded sample the tuning draws from this model (rank 0's)
        tokens = distributed.from_main(load_calibration, plan.calib, plan.source.tokenizer(), model=model, progress=progress)
    if distributed.sharding(shard):
        model = distributed.shard(model.get_decoder().layers, model)
    log(f"imatrix: llama.cpp's importance matrix of the float model on {tokens.shape[0]} x {tokens.shape[1]} calibration tokens")
    im = collect(model, plan.source.arch, tokens, [plan.calib.calib], progress=progress)
    del model
    gc.collect()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / "imatrix.gguf"
    distributed.on_main(write_imatrix, path, im, force=True)  # every process holds the summed matrix
    info = {"file": str(path), "computed_on": "the float (untuned) model", "tokens": f"{tokens.shape[0]} x {tokens.shape[1]}",
            "calibration": plan.calib.calib, "entries": len(im),
            "weights": "NPFT-tuned and merged" if plan.npft is not None else "untuned",
            "rules": "llama.cpp's importance-weighted quantization (llama-quantize --imatrix)"}
    if plan.npft is not None and plan.npft.imatrix:
        info["tuned_against"] = "these rules: the rtn noise was the error of this imatrix's quantization"
    return path, info


def imatrix_note(info: dict) -> str:
    """One paragraph for the run report: which weights, which imatrix, which rules."""
    return (f"Quantizer: {info['rules']}, applied to the {info['weights']} weights; the importance matrix was computed "
            f"on {info['computed_on']} over the same {info['tokens']} calibration tokens ({info['calibration']}; "
            f"{info['entries']} entries, {info['file']})"
            + (f"; the tuning was run against {info['tuned_against']}" if info.get("tuned_against") else "") + ".\n")
