"""GPTQ onto Q4_0 on SmolLM2-135M, exported as an ordinary GGUF and measured in llama.cpp.

    nice .venv/bin/python evals/gptq_smollm2.py [--no-act-order] [--samples 128] [--out-dir evals/out]

1. the demo model (`smollm2-135m`, float32 in torch);
2. calibration: 128 random 512-token segments (seed 0) of --calib (default `wiki`, the fetched
   Wikipedia calibration articles), tokenized with the model's tokenizer (never the WikiText-2 test text);
3. GPTQ (damp 0.01, block 128) of every decoder linear onto Q4_0's blocks, layer by layer;
4. save_pretrained (weights + tokenizer) and `npft-gguf export DIR --type q4_0` (plain RTN, which
   leaves GPTQ's on-grid weights unchanged; checked here tensor by tensor);
5. `npft-gguf eval FILE --chunks 40` (WikiText-2 test, ctx 512, llama.cpp, flash attention off).

Writes evals/out/gptq_smollm2.json with the settings, timings and perplexity.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "npft_gguf.cli"]


def run(*args) -> str:
    print("$ npft-gguf " + " ".join(map(str, args)), flush=True)
    r = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    print(r.stdout, r.stderr, sep="", flush=True)
    if r.returncode:
        raise SystemExit(f"npft-gguf {args[0]} failed ({r.returncode})")
    return r.stdout


def main():
    from npft_gguf.calib import CalibSettings, load_calibration
    from npft_gguf.methods import GPTQSettings, gptq_model_
    from npft_gguf.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, help="llama.cpp threads for the eval (default: all cores)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "evals" / "out")
    ap.add_argument("--calib", default="wiki", help="calibration text, as npft-gguf --calib")
    args = ap.parse_args()
    tag = f"gptq-{args.type}" + ("" if args.act_order else "-natural") + ("-ts" if args.true_sequential else "")
    work = args.out_dir / tag
    work.mkdir(parents=True, exist_ok=True)

    src = open_source("smollm2-135m")
    tok = src.tokenizer()
    model = src.load_model()
    calib_settings = CalibSettings(calib=args.calib, samples=args.samples, length=args.length, seed=0)
    calib = load_calibration(calib_settings, tok, progress=False)
    settings = GPTQSettings(target=args.type, act_order=args.act_order, true_sequential=args.true_sequential)
    t0 = time.perf_counter()
    report = gptq_model_(model, calib, settings, device=args.device)
    gptq_s = time.perf_counter() - t0
    print(f"GPTQ: {len(report.linears)} linears, {report.tokens} tokens, {gptq_s:.0f} s", flush=True)

    hf = work / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    gguf = work / f"smollm2-135m-{tag}.gguf"
    run("export", hf, "-o", gguf, "--type", args.type, "--force")

    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    params = dict(model.named_parameters())
    exact = all(
        (dequantize(tensors[src.arch.gguf_name(n + ".weight")].data, tensors[src.arch.gguf_name(n + ".weight")].tensor_type)
         == src.arch.to_gguf_layout(n + ".weight", params[n + ".weight"].detach(), src.config).numpy().reshape(-1, params[n + ".weight"].shape[1])).all()
        for n in report.linears)
    print(f"exported weights equal GPTQ's in memory: {exact}", flush=True)

    eval_json = work / "eval.json"
    run("eval", gguf, "--chunks", args.chunks, "--json", eval_json, "--force", *(["--threads", args.threads] if args.threads else []))
    result = json.loads(eval_json.read_text())
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(), "torch": torch.__version__,
        "calibration": asdict(calib_settings), "gptq": asdict(settings), "gptq_seconds": round(gptq_s, 1),
        "export_exact": bool(exact), "gguf": str(gguf), "size_bytes": gguf.stat().st_size, "eval": result,
        "commands": [f"nice .venv/bin/python evals/gptq_smollm2.py {' '.join(sys.argv[1:])}",
                     f"npft-gguf export {hf} -o {gguf} --type {args.type} --force",
                     f"npft-gguf eval {gguf} --chunks {args.chunks} --json {eval_json}"],
    }
    (args.out_dir / f"{tag}.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out_dir / (tag + '.json')}")


if __name__ == "__main__":
    main()
