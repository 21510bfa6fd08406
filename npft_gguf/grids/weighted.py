"""llama.cpp's importance-weighted quantizers (what `llama-quantize --imatrix` runs), in numpy.

With an importance matrix, llama.cpp does not round to nearest: per 32-weight block it searches a
few candidate scales and keeps the one with the least weighted squared error, the weight of
weight j being  qw[j] * sqrt(sigma2 + x[j]^2)  (qw: the imatrix entry of its input column, the
mean squared activation; sigma2: the mean x^2 of the row, or for IQ4_NL twice that of the block).

  Q4_0, Q5_0   symmetric codes; 19 candidate scales -(nmax + 0.1 i)/max, i = -9..9, each scored by
               its least-squares scale (ggml's make_qx_quants)
  Q4_1, Q5_1   affine; 37 candidate ranges, each with its weighted least-squares scale and min
               (make_qkx3_quants)
  IQ4_NL       15 candidate scales on the non-uniform codebook, then every weight re-coded with the
               best scale (quantize_row_iq4_nl_impl); without an imatrix the weights are x^2
  Q6_K         16-weight sub-blocks by make_qx_quants, their scales quantized to int8 against one
               fp16 super-block scale (quantize_row_q6_K_ref / _impl): the output matrix's type

Every step repeats the C code's float32 arithmetic in its order: sums accumulate one term at a
time from 0 (`_sum`), products associate left to right as written, rounding is nearest-int with
ties to even (ggml's nearest_int), and the first of equal candidates wins, because the choice of
scale (an argmin over candidates) flips on the last bit of a sum. Blocks are vectorized: arrays
are (position in block, block), so each of the 32 sequential additions is one numpy operation
over all blocks. Codes are packed by the registry's own `pack_blocks`, so the byte layout is the
one RTN uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from . import Grid, get_grid
from .nonuniform import IQ4NL_LEVELS

F = np.float32
GROUP_MAX_EPS = F(1e-15)
WEIGHTED = ("q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q6_k")  # types with llama.cpp's imatrix rules here
SEARCHED = ("iq4_nl", "q6_k")  # types llama.cpp quantizes by a scale search even without an imatrix (weights x^2)
UNWEIGHTED = ("q8_0", "f32", "f16", "bf16")  # llama.cpp ignores the imatrix for these
CHUNK_WEIGHTS = 1 << 16  # weights per numpy pass (64 K: the (32, n_blocks) temporaries stay in cache)


def _sum(terms: np.ndarray) -> np.ndarray:
    """sum over axis 0, one term at a time from 0.0f, as `float s = 0; for (...) s += t;`."""
    acc = np.zeros(terms.shape[1:], F)
    for t in terms:
        acc += t
    return acc


def _rint(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (add 1.5 * 2^23 in float): round half to even, as np.rint."""
    return np.rint(x)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, (|x| max, the signed x there); the first of equal magnitudes, as `if (ax > amax)`."""
    ax = np.abs(x)
    i = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return ax[i, cols], x[i, cols]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b != 0, else 0 (C's `b ? a/b : 0`)."""
    nz = b != 0
    return np.where(nz, a / np.where(nz, b, F(1)), F(0)).astype(F)


# --- ggml's search routines on (n, n_blocks) float32 arrays -------------------------------------------

