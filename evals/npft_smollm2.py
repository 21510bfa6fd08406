"""NPFT on SmolLM2-135M, measured in llama.cpp: which noise, with or without the clean term, against
plain RTN Q4_0, a plain-LoRA control (same data, no noise) and the float model.

Every variant is one `npft-gguf convert` command (printed and stored in the JSON), run with the
short CPU recipe on --calib (default `wiki`: the fetched Wikipedia calibration articles); then one
`npft-gguf compare` evaluates all files on the first --chunks windows of WikiText-2 test
($NPFT_GGUF_WIKITEXT2; ctx 512, llama.cpp, fa off) with KLD against the F32 export. Output: evals/out/npft_smollm2-TAG.{json,md}.

    .venv/bin/python evals/npft_smollm2.py                      # all variants
    .venv/bin/python evals/npft_smollm2.py --only paper,control  # a subset
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evals" / "out" / "npft"
CLI = [str(ROOT / ".venv" / "bin" / "npft-gguf")]

VARIANTS = {  # name -> extra convert options (on top of --recipe short)
    "paper": ["--noise", "paper", "--clean-weight", "0.5"],
    "paper-nolambda": ["--noise", "paper", "--clean-weight", "0"],
    "grid": ["--noise", "grid", "--clean-weight", "0.5"],
    "grid-all": ["--noise", "grid", "--noise-scope", "all", "--clean-weight", "0.5"],
    "rtn": ["--noise", "rtn", "--clean-weight", "0.5"],
    "rtn-nolambda": ["--noise", "rtn", "--clean-weight", "0"],
    "control": ["--noise", "none", "--clean-weight", "0"],
}


def run(cmd: list[str]) -> tuple[float, str]:
    print("$", shlex.join(cmd), flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return time.time() - t, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated variants: " + ",".join(VARIANTS))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra convert options for every variant, e.g. '--epochs 2'")
    ap.add_argument("--tag", default="short", help="names this round's files: evals/out/npft_smollm2-TAG.{json,md}")
    ap.add_argument("--calib", default="wiki", help="calibration text, as npft-gguf --calib")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": _machine(), "tag": a.tag,
              "extra": a.extra, "variants": {}}
    files = []
    for name in names:
        out = OUT / f"smollm2-{a.tag}-{name}-q4_0.gguf"
        cmd = [*CLI, "convert", "smollm2-135m", "--bits", "4", "--recipe", "short", "--calib", a.calib,
               *VARIANTS[name], *shlex.split(a.extra), "--threads", str(a.threads), "--eval-text", "none",
               "-o", str(out), "--force", "--json"]
        seconds, stdout = run(cmd)
        rec = json.loads(stdout)
        t = rec.get("tune", {})
        record["variants"][name] = {
            "command": shlex.join(cmd), "wall_s": seconds, "tune_s": t.get("seconds"),
            "trace_before": (t.get("trace_before") or {}).get("trace"), "trace_before_se": (t.get("trace_before") or {}).get("se"),
            "trace_after": (t.get("trace_after") or {}).get("trace"), "trace_after_se": (t.get("trace_after") or {}).get("se"),
            "loss_first": t["history"][0] if t.get("history") else None, "loss_last": t["history"][-1] if t.get("history") else None,
            "file": str(out),
        }
        files.append(out)
    ref, rtn = OUT / "smollm2-f32.gguf", OUT / "smollm2-rtn-q4_0.gguf"
    if not ref.exists():
        run([*CLI, "export", "smollm2-135m", "--type", "f32", "-o", str(ref)])
    if not rtn.exists():
        run([*CLI, "export", "smollm2-135m", "--type", "q4_0", "-o", str(rtn)])
    report = OUT / f"compare-{a.tag}.md"
    cmd = [*CLI, "compare", str(rtn), *map(str, files), "--ref", str(ref), "--chunks", str(a.chunks),
           "--threads", str(a.threads), "--no-bench", "-o", str(report), "--force"]
    seconds, _ = run(cmd)
    record["compare_command"] = shlex.join(cmd)
    record["compare"] = json.loads(report.with_suffix(".json").read_text())
    (ROOT / "evals" / "out" / f"npft_smollm2-{a.tag}.json").write_text(json.dumps(record, indent=2))
    md = markdown(record)
    (ROOT / "evals" / "out" / f"npft_smollm2-{a.tag}.md").write_text(md)
    print(md)


def markdown(rec: dict) -> str:
    rows = {Path(r["file"]).name: r for r in rec["compare"]["rows"]}
    lines = [f"{rec['date']}, {rec['machine']}; WikiText-2 test, ctx 512, first {rec['compare']['chunks']} chunks, llama.cpp (fa off).", "",
             "| model | PPL | delta-PPL % vs F32 | mean KLD | same top-1 % | outlier Tr(H) before -> after | tune s |",
             "|---|---|---|---|---|---|---|"]
    for fname, r in rows.items():
        v = next((v for v in rec["variants"].values() if Path(v["file"]).name == fname), None)
        tr = "" if not v or v["trace_before"] is None else f"{v['trace_before']:.4g} -> {v['trace_after']:.4g}"
        label = fname.replace(".gguf", "")
        tune_s = "" if not v else f"{v['tune_s']:.0f}"
        lines.append(f"| {label} | {r['ppl']:.4f} ± {r['ppl_se']:.4f} | {r['delta_ppl_pct']:+.2f} | {r['kld_mean']:.4f} | "
                     f"{r['same_top1_pct']:.2f} | {tr} | {tune_s} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    return f"{model}, {len(os.sched_getaffinity(0))} cores"


if __name__ == "__main__":
    main()
