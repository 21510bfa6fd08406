"""Perplexity and KL divergence by llama-perplexity's protocol, chunk by chunk.

The token stream (BOS added when the vocabulary adds it) is cut into floor(N / n_ctx) windows;
each is decoded from a fresh cache with its first token replaced by BOS when the vocabulary adds
BOS, and only its second half is scored: logits at positions n_ctx/2 .. n_ctx-2 predict the next
token. With a reference model, both see the same windows and the per-token KL(ref || model),
argmax agreement and the change in the correct token's probability are accumulated; nothing
holds full-vocabulary logits beyond one window.

Without a reference the NLL of a position is `logsumexp(x) - x[target]` in float32 (torch,
multi-threaded; within about 1e-6 of float64); with one, both models' float64 log-softmax feeds
the KL divergence.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UsageError
from ..progress import bar
from ..signals import pause_for_tests
from .models import Backend


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 512
    chunks: int | None = None  # None: every full window


@dataclass
class EvalResult:
    model: str
    text: str
    settings: dict
    n_tokens_text: int = 0
    chunks: int = 0
    scored: int = 0
    ppl: float = float("nan")
    ppl_se: float = float("nan")
    seconds: float = 0.0
    interrupted: bool = False
    kld: dict | None = None
    ref: str | None = None
    ppl_ref: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def log_softmax(x: np.ndarray):
    """float64 log-probabilities (torch: multi-threaded, about 10x numpy on a 49k vocabulary)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64).log_softmax(-1)


def nll(x: np.ndarray, targets: np.ndarray):
    """-log p(target) per row, as float32 `logsumexp(x) - x[target]`: no log-probability matrix."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    return torch.logsumexp(t, -1) - t[torch.arange(len(targets)), torch.from_numpy(targets)]


@dataclass
class _Stats:
    """Running sums for PPL with its standard error, and the per-token KLD figures."""

    nll: list = field(default_factory=list)
    nll_ref: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    same_top: int = 0
    dp: list = field(default_factory=list)

    def add(self, lp, targets: np.ndarray, lp_ref):
        """One window's float64 log-probabilities of the model and of the reference (torch tensors)."""
        import torch

        rows, cols = torch.arange(len(targets)), torch.from_numpy(targets)
        self.nll.extend((-lp[rows, cols]).tolist())
        self.nll_ref.extend((-lp_ref[rows, cols]).tolist())
        p_ref = lp_ref.exp()
        self.kld.extend((p_ref * (lp_ref - lp)).sum(-1).tolist())
        self.same_top += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
        self.dp.extend((lp[rows, cols].exp() - p_ref[rows, cols]).tolist())

    @staticmethod
    def ppl(nll: list) -> tuple[float, float]:
        a = np.asarray(nll, dtype=np.float64)
        if len(a) < 2:
            return float("nan"), float("nan")
        mean = a.mean()
        se_mean = math.sqrt(max(a.var(), 0.0) / (len(a) - 1))
        return math.exp(mean), math.exp(mean) * se_mean  # delta method, as llama-perplexity reports

    def kld_summary(self) -> dict:
        k = np.asarray(self.kld)
        dp = np.asarray(self.dp)
        return {
            "mean": float(k.mean()), "median": float(np.median(k)), "p99": float(np.percentile(k, 99)),
            "max": float(k.max()), "same_top1_pct": 100.0 * self.same_top / len(k),
            "delta_p_mean_pct": 100.0 * float(dp.mean()), "delta_p_rms_pct": 100.0 * float(np.sqrt((dp ** 2).mean())),
        }


def check_ctx(ctx: int, n_ctx_train: int) -> None:
    """The window may not exceed the model's training context (0: unknown, not checked)."""
    if n_ctx_train and ctx > n_ctx_train:
        raise UsageError(f"--ctx {ctx} is above the model's training context of {n_ctx_train}; use a smaller --ctx")


def check_length(n_tokens: int, ctx: int) -> None:
    """Two windows at least, so the standard error means something."""
    if n_tokens < 2 * ctx:
        raise UsageError(f"the text has {n_tokens} tokens; at least 2 x ctx = {2 * ctx} are needed; use a longer text or a smaller --ctx")


