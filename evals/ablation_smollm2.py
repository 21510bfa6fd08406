"""Where the gain comes from: tuning objective x noise on SmolLM2-135M, NPFT then plain RTN Q4_0,
measured for fidelity to the float model on WikiText-2 and held-out texts of other domains.

Every row is `finetune --recipe short` on the same calibration tokens (`--calib wiki`), then
`export --type q4_0` (plain round-to-nearest, no importance matrix, so that the tuning alone is
measured); only `--objective` (ce: next-token loss on the text; kl: KL divergence from the float
model) and `--noise` (paper, grid, rtn, none) change. kl with no noise is not a row to tune: the
adapter starts at zero, so the student is its own teacher and nothing trains (finetune refuses it;
the run that tuned it anyway measured a file bit-identical to RTN). RTN Q4_0 without tuning is the
reference row. No tuning or calibration reads any evaluation text.

A run measures its variants and RTN Q4_0 with one `npft-gguf compare` per text against our F32
export on the same tokens (llama.cpp, ctx 512, flash attention off), and is added to the runs in
evals/ABLATION.json: a short recipe costs about 20 minutes of two cores per variant, so the table
is filled over several sessions. A run joins only if its own RTN Q4_0 and F32 rows equal every
earlier run's on the texts they share (within SAME below), with the
same recipe, calibration and chunks, which shows the same tokens, reference and kernels; otherwise
the script stops and says so. The table takes each row from the latest run that measured it and
says which run that was.

Checkpoints, F32 and RTN files live in evals/out/results, shared with evals/results_smollm2.py,
so either script reuses what the other tuned; every step is skipped when its output exists.
Writes evals/ABLATION.md and .json.

    NPFT_GGUF_WIKITEXT2=.../wiki.test.raw .venv/bin/python evals/ablation_smollm2.py --variants kl/paper,kl/grid --texts WikiText-2,shakespeare,french,code
    .venv/bin/python evals/ablation_smollm2.py --render      # ABLATION.md from ABLATION.json
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals import domains  # noqa: E402
from evals._run import Log, machine, npft  # noqa: E402
from evals.results_smollm2 import NOISES, OUT, built_by, once, options, texts, tuned  # noqa: E402

VARIANTS = "kl/rtn,ce/rtn,kl/grid,ce/grid,kl/paper,ce/paper,ce/none"
OBJECTIVES = {"ce": "next-token loss", "kl": "KL from the float model", "ce+kl": "both"}
JSON = ROOT / "evals" / "ABLATION.json"
CONTROL, REF = "RTN Q4_0", "f32.gguf"
# relative: how close a new run's control rows must be to an earlier run's. The RTN Q4_0 rows (integer
# dot products) have agreed to the bit across AMD EPYC and Intel Xeon machines; the F32 file's PPL moved by up to 6e-9
# (float summation order in llama.cpp's F32 path) while the KLD against it stayed equal to 1e-16. New
# tokens, a new reference or new kernels move either by orders of magnitude more.
SAME = {"control": 1e-9, "reference": 1e-7}


def main():
    a = options(__doc__, VARIANTS).parse_args()
    runs = earlier_runs()
    if a.render:
        write(runs)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    log = Log(OUT / "ablation-commands.json")
    f32 = once(OUT / "f32.gguf", lambda: npft("export", "smollm2-135m", "--type", "f32", "-o", OUT / "f32.gguf", log=log))
    files = {CONTROL: once(OUT / "rtn-q4_0.gguf", lambda: npft(
        "export", "smollm2-135m", "--type", "q4_0", "-o", OUT / "rtn-q4_0.gguf", log=log, label="RTN q4_0"))}
    tune_seconds = {}
    for v in (v for v in a.variants.split(",") if v):  # every tuning first: the comparisons then run once per text
        objective, noise = v.split("/")
        d = tuned(a, objective, noise, log)
        p = OUT / f"npft-{objective}-{noise}-q4_0.gguf"
        files[f"NPFT {objective}/{noise} Q4_0"] = once(p, lambda d=d, p=p: npft("export", d, "--type", "q4_0", "-o", p, log=log))
        rep = json.loads((d / "report.json").read_text())
        tune_seconds[v] = {"seconds": round(rep["tune"]["seconds"], 1), "resumed_at_epoch": rep["tune"].get("resumed_at_epoch")}
    chosen = texts(a.texts)
    tag = hashlib.sha256(" ".join(sorted(f.name for f in files.values())).encode()).hexdigest()[:8]
    results = {}
    for name, spec in chosen.items():  # this run's files only: earlier runs' rows are not measured again
        md = OUT / f"ablation-compare-{name}-{tag}.md"
        if not md.with_suffix(".json").exists():
            npft("compare", *files.values(), "--ref", f32, "--text", spec, "--chunks", a.chunks, "--threads", a.threads,
                 "--no-bench", "-o", md, "--force", log=log, label=f"compare {name}")
        results[name] = json.loads(md.with_suffix(".json").read_text())
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks,
           "calib": a.calib, "npft": a.npft, "f32_sha256": domains.sha256(f32),
           "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
           "tune_seconds": tune_seconds, "results": results, "commands": list(log),
           "domains": {d: domains.sha256(domains.path(d)) for d in domains.DOMAINS if d in chosen}}
    clash = disagreement(runs, rec)
    if clash:
        raise SystemExit(f"this run cannot join evals/ABLATION.json: {clash}. Its comparisons are in {OUT}; "
                         "move ABLATION.json aside to start the table again from this run.")
    runs = [*runs, rec]
    JSON.write_text(json.dumps({"runs": runs}, indent=2, default=str))
    write(runs)


def earlier_runs() -> list[dict]:
    """The runs in ABLATION.json (a file from before runs accumulated is one run)."""
    if not JSON.exists():
        return []
    rec = json.loads(JSON.read_text())
    return rec["runs"] if "runs" in rec else [rec]


def _row(run: dict, text: str, name: str) -> dict | None:
    return next((r for r in run["results"][text]["rows"] if Path(r["file"]).name == name), None)


def disagreement(runs: list[dict], new: dict) -> str | None:
    """Why `new` was not measured like the earlier runs, or None: the same recipe, calibration and
    chunks, the same F32 file where both know its hash, and on every shared text the same F32 PPL and
    the same control row (PPL, mean KLD, same top-1)."""
    control = Path(new["files"][CONTROL]).name
    for old in runs:
        when = old["date"][:10]
        for key in ("npft", "calib", "chunks"):
            if old[key] != new[key]:
                return f"its {key} is {new[key]!r}, the run of {when} used {old[key]!r}"
        if old.get("f32_sha256") and old["f32_sha256"] != new["f32_sha256"]:
            return f"its F32 file differs from the one the run of {when} measured against (sha256)"
        for text in set(old["results"]) & set(new["results"]):
            pairs = [(REF, "ppl"), (control, "ppl"), (control, "kld_mean"), (control, "same_top1_pct")]
            for name, key in pairs:
                a, b = _row(old, text, name)[key], _row(new, text, name)[key]
                if abs(a - b) > SAME["reference" if name == REF else "control"] * max(abs(a), abs(b), 1e-12):
                    return f"on {text} its {name} {key} is {b!r}, the run of {when} measured {a!r}"
    return None


def rows_by_label(run: dict) -> dict[str, dict[str, dict]]:
    """row label -> text -> its comparison row, in one run."""
    by_name = {Path(v).name: k for k, v in run["files"].items()}
    out: dict[str, dict[str, dict]] = {}
    for text, cmp in run["results"].items():
        for row in cmp["rows"]:
            if Path(row["file"]).name in by_name:
                out.setdefault(by_name[Path(row["file"]).name], {})[text] = row
    return out


def merged(runs: list[dict]) -> tuple[dict[str, dict[str, dict]], dict[str, int]]:
    """label -> text -> row, each row from the latest run that measured it, and label -> that run's
    index (the control row is the same in every run, by `disagreement`)."""
    table: dict[str, dict[str, dict]] = {}
    source: dict[str, int] = {}
    for i, run in enumerate(runs):
        for label, by_text in rows_by_label(run).items():
            if label != CONTROL or label not in table:
                source[label] = i
            table[label] = {**table.get(label, {}), **by_text} if label == CONTROL else by_text
    order = sorted(table, key=lambda k: (k != CONTROL, VARIANTS.split(",").index(k.split()[1])
                                         if k.split()[1] in VARIANTS.split(",") else 99, k))
    return {k: table[k] for k in order}, source


def _mean(row: dict, texts_) -> float:
    return sum(row[x]["kld_mean"] for x in texts_) / len(texts_)


def _same(a: dict, b: dict) -> bool:
    return a["kld_mean"] == b["kld_mean"] and a["ppl"] == b["ppl"]


def findings(t: dict, runs: list[dict], source: dict) -> list[str]:
    """Computed from the table: which objective and which noise is closer to the float model, each
    comparison over the texts that both (or all) of its rows were measured on."""
    tuned_ = {tuple(k.split()[1].split("/")): k for k in t if k.startswith("NPFT")}
    lines = []

    def shared(*labels):
        return [x for x in t[CONTROL] if all(x in t[k] for k in labels)]

    for noise in dict.fromkeys(n for _, n in tuned_):
        pair = {o: tuned_[(o, noise)] for o in ("kl", "ce") if (o, noise) in tuned_}
        if len(pair) == 2 and noise != "none":
            xs = shared(*pair.values())
            wins = [x for x in xs if t[pair["kl"]][x]["kld_mean"] < t[pair["ce"]][x]["kld_mean"]]
            lines.append(f"- noise {noise}: kl {'below' if len(wins) == len(xs) else 'not below'} ce on "
                         f"{len(wins)} of {len(xs)} texts ({', '.join(xs)}; averaged "
                         f"{_mean(t[pair['kl']], xs):.4f} vs {_mean(t[pair['ce']], xs):.4f}).")
    for obj in dict.fromkeys(o for o, _ in tuned_):
        noises = [n for o, n in tuned_ if o == obj and not (o == "kl" and n == "none")]
        xs = shared(*(tuned_[(obj, n)] for n in noises))
        ranked = sorted(noises, key=lambda n: _mean(t[tuned_[(obj, n)]], xs))
        lines.append(f"- objective {obj}, noises from closest to furthest over {', '.join(xs)}: "
                     + ", ".join(f"{n} {_mean(t[tuned_[(obj, n)]], xs):.4f}" for n in ranked) + ".")
    if ("kl", "none") in tuned_:
        k = tuned_[("kl", "none")]
        run = runs[source[k]]
        ctl = rows_by_label(run)[CONTROL]
        same = [x for x in t[k] if x in ctl and _same(t[k][x], ctl[x])]
        lines.append(f"- kl with no noise (run of {run['date'][:10]}): PPL and mean KLD equal to untuned RTN Q4_0's to the bit "
                     f"on {len(same)} of {len(t[k])} texts measured: with nothing perturbed the KL from the float model "
                     "has no gradient, so the adapter never left zero; finetune now refuses `--objective kl --noise none`.")
    worse = [k for k in tuned_.values() if _mean(t[k], shared(k)) >= _mean(t[CONTROL], shared(k))]
    lines.append("- rows whose mean KLD, averaged over the texts they were measured on, is not below untuned RTN Q4_0's: "
                 + (", ".join(f"{k} ({_mean(t[k], shared(k)):.4f} vs {_mean(t[CONTROL], shared(k)):.4f})" for k in worse)
                    if worse else "none") + ".")
    xs = shared(*tuned_.values())
    if xs:
        best = min(tuned_.values(), key=lambda k: _mean(t[k], xs))
        lines.append(f"- Closest to the float model over the texts every row has ({', '.join(xs)}): {best} ({_mean(t[best], xs):.4f}).")
    return lines


def write(runs: list[dict]):
    t, source = merged(runs)
    texts_ = list(dict.fromkeys(x for run in runs for x in run["results"]))
    last = runs[-1]
    lines = ["# Ablation: tuning objective x noise, SmolLM2-135M-Instruct, NPFT then plain RTN Q4_0", "",
             built_by(last, "ablation_smollm2.py", f"from {len(runs)} run{'s' * (len(runs) > 1)} (listed below)") + f" Every row: `npft-gguf finetune smollm2-135m {last['npft']} "
             f"--calib {last['calib']} --objective O --noise N` (and `--resample step` with rtn), then "
             "`npft-gguf export --type q4_0`: no importance matrix, so only the tuning differs. No tuning or "
             "calibration reads any evaluation text. The table gathers runs of several sessions; each run measured its own RTN Q4_0 and F32 rows, equal to every other run's on "
             "the texts they share (RTN Q4_0 to 1e-9 relative, F32 PPL to 1e-7: float summation order), and each row names its run. A '-' is a text its run did not measure. Tune "
             "seconds are each checkpoint's own report (wall time, summed over the sessions of a resumed run): "
             "comparable only between rows tuned on an idle machine of the same kind.", "",
             "## Runs", "", "| run | date | machine | rows | texts |", "|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        lines.append(f"| {i} | {run['date'][:10]} | {run['machine']} | "
                     + ", ".join(k for k in run["files"] if k != CONTROL) + " | " + ", ".join(run["results"]) + " |")
    lines += ["", "## Mean KLD (lower is closer to the float model)", "",
              "| objective | noise | run | tune s | " + " | ".join(texts_) + " |",
              "|---|---|---|---|" + "---|" * len(texts_)]
    for label, r in t.items():
        obj, noise = label.split()[1].split("/") if label.startswith("NPFT") else ("-", "-")
        desc = f"{obj} ({OBJECTIVES.get(obj, obj)})" if obj != "-" else "no tuning (RTN Q4_0)"
        tune = runs[source[label]]["tune_seconds"].get(f"{obj}/{noise}") or {}
        secs = f"{tune['seconds']:.0f}" if tune else "-"
        if tune.get("resumed_at_epoch") is not None:
            secs += f" (resumed after epoch {tune['resumed_at_epoch']})"
        run = "all" if label == CONTROL else str(source[label] + 1)
        lines.append(f"| {desc} | {NOISES.get(noise, '-')} | {run} | {secs} | "
                     + " | ".join(f"{r[x]['kld_mean']:.4f}" if x in r else "-" for x in texts_) + " |")
    lines += ["", "## Findings (computed from the table)", "", *findings(t, runs, source), ""]
    for x in texts_:
        cmp = next(run["results"][x] for run in runs if x in run["results"])
        ref = next(r for r in cmp["rows"] if Path(r["file"]).name == REF)
        lines += [f"## {x}: {cmp['text']} (F32 PPL {ref['ppl']:.3f})", "",
                  "| row | run | PPL | mean KLD | p99 KLD | same top-1 % |", "|---|---|---|---|---|---|"]
        for label, row in t.items():
            if x in row:
                r = row[x]
                lines.append(f"| {label} | {'all' if label == CONTROL else source[label] + 1} | {r['ppl']:.3f} | "
                             f"{r['kld_mean']:.4f} | {r['kld']['p99']:.4f} | {r['same_top1_pct']:.1f} |")
        lines.append("")
    for i, run in enumerate(runs, 1):
        lines += [f"## Commands of run {i} ({run['date'][:10]}, {run['machine']})", "", "| command | seconds |", "|---|---|"]
        seen = set()  # a resumed run logged a reused checkpoint's tune again: each command once, as first run
        for c in run["commands"]:
            if c["command"] not in seen:
                seen.add(c["command"])
                lines.append(f"| `{c['command']}` | {'-' if c['seconds'] is None else c['seconds']} |")
        lines.append("")
    (ROOT / "evals" / "ABLATION.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
