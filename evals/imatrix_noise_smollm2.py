"""Which error should NPFT's rtn noise be, when the file is written with an importance matrix?

`convert --method npft+imatrix` (the default at Q4_0) tunes, then writes the merged weights with
llama.cpp's importance-weighted rules. The rtn noise can be plain RTN's error (what the tuning
used until now) or the error of the quantizer that will really write the file (`finetune
--imatrix FILE`: llama.cpp's importance-weighted rounding with that imatrix). This script tunes
both on the same calibration tokens and recipe, writes both with the same imatrix, and measures
them beside untuned RTN Q4_0 and the untuned model with the same imatrix (llama.cpp's imatrix
Q4_0: `export --imatrix` is byte-identical to llama-quantize --imatrix, evals/IMATRIX_PARITY.md),
against our F32 export on WikiText-2 and the held-out texts. No tuning or calibration reads any
evaluation text.

Shares evals/out/results with results_smollm2.py and ablation_smollm2.py (the plain-RTN-noise
checkpoint is theirs); every step is skipped when its output exists. Writes
evals/IMATRIX_NOISE.md and .json.

    NPFT_GGUF_WIKITEXT2=.../wiki.test.raw .venv/bin/python evals/imatrix_noise_smollm2.py [--type iq4_nl]
    .venv/bin/python evals/imatrix_noise_smollm2.py --render
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals._run import Log, machine, npft  # noqa: E402
from evals.ablation_smollm2 import rows_by_label  # noqa: E402
from evals.results_smollm2 import OUT, built_by, once, options, texts, tuned  # noqa: E402

JSON = ROOT / "evals" / "IMATRIX_NOISE.json"
PLAIN, WEIGHTED = "NPFT kl/rtn, plain RTN noise, + imatrix", "NPFT kl/rtn, imatrix-weighted noise, + imatrix"
RTN, UNTUNED = "RTN", "untuned + imatrix (as llama-quantize --imatrix)"


def main():
    ap = options(__doc__, "kl/rtn")
    ap.add_argument("--type", default="q4_0", choices=["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"],
                    help="the type written (and tuned for)")
    a = ap.parse_args()
    runs = json.loads(JSON.read_text())["types"] if JSON.exists() else {}
    if a.render:
        write(runs)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    log = Log(OUT / ("imatrix-noise-commands.json" if a.type == "q4_0" else f"imatrix-noise-commands-{a.type}.json"))
    th = ["--threads", a.threads]
    f32 = once(OUT / "f32.gguf", lambda: npft("export", "smollm2-135m", "--type", "f32", "-o", OUT / "f32.gguf", log=log))
    imat = once(OUT / "ours.imatrix.gguf", lambda: npft(
        "imatrix", "smollm2-135m", "--calib", a.calib, "--ctx", 512, "--chunks", 64, *th, "-o", OUT / "ours.imatrix.gguf",
        log=log, label="imatrix of the float model"))
    t = a.type
    files = {RTN: once(OUT / f"rtn-{t}.gguf", lambda: npft(
        "export", "smollm2-135m", "--type", t, "-o", OUT / f"rtn-{t}.gguf", log=log, label=f"RTN {t}"))}
    files[UNTUNED] = once(OUT / f"imatrix-{t}.gguf", lambda: npft(
        "export", "smollm2-135m", "--type", t, "--imatrix", imat, "-o", OUT / f"imatrix-{t}.gguf", log=log))
    plain = tuned(a, "kl", "rtn", log, grid=t)
    suffix = "" if t == "q4_0" else f"-{t}"
    weighted = OUT / f"npft-kl-rtn-imatrix-noise{suffix}"
    if not (weighted / "config.json").exists():
        npft("finetune", "smollm2-135m", "-o", weighted, "--calib", a.calib, "--objective", "kl", "--noise", "rtn",
             "--resample", "step", *([] if t == "q4_0" else ["--grid", t]), "--imatrix", imat, *shlex.split(a.npft), *th,
             "--force", log=log, label=f"tune kl/rtn against the imatrix-weighted {t} error")
    tune_seconds = {}
    for label, d, name in ((PLAIN, plain, f"npft-kl-rtn{suffix}-{t}-ours-imatrix.gguf"),
                           (WEIGHTED, weighted, f"npft-kl-rtn-imatrix-noise{suffix}-{t}-imatrix.gguf")):
        files[label] = once(OUT / name, lambda d=d, name=name: npft(
            "export", d, "--type", t, "--imatrix", imat, "-o", OUT / name, log=log))
        tune_seconds[label] = round(json.loads((d / "report.json").read_text())["tune"]["seconds"], 1)
    results = {}
    for name, spec in texts(a.texts).items():
        md = OUT / f"imatrix-noise-compare-{name}{suffix}.md"
        if not md.with_suffix(".json").exists():
            npft("compare", *files.values(), "--ref", f32, "--text", spec, "--chunks", a.chunks, *th, "--no-bench",
                 "-o", md, "--force", log=log, label=f"compare {name}")
        results[name] = json.loads(md.with_suffix(".json").read_text())
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks,
           "calib": a.calib, "npft": a.npft, "type": t, "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
           "tune_seconds": tune_seconds, "results": results, "commands": list(log)}
    runs[t] = rec
    JSON.write_text(json.dumps({"types": runs}, indent=2, default=str))
    write(runs)


def write(runs: dict):
    first = next(iter(runs.values()))
    lines = ["# NPFT's rtn noise when the file is written with an importance matrix, SmolLM2-135M-Instruct", "",
             built_by(first, "imatrix_noise_smollm2.py", "(one run per type, dated below)") + " Both tunes of a type: "
             f"`npft-gguf finetune smollm2-135m {first['npft']} --calib {first['calib']} --objective kl --noise rtn "
             "[--grid TYPE]`, the same calibration tokens; one adds `--imatrix` (the float model's imatrix from "
             "`npft-gguf imatrix`, 64 x 512 tokens of the same calibration text), so its noise is the error of llama.cpp's "
             "importance-weighted quantizer with that imatrix (the tensor types of llama.cpp's mix with an imatrix) instead "
             "of plain RTN's. Both are then written by `export --type TYPE --imatrix` with that imatrix, as is the untuned "
             "model (byte-identical to llama-quantize --imatrix, evals/IMATRIX_PARITY.md). No tuning or calibration reads "
             "any evaluation text. Tune seconds are each checkpoint's own report.", ""]
    for rec in runs.values():
        lines += section(rec)
    (ROOT / "evals" / "IMATRIX_NOISE.md").write_text("\n".join(lines) + "\n")


def section(rec: dict) -> list[str]:
    t = rows_by_label(rec)
    xs = list(rec["results"])
    mean = {k: sum(t[k][x]["kld_mean"] for x in xs) / len(xs) for k in t}
    wins = [x for x in xs if t[WEIGHTED][x]["kld_mean"] < t[PLAIN][x]["kld_mean"]]
    T = rec.get("type", "q4_0").upper()
    lines = [f"## {T} ({rec['date'][:10]}, {rec['machine']})", "", "### Mean KLD (lower is closer to the float model)", "",
             "| file | tune s | " + " | ".join(xs) + " | mean |", "|---|---|" + "---|" * (len(xs) + 1)]
    for k in t:
        lines.append(f"| {k.replace(RTN, 'RTN ' + T)} | {rec['tune_seconds'].get(k, '-')} | " + " | ".join(f"{t[k][x]['kld_mean']:.4f}" for x in xs)
                     + f" | {mean[k]:.4f} |")
    verdict = "below" if len(wins) == len(xs) else "not below"
    lines += ["", "### Finding (computed from the table)", "",
              f"- The imatrix-weighted noise is {verdict} the plain RTN noise on {len(wins)} of {len(xs)} texts"
              + (f" ({', '.join(wins)})" if wins and len(wins) < len(xs) else "")
              + f"; averaged over the texts {mean[WEIGHTED]:.4f} vs {mean[PLAIN]:.4f} (untuned with the same imatrix "
              f"{mean[UNTUNED]:.4f}, untuned RTN {mean[RTN]:.4f}).", ""]
    for x in xs:
        lines += [f"### {x} (F32 PPL {next(r['ppl'] for r in rec['results'][x]['rows'] if r['kld_mean'] == 0):.3f})", "",
                  "| file | PPL | mean KLD | p99 KLD | same top-1 % |", "|---|---|---|---|---|"]
        for k in t:
            r = t[k][x]
            lines.append(f"| {k.replace(RTN, 'RTN ' + T)} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | {r['kld']['p99']:.4f} | {r['same_top1_pct']:.1f} |")
        lines.append("")
    lines += [f"### Commands ({T})", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {c['seconds']} |" for c in rec["commands"]]
    return lines + [""]


if __name__ == "__main__":
    main()
