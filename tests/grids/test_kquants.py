"""K-quants: GGUF bytes decode (by gguf-py) to exactly our fakequant; errors shrink with the bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

from npft_gguf.grids.kquants import KQUANTS

IDS = [g.name for g in KQUANTS]


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows at very different scales, plus an all-zero super-block, an outlier, negatives."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 1, rows).unsqueeze(1)
    w[0, :256] = 0.0
    w[1, 7] = 1000.0 * w[1].abs().max()
    w[2] = -w[2].abs()
    w[-1] = torch.rand(cols, generator=g) * 0.01  # positive-only
    return w


@pytest.mark.parametrize("shape", [(8, 512), (3, 1536)])
@pytest.mark.parametrize("grid", KQUANTS, ids=IDS)
def test_pack_decodes_to_fakequant(grid, shape):
    w = _weights(*shape, seed=shape[1])
    packed = grid.pack(w)
    assert packed.dtype == np.uint8
    assert packed.shape == (shape[0], shape[1] // 256 * grid.block_bytes)
    ref = dequantize(packed, grid.ggml)
    fq = grid.fakequant(w).numpy()
    assert ref.shape == fq.shape == shape
    assert np.array_equal(ref, fq)
    assert not fq[0, :256].any()


def _rel_rms(grid, w: torch.Tensor) -> float:
    return float((grid.fakequant(w) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())


# measured on this Gaussian: q2_k 0.329, q3_k 0.155, q4_k 0.078, q5_k 0.038, q6_k 0.0187 (RTN, so above
# llama.cpp's searched scales); the bounds leave ~10-20% margin and fail if a type loses a bit of resolution
MAX_REL_RMS = {"q2_k": 0.36, "q3_k": 0.18, "q4_k": 0.09, "q5_k": 0.045, "q6_k": 0.02}


def test_error_shrinks_with_bits():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    errs = {g.name: _rel_rms(g, w) for g in KQUANTS}
    names = [g.name for g in KQUANTS]
    assert all(errs[a] > errs[b] for a, b in zip(names, names[1:])), errs
    for name, bound in MAX_REL_RMS.items():
        assert errs[name] < bound, errs


@pytest.mark.parametrize("grid", KQUANTS, ids=IDS)
def test_fits_super_blocks_only(grid):
    assert grid.block == 256
    assert not grid.fits(576)
    assert grid.fits(1536)


def test_gguf_file_roundtrip(tmp_path):
    by_name = {g.name: g for g in KQUANTS}
    w = _weights(4, 768, seed=1)
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(str(path), "llama")
    for name in ("q4_k", "q6_k"):
        grid = by_name[name]
        writer.add_tensor(name, grid.pack(w), raw_dtype=grid.ggml)  # shape read as bytes per row
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    for name in ("q4_k", "q6_k"):
        t, grid = tensors[name], by_name[name]
        assert t.tensor_type == grid.ggml
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        assert np.array_equal(got, grid.fakequant(w).numpy())
