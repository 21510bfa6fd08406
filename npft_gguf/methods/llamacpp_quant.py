"""llama.cpp's own quantizer as a peer: our F32 export, then `llama_model_quantize` on it.

This is what GGUF users run today (llama-quantize), including the K-quant mixes (Q4_K_M, ...)
whose scales llama.cpp chooses by search and whose per-tensor types it picks itself. No
importance matrix is used, so the types that require one (IQ1/IQ2) are not offered.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_output, temporary
from ..signals import pause_for_tests
from ..writer import ExportReport, ExportSettings, prepare, write

# llama.cpp file types that need no importance matrix; our RTN names for K-quants map to the _S mixes
LLAMACPP_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs", "q2_k", "q3_k_s",
                  "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")
ALIASES = {"q3_k": "q3_k_s", "q4_k": "q4_k_s", "q5_k": "q5_k_s"}


def export_llamacpp(source, out: Path, type_name: str, pure: bool = False, force: bool = False,
                    progress: bool = True, imatrix: Path | None = None, provenance_extra: dict | None = None) -> ExportReport:
    """Write `source` at `out` quantized by llama.cpp to `type_name` (atomically): F32 first, in a
    temporary file beside `out` (`.NAME.npft-PID.f32`), removed afterwards however the run ends.
    `imatrix`: an importance matrix file, used as llama-quantize --imatrix uses it; `provenance_extra`:
    more of what made the file, recorded in its general.npft.settings (llama.cpp keeps the F32 file's keys)."""
    from .. import llamacpp
    from ..errors import UsageError

    ftype = ALIASES.get(type_name.lower(), type_name.lower())
    if ftype not in LLAMACPP_TYPES:
        raise UsageError(f"llama.cpp's quantizer has no type {type_name!r} here; choose one of: {', '.join(LLAMACPP_TYPES)}")
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
