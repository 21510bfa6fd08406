"""Torch twins of llama.cpp's scale searches (npft_gguf/grids/twins.py): how often they write what
llama.cpp writes, and what they cost a tuning step.

Agreement: the decoder linears of four of SmolLM2-135M's layers (first, last, two between), with
the importance matrix of the float model on the `wiki` calibration text (`npft-gguf imatrix
smollm2-135m --calib wiki --chunks 32`) and without one: the share of blocks (of 32 weights; for
the K-quants super-blocks of 256, on each row's first 512 or 1536 columns, as SmolLM2's 576-wide
rows fit none evenly) whose bytes (codes and fp16 scale, and min) the twin makes
exactly as llama.cpp's own quantizer (ggml_quantize_chunk in the libggml that llama-cpp-python
ships) does, and the imatrix-weighted error of the twin's whole matrix over llama.cpp's.

Step time: NPFT's short recipe (kl objective, rtn noise, Q4_0) on SmolLM2-135M for a few optimizer
steps with each noise: plain RTN's error, the twins of the imatrix Q4_0 mix's rules (the default on
a GPU), llama.cpp's own quantizer on the CPU (ggml_quantize_chunk: the default on the CPU since this
table, grids/mix.SearchRule). Seconds
per step after the first, median, and the ratio to plain RTN's; then plain RTN and the twins for
Q4_K (grid q4_k, llama-quantize's name of the Q4_K_S mix); each noise twice, interleaved, so
a busy machine shows as a spread rather than a bias. Each part is saved as it is measured, so an
interrupted run continues where it stopped.

    .venv/bin/python evals/twins.py [--steps 5]
    .venv/bin/python evals/twins.py --render

writes evals/TWINS.md and evals/TWINS.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals._run import machine, npft  # noqa: E402

OUT = ROOT / "evals" / "out" / "twins"
JSON = ROOT / "evals" / "TWINS.json"
# label -> (noise, the tuning's grid); each twin row's ratio is to the plain RTN row of its grid
NOISES = {"plain RTN": ("rtn", "q4_0"), "twins (imatrix Q4_0 mix)": ("twin", "q4_0"),
          "llama.cpp on the CPU (imatrix Q4_0 mix)": ("numpy", "q4_0"),
          "plain RTN (Q4_K)": ("rtn", "q4_k"), "twins (imatrix Q4_K_S mix)": ("twin", "q4_k")}
BASELINE = {"q4_0": "plain RTN", "q4_k": "plain RTN (Q4_K)"}


def agreement(source, imatrix) -> list[dict]:
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    from npft_gguf.grids import get_grid
    from npft_gguf.grids.twins import TWINNED, TwinRules
    from npft_gguf.llamacpp import ggml_quantize

    layers = source.config.num_hidden_layers
    picked = sorted({0, layers // 3, 2 * layers // 3, layers - 1})  # first, last and two between: a quarter hour on 2 cores
    linears = [n for n, s in source.shapes().items() if len(s) == 2 and any(n.startswith(f"model.layers.{i}.") for i in picked)]
    rows = []
    for name in TWINNED:
        grid = get_grid(name)
        for with_im in (True, False):  # K-quants: every row's first columns, a multiple of 256 (SmolLM2's 576 -> 512)
            same = total = 0
            err_twin = err_ggml = 0.0
            for n in linears:
                w = source.load(n).float().numpy()
                qw = imatrix.weights(source.arch.gguf_name(n)) if with_im else None
                cols = w.shape[1] // grid.block * grid.block
                w, qw = np.ascontiguousarray(w[:, :cols]), None if qw is None else qw[:cols]
                ours = grid.pack_blocks(TwinRules(name, qw).codes(torch.from_numpy(w)))
                theirs = ggml_quantize(name, w, qw)
                blocks = theirs.reshape(-1, GGML_QUANT_SIZES[grid.ggml][1])
                same += int((ours == blocks).all(1).sum())
                total += blocks.shape[0]
                wt = np.ones(w.shape[1], np.float32) if qw is None else qw
                d_ours = dequantize(ours.reshape(w.shape[0], -1), grid.ggml).reshape(w.shape)
                d_theirs = dequantize(theirs, grid.ggml).reshape(w.shape)
                err_twin += float((wt * (d_ours - w) ** 2).sum())
                err_ggml += float((wt * (d_theirs - w) ** 2).sum())
            rows.append({"type": name, "imatrix": with_im, "layers": picked, "matrices": len(linears), "blocks": total,
                         "identical": same, "identical_pct": 100.0 * same / total,
                         "error_ratio": err_twin / err_ggml if err_ggml else None})  # None: llama.cpp's file is lossless
            print(f"{name} imatrix={with_im}: {100.0 * same / total:.3f} % of {total} blocks identical", flush=True)
    return rows


def step_times(source, imatrix_path: Path, noise: str, steps: int, grid: str = "q4_0") -> list[float]:
    """Seconds between consecutive optimizer steps of a short-recipe tuning with `noise`."""
    import tempfile

    from npft_gguf.calib import CalibSettings, load_calibration
    from npft_gguf.npft import NPFTSettings, tune

    tokens = load_calibration(CalibSettings(calib="wiki", samples=64, length=256), source.tokenizer(), progress=False)
    settings = NPFTSettings(noise="rtn", objective="kl", grid=grid, imatrix=None if noise == "rtn" else str(imatrix_path),
                            epochs=1, max_steps_per_epoch=steps, lr=5e-4, batch=4, fisher_samples=2, trace_samples=0)
    stamps = []
    from npft_gguf.grids.mix import SearchRule

    saved = SearchRule.on_cpu  # which of the two a search runs on the CPU: the twin, or llama.cpp's quantizer
    SearchRule.on_cpu = "llama.cpp" if noise == "numpy" else "twin"
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            tune(source.load_model(), tokens, settings, Path(run_dir), progress=False,
                 on_step=lambda row: stamps.append(time.perf_counter()), log=lambda m: None)
    finally:
        SearchRule.on_cpu = saved
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        write(json.loads(JSON.read_text()))
        return
    import torch

    from npft_gguf.imatrix import load_imatrix
    from npft_gguf.sources import open_source

    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    im_path = OUT / "smollm2.imatrix.gguf"
    cmd = None
    if not im_path.exists():
        npft("imatrix", "smollm2-135m", "--calib", "wiki", "--ctx", 512, "--chunks", 32, "-o", im_path)
    cmd = f"npft-gguf imatrix smollm2-135m --calib wiki --ctx 512 --chunks 32 -o {im_path.relative_to(ROOT)}"
    source = open_source("smollm2-135m")
    partial = OUT / "twins.partial.json"  # each part saved as it is measured: a rerun measures only what is missing
    rec = json.loads(partial.read_text()) if partial.exists() else {}
    rec.update({"date": dt.date.today().isoformat(), "machine": machine(), "imatrix": cmd})
    if "agreement" not in rec:
        rec["agreement"] = agreement(source, load_imatrix(im_path))
        partial.write_text(json.dumps(rec, indent=1))
    rec.setdefault("steps", {})
    rec.setdefault("rounds_done", 0)
    while rec["rounds_done"] < 2:
        for label, (noise, grid) in NOISES.items():
            t = step_times(source, im_path, noise, a.steps, grid)
            rec["steps"].setdefault(label, []).extend(t)
            print(f"{label} (round {rec['rounds_done'] + 1}): {', '.join(f'{x:.2f}' for x in t)} s per step", flush=True)
        rec["rounds_done"] += 1
        partial.write_text(json.dumps(rec, indent=1))
    JSON.write_text(json.dumps(rec, indent=1))
    write(rec)


def write(rec: dict):
    lines = [
        "# Torch twins of llama.cpp's scale searches", "",
        f"Built by `.venv/bin/python evals/twins.py` on {rec['date']} ({rec['machine']}). The imatrix: `{rec['imatrix']}`.", "",
        "## Agreement with llama.cpp's bytes", "",
        f"The decoder linears of SmolLM2-135M's layers {', '.join(map(str, rec['agreement'][0]['layers']))} "
        f"({rec['agreement'][0]['matrices']} matrices). Identical: the block's bytes (codes, fp16 scale, min; a K-quant's super-block of 256, on each row's "
        "first 512 or 1536 columns) "
        "equal ggml_quantize_chunk's. Error ratio: the twin's imatrix-weighted squared error over those matrices "
        "divided by llama.cpp's (1 = the same; without an imatrix, unweighted; '-': llama.cpp's file is lossless, as "
        "Q4_1 is for this model, whose only public weights are Q4_1).", "",
        "| type | imatrix | blocks | identical % | error ratio |", "|---|---|---|---|---|",
    ]
    for r in rec["agreement"]:
        lines.append(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['blocks']} | {r['identical_pct']:.3f} | "
                     + ("- |" if r["error_ratio"] is None else f"{r['error_ratio']:.6f} |"))
    lines += ["", "## Tuning step time", "",
              "NPFT short recipe (kl objective, rtn noise, batch 4 x 256 tokens) on SmolLM2-135M, Q4_0 and Q4_K (the "
              "Q4_K_S mix: on SmolLM2 only the 1536-wide down_proj rows fit Q4_K, the rest fall back to Q5_0 as in "
              "llama.cpp); seconds between optimizer steps after the first, both rounds pooled; each ratio is to "
              "plain RTN noise on the same grid.", "",
              "| noise | steps | median s | min s | max s | ratio to plain RTN |", "|---|---|---|---|---|---|"]
    for label, t in rec["steps"].items():
        m = statistics.median(t)
        base = statistics.median(rec["steps"][BASELINE[NOISES[label][1]]])
        lines.append(f"| {label} | {len(t)} | {m:.2f} | {min(t):.2f} | {max(t):.2f} | {m / base:.2f}x |")
    (ROOT / "evals" / "TWINS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