def make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes L in 0..2*nmax-1 and the scale, per column (rmse_type 1, weights w)."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    lo, hi = F(-nmax), F(nmax - 1)

    def trial(iscale):
        q = np.clip(_rint(iscale * x), lo, hi)
        return q, _sum(w * x * q), _sum(w * q * q)

    q, sumlx, suml2 = trial(F(-nmax) / mx)
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    codes = q + F(nmax)
    for i in range(-9, 10):
        if i == 0:
            continue
        q, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(i)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = np.where(better, q + F(nmax), codes)
        scale = np.where(better, _div(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    codes = np.where(zero, F(0), codes)
    scale = np.where(zero, F(0), scale)
    return codes.astype(np.uint8), scale


def make_qkx3_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                     nstep: int = 36) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine codes L in 0..nmax, scale and min (min <= 0), per column (squared error, weights w)."""
    mn, mx = x[0].copy(), x[0].copy()
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for xi, wi in zip(x[1:], w[1:]):
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w += wi
        sum_x += wi * xi
    mn = np.where(mn > 0, F(0), mn)
    flat = mx <= mn
    rng = np.where(flat, F(1), mx - mn)
    top = F(nmax)

    def codes_for(iscale, lo):
        return np.clip(_rint(iscale * (x - lo)), F(0), top)

    iscale = top / rng
    scale = F(1) / iscale
    L = codes_for(iscale, mn)
    diff = scale * L + mn - x
    best = _sum(w * (diff * diff))
    for i in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(i) + top) / np.where(flat, F(1), mx - mn)
        la = codes_for(iscale, mn)
        wl = w * la
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * la), _sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, F(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 != 0, sum_l2, F(1)), this_scale)
        diff = this_scale * la + this_min - x
        mad = _sum(w * (diff * diff))
        better = ok & (mad < best) & ~flat
        L = np.where(better, la, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat, F(0), L)
    scale = np.where(flat, F(0), scale)
    return L.astype(np.uint8), scale.astype(F), mn.astype(F)


IQ4NL = np.array(IQ4NL_LEVELS, F)


# the levels are integers, so the number of levels <= x is a function of floor(x): a table lookup
_ABOVE = np.clip(np.searchsorted(IQ4NL, np.arange(-128, 129, dtype=F), side="right"), 1, len(IQ4NL) - 1)


def best_index_iq4nl(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 on the IQ4_NL codebook: the nearest level, the upper one on ties, the
    ends for x beyond them (the comparison in float32, as in C)."""
    mu = np.take(_ABOVE, (np.clip(np.floor(x), F(-128), F(128)) + F(128)).astype(np.intp))
    lower = (x - np.take(IQ4NL, mu - 1)) < (np.take(IQ4NL, mu) - x)
    idx = mu - lower
    idx = np.where(x <= IQ4NL[0], 0, idx)
    return np.where(x >= IQ4NL[-1], len(IQ4NL) - 1, idx).astype(np.uint8)


def iq4_nl_search(x: np.ndarray, w: np.ndarray, ntry: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_iq4_nl_impl for one 32-weight block per column: (codes, scale)."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    v0 = IQ4NL[0]

    def sums(iscale):
        q = np.take(IQ4NL, best_index_iq4nl(iscale * x))
        wq = w * q
        return _sum(wq * x), _sum(wq * q)

    d = -mx / v0 if ntry > 0 else mx / v0
    sumqx, sumq2 = sums(F(1) / d)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F(1)), F(0)).astype(F)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(F(itry + int(v0)) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / np.where(better, sumq2, F(1)), d)
        best = np.where(better, d * sumqx, best)
    d = np.where(zero, F(0), d)
    inv = _div(np.ones_like(d), d)
    return best_index_iq4nl(inv * x), d


# --- whole rows -> codes -> GGUF bytes ---------------------------------------------------------------

def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _row_sigma2(w: np.ndarray) -> np.ndarray:
    """sum_x2 / n_per_row per row, summed column by column as quantize_row_q4_0_impl does."""
    return _sum(np.ascontiguousarray(w.T * w.T)) / F(w.shape[1])


