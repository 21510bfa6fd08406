"""NPFT on SmolLM2-135M, measured in llama.cpp: which noise, with or without the clean term, against
plain RTN Q4_0, a plain-LoRA control (same data, no noise) and the float model.

Every variant is one `npft-gguf convert` command (printed and stored in the JSON), run with the
short CPU recipe on --calib (default `wiki`: the fetched Wikipedia calibration articles); then one
`npft-gguf compare` evaluates all files on the first --chunks windows of WikiText-2 test
($NPFT_GGUF_WIKITEXT2; ctx 512, llama.cpp, fa off) with KLD against the F32 export. Output: evals/out/npft_smollm2-TAG.{json,md}.

    .venv/bin/python evals/npft_smollm2.py                      # all variants
    .venv/bin/python evals/npft_smollm2.py --only paper,control  # a subset
    .venv/bin/python evals/npft_smollm2.py --render             # evals/NPFT_ROUNDS.md from the rounds' JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "evals" / "out" / "npft"
CLI = [str(ROOT / ".venv" / "bin" / "npft-gguf")]

from evals._run import machine, run  # noqa: E402

VARIANTS = {  # name -> extra convert options (on top of --recipe short)
    "paper": ["--noise", "paper", "--clean-weight", "0.5"],
    "paper-nolambda": ["--noise", "paper", "--clean-weight", "0"],
    "grid": ["--noise", "grid", "--clean-weight", "0.5"],
    "grid-all": ["--noise", "grid", "--noise-scope", "all", "--clean-weight", "0.5"],
    "rtn": ["--noise", "rtn", "--clean-weight", "0.5"],
    "rtn-nolambda": ["--noise", "rtn", "--clean-weight", "0"],
    "control": ["--objective", "ce", "--noise", "none", "--clean-weight", "0"],  # under kl alone nothing trains
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated variants: " + ",".join(VARIANTS))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra convert options for every variant, e.g. '--epochs 2'")
    ap.add_argument("--tag", default="short", help="names this round's files: evals/out/npft_smollm2-TAG.{json,md}")
    ap.add_argument("--calib", default="wiki", help="calibration text, as npft-gguf --calib")
    ap.add_argument("--render", action="store_true", help="only rewrite evals/NPFT_ROUNDS.md from the rounds' JSON under evals/out/")
    a = ap.parse_args()
    if a.render:
        return write_rounds()
    names = a.only.split(",") if a.only else list(VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "tag": a.tag,
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


ROUNDS_HEAD = """# NPFT variants on SmolLM2-135M: paper vs grid noise, lambda on/off, the outlier trace

Built by `.venv/bin/python evals/npft_smollm2.py --render` from the JSON that `evals/npft_smollm2.py` and the
commands below leave under evals/out/; each section names its commands, machine and date. The evaluation is the one
of evals/RESULTS.md (WikiText-2 test, ctx 512, first 40 chunks, llama.cpp, KLD against the F32 export).
"""


def write_rounds() -> None:
    """evals/NPFT_ROUNDS.md from the rounds' JSON; refuses to replace it with nothing."""
    body = npft_rounds() + extra_checks()
    if not body:
        sys.exit("no NPFT rounds under evals/out/ (run evals/npft_smollm2.py first); evals/NPFT_ROUNDS.md left as it is")
    (ROOT / "evals" / "NPFT_ROUNDS.md").write_text(ROUNDS_HEAD + "\n" + "\n".join(body))


EXTRA = ROOT / "evals" / "out" / "npft"


def extra_checks() -> list[str]:
    """Single runs kept beside the rounds: the outlier trace with enough paired probes, and the
    grid-noise variant's evaluation (each with the command that made it)."""
    out = []
    rep = EXTRA / "trace-paper" / "report.json"
    if rep.exists():
        t = json.loads(rep.read_text())["tune"]
        b, a = t["trace_before"], t["trace_after"]
        d = [x - y for x, y in zip(a["estimates"], b["estimates"])]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        out += ["## The method's own claim: outlier Hessian trace, paper noise", "",
                "```", "npft-gguf finetune smollm2-135m -o evals/out/npft/trace-paper --calib ../shared/data/calib/wiki_excerpt.txt "
                "--recipe short --noise paper --calib-samples 32 --epochs 1 --lr 2e-4 --trace-samples 8 --trace-probes 2 "
                "--trace-len 128 --threads 2 --force", "```", "",
                f"Hutchinson, {b['n']} paired estimates ({b['samples']} samples of 128 tokens x {b['probes']} Rademacher probes) on the "
                f"first epoch's outliers: Tr(H_outliers) {b['trace']:.1f} before, {a['trace']:.1f} after; paired change "
                f"{mean:+.1f} ± {se:.1f} ({100 * mean / b['trace']:+.1f} %, {abs(mean) / se:.1f} standard errors). "
                f"Wall time {t['seconds']:.0f} s (contended machine).", ""]
    for name, noise, title in (("grid", "--noise grid --clean-weight 0.5", "Grid noise at the outliers"),
                               ("paper-nolambda", "--noise paper --clean-weight 0", "Paper noise without the clean term (lambda 0, as the public code)")):
        ev = EXTRA / f"short-b-{name}-eval.json"
        if not ev.exists():
            continue
        e = json.loads(ev.read_text())
        out += [f"## {title} (round `short`'s recipe)", "", "```",
                f"npft-gguf convert smollm2-135m --bits 4 --recipe short --calib ../shared/data/calib/wiki_excerpt.txt {noise} "
                f"--calib-samples 32 --epochs 1 --lr 2e-4 --threads 2 --eval-text none -o evals/out/npft/smollm2-short-b-{name}-q4_0.gguf --force",
                f"npft-gguf eval evals/out/npft/smollm2-short-b-{name}-q4_0.gguf --ref evals/out/results/smollm2-f32.gguf --chunks 40 "
                f"--threads 2 --json evals/out/npft/short-b-{name}-eval.json", "```", "",
                f"PPL {e['ppl']:.4f} ± {e['ppl_se']:.4f}, mean KLD {e['kld']['mean']:.4f}, same top-1 {e['kld']['same_top1_pct']:.2f} %.", ""]
    return out


def npft_rounds() -> list[str]:
    """The NPFT variant rounds of evals/npft_smollm2.py, where they have been run."""
    out = []
    for path in sorted((ROOT / "evals" / "out").glob("npft_smollm2-*.json")):
        r = json.loads(path.read_text())
        md = path.with_suffix(".md")
        out += [f"## NPFT variants, round `{r.get('tag', path.stem)}`", "",
                f"`.venv/bin/python evals/npft_smollm2.py --tag {r.get('tag')} --extra \"{r.get('extra', '')}\"` "
                f"({r['date']}, {r['machine']}); each variant is one `npft-gguf convert`:", "", "```"]
        out += [v["command"].replace(str(ROOT) + "/", "") for v in r["variants"].values()]
        out += ["```", "", md.read_text() if md.exists() else "", ""]
    return out



if __name__ == "__main__":
    main()
