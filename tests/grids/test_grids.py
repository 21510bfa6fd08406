"""Every grid: dequantize(pack(W)) == fakequant(W) exactly, by gguf-py's independent dequantizers,
and the legacy types byte for byte equal to gguf-py's reference quantizer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from npft_gguf.errors import UsageError
from npft_gguf.grids import GRIDS, get_grid
from npft_gguf.grids.base import round_half_away

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def weights(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.05
    w[0, 3] = 0.9  # an outlier
    w[1, :32] = 0.0  # an all-zero block
    w[2, :32] = -torch.rand(32, generator=g)  # negative-only block
    w[3, 0], w[3, 1] = -0.25, 0.25  # equal magnitudes: ggml keeps the first
    w[4, :32] = torch.linspace(-1, 1, 32)  # values on exact halves of the step
    return w


def unpacked(grid, packed: np.ndarray) -> np.ndarray:
    if grid.name == "f32":
        return packed
    if grid.name == "f16":
        return packed.astype(np.float32)
    return dequantize(packed, grid.ggml)


@pytest.mark.parametrize("name", list(GRIDS))
def test_dequantize_of_pack_equals_fakequant(name):
    grid = GRIDS[name]
    cols = 512 if grid.block == 256 else 256
    w = weights(cols=cols)
    fq = grid.fakequant(w).numpy()
    assert np.array_equal(unpacked(grid, grid.pack(w)).reshape(fq.shape), fq)
    assert fq.shape == tuple(w.shape) and fq.dtype == np.float32


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_reference_quantizer(name):
    grid = GRIDS[name]
    for seed in range(3):
        w = weights(seed=seed)
        assert np.array_equal(grid.pack(w), quantize(w.numpy(), grid.ggml)), (name, seed)


@pytest.mark.parametrize("name", LEGACY + ["iq4_nl"])
def test_rtn_error_is_within_one_step(name):
    grid = GRIDS[name]
    w = weights()
    err = (grid.fakequant(w) - w).abs().reshape(-1, 32).amax(1)
    span = w.reshape(-1, 32).abs().amax(1)
    steps = {"q8_0": 127, "q4_0": 8, "q5_0": 16, "q4_1": 7.5, "q5_1": 15.5, "iq4_nl": 127 / 24}
    assert torch.all(err <= span / steps[name] + 1e-7)


def test_bits_per_weight_match_llama_cpp():
    assert {n: GRIDS[n].bits_per_weight for n in LEGACY + ["iq4_nl"]} == {
        "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "iq4_nl": 4.5}


def test_round_half_away_is_c_roundf():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998, -126.5])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, 2.0, -127.0]


def test_get_grid_rejects_unknown_type():
    assert get_grid("Q4_0") is GRIDS["q4_0"] and get_grid(T.Q8_0) is GRIDS["q8_0"]
    with pytest.raises(UsageError, match="unknown tensor type"):
        get_grid("q9_9")


@pytest.mark.parametrize("name", [n for n in GRIDS if n not in ("f32", "f16", "bf16")])
def test_pack_in_row_chunks_equals_whole_tensor(name, monkeypatch):
    """pack works through row chunks; 48 rows in chunks of 5 (a short last chunk) give the same bytes."""
    import npft_gguf.grids.base as base

    grid = GRIDS[name]
    cols = 512 if grid.block == 256 else 256
    w = weights(cols=cols)
    whole = grid.pack_blocks(grid.encode(w.reshape(-1, grid.block))).reshape(w.shape[0], -1)
    monkeypatch.setattr(base, "PACK_CHUNK", 5 * cols)
    chunked = grid.pack(w)
    assert chunked.shape == whole.shape and np.array_equal(chunked, whole)


def test_rows_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        GRIDS["q4_0"].pack(torch.zeros(2, 48))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path checked where a GPU is present")
@pytest.mark.parametrize("name", list(GRIDS))
def test_cuda_fakequant_equals_cpu(name):
    grid = GRIDS[name]
    w = weights(cols=512)
    assert torch.equal(grid.fakequant(w.cuda()).cpu(), grid.fakequant(w))
