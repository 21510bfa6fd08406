"""GPTQ onto GGUF grids: the result is exactly on the grid (RTN leaves it unchanged), an exported
file holds exactly GPTQ's weights, and GPTQ beats RTN on its own objective."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from npft_gguf.grids import get_grid
from npft_gguf.methods import GPTQ, GPTQSettings, gptq_model_
from npft_gguf.methods.ongrid import GPTQ_GRIDS, grid_columns
from npft_gguf.methods.sequential import run_layerwise
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export


def problem(rows=64, cols=256, seed=0):
    """A weight and correlated inputs with a few loud channels, as in real layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 17] = 0.6  # an outlier weight that sets its block's scale
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = torch.randn(2048, cols, generator=g) @ mix
    x[:, 5] *= 15
    return w, x


def hessian(x, columns):
    h = GPTQ(columns)
    for part in x.split(500):
        h.add_batch(part)
    return h


def proxy_error(w, q, x):
    return ((q - w) @ x.T).pow(2).mean().item()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("type_name", GPTQ_GRIDS)
def test_gptq_output_is_exactly_on_the_grid(type_name, act_order, static):
    w, x = problem()
    settings = GPTQSettings(target=type_name, act_order=act_order, static_groups=static, block=64)
    q = hessian(x, w.shape[1]).quantize(w, settings.quantizer(), settings).weight
    grid = get_grid(type_name)
    assert torch.equal(grid.fakequant(q), q)  # RTN of GPTQ's output is the identity
    assert proxy_error(w, q, x) < 0.95 * proxy_error(w, grid.fakequant(w), x)


def test_add_batch_is_the_mean_of_2xxT():
    _, x = problem(cols=64)
    h = hessian(x, 64)
    assert torch.allclose(h.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", [*GPTQ_GRIDS, "rtn4", "rtn3g32"])
def test_uncorrelated_inputs_give_plain_rtn(target):
    """With H = I no error is fed forward, so GPTQ must reproduce the quantizer's RTN bit for bit:
    this pins the column quantizer to the grid's own encoder."""
    w, _ = problem()
    settings = GPTQSettings(target=target)
    h = GPTQ(w.shape[1])
    h.H = torch.eye(w.shape[1])
    q = settings.quantizer()
    assert torch.equal(h.quantize(w, q, settings).weight, q.fakequant(w))


def test_kept_columns_stay_float_and_the_rest_on_grid():
    w, x = problem()
    keep = torch.tensor([5, 40, 41])
    settings = GPTQSettings(target="q4_0")
    q = hessian(x, w.shape[1]).quantize(w, settings.quantizer(), settings, keep=keep).weight
    grid = get_grid("q4_0")
    assert not torch.equal(q[:, keep], grid.fakequant(w)[:, keep])
    untouched = [b for b in range(w.shape[1] // 32) if not any(b * 32 <= k < b * 32 + 32 for k in keep.tolist())]
    for b in untouched:
        block = q[:, b * 32:(b + 1) * 32]
        assert torch.equal(grid.fakequant(block), block)


def test_k_quants_are_refused():
    from npft_gguf.errors import UsageError

    with pytest.raises(UsageError, match="q4_0"):
        grid_columns("q4_k")


def test_layerwise_driver_sees_the_models_own_layer_inputs(tiny_bpe):
    """With a method that changes nothing, each linear's Hessian equals 2 X^T X / n of the inputs the
    full model gives it: the captured kwargs (RoPE, mask) and the propagation are right."""
    model = open_source(str(tiny_bpe)).load_model()
    calib = torch.randint(0, model.config.vocab_size, (6, 40), generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(name, linear, h):
        seen[name] = h.H.clone()
        return {}

    run_layerwise(model, calib, record, batch_size=4, progress=False)
    direct, hooks = {}, []
    for name, mod in model.named_modules():
        if name in seen:
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: direct.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    assert len(seen) == 7 * model.config.num_hidden_layers
    for name, xs in direct.items():
        x = torch.cat(xs)
        assert torch.allclose(seen[name], 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("type_name,pure", [("q4_0", True), ("q4_0", False), ("q5_1", True), ("q8_0", True)])
def test_exported_gguf_holds_exactly_the_gptq_weights(tiny_bpe, tmp_path, type_name, pure):
    """GPTQ in memory -> save_pretrained -> our ordinary RTN export -> gguf-py's dequantizer: equal."""
    src = open_source(str(tiny_bpe))
    model = src.load_model()
    calib = torch.randint(0, model.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(1))
    report = gptq_model_(model, calib, GPTQSettings(target=type_name, act_order=True), progress=False)
    assert all(v["quantizer"] == type_name for v in report.linears.values())
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    src.tokenizer().save_pretrained(hf)
    out = tmp_path / "m.gguf"
    export(open_source(str(hf)), out, ExportSettings(type_name, pure=pure), progress=False)
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    params = dict(model.named_parameters())
    checked = 0
    for hf_name in report.linears:
        name = src.arch.gguf_name(hf_name + ".weight")
        t = tensors[name]
        assert t.tensor_type.name.lower() == type_name, name
        got = dequantize(t.data, t.tensor_type).reshape(params[hf_name + ".weight"].shape)
        want = src.arch.to_gguf_layout(hf_name + ".weight", params[hf_name + ".weight"].detach(), src.config)
        assert np.array_equal(got, want.numpy()), name
        checked += 1
    assert checked == 7 * model.config.num_hidden_layers
