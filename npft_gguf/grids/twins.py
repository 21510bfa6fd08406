"""Torch twins of llama.cpp's scale-searching quantizers, for NPFT's noise on the tuning device.

The file is written by llama.cpp's own quantizer (llamacpp.GgmlQuantizer), on the CPU; at every
tuning step, on the tuning device, the noise needs the same rule. The twins run the same
search (the same candidate scales in the same order, the same least-squares scale and min, the
same first-wins comparisons, fp16 scales on the way back) as whole-tensor torch operations on the
weight's own device. The one difference is the order of the 32 additions inside a block, so a
block whose two best candidates tie to the last bits of a float32 sum may pick the other one; how
often that happens, and what it costs, is measured against the written bytes on real weights
(tests/grids/test_twins.py, evals/twins_agreement.py).

  Q4_0, Q5_0   make_qx_quants: 19 candidate scales
  Q4_1, Q5_1   make_qkx3_quants: 37 candidate ranges, each fitted by weighted least squares
  IQ4_NL       15 candidate scales on the non-uniform codebook, then every weight re-coded
  Q4_K, Q5_K   per 32-weight sub-block the Q4_1-style range search (qkx3_search; without an
               imatrix ggml's make_qkx2_quants, the same search over fewer candidates); then the
               8 scales and 8 mins to 6 bits: against their largest without an imatrix, by
               make_qp_quants's weighted search with one (qp_search); then every weight re-coded
  Q6_K         per 16-weight sub-block Q4_0's search (qx_search, 32 levels each side), the 16
               scales to 8 bits against the largest, then every weight re-coded

Weights of the search: with an imatrix entry qw, qw * sqrt(sigma2 + x^2) (sigma2 the row's mean
x^2, for IQ4_NL twice the block's, for Q4_K/Q5_K twice the super-block's; Q6_K takes qw alone);
without one, IQ4_NL and Q6_K weigh by x^2, Q4_K/Q5_K by |x| plus the sub-block's root mean square,
and the 32-weight legacy types round to nearest (their plain grid, exactly our RTN).
"""

from __future__ import annotations

import torch

from . import Grid, get_grid
from .base import as_f32
from .nonuniform import IQ4NL_LEVELS

