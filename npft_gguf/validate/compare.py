"""Side-by-side report of GGUF files: size, type mix, perplexity, KLD against a reference, speed."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

from ..inspect import inspect
from .bench import BenchSettings, bench
from .models import LlamaCppBackend
from .perplexity import EvalSettings, evaluate
from .reference import logits_bytes, recorded

COLUMNS = ["file", "type mix", "size MB", "bits/weight", "PPL", "delta-PPL %", "mean KLD", "same top-1 %", "pp t/s", "tg t/s"]


def machine_label() -> str:
    """The machine a report was measured on, as reports print it."""
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def compare(files: list[Path], ref: Path, text: str, text_name: str, settings: EvalSettings,
            bench_settings: BenchSettings | None, threads: int | None = None, progress: bool = True,
            n_gpu_layers: int = 0, flash_attn: bool = False, log=None) -> dict:
    """Every file against `ref` on the same windows of `text`. The reference is decoded once per
    window: its logits are recorded on the first pass and replayed for every file (reference.py),
    up to the record's disk budget; where they will not all fit, `log` hears so before the first
    pass, and the windows past the budget are decoded again for each file."""
    def backend(f):
        return LlamaCppBackend(f, settings.ctx, threads, n_gpu_layers, flash_attn)

    with recorded(backend(ref)) as ref_backend:
        others = [f for f in files if Path(f) != Path(ref)]
        n = len(ref_backend.tokenize(text)) // settings.ctx
        need = logits_bytes(min(n, settings.chunks or n), settings.ctx, ref_backend.n_vocab)
        short = ref_backend.shortfall(need) if others else None
        if short and log is not None:
            log(f"note: {short}; the reference runs again for each of the {len(others)} files on the windows past that")
        report = _compare(files, ref, ref_backend, text, text_name, settings, bench_settings, backend, progress)
        report["reference"] = {"logits_bytes": need, "recorded_bytes": ref_backend.recorded, "decodes": ref_backend.computed,
                               "replayed": ref_backend.replayed, "shortfall": short}
        return report


def _compare(files, ref, ref_backend, text, text_name, settings, bench_settings, backend, progress) -> dict:
    ref_result = evaluate(ref_backend, text, text_name, settings, progress=progress)
    rows = []
    for f in [ref, *[f for f in files if Path(f) != Path(ref)]]:
        info = inspect(f)
        if Path(f) == Path(ref):
            r = ref_result
            kld = {"mean": 0.0, "same_top1_pct": 100.0}
        else:
            r = evaluate(backend(f), text, text_name, settings, ref=ref_backend, progress=progress)
            kld = r.kld
        speed = bench(f, bench_settings, progress=progress).summary() if bench_settings else {"pp": None, "tg": None}
        rows.append({
            "file": str(f), "types": {k: v["tensors"] for k, v in info["types"].items()},
            "size_mb": info["file_size_bytes"] / 1e6, "bits_per_weight": info["bits_per_weight"],
            "ppl": r.ppl, "ppl_se": r.ppl_se, "delta_ppl_pct": 100.0 * (r.ppl / ref_result.ppl - 1.0),
            "kld_mean": kld["mean"], "same_top1_pct": kld["same_top1_pct"], "kld": r.kld,
            "pp_tps": speed["pp"]["mean"] if speed["pp"] else None, "tg_tps": speed["tg"]["mean"] if speed["tg"] else None,
            "eval_settings": r.settings,
        })
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_label(),
        "text": text_name, "ctx": settings.ctx, "chunks": ref_result.chunks, "ref": str(ref), "rows": rows,
        "bench": bench_settings.__dict__ if bench_settings else None,
    }


def markdown(report: dict) -> str:
    def mix(types):
        return ", ".join(f"{k.lower()} x{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    b = report["bench"] or {}
    lines = [
        f"Reference {report['ref']}; text {report['text']}, ctx {report['ctx']}, {report['chunks']} chunks; "
        f"bench pp{b.get('pp', '-')} / tg{b.get('tg', '-')}; {report['date']}, {report['machine']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in report["rows"]:
        lines.append("| " + " | ".join([
            Path(r["file"]).name, mix(r["types"]), f"{r['size_mb']:.1f}", f"{r['bits_per_weight']:.2f}",
            f"{r['ppl']:.4f} ± {r['ppl_se']:.4f}", f"{r['delta_ppl_pct']:+.2f}", f"{r['kld_mean']:.5f}",
            f"{r['same_top1_pct']:.2f}", num(r["pp_tps"], ".1f"), num(r["tg_tps"], ".1f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        ax.errorbar(r["size_mb"], r["ppl"], yerr=r["ppl_se"], fmt="o", capsize=3)
        ax.annotate(Path(r["file"]).stem, (r["size_mb"], r["ppl"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"perplexity ({report['text'].split(' ')[0]}, ctx {report['ctx']})")
    ax.set_title("perplexity against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def outputs(md_path: Path, plot_path: Path | None) -> list[Path]:
    """What `write` writes: the Markdown report, its JSON beside it, and the plot if asked for."""
    return [Path(md_path), Path(md_path).with_suffix(".json"), *([Path(plot_path)] if plot_path else [])]


def write(report: dict, md_path: Path, plot_path: Path | None, force: bool = False) -> None:
    from ..atomic import atomic_output, check_target

    for path in outputs(md_path, plot_path):  # all or none: no report beside a plot that cannot be written
        check_target(path, force)
    with atomic_output(md_path, force=force) as tmp:
        tmp.write_text(markdown(report))
    with atomic_output(md_path.with_suffix(".json"), force=force) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    if plot_path:
        with atomic_output(plot_path, force=force) as tmp:
            plot(report, tmp.with_suffix(".png") if tmp.suffix != ".png" else tmp)
            if tmp.suffix != ".png":
                tmp.with_suffix(".png").replace(tmp)
