"""Where the gain comes from: tuning objective x noise on SmolLM2-135M, NPFT then plain RTN Q4_0,
measured for fidelity to the float model on WikiText-2 and held-out texts of other domains.

Every row is `finetune --recipe short` on the same calibration tokens (`--calib wiki`), then
`export --type q4_0` (plain round-to-nearest, no importance matrix, so that the tuning alone is
measured); only `--objective` (ce: next-token loss on the text; kl: KL divergence from the float
model) and `--noise` (paper, grid, rtn, none) change. RTN Q4_0 without tuning is the reference
row. One `npft-gguf compare` per text measures all rows against our F32 export on the same tokens
(llama.cpp, ctx 512, flash attention off). No tuning or calibration reads any evaluation text.

The checkpoints, F32 and RTN files live in evals/out/results, shared with evals/results_smollm2.py,
so either script reuses what the other tuned; every step is skipped when its output exists.
Writes evals/ABLATION.md and .json.

    NPFT_GGUF_WIKITEXT2=.../wiki.test.raw .venv/bin/python evals/ablation_smollm2.py --texts WikiText-2,shakespeare,french,code
    .venv/bin/python evals/ablation_smollm2.py --render      # ABLATION.md from ABLATION.json
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals import domains  # noqa: E402
from evals._run import machine, npft  # noqa: E402
from evals.results_smollm2 import NOISES, OUT, Log, built_by, once, options, texts, tuned  # noqa: E402

VARIANTS = "kl/rtn,ce/rtn,kl/grid,ce/grid,kl/paper,ce/paper,kl/none,ce/none"
OBJECTIVES = {"ce": "next-token loss", "kl": "KL from the float model", "ce+kl": "both"}


def main():
    a = options(__doc__, VARIANTS).parse_args()
    if a.render:
        write(json.loads((ROOT / "evals" / "ABLATION.json").read_text()))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    log = Log(OUT / "ablation-commands.json")
    f32 = once(OUT / "f32.gguf", lambda: npft("export", "smollm2-135m", "--type", "f32", "-o", OUT / "f32.gguf", log=log))
    files = {"RTN Q4_0": once(OUT / "rtn-q4_0.gguf", lambda: npft(
        "export", "smollm2-135m", "--type", "q4_0", "-o", OUT / "rtn-q4_0.gguf", log=log, label="RTN q4_0"))}
    tune_seconds = {}
    for v in (v for v in a.variants.split(",") if v):  # every tuning first: the comparisons then run once per text
        objective, noise = v.split("/")
        d = tuned(a, objective, noise, log)
        p = OUT / f"npft-{objective}-{noise}-q4_0.gguf"
        files[f"NPFT {objective}/{noise} Q4_0"] = once(p, lambda d=d, p=p: npft("export", d, "--type", "q4_0", "-o", p, log=log))
        rep = json.loads((d / "report.json").read_text())
        tune_seconds[v] = round(rep.get("tune", {}).get("seconds", 0), 1)
    chosen = texts(a.texts)
    results = {}
    for name, spec in chosen.items():
        md = OUT / f"ablation-compare-{name}.md"
        js = md.with_suffix(".json")
        have = {Path(r["file"]).name for r in json.loads(js.read_text())["rows"]} if js.exists() else set()
        if not {f.name for f in files.values()} <= have:  # a variant added later: this text is compared again
            npft("compare", *files.values(), "--ref", f32, "--text", spec, "--chunks", a.chunks, "--threads", a.threads,
                 "--no-bench", "-o", md, "--force", log=log, label=f"compare {name}")
        results[name] = json.loads(js.read_text())
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks,
           "calib": a.calib, "npft": a.npft, "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
           "tune_seconds": tune_seconds, "results": results, "commands": list(log),
           "domains": {d: domains.sha256(domains.path(d)) for d in domains.DOMAINS if d in chosen}}
    (ROOT / "evals" / "ABLATION.json").write_text(json.dumps(rec, indent=2, default=str))
    write(rec)


def rows_by_label(rec: dict) -> dict[str, dict[str, dict]]:
    """row label -> text -> its comparison row."""
    by_name = {Path(v).name: k for k, v in rec["files"].items()}
    out: dict[str, dict[str, dict]] = {}
    for text, cmp in rec["results"].items():
        for row in cmp["rows"]:
            if Path(row["file"]).name in by_name:
                out.setdefault(by_name[Path(row["file"]).name], {})[text] = row
    return out


def findings(t: dict, texts_: list[str]) -> list[str]:
    """Computed from the table: which objective and which noise is closer to the float model."""
    mean = {k: sum(r[x]["kld_mean"] for x in texts_) / len(texts_) for k, r in t.items()}
    tuned_ = {tuple(k.split()[1].split("/")): k for k in t if k.startswith("NPFT")}
    lines = []
    for noise in dict.fromkeys(n for _, n in tuned_):
        pair = {o: tuned_[(o, noise)] for o in ("kl", "ce") if (o, noise) in tuned_}
        if len(pair) == 2:
            wins = [x for x in texts_ if t[pair["kl"]][x]["kld_mean"] < t[pair["ce"]][x]["kld_mean"]]
            lines.append(f"- noise {noise}: kl {'below' if len(wins) == len(texts_) else 'not below'} ce on "
                         f"{len(wins)} of {len(texts_)} texts (averaged {mean[pair['kl']]:.4f} vs {mean[pair['ce']]:.4f}).")
    for obj in dict.fromkeys(o for o, _ in tuned_):
        ranked = sorted((n for o, n in tuned_ if o == obj), key=lambda n: mean[tuned_[(obj, n)]])
        lines.append(f"- objective {obj}, noises from closest to furthest: "
                     + ", ".join(f"{n} {mean[tuned_[(obj, n)]]:.4f}" for n in ranked) + ".")
    worse = [k for k in tuned_.values() if mean[k] >= mean["RTN Q4_0"]]
    lines.append(f"- rows no closer than untuned RTN Q4_0 ({mean['RTN Q4_0']:.4f}) averaged over the texts: "
                 + (", ".join(worse) if worse else "none") + ".")
    best = min(tuned_.values(), key=mean.get)
    lines.append(f"- Closest to the float model averaged over the texts: {best} ({mean[best]:.4f}).")
    return lines


def write(rec: dict):
    t = rows_by_label(rec)
    texts_ = list(rec["results"])
    lines = ["# Ablation: tuning objective x noise, SmolLM2-135M-Instruct, NPFT then plain RTN Q4_0", "",
             built_by(rec, "ablation_smollm2.py") + f" Every row: `npft-gguf finetune smollm2-135m {rec['npft']} "
             f"--calib {rec['calib']} --objective O --noise N` (and `--resample step` with rtn), then "
             "`npft-gguf export --type q4_0`: no importance matrix, so only the tuning differs. No tuning or "
             "calibration reads any evaluation text.", "",
             "## Mean KLD (lower is closer to the float model)", "",
             "| objective | noise | tune s | mean KLD, averaged | " + " | ".join(texts_) + " |",
             "|---|---|---|---|" + "---|" * len(texts_)]
    for label, r in t.items():
        obj, noise = label.split()[1].split("/") if label.startswith("NPFT") else ("-", "-")
        desc = f"{obj} ({OBJECTIVES.get(obj, obj)})" if obj != "-" else "no tuning (RTN Q4_0)"
        secs = rec["tune_seconds"].get(f"{obj}/{noise}", "-")
        avg = sum(r[x]["kld_mean"] for x in texts_) / len(texts_)
        lines.append(f"| {desc} | {NOISES.get(noise, '-')} | {secs} | {avg:.4f} | "
                     + " | ".join(f"{r[x]['kld_mean']:.4f}" for x in texts_) + " |")
    lines += ["", "## Findings (computed from the table)", "", *findings(t, texts_), ""]
    for x in texts_:
        cmp = rec["results"][x]
        ref = next(r for r in cmp["rows"] if Path(r["file"]).name == "f32.gguf")
        lines += [f"## {x}: {cmp['text']} (F32 PPL {ref['ppl']:.3f})", "",
                  "| row | PPL | mean KLD | p99 KLD | same top-1 % |", "|---|---|---|---|---|"]
        for label, row in t.items():
            r = row[x]
            lines.append(f"| {label} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | {r['kld']['p99']:.4f} | {r['same_top1_pct']:.1f} |")
        lines.append("")
    lines += ["## Commands", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {'-' if c['seconds'] is None else c['seconds']} |" for c in rec["commands"]]
    (ROOT / "evals" / "ABLATION.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
