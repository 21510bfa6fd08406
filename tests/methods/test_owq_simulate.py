"""OWQ (simulated) and the paper's per-channel min-max quantizer."""

import torch

from npft_gguf.grids import get_grid
from npft_gguf.methods import GPTQ, MinMax, OWQSettings, fake_quantize_minmax_, owq_model_
from npft_gguf.methods.owq import OWQ_WARNING, mean_bits, weak_columns
from npft_gguf.methods.simulate import parse_simulated
from npft_gguf.sources import open_source


def test_minmax_is_asymmetric_per_channel_rtn():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 96, generator=g) + 0.3
    for bits in (3, 4):
        q = MinMax(bits).fakequant(w)
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        scale = (hi - lo) / (2 ** bits - 1)
        assert all(len(torch.unique(r)) <= 2 ** bits for r in q)
        assert ((q - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # nothing clipped: the grid spans the row
    grouped = MinMax(4, 32).fakequant(w)
    assert torch.equal(grouped[:, :32], MinMax(4).fakequant(w[:, :32]))
    assert parse_simulated("rtn3") == MinMax(3) and parse_simulated("rtn4g128") == MinMax(4, 128)
    assert parse_simulated("q4_0") is None


def test_weak_columns_are_the_loud_and_badly_rounded_ones():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * 0.05
    x = torch.randn(1000, 64, generator=g)
    x[:, 9] *= 30  # a loud input channel
    h = GPTQ(64)
    h.add_batch(x)
    assert 9 in weak_columns(w, h.H, MinMax(4), 1).tolist()


def test_owq_keeps_fp16_columns_and_quantizes_the_rest(tiny_bpe):
    src = open_source(str(tiny_bpe))
    model = src.load_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = torch.randint(0, model.config.vocab_size, (6, 40), generator=torch.Generator().manual_seed(0))
    report = owq_model_(model, calib, OWQSettings(weak_cols=2), progress=False)
    grid = get_grid("q4_0")
    for name, info in report.linears.items():
        w = model.get_submodule(name).weight.detach()
        weak = info["weak"]
        assert info["weak_cols"] == len(weak) == 2
        assert torch.equal(w[:, weak], w[:, weak].half().float())  # kept in fp16
        for b in range(w.shape[1] // 32):  # blocks without a weak column are exactly on the grid
            block = w[:, b * 32:(b + 1) * 32]
            assert torch.equal(grid.fakequant(block), block) == (not any(b * 32 <= j < b * 32 + 32 for j in weak)), (name, b)
        assert not torch.equal(w, before[name + ".weight"])
    assert 4.5 < mean_bits(report) < 5.5  # q4_0's 4.5 plus 2 fp16 columns of 64 or 128
    assert "GGUF cannot hold" in OWQ_WARNING


def test_fake_quantize_minmax_touches_decoder_linears_only(tiny_bpe):
    model = open_source(str(tiny_bpe)).load_model()
    emb = model.model.embed_tokens.weight.detach().clone()
    info = fake_quantize_minmax_(model, bits=3)
    assert info == {"fake_quant": "minmax3", "fake_quant_layers": 14}
    assert torch.equal(model.model.embed_tokens.weight, emb)
    w = model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(r)) for r in w) <= 8
