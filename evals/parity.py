"""Whole-model checks of the exporter against llama.cpp on the real SmolLM2-135M.

1. Byte-exact: for q8_0, q4_0, q4_1, q5_0, q5_1, every tensor of our export equals what
   llama.cpp's `llama_model_quantize` writes from our F32 export (pure and llama.cpp's default mix).
2. Logits: our F32 export run by llama.cpp against the transformers model on WikiText-2 windows.
3. Tokens: llama.cpp's tokenization of all of wiki.test.raw against the Hugging Face tokenizer's.

    python evals/parity.py [--out-dir evals/out] [--windows 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npft_gguf import llamacpp  # noqa: E402
from npft_gguf.sources import open_source  # noqa: E402
from npft_gguf.texts import load_text  # noqa: E402
from npft_gguf.writer import ExportSettings, export  # noqa: E402

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def compare_files(a: Path, b: Path) -> dict:
    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    same_type = sum(ta[n].tensor_type == tb[n].tensor_type for n in ta if n in tb)
    same_bytes = sum(np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8)) for n in ta if n in tb)
    return {"tensors": len(ta), "names_equal": sorted(ta) == sorted(tb), "same_type": same_type, "same_bytes": same_bytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "evals" / "out")
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 512 tokens for the logits check")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    src = open_source("smollm2-135m")
    f32 = args.out_dir / "smollm2-f32.gguf"
    export(src, f32, ExportSettings("f32"), force=True, progress=False)
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "llama_cpp_python": __import__("llama_cpp").__version__, "bytes": {}, "logits": {}, "tokens": {}}

    for t in TYPES:
        for pure in (True, False):
            ours, theirs = args.out_dir / f"ours-{t}.gguf", args.out_dir / f"llamacpp-{t}.gguf"
            export(src, ours, ExportSettings(t, pure=pure), force=True, progress=False)
            llamacpp.quantize(f32, theirs, t, pure=pure)
            r = compare_files(ours, theirs)
            report["bytes"][f"{t}{' pure' if pure else ''}"] = r
            print(f"{t:5s} {'pure ' if pure else 'mixed'}: {r['same_bytes']}/{r['tensors']} tensors byte-identical, "
                  f"{r['same_type']}/{r['tensors']} same type", flush=True)
            ours.unlink(), theirs.unlink()

    name, text = load_text("wikitext2")
    llm = llamacpp.load(f32, n_ctx=512)
    tok = src.tokenizer()
    t0 = time.perf_counter()
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    cpp_ids = llamacpp.tokenize(llamacpp.load(f32, n_ctx=64, vocab_only=True, logits_all=False), text)
    first_diff = next((i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids)) if a != b), None)
    report["tokens"] = {"text": name, "hf": len(hf_ids), "llama_cpp": len(cpp_ids), "equal": hf_ids == cpp_ids,
                        "first_difference": first_diff, "seconds": time.perf_counter() - t0}
    print(f"tokens: HF {len(hf_ids)}, llama.cpp {len(cpp_ids)}, identical: {hf_ids == cpp_ids}", flush=True)

    model = src.load_model()
    diffs, means, agree, n = [], [], 0, 0
    for w in range(args.windows):
        ids = hf_ids[w * 512:(w + 1) * 512]
        theirs = llamacpp.logits(llm, ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        d = np.abs(ours - theirs)
        diffs.append(float(d.max()))
        means.append(float(d.mean()))
        agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
        n += len(ids)
    report["logits"] = {"windows": args.windows, "ctx": 512, "max_abs_diff": max(diffs), "mean_abs_diff": float(np.mean(means)),
                        "top1_agreement_pct": 100.0 * agree / n, "llama_cpp_settings": "F32 weights, f16 KV cache (default), fa off"}
    print(f"logits over {n} positions: max |diff| {max(diffs):.4g}, mean |diff| {np.mean(means):.4g}, "
          f"top-1 agreement {100.0 * agree / n:.2f} %", flush=True)
    out = args.out_dir / "parity.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    ok = all(r["same_bytes"] == r["tensors"] == r["same_type"] for r in report["bytes"].values()) and report["tokens"]["equal"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