def windows(tokens: list[int], backend: Backend, settings: EvalSettings) -> list[list[int]]:
    n_ctx = settings.ctx
    check_ctx(n_ctx, backend.n_ctx_train)
    check_length(len(tokens), n_ctx)
    n = len(tokens) // n_ctx
    if settings.chunks:
        n = min(n, settings.chunks)
    out = []
    for i in range(n):
        w = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if backend.add_bos:
            w[0] = backend.bos_id
        out.append(w)
    return out


def evaluate(backend: Backend, text: str, text_name: str, settings: EvalSettings,
             ref: Backend | None = None, progress: bool = True, partial: bool = False) -> EvalResult:
    """Perplexity of `backend` on `text` (and KLD against `ref`). Ctrl-C (or SIGTERM) goes on to
    the caller, unless it asks for a `partial` result: then what was measured comes back, marked
    `interrupted`, and the caller must show it as such and exit as interrupted."""
    tokens = backend.tokenize(text)
    if ref is not None:
        if ref.n_vocab != backend.n_vocab or ref.vocab_fingerprint() != backend.vocab_fingerprint():
            raise UsageError(f"the reference {ref.label} has a different vocabulary ({ref.n_vocab} vs {backend.n_vocab} tokens); KL divergence needs the same one")
        if ref.tokenize(text) != tokens:
            raise UsageError(f"the reference {ref.label} tokenizes the text differently; KL divergence needs the same tokens")
    wins = windows(tokens, backend, settings)
    first = settings.ctx // 2
    result = EvalResult(model=backend.label, text=text_name, n_tokens_text=len(tokens), ref=ref.label if ref else None,
                        settings={**asdict(settings), **backend.settings, "scored_from": first})
    stats = _Stats()
    t0 = time.perf_counter()
    try:
        for w in bar(wins, desc="perplexity", unit="chunk", disable=not progress):
            targets = np.asarray(w[first + 1:], dtype=np.int64)
            x = backend.logits(w, first)[:-1]  # positions first..ctx-2 predict tokens first+1..ctx-1
            if ref is None:
                stats.nll.extend(nll(x, targets).tolist())
            else:
                lp = log_softmax(x)  # a copy: the reference may reuse the same buffer
                stats.add(lp, targets, log_softmax(ref.logits(w, first)[:-1]))
            result.chunks += 1
            pause_for_tests("perplexity:chunk")
    except KeyboardInterrupt:
        if not partial:
            raise
        result.interrupted = True
    result.seconds = time.perf_counter() - t0
    result.scored = len(stats.nll)
    result.ppl, result.ppl_se = stats.ppl(stats.nll)
    if ref is not None and stats.kld:
        result.kld = stats.kld_summary()
        result.ppl_ref = stats.ppl(stats.nll_ref)[0]
    return result


def format_text(r: EvalResult) -> str:
    s = r.settings
    where = f"{s.get('backend')}" + (f", {s.get('threads')} threads, fa {'on' if s.get('flash_attn') else 'off'}" if s.get("backend") == "llama.cpp" else f", {s.get('device')}, {s.get('dtype')}")
    lines = [
        f"{r.model}",
        f"  text        {r.text}: {r.n_tokens_text} tokens, {r.chunks} chunks of {s['ctx']} ({r.scored} scored){' [interrupted]' if r.interrupted else ''}",
        f"  perplexity  {r.ppl:.4f} +/- {r.ppl_se:.4f}   ({where}, {r.seconds:.1f} s)",
    ]
    if r.kld:
        k = r.kld
        lines += [
            f"  vs {r.ref}: ref perplexity {r.ppl_ref:.4f}",
            f"  KLD         mean {k['mean']:.6f}, median {k['median']:.6f}, p99 {k['p99']:.6f}, max {k['max']:.6f}",
            f"  same top-1  {k['same_top1_pct']:.2f} %   delta-p mean {k['delta_p_mean_pct']:+.3f} %, rms {k['delta_p_rms_pct']:.3f} %",
        ]
    return "\n".join(lines)
