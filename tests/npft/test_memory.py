"""Memory that fits: gradient checkpointing with every noise kind and objective gives the same
losses and adapter gradients for less memory held for the backward pass; no float32 copy of a
weight in the noise; Fisher scores and the Hessian trace in bounded memory, with the same results."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from npft_gguf.npft import NPFTSettings, tune
from npft_gguf.npft.objective import loss as objective_loss
from tests.npft.conftest import tiny_model
from tests.npft.memory import TensorBytes

ONE_STEP = dict(epochs=1, max_steps_per_epoch=1, batch=4, lr=2e-3, outlier_pct=1.0, trace_samples=0, rank=4, alpha=8,
                fisher_samples=2)
KINDS = [(noise, objective) for noise in ("rtn", "grid", "paper", "none") for objective in ("kl", "ce")
         if (noise, objective) != ("none", "kl")]


def _one_step(tiny_bpe, tokens, tmp_path, monkeypatch, **settings):
    """(losses, adapter gradients of the first step, bytes held for the backward by each loss's forward)."""
    from npft_gguf.npft import train

    held, grads = [], []

    def measured(*args):
        with TensorBytes() as count:
            out = objective_loss(*args)
        held.append(count.live)
        return out

    def keep_grads(opt, args, kwargs):
        grads.extend(p.grad.clone() for g in opt.param_groups for p in g["params"])

    monkeypatch.setattr(train, "objective_loss", measured)
    handle = register_optimizer_step_pre_hook(keep_grads)
    try:
        r = tune(tiny_model(tiny_bpe), tokens, NPFTSettings(**ONE_STEP, **settings), tmp_path, progress=False)
    finally:
        handle.remove()
    return r.history[0], grads, held


@pytest.mark.parametrize("noise,objective", KINDS)
def test_checkpointing_gives_the_same_step_for_less_memory(tiny_bpe, tokens, tmp_path, monkeypatch, noise, objective):
    kw = dict(noise=noise, objective=objective, clean_weight=0.5 if noise != "none" else 0.0)
    plain, plain_grads, plain_held = _one_step(tiny_bpe, tokens, tmp_path / "plain", monkeypatch, **kw)
    ckpt, ckpt_grads, ckpt_held = _one_step(tiny_bpe, tokens, tmp_path / "ckpt", monkeypatch, gradient_checkpointing=True, **kw)
    for key in ("loss_noisy", "loss_clean", "noise_rms"):
        assert ckpt[key] == (None if plain[key] is None else pytest.approx(plain[key], rel=1e-5, abs=1e-9)), key
    assert len(ckpt_grads) == len(plain_grads) > 0 and any(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert len(ckpt_held) == len(plain_held)
    assert max(ckpt_held) < 0.7 * max(plain_held), (ckpt_held, plain_held)


def test_noise_holds_no_float32_copy_of_the_weight(monkeypatch):
    """rtn noise is formed in the hook in row chunks, in the weight's dtype: a forward and backward
    of a bfloat16 layer peaks near its one bfloat16 z, keeps nothing after, and the chunks make the
    same error as the whole; dense grid noise is held in the weight's dtype."""
    import torch.nn.functional as F

    from npft_gguf.grids import get_grid
    from npft_gguf.npft import noise

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256, bias=False).to(torch.bfloat16).requires_grad_(False)
    n = lin.weight.numel()
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    outs = []
    for chunk in (n, 16 * 512):  # whole, and 16 chunks of rows
        monkeypatch.setattr(noise, "NOISE_CHUNK", chunk, raising=False)
        with TensorBytes() as count:
            p = noise.Perturbation(lin, "rtn", "all", "q4_0", None)
            p.resample(torch.Generator())
            p.active = True
            xg = x.clone().requires_grad_(True)
            out = lin(xg)
            out.float().square().sum().backward()
            outs.append((out.detach(), xg.grad))
            del out, xg
        p.remove()
        assert count.live < 0.05 * n  # nothing of the size of the weight kept
    assert count.peak < 3.5 * n  # the bfloat16 z (2 bytes a weight) and one chunk's float32 temporaries
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    z = (get_grid("q4_0").fakequant(lin.weight.float()) - lin.weight.float()).to(torch.bfloat16)
    torch.testing.assert_close(outs[0][0], lin(x) + F.linear(x, z))
    dense = noise.Perturbation(lin, "grid", "all", "q4_0", None)
    dense.resample(torch.Generator().manual_seed(0))
    assert dense.z.dtype == torch.bfloat16 and torch.count_nonzero(dense.z) > 0.9 * n
    dense.remove()
