"""The perturbation: where it lands, how large it is, and that the hook equals a perturbed weight."""

import torch
import torch.nn.functional as F

from npft_gguf.grids import get_grid
from npft_gguf.npft.noise import Perturbation
from npft_gguf.sensitivity import Outliers


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 64, generator=g))
    # row 0: three outliers, row 1: one (gets no noise), row 4: two
    o = Outliers(torch.tensor([0, 0, 0, 1, 4, 4]), torch.tensor([3, 10, 40, 5, 0, 63]))
    return lin, o


def _dense(p, shape):
    z = torch.zeros(shape)
    if p.dense:
        return p.z
    z[p.rows, p.cols] = p.z
    return z


def test_paper_noise_rows_ranges_and_means():
    lin, o = _setup()
    p = Perturbation(lin, "paper", "outliers", "q4_0", o)
    w = lin.weight.detach()
    for seed in range(20):
        p.resample(torch.Generator().manual_seed(seed))
        z = _dense(p, w.shape)
        assert torch.count_nonzero(z[[2, 3, 5]]) == 0 and torch.count_nonzero(z[1]) == 0  # one outlier: none
        for r, cols in ((0, [3, 10, 40]), (4, [0, 63])):
            assert abs(float(z[r, cols].sum())) < 1e-5  # mean-subtracted
            width = float(w[r, cols].max() - w[r, cols].min())
            assert float(z[r, cols].max() - z[r, cols].min()) <= width + 1e-6
        mask = torch.zeros_like(z, dtype=torch.bool)
        mask[o.rows, o.cols] = True
        assert torch.count_nonzero(z[~mask]) == 0
    p.remove()


def test_grid_noise_is_within_half_a_step():
    lin, o = _setup()
    p = Perturbation(lin, "grid", "outliers", "q4_0", o)
    step = get_grid("q4_0").step(lin.weight.detach())
    p.resample(torch.Generator().manual_seed(0))
    z = _dense(p, lin.weight.shape)
    assert torch.all(z.abs() <= step / 2 + 1e-7)
    assert torch.count_nonzero(z) == len(o)  # grid noise perturbs single-outlier rows too
    # the step is the block's |d|: Q8_0 RTN error is about half of it (Q4_0 clamps its top code)
    w = lin.weight.detach()
    q8 = get_grid("q8_0")
    assert torch.all((q8.fakequant(w) - w).abs() <= 0.6 * q8.step(w))  # d/2, plus fp16 rounding of d x 127
    assert torch.all((get_grid("q4_0").fakequant(w) - w).abs() <= step + 1e-6)
    dense = Perturbation(lin, "grid", "all", "q4_0", None)
    dense.resample(torch.Generator().manual_seed(1))
    assert torch.count_nonzero(dense.z) == w.numel() and torch.all(dense.z.abs() <= step / 2 + 1e-7)
    p.remove()
    dense.remove()


def test_hook_equals_the_perturbed_weight_and_leaves_the_weight_alone():
    lin, o = _setup()
    before = lin.weight.detach().clone()
    x = torch.randn(2, 5, 64)
    for kind, scope, found in (("paper", "outliers", o), ("grid", "outliers", o), ("grid", "all", None)):
        p = Perturbation(lin, kind, scope, "q4_0", found)
        p.resample(torch.Generator().manual_seed(3))
        clean = lin(x)
        p.active = True
        noisy = lin(x)
        p.active = False
        torch.testing.assert_close(noisy, F.linear(x, before + _dense(p, before.shape)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clean, F.linear(x, before))
        assert not torch.equal(noisy, clean)
        p.remove()
    assert torch.equal(lin.weight, before)


def test_rtn_noise_makes_the_layer_its_quantized_merged_self():
    lin, _ = _setup()
    w = lin.weight.detach().clone()
    delta = (torch.randn(6, 64) * 0.01).requires_grad_(True)
    p = Perturbation(lin, "rtn", "all", "q4_0", None, merged=lambda: w + delta.detach())
    p.resample(torch.Generator())
    x = torch.randn(3, 64)
    p.active = True
    out = lin(x) + F.linear(x, delta)  # what a LoRA layer computes: base + BA
    q = get_grid("q4_0").fakequant(w + delta.detach())
    torch.testing.assert_close(out, F.linear(x, q), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()  # straight through: z is a constant, the adapter's gradient sees Q
    expect = 2 * F.linear(x, q).t() @ x
    torch.testing.assert_close(delta.grad, expect, rtol=1e-4, atol=1e-4)
    p.remove()


def test_rtn_noise_uses_the_quantizer_that_will_write_the_file():
    """Under an imatrix the written file is not plain RTN: z is the given quantizer's error."""
    lin, _ = _setup()
    w = lin.weight.detach().clone()
    coarse = lambda v: torch.round(v * 2) / 2  # noqa: E731 - a stand-in quantizer, unlike q4_0's RTN
    p = Perturbation(lin, "rtn", "all", "q4_0", None, quantize=coarse)
    p.resample(torch.Generator())
    torch.testing.assert_close(w + p.rtn_error(), coarse(w))
    assert not torch.allclose(w + p.rtn_error(), get_grid("q4_0").fakequant(w))
    p.remove()


def test_noise_for_a_simulated_per_channel_target():
    """`--type rtn3`: rtn noise is that quantizer's own error, grid noise half its channel scale."""
    from npft_gguf.methods.simulate import MinMax

    lin, o = _setup()
    w = lin.weight.detach().clone()
    q3 = MinMax(3)
    step = q3.step(w)
    assert step.shape == w.shape and torch.all(step == step[:, :1])  # one scale per output channel
    assert torch.all((q3.fakequant(w) - w).abs() <= step / 2 + 1e-6)
    p = Perturbation(lin, "rtn", "all", "rtn3", None)
    p.resample(torch.Generator())
    torch.testing.assert_close(w + p.rtn_error(), q3.fakequant(w))
    g = Perturbation(lin, "grid", "outliers", "rtn3", o)
    g.resample(torch.Generator().manual_seed(0))
    z = _dense(g, w.shape)
    assert torch.count_nonzero(z) == len(o) and torch.all(z.abs() <= step / 2 + 1e-7)
    grouped = MinMax(3, 32).step(w)
    assert not torch.equal(grouped[:, 0], grouped[:, 32])  # a scale per group of 32 columns
    p.remove()
    g.remove()
