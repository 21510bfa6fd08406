"""Tuning objectives: what the noisy and the clean term of NPFT's loss measure.

    ce     next-token cross-entropy on the calibration tokens (the paper, and its public code)
    kl     KL(p_float || p_tuned) per position: the distance from the float model's next-token
           distribution, the quantity a faithful quantized file should keep small
    ce+kl  the sum of the two

Next-token loss on calibration text pulls the model towards that text, not towards the float
model: perplexity on similar text falls while the model drifts (docs/METHOD.md). The KL objective
distils from the float model instead. Its teacher is the same peft model with the adapters
disabled and the noise off, so no second copy of the weights is held; the teacher gives its
final hidden states, not its logits.

Full-vocabulary logits are never held for a whole batch: the KL is summed over position chunks,
each recomputed in the backward pass (activation checkpointing), so only one chunk's
(batch, positions, vocab) float32 logits exist at a time, whatever the vocabulary (Qwen 151,936,
Gemma 262,144). The result is exact: no top-k truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 64 * 2**20  # float32 logits held at once per chunk (student and teacher: twice this)


@dataclass(frozen=True)
class Objective:
    name: str
    ce: bool   # includes next-token cross-entropy
    kl: bool   # includes KL from the float model
    summary: str

    @property
    def needs_teacher(self) -> bool:
        return self.kl


OBJECTIVES = {
    "ce": Objective("ce", ce=True, kl=False, summary="next-token cross-entropy on the calibration tokens"),
    "kl": Objective("kl", ce=False, kl=True, summary="KL divergence from the float model's next-token distribution"),
    "ce+kl": Objective("ce+kl", ce=True, kl=True, summary="cross-entropy plus KL from the float model"),
}

# Fisher scores and the Hessian trace keep the next-token loss whatever the objective: at the start
# of tuning the student is the teacher, where the KL and its gradient are zero.
SENSITIVITY_LOSS = "next-token cross-entropy on the calibration tokens (per-sample squared gradients)"
TRACE_LOSS = "next-token cross-entropy on the calibration tokens"


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        from ..errors import UsageError

        raise UsageError(f"--objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def _causal_lm(model):
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model, x: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (batch, positions, hidden), without the vocabulary head."""
    lm = _causal_lm(model)
    return lm.get_decoder()(input_ids=x).last_hidden_state


@torch.no_grad()
def teacher_hidden(model, x: torch.Tensor) -> torch.Tensor:
    """The float model's last hidden states: adapters disabled (peft), noise off (the caller's)."""
    with model.disable_adapter():
        return final_hidden(model, x)


def _head(lm):
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return head, softcap


def _logits(h, weight, bias, softcap):
    z = F.linear(h, weight, bias).float()
    return torch.tanh(z / softcap) * softcap if softcap else z


def _kl_sum(h_student, h_teacher, weight, bias, softcap):
    log_q = F.log_softmax(_logits(h_student, weight, bias, softcap), -1)
    log_p = F.log_softmax(_logits(h_teacher, weight, bias, softcap), -1)
    return (log_p.exp() * (log_p - log_q)).sum()


def kl_from_hidden(lm, h_student: torch.Tensor, h_teacher: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student), in position chunks, each checkpointed."""
    head, softcap = _head(lm)
    b, t, _ = h_student.shape
    vocab = head.weight.shape[0]
    step = max(1, chunk_bytes // (4 * b * vocab))
    total = h_student.new_zeros((), dtype=torch.float32)
    for i in range(0, t, step):
        part = (h_student[:, i:i + step], h_teacher[:, i:i + step], head.weight, head.bias, softcap)
        if torch.is_grad_enabled() and h_student.requires_grad:
            total = total + checkpoint(_kl_sum, *part, use_reentrant=False)
        else:
            total = total + _kl_sum(*part)
    return total / (b * t)


def loss(objective: Objective, model, x: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """The objective on one micro-batch `x`, for the model as it is now (noise on or off)."""
    if not objective.kl:
        return model(input_ids=x, labels=x).loss
    lm = _causal_lm(model)
    h = final_hidden(model, x)
    value = kl_from_hidden(lm, h, teacher)
    if objective.ce:
        head, softcap = _head(lm)
        ce = 0.0
        b, t, _ = h.shape
        step = max(1, CHUNK_BYTES // (4 * b * head.weight.shape[0]))
        for i in range(0, t - 1, step):
            j = min(i + step, t - 1)
            part = (h[:, i:j], x[:, i + 1:j + 1], head.weight, head.bias, softcap)
            ce = ce + (checkpoint(_ce_sum, *part, use_reentrant=False) if h.requires_grad else _ce_sum(*part))
        value = value + ce / (b * (t - 1))
    return value


def _ce_sum(h, labels, weight, bias, softcap):
    z = _logits(h, weight, bias, softcap)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum")
