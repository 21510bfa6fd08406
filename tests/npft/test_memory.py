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


def _dense_fisher(model, tokens, lin):
    """The Fisher scores as they were first made: every module's gradient at once, then squared."""
    fisher = {n: torch.zeros_like(m.weight) for n, m in lin.items()}
    for m in lin.values():
        m.weight.requires_grad_(True)
    for i in range(len(tokens)):
        x = tokens[i:i + 1]
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, [m.weight for m in lin.values()])
        for f, g in zip(fisher.values(), grads):
            f.add_(g.float().square())
    return fisher


def _positions(found):
    return {name: set(zip(o.rows.tolist(), o.cols.tolist())) for name, o in found.items()}


def test_fisher_in_stages_finds_the_same_outliers_in_less_memory(tiny_bpe, tokens):
    from peft import LoraConfig, get_peft_model

    from npft_gguf.sensitivity import find_outliers, outliers, summary, target_linears

    model = get_peft_model(tiny_model(tiny_bpe), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).eval()
    lin = target_linears(model)
    x = tokens[:3]
    with TensorBytes() as dense_bytes:
        dense = _dense_fisher(model, x, lin)
    for m in lin.values():
        m.weight.requires_grad_(False)
    expect = outliers(dense, 1.0)
    peaks = []
    for stages in (1, 3, 100):
        with TensorBytes() as count:
            found, rows = find_outliers(model, x, lin, 1.0, stages, progress=False)
        peaks.append(count.peak)
        assert _positions(found) == _positions(expect)
        assert [r["module"] for r in rows] == list(lin)
        for got, want in zip(rows, summary(lin, dense, expect)):
            numbers = lambda row: {k: v for k, v in row.items() if k != "module"}  # noqa: E731
            assert got["module"] == want["module"] and numbers(got) == pytest.approx(numbers(want), rel=1e-5)
        assert all(p.grad is None for p in model.parameters())  # no gradient left behind, the adapter's included
        assert not any(m.weight.requires_grad for m in lin.values()) and not model.training
        if stages == 1:  # and once more with the decoder layers checkpointed: the same, for less
            from contextlib import nullcontext

            from npft_gguf.npft.train import checkpoint_layers

            model.train()
            checkpoint_layers(model, lambda: (nullcontext(), nullcontext()))
            with TensorBytes() as count:
                again, again_rows = find_outliers(model, x, lin, 1.0, 1, progress=False)
            assert again_rows == rows and _positions(again) == _positions(found)
            checkpoint_layers(model, None)
            assert model.training and count.peak < 0.8 * peaks[0], (count.peak, peaks)
            model.eval()
    # one gradient at a time: below all gradients at once; each stage holds a third of the scores, a module's at most
    assert peaks[0] < dense_bytes.peak and peaks[1] < 0.8 * peaks[0] and peaks[2] < peaks[1], (peaks, dense_bytes.peak)


def _dense_trace(model, tokens, lin, found, probes, seed):
    """Hutchinson's outlier trace as it was first made: the gradients of the whole weights, with their graph."""
    names = list(lin)
    weights = [lin[n].weight.requires_grad_(True) for n in names]
    at = [(found[n].rows, found[n].cols) for n in names]
    gen = torch.Generator().manual_seed(seed)
    estimates = []
    for i in range(len(tokens)):
        x = tokens[i:i + 1]
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, weights, create_graph=True)
        for p in range(probes):
            signs = [torch.randint(0, 2, (len(found[n]),), generator=gen).to(w.dtype) * 2 - 1 for n, w in zip(names, weights)]
            dot = sum((g[r, c] * s).sum() for g, (r, c), s in zip(grads, at, signs))
            hvs = torch.autograd.grad(dot, weights, retain_graph=p < probes - 1)
            estimates.append(sum(float((hv[r, c] * s).sum()) for hv, (r, c), s in zip(hvs, at, signs)))
    return estimates


def test_trace_at_the_outliers_equals_the_whole_weight_one_in_less_memory(tiny_bpe, tokens):
    from npft_gguf.npft.hessian import outlier_trace
    from npft_gguf.sensitivity import outliers, target_linears

    model = tiny_model(tiny_bpe).double().eval()
    model.config._attn_implementation = "eager"
    lin = target_linears(model)
    g = torch.Generator().manual_seed(0)
    found = outliers({n: torch.rand(m.weight.shape, generator=g) for n, m in lin.items()}, 1.0)
    x = tokens[:2, :24]
    with TensorBytes() as dense_bytes:
        want = _dense_trace(model, x, lin, found, probes=2, seed=5)
    for m in lin.values():
        m.weight.requires_grad_(False)
    with TensorBytes() as count:
        got = outlier_trace(model, x, lin, found, probes=2, seed=5, progress=False)
    assert got["estimates"] == pytest.approx(want, rel=1e-9)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in lin.values())
    assert dense_bytes.peak - count.peak > 2 * weight_bytes  # no whole-weight gradient, nor its product with H


def test_finetune_command_with_checkpointing_and_fisher_stages(tiny_bpe, tmp_path):
    """The command the issue saw fail: `finetune --gradient-checkpointing`, here with every memory option."""
    import json

    from tests.conftest import calib_text
    from tests.test_cli import run
    from tests.test_convert import TINY

    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(40_000))
    out = tmp_path / "tuned"
    r = run("finetune", tiny_bpe, "-o", out, "--calib", calib, *TINY, "--epochs", "1", "--noise", "rtn",
            "--objective", "kl", "--gradient-checkpointing", "--fisher-stages", "3")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "report.json").read_text())["tune"]["settings"]
    assert settings["gradient_checkpointing"] and settings["fisher_stages"] == 3


def test_convert_exports_the_merged_model_in_its_own_dtype(tiny_bpe, tmp_path, monkeypatch):
    """No float32 copy of the whole merged model on the tuning device: the export streams it in the
    tuning's dtype (bfloat16 on CUDA, here forced on the CPU), and the bytes are those of its float32 copy."""
    from npft_gguf import convert, sources
    from npft_gguf.writer import ExportSettings, export
    from tests.conftest import calib_text
    from tests.test_cli import run
    from tests.test_convert import TINY

    exported = []
    init = sources.ModelSource.__init__

    def spy(self, base, model, label):
        exported.append(model)
        init(self, base, model, label)

    monkeypatch.setattr(convert, "tuning_dtype", lambda device: torch.bfloat16)  # as on CUDA
    monkeypatch.setattr(sources.ModelSource, "__init__", spy)
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_text(40_000))
    r = run("convert", tiny_bpe, "-o", tmp_path / "m.gguf", "--calib", calib, *TINY, "--epochs", "1", "--max-steps", "1",
            "--eval-text", "none", "--ctx", "64")
    assert r.returncode == 0, r.stderr
    assert {p.dtype for p in exported[0].parameters()} == {torch.bfloat16}
    base = sources.open_source(str(tiny_bpe))
    written = []
    for model in (exported[0], exported[0].float()):
        out = tmp_path / f"{len(written)}.gguf"
        export(sources.ModelSource(base, model, "npft"), out, ExportSettings(type="q4_0"), progress=False)
        written.append(out.read_bytes())
    assert written[0] == written[1]


def test_a_resume_may_change_the_memory_settings_only():
    """Checkpointing and the Fisher stages change memory and time, never the result: a resumed run may
    switch them; a change of recipe is still refused."""
    saved = NPFTSettings().as_dict()
    assert NPFTSettings(gradient_checkpointing=True, fisher_stages=4).same_run(saved) == []
    assert NPFTSettings(lr=1e-3, fisher_stages=4).same_run(saved) == ["lr"]
