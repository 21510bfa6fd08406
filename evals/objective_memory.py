"""Peak memory and time of one NPFT training step per tuning objective, on a large vocabulary.

A tiny qwen2-shaped model (2 layers, hidden 64) with Qwen's real vocabulary of 151,936 tokens, so
the vocabulary head dominates as it does for real models with large vocabularies: the CE
objective materialises (batch, positions, vocab) float32 logits; the KL objective works in
checkpointed position chunks (npft_gguf/npft/objective.py). Each objective runs in a fresh
process: model and LoRA built, then one micro-batch of the noisy and the clean term (forward +
backward), and the process's peak RSS above what it held before the step is reported.

    .venv/bin/python evals/objective_memory.py                 # table for ce, kl, ce+kl
    .venv/bin/python evals/objective_memory.py --batch 2 --len 512 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one(objective: str, batch: int, length: int, vocab: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from npft_gguf.npft.objective import get_objective, loss, teacher_hidden

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=length, tie_word_embeddings=True)
    model = get_peft_model(Qwen2ForCausalLM(cfg).float(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    x = torch.randint(0, vocab, (batch, length))
    obj = get_objective(objective)
    before = rss_peak_mb()
    t = time.perf_counter()
    for _ in range(steps):
        teacher = teacher_hidden(model, x) if obj.needs_teacher else None
        for _term in ("noisy", "clean"):
            loss(obj, model, x, teacher).backward()
    seconds = (time.perf_counter() - t) / steps
    return {"objective": objective, "peak_rss_mb": rss_peak_mb(), "before_step_mb": before,
            "step_peak_above_mb": rss_peak_mb() - before, "seconds_per_step": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.len, a.vocab, a.steps)))
        return
    rows = []
    for objective in ("ce", "kl", "ce+kl"):
        out = subprocess.run([sys.executable, __file__, "--one", objective, "--batch", str(a.batch), "--len", str(a.len),
                              "--vocab", str(a.vocab), "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ce = rows[0]["step_peak_above_mb"]
    print(f"tiny qwen2, vocab {a.vocab}, batch {a.batch} x {a.len} tokens, noisy + clean term, 1 thread\n")
    print("| objective | peak RSS MB | step's peak above start MB | x CE | s/step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['peak_rss_mb']:.0f} | {r['step_peak_above_mb']:.0f} | {r['step_peak_above_mb'] / ce:.2f} | "
              f"{r['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
