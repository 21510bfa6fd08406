"""llama.cpp's own quantizer as a peer: our F32 export, then `llama_model_quantize` on it.

This is what GGUF users run today (llama-quantize), including the K-quant mixes (Q4_K_M, ...)
whose scales llama.cpp chooses by search and whose per-tensor types it picks itself. Our own
writer writes the same bytes for the file types it has a table for (grids/mix.py); this path is
the reference for them and the only writer of the rest (choices.FILE_TYPES, written=False).
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_output, temporary
from ..signals import pause_for_tests
from ..writer import ExportReport, ExportSettings, prepare, write



def export_llamacpp(source, out: Path, type_name: str, pure: bool = False, force: bool = False,
                    progress: bool = True, imatrix: Path | None = None, provenance_extra: dict | None = None) -> ExportReport:
    """Write `source` at `out` quantized by llama.cpp to `type_name` (atomically): F32 first, in a
    temporary file beside `out` (`.NAME.npft-PID.f32`), removed afterwards however the run ends.
    `imatrix`: an importance matrix file, used as llama-quantize --imatrix uses it; `provenance_extra`:
    more of what made the file, recorded in its general.npft.settings (llama.cpp keeps the F32 file's keys)."""
    from .. import llamacpp
    from ..choices import EXPORT_TYPES, canonical_type
    from ..errors import UsageError

    ftype = canonical_type(type_name)
    if ftype is None or ftype == "f32":  # llama_model_quantize has no all-f32 target
        raise UsageError(f"llama.cpp's quantizer has no type {type_name!r} here; choose one of: "
                         f"{', '.join(t for t in EXPORT_TYPES if t != 'f32')}")
    out = Path(out)
    provenance = {"method": f"llama.cpp:{ftype}", "quantizer": "llama_model_quantize (no imatrix), from an f32 export"}
    weights = None
    if imatrix is not None:
        from ..imatrix import check_imatrix_for

        im = check_imatrix_for(imatrix, source)  # its values, and its widths against the source's header
        weights = {name: im.weights(name) for name in im.entries}
        provenance["quantizer"] = f"llama_model_quantize with the imatrix {imatrix}, from an f32 export"
    job = prepare(source, ExportSettings("f32"), {**provenance, **(provenance_extra or {})})  # every check from headers, before any write
    with atomic_output(out, force) as tmp, temporary(out, "f32") as f32:
        write(source, f32, job, progress)
        pause_for_tests("llamacpp:quantize")
        llamacpp.quantize(f32, tmp, ftype, pure=pure, imatrix=weights)
    return _report(out, ftype, pure)


def _report(path: Path, ftype: str, pure: bool) -> ExportReport:
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    report = ExportReport(str(path), ftype, pure, len(tensors), path.stat().st_size)
    for t in tensors:
        name = t.tensor_type.name.lower()
        report.types[name] = report.types.get(name, 0) + 1
    return report
