"""Fidelity to the float model on SmolLM2-135M: every method at Q4_0's size (and IQ4_NL), measured
on WikiText-2 and on held-out texts of other domains, beside llama.cpp's own best.

Rows (each a GGUF file; one `npft-gguf compare` per text evaluates them all against our F32
export on the same tokens, llama.cpp, ctx 512, flash attention off):
    RTN Q4_0 / IQ4_NL          our export, plain round-to-nearest
    GPTQ Q4_0                  `convert --method gptq` (act-order), 128 x 512 calibration tokens
    llama.cpp Q4_0 / IQ4_NL / Q4_K_M + imatrix, and Q4_K_M without: llama-imatrix on the same
                               calibration text (64 x 512 tokens), then llama-quantize --imatrix
    NPFT <objective>/<noise>   `finetune --recipe short` on the same calibration tokens, then RTN
                               (and, with --imatrix rows, our importance-weighted export)
Texts: WikiText-2 test (where $NPFT_GGUF_WIKITEXT2 names a copy), the held-out Wikipedia articles
(wiki-heldout), and the domains of evals/domains.py (shakespeare, pydoc, french, code). No tuning
or calibration reads any of them.

Every step is skipped when its output exists (delete evals/out/fidelity to start over), so an
interrupted run continues. Writes evals/FIDELITY.md and .json (and FIDELITY.png).

    .venv/bin/python evals/fidelity_smollm2.py --variants kl/rtn,ce/rtn --chunks 20
    .venv/bin/python evals/fidelity_smollm2.py --render      # FIDELITY.md from FIDELITY.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "evals" / "out" / "fidelity"
CLI = str(ROOT / ".venv" / "bin" / "npft-gguf")

from evals import domains  # noqa: E402

LOG: list = []


def run(cmd: list, label: str | None = None) -> float:
    cmd = [str(c) for c in cmd]
    line = shlex.join(cmd).replace(str(ROOT) + "/", "").replace(CLI, "npft-gguf")
    print("$", line, flush=True)
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {line}\n{r.stderr[-3000:]}")
    LOG.append({"command": line, "seconds": round(time.time() - t, 1), "label": label})
    return time.time() - t


def npft(*args, label=None) -> float:
    return run([CLI, *args], label)


def once(path: Path, make) -> Path:
    if not path.exists():
        make()
    return path


def texts(a) -> dict[str, str]:
    """Display name -> `--text` argument."""
    out = {}
    if os.environ.get("NPFT_GGUF_WIKITEXT2"):
        out["WikiText-2"] = "wikitext2"
    out["wiki-heldout"] = "wiki-heldout"
    for d in domains.DOMAINS:
        out[d] = str(domains.build(d))
    return out


def llamacpp_tool(name: str) -> str:
    from evals.llamacpp_tools import tools  # builds llama.cpp's tools from the llama-cpp-python sdist once

    return str(tools()[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="kl/rtn", help="NPFT rows as objective/noise, comma-separated (ce, kl, ce+kl / paper, grid, rtn, none)")
    ap.add_argument("--npft", default="--recipe short", help="further finetune options for every NPFT row")
    ap.add_argument("--calib", default="wiki", help="calibration text for every method")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="skip the llama.cpp imatrix rows (they build llama.cpp's tools)")
    ap.add_argument("--imatrix-rows", action="store_true",
                    help="also NPFT, then our importance-weighted Q4_0/IQ4_NL export with the float model's imatrix (needs the peers)")
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        rec = json.loads((ROOT / "evals" / "FIDELITY.json").read_text())
        write(rec)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    th = ["--threads", a.threads]
    f32 = once(OUT / "f32.gguf", lambda: npft("export", "smollm2-135m", "--type", "f32", "-o", OUT / "f32.gguf"))
    files: dict[str, Path] = {}
    for t in ("q4_0", "iq4_nl"):
        files[f"RTN {t.upper()}"] = once(OUT / f"rtn-{t}.gguf", lambda t=t: npft("export", "smollm2-135m", "--type", t, "-o", OUT / f"rtn-{t}.gguf"))
    files["GPTQ Q4_0"] = once(OUT / "gptq-q4_0.gguf", lambda: npft(
        "convert", "smollm2-135m", "--method", "gptq", "--type", "q4_0", "--calib", a.calib, "--calib-samples", 128,
        "--calib-len", 512, "--eval-text", "none", *th, "-o", OUT / "gptq-q4_0.gguf", label="GPTQ Q4_0"))
    calib_file = OUT / f"calib-{a.calib}.txt"
    if not a.no_peers:
        if not calib_file.exists():
            from npft_gguf.calib import calibration_text

            calib_file.write_text(calibration_text(a.calib), encoding="utf-8")
        imat = once(OUT / "llamacpp.imatrix.gguf", lambda: run(
            [llamacpp_tool("llama-imatrix"), "-m", f32, "-f", calib_file, "-c", 512, "-b", 512, "--chunks", 64, "--no-ppl", "-t", a.threads,
             "-o", OUT / "llamacpp.imatrix.gguf"], label="llama-imatrix"))
        quant = llamacpp_tool("llama-quantize")
        for t, use in (("q4_0", True), ("iq4_nl", True), ("q4_k_m", True), ("q4_k_m", False)):
            name = f"llama.cpp {t.upper()}" + (" + imatrix" if use else "")
            p = OUT / f"llamacpp-{t}{'-imatrix' if use else ''}.gguf"
            files[name] = once(p, lambda t=t, use=use, p=p: run(
                [quant, *(["--imatrix", imat] if use else []), f32, p, t.upper(), a.threads], label=name))
    for v in [v for v in a.variants.split(",") if v]:
        objective, noise = v.split("/")
        tuned = OUT / f"npft-{objective}-{noise}"
        if not (tuned / "config.json").exists():
            npft("finetune", "smollm2-135m", "-o", tuned, "--calib", a.calib, "--objective", objective, "--noise", noise,
                 *(["--resample", "step"] if noise == "rtn" else []), *shlex.split(a.npft), *th, "--force", label=f"tune {v}")
        for t in ("q4_0", "iq4_nl"):
            p = OUT / f"npft-{objective}-{noise}-{t}.gguf"
            files[f"NPFT {objective}/{noise} {t.upper()}"] = once(p, lambda t=t, p=p: npft("export", tuned, "--type", t, "-o", p))
            if a.imatrix_rows:  # the tuned weights, then importance-weighted scales from the float model's imatrix
                p = OUT / f"npft-{objective}-{noise}-{t}-imatrix.gguf"
                files[f"NPFT {objective}/{noise} {t.upper()} + imatrix"] = once(p, lambda t=t, p=p: npft(
                    "export", tuned, "--type", t, "--imatrix", OUT / "llamacpp.imatrix.gguf", "-o", p))
    results = {}
    for name, spec in texts(a).items():
        md = OUT / f"compare-{name}.md"
        if not md.with_suffix(".json").exists():
            npft("compare", *files.values(), "--ref", f32, "--text", spec, "--chunks", a.chunks, *th, "--no-bench", "-o", md,
                 "--force", label=f"compare {name}")
        results[name] = json.loads(md.with_suffix(".json").read_text())
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks,
           "calib": a.calib, "npft": a.npft, "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()},
           "results": results, "commands": LOG,
           "domains": {d: domains.sha256(domains.path(d)) for d in domains.DOMAINS}}
    (ROOT / "evals" / "FIDELITY.json").write_text(json.dumps(rec, indent=2, default=str))
    write(rec)


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def table(rec: dict) -> dict[str, dict[str, dict]]:
    """file label -> text -> its comparison row."""
    by_name = {Path(v).name: k for k, v in rec["files"].items()} | {"f32.gguf": "F32"}
    out: dict[str, dict[str, dict]] = {}
    for text, cmp in rec["results"].items():
        for row in cmp["rows"]:
            label = by_name.get(Path(row["file"]).name, Path(row["file"]).stem)
            out.setdefault(label, {})[text] = row
    return out


def standing(rec: dict, t: dict) -> list[str]:
    """Computed from the table: does each NPFT Q4_0 row beat GPTQ and llama.cpp's imatrix Q4_0 on every text?"""
    lines = []
    texts_ = list(rec["results"])
    peers = [p for p in ("GPTQ Q4_0", "llama.cpp Q4_0 + imatrix", "llama.cpp Q4_K_M") if p in t]
    for label in [k for k in t if k.startswith("NPFT") and "Q4_0" in k]:
        for p in peers:
            wins = [x for x in texts_ if t[label][x]["kld_mean"] < t[p][x]["kld_mean"]]
            verdict = "below" if len(wins) == len(texts_) else ("above" if not wins else "mixed")
            lines.append(f"- {label} vs {p}: mean KLD {verdict} on {len(wins)} of {len(texts_)} texts"
                         + (f" ({', '.join(wins)})" if wins and len(wins) < len(texts_) else "") + ".")
    for label in [k for k in t if k.startswith("NPFT") and "IQ4_NL" in k]:
        p = "llama.cpp IQ4_NL + imatrix"
        if p in t:
            wins = [x for x in texts_ if t[label][x]["kld_mean"] < t[p][x]["kld_mean"]]
            lines.append(f"- {label} vs {p}: mean KLD below on {len(wins)} of {len(texts_)} texts.")
    return lines


