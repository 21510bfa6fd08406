#!/usr/bin/env python3
"""Where SmolLM2-135M's decoder linears see massive activations, and how much of GPTQ's Hessian
they take (the reason GPTQ runs with act-order by default; see npft_gguf/methods/gptq.py).

For every decoder linear it prints, over a few calibration segments: the first token's share of
tr(X X^T) (the Hessian's trace, up to a constant), max |x| over all tokens and over all but the
first. Rows where the first token takes more than --min-share are printed, plus the first and last
layer for scale.

    .venv/bin/python evals/massive_activations.py [--samples 4] [--min-share 0.02] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")  # one per distinct input


def main():
    from npft_gguf.calib import CalibSettings, load_calibration
    from npft_gguf.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4, help="calibration segments of 512 tokens (seed 0)")
    ap.add_argument("--min-share", type=float, default=0.02)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calib", default="wiki", help="calibration text, as npft-gguf --calib (default: the fetched Wikipedia articles)")
    a = ap.parse_args()
    src = open_source("smollm2-135m")
    model = src.load_model(dtype=torch.float32)
    calib = CalibSettings(calib=a.calib, samples=a.samples, length=512, seed=0)
    ids = load_calibration(calib, src.tokenizer(), model=model, progress=False)
    stats = {}

    def hook(name):
        def record(_mod, inp, _out):
            x = inp[0].float()
            sq = (x * x).sum(-1)  # (batch, tokens)
            stats[name] = {"first_token_share": float(sq[:, 0].sum() / sq.sum()), "max_abs": float(x.abs().amax()),
                           "max_abs_rest": float(x[:, 1:].abs().amax())}
        return record

    layers = model.model.layers
    for i, layer in enumerate(layers):
        for n in LINEARS:
            layer.get_submodule(n).register_forward_hook(hook(f"{i}.{n}"))
    with torch.no_grad():
        model(ids, use_cache=False)
    last = len(layers) - 1
    print(f"{'linear':24s} {'first token share of tr H':>26s} {'max |x|':>10s} {'max |x|, rest':>14s}")
    for k, s in stats.items():
        if s["first_token_share"] > a.min_share or k.startswith(("0.", f"{last}.")):
            print(f"{k:24s} {s['first_token_share']:26.3f} {s['max_abs']:10.1f} {s['max_abs_rest']:14.1f}")
    if a.json:
        a.json.write_text(json.dumps({"calibration": calib.calib, "samples": a.samples, "linears": stats}, indent=2))


if __name__ == "__main__":
    main()