EPS = 1e-15  # ggml's GROUP_MAX_EPS: a block whose largest |x| is below it is all zeros
KTWINS = ("q4_k", "q5_k", "q6_k")  # K-quants: 256-weight super-blocks (kquant_codes)
TWINNED = ("q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", *KTWINS)  # types whose search has a twin here
NMAX = {"q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31, "q4_k": 15, "q5_k": 31, "q6_k": 32}
# the candidate ranges (rmin, rdelta, nstep) of Q4_K/Q5_K's sub-block search: without an imatrix
# (make_qkx2_quants), with one (make_qkx3_quants)
KRANGES = {("q4_k", False): (-1.0, 0.1, 20), ("q5_k", False): (-0.5, 0.1, 15),
           ("q4_k", True): (-0.9, 0.05, 36), ("q5_k", True): (-0.9, 0.05, 36)}


def _f(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar on like's device, so constant arithmetic rounds as C's float does."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block (row of x): |x| max and the signed x there, the first of equal magnitudes."""
    i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, i)
    return mx.abs(), mx


def qx_search(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants on blocks x (n, 32) with weights w: (codes 0..2*nmax-1, scale (n, 1))."""
    amax, mx = _signed_absmax(x)
    zero = amax < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    lo, hi = float(-nmax), float(nmax - 1)

    def trial(iscale):
        q = torch.clamp(torch.round(iscale * x), lo, hi)
        wx = w * x
        return q, (wx * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)

    q, sumlx, suml2 = trial(_f(-nmax, x) / mx)
    nz = suml2 != 0
    scale = torch.where(nz, sumlx / torch.where(nz, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    best = scale * sumlx
    codes = q + nmax
    for i in range(-9, 10):
        if i == 0:
            continue
        q, sumlx, suml2 = trial(-(_f(nmax, x) + _f(0.1, x) * _f(i, x)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = torch.where(better, q + nmax, codes)
        scale = torch.where(better, sumlx / torch.where(better, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(better, scale * sumlx, best)
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def qkx3_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                nstep: int = 36) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx3_quants on blocks x (n, 32) with weights w: (codes 0..nmax, scale, min <= 0). Each
    candidate range starts from the min the best candidate so far fitted, as in ggml, so the
    candidates are tried one after another (each one over every block at once)."""
    mn = torch.clamp(x.amin(1, keepdim=True), max=0.0)
    mx = x.amax(1, keepdim=True)
    sum_w = w.sum(1, keepdim=True)
    sum_x = (w * x).sum(1, keepdim=True)
    flat = mx <= mn
    one = torch.ones_like(mx)
    top = float(nmax)

    def codes_for(iscale, lo):
        return torch.clamp(torch.round(iscale * (x - lo)), 0.0, top)

    iscale = _f(top, x) / torch.where(flat, one, mx - mn)
    scale = 1.0 / iscale
    L = codes_for(iscale, mn)
    diff = scale * L + mn - x
    best = (w * (diff * diff)).sum(1, keepdim=True)
    for i in range(nstep + 1):
        iscale = (_f(rmin, x) + _f(rdelta, x) * _f(i, x) + top) / torch.where(flat, one, mx - mn)
        la = codes_for(iscale, mn)
        wl = w * la
        sum_l, sum_l2, sum_xl = wl.sum(1, keepdim=True), (wl * la).sum(1, keepdim=True), (wl * x).sum(1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, one), this_scale)
        diff = this_scale * la + this_min - x
        mad = (w * (diff * diff)).sum(1, keepdim=True)
        better = ok & (mad < best) & ~flat
        L = torch.where(better, la, L)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    return L, torch.where(flat, torch.zeros_like(scale), scale), mn


def _levels(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4NL_LEVELS, dtype=torch.float32, device=like.device)


def iq4nl_index(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8: the nearest level, the upper one on ties, the ends beyond them."""
    mu = torch.clamp(torch.searchsorted(levels, x.contiguous(), right=True), 1, levels.numel() - 1)
    lower = (x - levels[mu - 1]) < (levels[mu] - x)
    idx = mu - lower.long()
    idx = torch.where(x <= levels[0], torch.zeros_like(idx), idx)
    return torch.where(x >= levels[-1], torch.full_like(idx, levels.numel() - 1), idx)


def iq4nl_search(x: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_iq4_nl_impl on blocks x (n, 32) with weights w: (codebook indices, scale)."""
    levels = _levels(x)
    amax, mx = _signed_absmax(x)
    zero = amax < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    v0 = IQ4NL_LEVELS[0]

    def sums(iscale):
        q = levels[iq4nl_index(iscale * x, levels)]
        wq = w * q
        return (wq * x).sum(1, keepdim=True), (wq * q).sum(1, keepdim=True)

    d = -mx / _f(v0, x)
    sumqx, sumq2 = sums(1.0 / d)
    pos = sumq2 > 0
    d = torch.where(pos, sumqx / torch.where(pos, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumq2))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(_f(itry + v0, x) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(better, sumq2, torch.ones_like(sumq2)), d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return iq4nl_index(inv * x, levels), d


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right, as C's loop does (for the 8 scales of a super-block)."""
    acc = t[..., :1]
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i:i + 1]
    return acc


def qp_search(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants on rows x (n, k) >= 0 with weights w: (codes 0..nmax, scale (n, 1)). The best
    of 9 scales near max/nmax, then up to 5 passes that move one code at a time while the fit
    improves (element by element, as in ggml; a pass that changes nothing changes nothing after)."""
    mx = torch.clamp(x.amax(1, keepdim=True), min=0.0)
    zero = mx < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    top = _f(nmax, x)

    def mse(iscale, clamp):
        q = torch.round(iscale * x)
        q = torch.clamp(q, max=float(nmax)) if clamp else q
        diff = x - (1.0 / iscale) * q
        return _seq_sum(w * diff * diff)

    iscale = top / mx
    best = mse(iscale, False)
    for i in range(-4, 5):
        if i == 0:
            continue
        cand = (_f(0.1, x) * _f(i, x) + top) / mx
        e = mse(cand, True)
        better = e < best
        best = torch.where(better, e, best)
        iscale = torch.where(better, cand, iscale)
    L = torch.clamp(torch.round(iscale * x), max=float(nmax))
    sumlx, suml2 = _seq_sum(w * x * L), _seq_sum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i:i + 1], x[:, i:i + 1], L[:, i:i + 1]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.clamp(torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))), max=float(nmax))
            slx = slx + wi * xi * new
            sl2 = sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i:i + 1] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    pos = suml2 > 0
    d = torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(d), d)


def _recode(x: torch.Tensor, de: torch.Tensor, dm: torch.Tensor, keep: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The K-quants' last step: every weight of a sub-block (x (n, s, k)) to the nearest code of its
    decoded grid de * q - dm; a sub-block whose decoded scale is 0 keeps its search's codes `keep`."""
    has = de != 0
    q = torch.clamp(torch.round((x + dm) / torch.where(has, de, torch.ones_like(de))), lo, hi)
    return torch.where(has, q, keep)


def kquant_codes(name: str, x: torch.Tensor, qw: torch.Tensor | None) -> dict:
    """llama.cpp's Q4_K/Q5_K/Q6_K rules on super-blocks x (n, 256) with their imatrix entries qw
    (n, 256; None: without an imatrix): the codes grids.kquants packs and decodes."""
    n = x.shape[0]
    if name == "q6_k":
        xs = x.reshape(-1, 16)
        wt = xs * xs if qw is None else qw.reshape(-1, 16)
        L, scale = qx_search(xs, wt, 32)
        scales = scale.reshape(n, 16)
        amax, mx = _signed_absmax(scales)
        zero = amax < EPS
        iscale = _f(-128.0, x) / torch.where(zero, torch.ones_like(mx), mx)
        d = torch.where(zero, torch.zeros_like(mx), 1.0 / iscale)
        sc = torch.where(zero, torch.zeros_like(scales), torch.clamp(torch.round(iscale * scales), max=127.0))
        de = (as_f32(d) * sc).unsqueeze(2)
        q = _recode(x.reshape(n, 16, 16), de, torch.zeros_like(de), L.reshape(n, 16, 16) - 32, -32.0, 31.0)
        q = torch.where(zero.unsqueeze(2), torch.full_like(q, -32.0), q)  # an all-zero super-block: all bytes 0
        return {"d": d, "sc": sc.to(torch.int8), "q": q.reshape(n, 256).to(torch.int8)}
    nmax = NMAX[name]
    xs = x.reshape(n, 8, 32)
    if qw is None:
        av = torch.sqrt((xs * xs).sum(2, keepdim=True) / 32.0)
        wt = av + xs.abs()
    else:
        sigma2 = (x * x).sum(1, keepdim=True).unsqueeze(2) * (2.0 / 256)
        wt = qw.reshape(n, 8, 32) * torch.sqrt(sigma2 + xs * xs)
    L, scale, mn = qkx3_search(xs.reshape(-1, 32), wt.reshape(-1, 32), nmax, *KRANGES[(name, qw is not None)])
    scales, mins = scale.reshape(n, 8), -mn.reshape(n, 8)
    if qw is None:  # 6-bit codes against the largest scale and min
        def six_bits(v):
            top = torch.clamp(v.amax(1, keepdim=True), min=0.0)
            inv = torch.where(top > 0, 63.0 / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
            return torch.clamp(torch.round(inv * v), 0.0, 63.0), top / 63.0
        sc, d = six_bits(scales)
        m, dmin = six_bits(mins)
    else:
        sw = wt.sum(2)
        sc, d = qp_search(scales, sw, 63)
        m, dmin = qp_search(mins, sw, 63)
    de = (as_f32(d) * sc).unsqueeze(2)
    dm = (as_f32(dmin) * m).unsqueeze(2)
    q = _recode(xs, de, dm, L.reshape(n, 8, 32), 0.0, float(nmax))
    return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8), "q": q.reshape(n, 256).to(torch.uint8)}


class TwinRules:
    """llama.cpp's quantizer for `grid` with imatrix entry `qw` (None: its rules without one), as
    torch operations on the weight's device. `codes(w)` gives the fields the grid's pack_blocks takes
    (for measuring agreement); `fakequant(w)` the dequantized weight, what NPFT's rtn noise needs."""

    def __init__(self, grid: Grid | str, qw=None):
        self.grid = get_grid(grid) if isinstance(grid, str) else grid
        if self.grid.name not in TWINNED:
            raise ValueError(f"no torch twin of llama.cpp's rules for {self.grid.name}")
        self.qw = None if qw is None else torch.as_tensor(qw, dtype=torch.float32).reshape(-1)

    @property
    def name(self) -> str:
        return self.grid.name

    def _blocks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, search weights) as (n_blocks, 32), or weights None where llama.cpp rounds to nearest;
        for the K-quants (x, imatrix entries or None) as (n_super_blocks, 256)."""
        block = self.grid.block
        if w.ndim != 2 or not self.grid.fits(w.shape[1]):
            raise ValueError(f"{self.name} needs a 2-D weight whose rows are a multiple of {block}, got {tuple(w.shape)}")
        rows, cols = w.shape
        w = w.detach().to(torch.float32)
        x = w.reshape(-1, block)
        if self.qw is None:
            return x, (x * x if self.name == "iq4_nl" else None)
        if self.qw.shape[0] != cols:
            raise ValueError(f"the imatrix entry has {self.qw.shape[0]} columns, the weight {cols}")
        qw = self.qw.to(w.device).reshape(1, -1, block).expand(rows, -1, -1).reshape(-1, block)
        if self.name in KTWINS:
            return x, qw
        if self.name == "iq4_nl":
            sigma2 = (x * x).sum(1, keepdim=True) * (2.0 / 32)
        else:
            sigma2 = ((w * w).sum(1, keepdim=True) / cols).repeat_interleave(cols // 32, dim=0)
        return x, qw * torch.sqrt(sigma2 + x * x)

    def codes(self, w: torch.Tensor) -> dict:
        """Per block the codes and the float32 scale (and min), before fp16 rounding; None weights
        (legacy types without an imatrix) give the plain grid's own encoding."""
        x, wt = self._blocks(w)
        if self.name in KTWINS:
            return kquant_codes(self.name, x, wt)
        if wt is None:
            return self.grid.encode(x)
        if self.name == "iq4_nl":
            q, d = iq4nl_search(x, wt)
            return {"d": d, "q": q.to(torch.uint8)}
        if self.name in ("q4_0", "q5_0"):
            q, d = qx_search(x, wt, NMAX[self.name])
            return {"d": d, "q": q.to(torch.uint8)}
        q, d, mn = qkx3_search(x, wt, NMAX[self.name])
        return {"d": d, "m": mn, "q": q.to(torch.uint8)}

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as the written file will hold it, dequantized: float32 of w's shape."""
        c = self.codes(w)
        q = c["q"].to(torch.float32)
        if self.name in KTWINS:
            out = self.grid.decode(c)
        elif self.name == "iq4_nl":
            out = as_f32(c["d"]) * _levels(q)[c["q"].long()]
        elif self.name in ("q4_0", "q5_0"):
            out = as_f32(c["d"]) * (q - NMAX[self.name])
        else:
            out = as_f32(c["d"]) * q + as_f32(c["m"])
        return out.reshape(w.shape)
