"""Column quantizers for GPTQ that land exactly on llama.cpp's 32-weight block grids.

GPTQ quantizes one column at a time, so a block's parameters must be fixed before its first column
is quantized, from the weights as they are then (error-updated). The block's parameters are taken
by the grid's own rule (legacy.py; ggml's reference quantizer): Q4_0/Q5_0 d = m / -2^(b-1) with m the
signed value of largest magnitude, Q8_0 d = amax / 127, Q4_1/Q5_1 d = (max - min) / (2^b - 1) and
offset min. Codes are computed from the float32 scale and values rebuilt from the fp16 one, as ggml.

On-grid is not enough: the file stores only codes, and llama.cpp (and our writer) recompute the
scale from the weights. RTN of a block reproduces it only if the block still holds its extreme
code: Q4_0's code 0 (the only value of magnitude 8|d|), Q8_0's +-127, Q4_1's codes 0 and 15. GPTQ's
error feedback may have moved the weight that defined the scale, so that weight (the "anchor",
remembered per row and block) is pinned to its extreme code when its column comes; the error this
makes is fed forward like any other. With that, `grid.fakequant(W_gptq) == W_gptq` bit for bit, and
exporting W_gptq with the ordinary RTN writer reproduces GPTQ's weights exactly.

Every quantizer here has the same small face, shared with simulate.MinMax:
  group               columns per block along the row (0: the whole row)
  fit(w, mask)        parameters per row from a block of weights (rows, group); mask: columns to use
  quantize(x, p, j)   one column x (rows,) at position j of its block -> dequantized values
  fakequant(w)        plain RTN of a whole matrix (for OWQ's scores and for tests)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import Grid, get_grid
from ..grids.base import as_f32, round_half_away, safe_inverse
from ..grids.legacy import Q8_0, _Affine, _Symmetric

Params = dict[str, torch.Tensor]
GPTQ_GRIDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def _masked_extreme(w: torch.Tensor, mask: torch.Tensor | None, fill: float, largest: bool):
    """Per row, the (value, index) of the largest (or smallest) entry among the masked-in columns."""
    if mask is not None:
        w = w.masked_fill(~mask.to(w.device)[None, :], fill)
    r = w.max(dim=1) if largest else w.min(dim=1)
    return r.values, r.indices


@dataclass(frozen=True)
class GridColumns:
    """GPTQ's column quantizer for one legacy GGUF grid (blocks of 32 along the row)."""

    grid: Grid

    @property
    def group(self) -> int:
        return self.grid.block

    @property
    def name(self) -> str:
        return self.grid.name

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        return self.grid.fakequant(w)

    def fit(self, w: torch.Tensor, mask: torch.Tensor | None = None) -> Params:
        g = self.grid
        if isinstance(g, _Affine):
            lo, i_lo = _masked_extreme(w, mask, float("inf"), largest=False)
            hi, i_hi = _masked_extreme(w, mask, float("-inf"), largest=True)
            d = (hi - lo) / float((1 << g.bits) - 1)
            return {"d": d, "inv": safe_inverse(d), "d16": as_f32(d), "m": lo, "m16": as_f32(lo), "lo": i_lo, "hi": i_hi}
        _, idx = _masked_extreme(w.abs(), mask, -1.0, largest=True)
        m = w.gather(1, idx[:, None])[:, 0]  # signed; the first of equal magnitudes, as ggml
        d = m / -float(1 << (g.bits - 1)) if isinstance(g, _Symmetric) else m.abs() / 127.0
        return {"d": d, "inv": safe_inverse(d), "d16": as_f32(d), "anchor": idx}

    def quantize(self, x: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        g = self.grid
        if isinstance(g, _Affine):
            top = (1 << g.bits) - 1
            q = torch.clamp(torch.trunc((x - p["m"]) * p["inv"] + 0.5), 0, top)
            q = torch.where(p["lo"] == j, 0.0, q)
            q = torch.where(p["hi"] == j, float(top), q)
            return p["d16"] * q + p["m16"]
        if isinstance(g, _Symmetric):
            half = 1 << (g.bits - 1)
            q = torch.clamp(torch.trunc(x * p["inv"] + (half + 0.5)), 0, 2 * half - 1)
            q = torch.where(p["anchor"] == j, 0.0, q)  # code 0 = -half * d = the anchor's value m
            return p["d16"] * (q - half)
        q = torch.clamp(round_half_away(x * p["inv"]), -127, 127)
        q = torch.where(p["anchor"] == j, torch.where(x < 0, -127.0, 127.0), q)
        return p["d16"] * q


def grid_columns(type_name: str) -> GridColumns:
    """The GPTQ column quantizer for a GGUF type; only the 32-block legacy types are supported."""
    from ..errors import UsageError

    grid = get_grid(type_name)
    if not isinstance(grid, (_Symmetric, _Affine, Q8_0)):
        raise UsageError(f"GPTQ onto {grid.name} is not supported; choose one of: {', '.join(GPTQ_GRIDS)} "
                         "(K-quants and IQ4_NL choose their scales by search, not by one rule)")
    return GridColumns(grid)
