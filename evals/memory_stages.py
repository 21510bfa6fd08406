"""Peak resident memory of each NPFT stage on SmolLM2-135M, CPU, with the short recipe's shapes
(256-token samples, LoRA rank 16 on the default targets, batch 4). A thread samples VmRSS every
10 ms; each line is the peak since the previous line. Per-sample stages (Fisher, the Hutchinson
trace) do not grow with the sample count, so a few samples show their peak.

    .venv/bin/python evals/memory_stages.py [--json OUT.json]

With --cli, it runs one npft-gguf command in-process instead and prints the Python stack (our,
peft's and transformers' frames) at the process's highest RSS:

    .venv/bin/python evals/memory_stages.py --cli finetune smollm2-135m -o /tmp/ft --recipe short ...
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = "wiki"  # the calibration articles of the Wikipedia dump fetched from PyPI (npft_gguf/texts.py)


def rss_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


class Peaks:
    """Samples RSS in a thread: the peak since the last `stage`, and (with stacks) the main
    thread's stack when the run's overall high was set."""

    def __init__(self, stacks: bool = False):
        self.peak, self.rows = rss_mb(), []
        self.high, self.high_stack, self.stacks = self.peak, [], stacks
        self.main_id = threading.get_ident()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            mb = rss_mb()
            self.peak = max(self.peak, mb)
            if self.stacks and mb > self.high:
                self.high, self.high_stack = mb, self._main_stack()
            time.sleep(0.01)

    def _main_stack(self) -> list[str]:
        frame = sys._current_frames().get(self.main_id)
        stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)]
        return [x for x in stack if any(k in x for k in ("npft_gguf", "peft", "transformers"))]

    def stage(self, name: str):
        now = rss_mb()
        self.rows.append({"stage": name, "peak_mb": max(self.peak, now), "after_mb": now})
        print(f"{name:34s} peak {self.rows[-1]['peak_mb']:6d} MB   after {now:6d} MB", flush=True)
        self.peak = now


def peak_stack(cli_args: list[str]):
    """Run `npft-gguf CLI_ARGS` here and say where RSS reached its high."""
    peaks = Peaks(stacks=True)
    from npft_gguf.cli import main as cli

    try:
        cli(cli_args, prog_name="npft-gguf")
    except SystemExit as e:
        if e.code:
            raise
    finally:
        print(f"peak RSS {peaks.high} MB, reached in:", *peaks.high_stack[-8:], sep="\n  ", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cli", nargs=argparse.REMAINDER, help="an npft-gguf command line to run and profile instead")
    args = ap.parse_args()
    if args.cli:
        return peak_stack(args.cli)
    peaks = Peaks()
    import torch
    from peft import LoraConfig, get_peft_model

    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import calibrated_model
    from npft_gguf.npft.config import NPFTSettings
    from npft_gguf.npft.hessian import outlier_trace
    from npft_gguf.npft.noise import Perturbations, merged_weights
    from npft_gguf.sensitivity import fisher_diagonal, outliers, target_linears
    from npft_gguf.sources import open_source

    torch.set_num_threads(2)
    peaks.stage("imports")
    calib = CalibSettings(calib=CALIB, samples=8, length=256, seed=0)
    source = open_source("smollm2-135m")
    model, tokens = calibrated_model(source, calib, "cpu", False, lambda m: None)
    peaks.stage("load + calibrate (8 x 256)")
    s = NPFTSettings().for_family(source.arch)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(s.targets), task_type="CAUSAL_LM"))
    linears = target_linears(peft_model)
    peaks.stage("peft wrap (rank 16)")
    fisher = fisher_diagonal(peft_model, tokens[:4], linears, False)
    peaks.stage("fisher (4 samples)")
    found = outliers(fisher, s.outlier_pct)
    del fisher
    peaks.stage("outliers, fisher freed")
    outlier_trace(peft_model, tokens[:1], linears, found, probes=2, progress=False)
    peaks.stage("hessian trace (1 sample, 2 probes)")
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(2):
        x = tokens[i * 4:(i + 1) * 4]
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    peaks.stage("train 2 steps (batch 4), no noise")
    noise = Perturbations(linears, found, "rtn", "outliers", "q4_0", s.perturbed, merged_weights(peft_model))
    noise.resample(torch.Generator().manual_seed(0))
    peaks.stage("rtn noise set up (q4_0)")
    for i in range(2):  # as npft/train.py: the noisy loss, then lambda times the clean one
        x = tokens[i * 4:(i + 1) * 4]
        with noise.on():
            peft_model(input_ids=x, labels=x).loss.backward()
        (0.5 * peft_model(input_ids=x, labels=x).loss).backward()
        opt.step()
        opt.zero_grad()
        noise.resample(torch.Generator().manual_seed(i + 1))
    noise.remove()
    peaks.stage("train 2 steps with rtn noise")
    outlier_trace(peft_model, tokens[:1], linears, found, probes=2, progress=False)
    peaks.stage("hessian trace again (after tuning)")
    if args.json:
        args.json.write_text(json.dumps(peaks.rows, indent=1))


if __name__ == "__main__":
    main()