def _legacy_weights(w: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, weight) as (32, n_blocks): weight = qw * sqrt(sigma2_row + x^2)."""
    rows, cols = w.shape
    sigma2 = np.repeat(_row_sigma2(w), cols // 32)
    x = np.ascontiguousarray(w.reshape(-1, 32).T)
    q = np.ascontiguousarray(np.broadcast_to(qw.reshape(-1, 32), (rows, cols // 32, 32)).reshape(-1, 32).T)
    return x, q * np.sqrt(sigma2 + x * x)


def _iq4_nl_weights(w: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(w.reshape(-1, 32).T)
    if qw is None:
        return x, x * x
    sigma2 = _sum(x * x) * F(2.0 / 32)
    rows, cols = w.shape
    q = np.ascontiguousarray(np.broadcast_to(qw.reshape(-1, 32), (rows, cols // 32, 32)).reshape(-1, 32).T)
    return x, q * np.sqrt(sigma2 + x * x)


def _q6_k(w: np.ndarray, qw: np.ndarray | None) -> dict:
    """quantize_row_q6_K_ref (qw None: weights x^2) or quantize_row_q6_K_impl (weights qw)."""
    rows, cols = w.shape
    x = np.ascontiguousarray(w.reshape(-1, 16).T)  # (16, n_sub)
    if qw is None:
        wt = x * x
    else:
        wt = np.ascontiguousarray(np.broadcast_to(qw.reshape(-1, 16), (rows, cols // 16, 16)).reshape(-1, 16).T)
    L, scales = make_qx_quants(x, wt, 32)
    nsb = rows * cols // 256
    scales = scales.reshape(nsb, 16).T  # (16 sub-blocks, n_super)
    amax, max_scale = _first_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = F(-128) / np.where(zero, F(1), max_scale)
    d16 = (F(1) / iscale).astype(np.float16)
    sc = np.minimum(F(127), _rint(iscale * scales))  # (16, n_super)
    de = d16.astype(F) * sc  # (16, n_super)
    de = de.T.reshape(-1)  # per sub-block, in x's column order
    q = np.clip(_rint(x / np.where(de != 0, de, F(1))), F(-32), F(31)) + F(32)
    L = np.where(de != 0, q, L.astype(F))
    L = np.where(np.repeat(zero, 16), F(0), L)
    sc = np.where(zero, F(0), sc)
    d = np.where(zero, F(0), d16.astype(F))
    codes = (L.T.reshape(nsb, 256) - F(32)).astype(np.int8)
    return {"d": _t(d.reshape(-1, 1)), "sc": _t(sc.T.astype(np.int8)), "q": _t(codes)}


def codes(grid: Grid, w: np.ndarray, qw: np.ndarray | None) -> dict:
    """llama.cpp's codes for rows `w` (float32, (rows, cols)) of `grid`, imatrix entry `qw` (cols,)
    or None (no entry: llama.cpp's own quantizer without one)."""
    w = np.ascontiguousarray(w, F)
    name = grid.name
    if name in ("q4_0", "q5_0", "q4_1", "q5_1"):
        if qw is None:  # quantize_row_*_ref: exactly our RTN
            return grid.encode(grid._blocks(torch.from_numpy(w)))
        x, wt = _legacy_weights(w, qw)
        if name in ("q4_0", "q5_0"):
            L, d = make_qx_quants(x, wt, 8 if name == "q4_0" else 16)
            return {"d": _t(d.reshape(-1, 1)), "q": _t(L.T)}
        L, d, mn = make_qkx3_quants(x, wt, 15 if name == "q4_1" else 31)
        return {"d": _t(d.reshape(-1, 1)), "m": _t(mn.reshape(-1, 1)), "q": _t(L.T)}
    if name == "iq4_nl":
        x, wt = _iq4_nl_weights(w, qw)
        L, d = iq4_nl_search(x, wt)
        return {"d": _t(d.reshape(-1, 1)), "q": _t(L.T)}
    if name == "q6_k":
        return _q6_k(w, qw)
    raise ValueError(f"no llama.cpp imatrix rules for {name} here")


class LlamaCppRules:
    """A packer with Grid's face (chunk_rows, pack_rows, pack) that quantizes by llama.cpp's rules
    for `grid` with imatrix entry `qw` (None: llama.cpp's rules without an imatrix)."""

    def __init__(self, grid: Grid | str, qw: np.ndarray | None):
        self.grid = get_grid(grid) if isinstance(grid, str) else grid
        if self.grid.name not in WEIGHTED:
            raise ValueError(f"no llama.cpp imatrix rules for {self.grid.name} here")
        self.qw = None if qw is None else np.ascontiguousarray(qw, F).reshape(-1)

    @property
    def name(self) -> str:
        return self.grid.name

    def chunk_rows(self, ncols: int) -> int:
        return max(1, CHUNK_WEIGHTS // ncols)

    def _check(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or not self.grid.fits(shape[1]):
            raise ValueError(f"{self.name} needs a 2-D weight whose rows are a multiple of {self.grid.block}, got {tuple(shape)}")
        if self.qw is not None and self.qw.shape[0] != shape[1]:
            raise ValueError(f"the imatrix entry has {self.qw.shape[0]} columns, the weight {shape[1]}")

    def row_bytes(self, ncols: int) -> int:
        return self.grid.row_bytes(ncols)

    def _pack_chunk(self, w) -> np.ndarray:
        w = w.detach().to(torch.float32).cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, F)
        self._check(w.shape)
        return self.grid.pack_blocks(codes(self.grid, w, self.qw)).reshape(w.shape[0], -1)

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        """What these rules make of the 2-D weight `w`, dequantized: float32 of w's shape, on w's
        device. NPFT's rtn noise uses it when the file will be written with an importance matrix, so
        the tuning meets the error the written file has, not plain RTN's. It runs the bit-exact numpy
        search on the CPU: about 0.09 s per million weights for Q4_0 and 0.5 s for IQ4_NL (2-core AMD
        EPYC), at every tuning step."""
        self._check(tuple(w.shape))
        x = w.detach().to(torch.float32).cpu()
        out = torch.empty_like(x)
        rows = self.chunk_rows(x.shape[1])
        for i in range(0, x.shape[0], rows):
            out[i:i + rows] = self.grid.decode(codes(self.grid, x[i:i + rows].numpy(), self.qw)).reshape(-1, x.shape[1])
        return out.to(w.device)

    def pack_rows(self, chunks: Iterable, shape: tuple[int, int]) -> np.ndarray:
        """GGUF bytes of a 2-D weight given as consecutive row chunks (Grid.pack_rows' loop)."""
        self._check(shape)
        return Grid.pack_rows(self, chunks, shape)

    def pack(self, w) -> np.ndarray:
        """GGUF bytes, uint8 (rows, row_bytes), of a whole 2-D weight (torch or numpy)."""
        w = torch.as_tensor(w)
        return self.pack_rows(w.split(self.chunk_rows(w.shape[1])), tuple(w.shape))
