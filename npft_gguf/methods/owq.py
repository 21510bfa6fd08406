"""OWQ (Lee et al., arXiv 2306.02272), simulated: a few weak input columns per linear stay in fp16,
the rest are GPTQ-quantized around them.

Column j's sensitivity is H_jj * ||W_:,j - RTN(W)_:,j||^2 (H = 2 X X^T / n from calibration
inputs, RTN on the same target quantizer). The top-k columns are kept: GPTQ orders them last, never
quantizes them, and lets them absorb the error feedback of every quantized column; they are then
rounded to fp16. Group parameters (GGUF blocks of 32) are fitted from the quantized columns only.

GGUF has no per-column mixed precision (one type per tensor), so an OWQ model cannot be written as a
GGUF file that llama.cpp runs: the result is a fake-quantized float model, evaluated in torch on the
same perplexity protocol. `OWQ_WARNING` says so in words a command line can print.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .gptq import GPTQ, GPTQSettings
from .sequential import SequentialReport, run_layerwise

OWQ_WARNING = ("OWQ is simulated: its weak columns stay in fp16 beside quantized ones, which GGUF cannot hold "
               "(one type per tensor), so no .gguf file is written; the model is fake-quantized and evaluated in torch")


@dataclass(frozen=True)
class OWQSettings:
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    weak_cols: int | None = None  # weak columns per linear; overrides weak_fraction
    weak_fraction: float = 0.01  # of each linear's input columns, rounded, at least 1

    def k(self, columns: int) -> int:
        if self.weak_cols is not None:
            return max(0, min(columns, self.weak_cols))
        return max(1, round(self.weak_fraction * columns))


def weak_columns(weight: torch.Tensor, H: torch.Tensor, quantizer, k: int) -> torch.Tensor:
    """Indices of the k columns with the largest H_jj * ||W_j - RTN(W)_j||^2."""
    w = weight.detach().to(H.device, torch.float32)
    score = torch.diag(H) * (w - quantizer.fakequant(w).to(w.device)).pow(2).sum(0)
    return torch.topk(score, k).indices


def owq_method(settings: OWQSettings):
    q = settings.gptq.quantizer()
    base_bits = getattr(getattr(q, "grid", None), "bits_per_weight", None) or getattr(q, "bits", 16)

    def apply(name, linear, h: GPTQ):
        if q.group and linear.in_features % q.group:
            return {"skipped": True}
        k = settings.k(linear.in_features)
        keep = weak_columns(linear.weight, h.H, q, k) if k else None
        r = h.quantize(linear.weight, q, settings.gptq, keep=keep)
        w = r.weight
        if keep is not None:
            w[:, keep.to(w.device)] = w[:, keep.to(w.device)].half().float()
        linear.weight.copy_(w.to(linear.weight.dtype))
        frac = k / linear.in_features
        return {"quantizer": q.name, "weak_cols": k, "weak": sorted(keep.tolist()) if k else [], "loss": r.loss, "seconds": round(r.seconds, 3),
                "bits_per_weight": (1 - frac) * base_bits + frac * 16, "weights": linear.weight.numel()}

    return apply


def owq_model_(model, calib: torch.Tensor, settings: OWQSettings = OWQSettings(), *, device=None,
               progress: bool = True) -> SequentialReport:
    """OWQ every decoder linear of `model` in place (simulated); the report's linears carry weak_cols
    and an effective bits/weight (weak columns counted at 16 bits, their indices not counted)."""
    return run_layerwise(model, calib, owq_method(settings), device=device, batch_size=settings.gptq.batch_size,
                         true_sequential=settings.gptq.true_sequential, progress=progress)


def mean_bits(report: SequentialReport) -> float:
    """Weight-averaged bits/weight over the quantized linears of an OWQ report."""
    items = [v for v in report.linears.values() if not v.get("skipped")]
    total = sum(v["weights"] for v in items)
    return sum(v["bits_per_weight"] * v["weights"] for v in items) / total if total else float("nan")
