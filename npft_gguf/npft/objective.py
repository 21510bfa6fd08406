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
and since its gradient with respect to the logits is known in closed form (q - p), each chunk's
gradient with respect to the hidden states is formed at once and only that is kept for the
backward pass. Only one chunk's (batch, positions, vocab) float32 logits exist at a time, whatever
the vocabulary (Qwen 151,936, Gemma 262,144), and nothing is recomputed. The result is exact: no
top-k truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    return lm.get_decoder()(input_ids=x, use_cache=False).last_hidden_state


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


class _HeadLoss(torch.autograd.Function):
    """sum over positions of KL(p_teacher || q) / n_kl + CE(q, label) / n_ce, q = softmax(head(h)).

    The gradient with respect to the logits is known in closed form (q - p_teacher for the KL,
    q - onehot for the CE), so each chunk's logits live only inside forward: it computes the
    value and d/dh chunk by chunk and keeps just d/dh (batch, positions, hidden) for backward.
    Head cost per chunk: student and teacher logits, one matmul for d/dh; nothing recomputed."""

    @staticmethod
    def forward(ctx, h, h_teacher, labels, weight, bias, softcap, step):
        b, t, _ = h.shape
        n_kl, n_ce = b * t, b * max(t - 1, 1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.zeros_like(h, dtype=torch.float32)
        for i in range(0, t, step):
            hs = h[:, i:i + step]
            capped = _logits(hs, weight, bias, softcap)
            log_q = F.log_softmax(capped, -1)
            q = log_q.exp()
            g = torch.zeros_like(q)
            if h_teacher is not None:
                log_p = F.log_softmax(_logits(h_teacher[:, i:i + step], weight, bias, softcap), -1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum() / n_kl
                g += (q - p) / n_kl
                del log_p, p
            if labels is not None:
                j = min(i + step, t - 1)  # position t-1 has no next token
                if j > i:
                    lab = labels[:, i + 1:j + 1]
                    total += -log_q[:, : j - i].gather(-1, lab.unsqueeze(-1)).sum() / n_ce
                    g[:, : j - i] += q[:, : j - i] / n_ce
                    g[:, : j - i].scatter_add_(-1, lab.unsqueeze(-1), torch.full_like(lab, -1.0 / n_ce, dtype=g.dtype).unsqueeze(-1))
            if softcap:
                g *= 1 - (capped / softcap).square()
            grad[:, i:i + step] = g.to(weight.dtype) @ weight
            del capped, log_q, q, g
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out * grad).to(grad.dtype), None, None, None, None, None, None


def head_loss(lm, h: torch.Tensor, h_teacher: torch.Tensor | None, labels: torch.Tensor | None,
              chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean KL from the teacher over all positions (if `h_teacher`) plus mean next-token CE (if
    `labels`), from the final hidden states, in position chunks of at most `chunk_bytes` of logits."""
    head, softcap = _head(lm)
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise NotImplementedError("the fused head loss assumes a frozen vocabulary head (it is not a LoRA target)")
    b, t, _ = h.shape
    step = max(1, chunk_bytes // (4 * b * head.weight.shape[0]))
    return _HeadLoss.apply(h, h_teacher, labels, head.weight, head.bias, softcap, step)


def kl_from_hidden(lm, h_student: torch.Tensor, h_teacher: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student)."""
    return head_loss(lm, h_student, h_teacher, None, chunk_bytes)


def loss(objective: Objective, model, x: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """The objective on one micro-batch `x`, for the model as it is now (noise on or off)."""
    if not objective.kl:
        return model(input_ids=x, labels=x, use_cache=False).loss
    lm = _causal_lm(model)
    return head_loss(lm, final_hidden(model, x), teacher, x if objective.ce else None)