def write(rec: dict):
    t = table(rec)
    texts_ = list(rec["results"])
    any_cmp = next(iter(rec["results"].values()))
    lines = ["# Fidelity to the float model: SmolLM2-135M-Instruct", "",
             f"Built by `.venv/bin/python evals/fidelity_smollm2.py` on {rec['date'][:10]}, {rec['machine']}. "
             f"llama.cpp (llama-cpp-python), ctx {any_cmp['ctx']}, first {rec['chunks']} chunks of each text, flash attention off; "
             "KLD against our F32 export on the same tokens. Calibration for every method: "
             f"`--calib {rec['calib']}` (gensim's Wikipedia articles, never the held-out ones); NPFT options `{rec['npft']}`.", "",
             "## Mean KLD per text (lower is closer to the float model)", "",
             "| file | size MB | " + " | ".join(texts_) + " |", "|---|---|" + "---|" * len(texts_)]
    for label, row in t.items():
        if label == "F32":
            continue
        size = next(iter(row.values()))["size_mb"]
        lines.append(f"| {label} | {size:.1f} | " + " | ".join(f"{row[x]['kld_mean']:.4f}" if x in row else "" for x in texts_) + " |")
    lines += ["", "## Standing (computed from the table)", "", *standing(rec, t), ""]
    for x in texts_:
        cmp = rec["results"][x]
        lines += [f"## {x}: {cmp['text']}", "", "| file | PPL | mean KLD | p99 KLD | same top-1 % |", "|---|---|---|---|---|"]
        for label, row in t.items():
            r = row.get(x)
            if r is None:
                continue
            p99 = r["kld"]["p99"] if r.get("kld") else 0.0
            lines.append(f"| {label} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | {p99:.4f} | {r['same_top1_pct']:.1f} |")
        lines.append("")
    lines += ["## Domain texts (sha256)", ""] + [f"- {d}: `{h}`" for d, h in rec.get("domains", {}).items()] + [""]
    lines += ["## Commands", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {c['seconds']} |" for c in rec["commands"]]
    (ROOT / "evals" / "FIDELITY.md").write_text("\n".join(lines) + "\n")
    plot(t, texts_)


def plot(t: dict, texts_: list[str]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [k for k in t if k != "F32"]
    fig, ax = plt.subplots(figsize=(10, 5))
    w = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ax.bar([j + i * w for j in range(len(texts_))], [t[label].get(x, {}).get("kld_mean", 0) for x in texts_], w, label=label)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(texts_))], texts_)
    ax.set_ylabel("mean KLD against F32")
    ax.set_title("SmolLM2-135M: KL divergence from the float model, per text")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(ROOT / "evals" / "FIDELITY.png", dpi=110)


if __name__ == "__main__":
    main()
