"""The run report: what was tuned, how, what it cost, and whether the curvature at the outliers
went down (JSON for scripts, Markdown for people)."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_output


def write_report(data: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    js, md = out_dir / "report.json", out_dir / "report.md"
    with atomic_output(js, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    with atomic_output(md, force=True) as tmp:
        tmp.write_text(markdown(data))
    return js, md


def markdown(d: dict) -> str:
    t = d.get("tune", {})
    lines = [f"# NPFT run: {d.get('source', '?')}", ""]
    lines += [f"- tool: npft-gguf {d.get('version', '?')}, device {t.get('device', '?')}, {d.get('date', '')}",
              f"- calibration: {d.get('calibration', {})}",
              f"- wall time: {t.get('seconds', 0):.0f} s; peak memory: "
              + ", ".join(f"{k} {v:.0f} MiB" for k, v in t.get("peak_memory_mb", {}).items()), ""]
    if t.get("resumed_at_epoch") is not None:
        lines += [f"Resumed after epoch {t['resumed_at_epoch']}.", ""]
    if t.get("losses"):
        lines += ["## Losses", "", "| stage | loss |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in t["losses"].items()]
        lines += [""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in t.get("settings", {}).items()]
    b, a = t.get("trace_before"), t.get("trace_after")
    if b and a:
        from .hessian import paired_change

        pc = paired_change(b, a)
        change = 100.0 * pc["diff"] / abs(b["trace"]) if b["trace"] else float("nan")
        lines += ["", "## Hessian trace at the outliers (Hutchinson)", "",
                  f"{b['n']} estimates ({b['samples']} samples x {b['probes']} Rademacher probes), the same before and after.", "",
                  "| | Tr(H_outliers) | std. error |", "|---|---|---|",
                  f"| before | {b['trace']:.4g} | {b['se']:.2g} |", f"| after | {a['trace']:.4g} | {a['se']:.2g} |",
                  f"| change (paired) | {pc['diff']:+.4g} ({change:+.1f} %) | {pc['se']:.2g} |"]
    hist = t.get("history", [])
    if hist:
        lines += ["", "## Loss", "", "| step | epoch | L(W+z+BA) | L(W+BA) | lr |", "|---|---|---|---|---|"]
        every = max(1, len(hist) // 20)
        for r in hist[::every] + ([hist[-1]] if (len(hist) - 1) % every else []):
            clean = "" if r["loss_clean"] is None else f"{r['loss_clean']:.4f}"
            lines.append(f"| {r['step']} | {r['epoch']} | {r['loss_noisy']:.4f} | {clean} | {r['lr']:.2e} |")
    fs = t.get("fisher_summary", [])
    if fs:
        lines += ["", "## Outliers (first epoch, by Fisher score)", "",
                  f"Outliers per epoch: {t.get('outliers_per_epoch')}", "",
                  "| module | weights | outliers | mean abs w (outliers) | mean abs w (rest) | mean score ratio |",
                  "|---|---|---|---|---|---|"]
        for r in fs:
            lines.append(f"| {r['module']} | {r['n']} | {r['outliers']} | {r['mean_abs_w_outliers']:.4f} | "
                         f"{r['mean_abs_w_rest']:.4f} | {r['score_ratio']:.1f} |")
    ev = d.get("evaluation")
    if ev:
        lines += ["", "## Evaluation", "", ev]
    return "\n".join(lines) + "\n"
