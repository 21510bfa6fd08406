"""Hutchinson's outlier trace against the exact second derivative (finite differences, float64)."""

import torch

from npft_gguf.npft.hessian import outlier_trace
from npft_gguf.sensitivity import Outliers, target_linears


def test_single_coordinate_equals_the_second_derivative(tiny_bpe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe).double()
    lin = target_linears(model)
    name = "model.layers.1.mlp.down_proj"
    r, c = 3, 17
    # one outlier in one module: every Rademacher probe gives v^T H v = H_ii exactly
    found = {n: Outliers(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) for n in lin}
    found[name] = Outliers(torch.tensor([r]), torch.tensor([c]))
    x = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    got = outlier_trace(model, x, lin, found, probes=3, progress=False)
    assert got["n"] == 3 and got["se"] < 1e-9

    def loss(delta):
        with torch.no_grad():
            w = lin[name].weight
            old = float(w[r, c])
            w[r, c] = old + delta
            logits = model(input_ids=x).logits[0, :-1]  # float64 (HF's own loss upcasts only to float32)
            val = float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))
            w[r, c] = old
            return val

    def second(h):
        return (loss(h) - 2 * loss(0.0) + loss(-h)) / h ** 2

    fd = second(0.01)  # the rotary tables stay float32, so h cannot be tiny: agreement to a few percent
    assert abs(got["trace"] - fd) <= 0.03 * abs(fd)
    assert abs(got["per_module"][name] - fd) <= 0.03 * abs(fd)
    assert lin[name].weight.requires_grad and model.config._attn_implementation != "eager"  # both restored


def test_paired_change_removes_shared_probe_noise():
    from npft_gguf.npft.hessian import paired_change

    before = {"trace": 10.0, "estimates": [5.0, 15.0, 8.0, 12.0]}
    after = {"trace": 9.0, "estimates": [4.0, 14.1, 6.9, 11.0]}  # each pair drops by about 1
    pc = paired_change(before, after)
    assert abs(pc["diff"] + 1.0) < 1e-9 and pc["se"] < 0.05  # unpaired, the SE would be about 2


def test_each_probe_is_the_curvature_along_its_sign_vector(tiny_bpe):
    """Two outliers in one module: v^T H v = H11 + H22 + 2 s1 s2 H12, so every estimate is the
    second derivative along (1, 1) or along (1, -1); the cross term must be there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe).double()
    lin = target_linears(model)
    name = "model.layers.0.mlp.down_proj"
    rows, cols = torch.tensor([2, 2]), torch.tensor([5, 9])  # same row: strongly coupled weights
    found = {n: Outliers(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) for n in lin}
    found[name] = Outliers(rows, cols)
    x = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    got = outlier_trace(model, x, lin, found, probes=6, progress=False)

    def loss(d1, d2):
        w = lin[name].weight
        with torch.no_grad():
            old = w[rows, cols].clone()
            w[rows, cols] = old + torch.tensor([d1, d2], dtype=w.dtype)
            val = float(torch.nn.functional.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:]))
            w[rows, cols] = old
        return val

    h = 0.01
    along = [(loss(h, s * h) - 2 * loss(0.0, 0.0) + loss(-h, -s * h)) / h ** 2 for s in (1, -1)]
    assert abs(along[0] - along[1]) > 0.1 * max(map(abs, along))  # the cross term is not negligible here
    for e in got["estimates"]:
        assert min(abs(e - a) for a in along) <= 0.03 * max(map(abs, along)), (e, along)
