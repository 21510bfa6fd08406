"""llama.cpp's importance-weighted quantizers (grids/weighted.py) against two independent oracles:

- a plain reference written here loop by loop, one float32 scalar at a time, from the C code's
  description (its own block packing too), on a few blocks;
- ggml itself: `ggml_quantize_chunk` from the libggml-base that llama-cpp-python ships (llamacpp.ggml_quantize), on
  thousands of blocks with random importance matrices, byte for byte.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from npft_gguf.grids import get_grid
from npft_gguf.grids.nonuniform import IQ4NL_LEVELS
from npft_gguf.grids.weighted import WEIGHTED, LlamaCppRules

f32 = np.float32


# --- the plain reference --------------------------------------------------------------------------

def nearest_int(v) -> int:
    return int(np.rint(f32(v)))


def ref_qx(x, w, nmax):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w): (scale, codes)."""
    n = len(x)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = f32(abs(v)), f32(v)
    if amax < f32(1e-15):
        return f32(0), [0] * n

    def trial(iscale):
        sumlx, suml2, L = f32(0), f32(0), []
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            L.append(l + nmax)
            sumlx = f32(sumlx + f32(f32(w[i] * x[i]) * f32(l)))
            suml2 = f32(suml2 + f32(f32(w[i] * f32(l)) * f32(l)))
        return sumlx, suml2, L

    sumlx, suml2, L = trial(f32(-nmax) / mx)
    scale = f32(sumlx / suml2) if suml2 != 0 else f32(0)
    best = f32(scale * sumlx)
    for k in range(-9, 10):
        if k == 0:
            continue
        s, s2, Lk = trial(f32(-(f32(nmax) + f32(f32(0.1) * f32(k)))) / mx)
        if s2 > 0 and f32(s * s) > f32(best * s2):
            L, scale = Lk, f32(s / s2)
            best = f32(scale * s)
    return scale, L


def ref_qkx3(x, w, nmax):
    """make_qkx3_quants(n, nmax, x, w, L, &min, Laux, -0.9, 0.05, 36, false): (scale, min, codes)."""
    n = len(x)
    lo, hi = f32(x[0]), f32(x[0])
    sum_w = f32(w[0])
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        lo = x[i] if x[i] < lo else lo
        hi = x[i] if x[i] > hi else hi
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    if lo > 0:
        lo = f32(0)
    if hi <= lo:
        return f32(0), lo, [0] * n
    iscale = f32(f32(nmax) / f32(hi - lo))
    scale = f32(f32(1) / iscale)
    L, best = [], f32(0)
    for i in range(n):
        L.append(max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - lo))))))
        diff = f32(f32(f32(scale * f32(L[i])) + lo) - x[i])
        best = f32(best + f32(w[i] * f32(diff * diff)))
    for k in range(37):
        iscale = f32(f32(f32(f32(-0.9) + f32(f32(0.05) * f32(k))) + f32(nmax)) / f32(hi - lo))
        la, sl, sl2, sxl = [], f32(0), f32(0), f32(0)
        for i in range(n):
            q = max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - lo)))))
            la.append(q)
            sl = f32(sl + f32(w[i] * f32(q)))
            sl2 = f32(sl2 + f32(f32(w[i] * f32(q)) * f32(q)))
            sxl = f32(sxl + f32(f32(w[i] * f32(q)) * x[i]))
        D = f32(f32(sum_w * sl2) - f32(sl * sl))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sxl) - f32(sum_x * sl)) / D)
            this_min = f32(f32(f32(sl2 * sum_x) - f32(sl * sxl)) / D)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sxl / sl2)
            mad = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(la[i])) + this_min) - x[i])
                mad = f32(mad + f32(w[i] * f32(diff * diff)))
            if mad < best:
                L, best, scale, lo = la, mad, this_scale, this_min
    return scale, lo, L


LEVELS = [f32(v) for v in IQ4NL_LEVELS]


def ref_best_index(v) -> int:
    if v <= LEVELS[0]:
        return 0
    if v >= LEVELS[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < LEVELS[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if f32(v - LEVELS[hi - 1]) < f32(LEVELS[hi] - v) else hi


def ref_iq4nl(x, qw):
    """quantize_row_iq4_nl_impl(32, 32, ..., qw, ntry=7) for one block: (d, codes)."""
    sigma2 = f32(0)
    for v in x:
        sigma2 = f32(sigma2 + f32(v * v))
    sigma2 = f32(sigma2 * f32(2.0 / 32))
    w = [f32(v * v) if qw is None else f32(qw[j] * np.sqrt(f32(sigma2 + f32(v * v)))) for j, v in enumerate(x)]
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = f32(abs(v)), f32(v)
    d = f32(0)
    if amax >= f32(1e-15):
        def sums(iscale):
            sqx, sq2 = f32(0), f32(0)
            for j in range(32):
                q = LEVELS[ref_best_index(f32(iscale * x[j]))]
                sqx = f32(sqx + f32(f32(w[j] * q) * x[j]))
                sq2 = f32(sq2 + f32(f32(w[j] * q) * q))
            return sqx, sq2

        d = f32(f32(-mx) / LEVELS[0])
        sqx, sq2 = sums(f32(f32(1) / d))
        d = f32(sqx / sq2) if sq2 > 0 else f32(0)
        best = f32(d * sqx)
        for itry in range(-7, 8):
            sqx, sq2 = sums(f32(f32(itry - 127) / mx))
            if sq2 > 0 and f32(sqx * sqx) > f32(best * sq2):
                d = f32(sqx / sq2)
                best = f32(d * sqx)
    inv = f32(f32(1) / d) if d != 0 else f32(0)
    return d, [ref_best_index(f32(inv * v)) for v in x]


def half(v) -> bytes:
    return np.float16(v).tobytes()


def nibble_bytes(L) -> bytes:
    return bytes((L[j] & 15) | ((L[j + 16] & 15) << 4) for j in range(16))


def high_bit_bytes(L) -> bytes:
    qh = 0
    for j in range(32):
        qh |= ((L[j] >> 4) & 1) << j
    return int(qh).to_bytes(4, "little")


def ref_row(name: str, row: np.ndarray, qw: np.ndarray | None) -> bytes:
    """One row quantized and packed as ggml's block structs, by the reference above."""
    x = [f32(v) for v in row]
    out = b""
    if name == "iq4_nl":
        for b in range(0, len(x), 32):
            d, L = ref_iq4nl(x[b:b + 32], None if qw is None else qw[b:b + 32])
            out += half(d) + nibble_bytes(L)
        return out
    sum_x2 = f32(0)
    for v in x:
        sum_x2 = f32(sum_x2 + f32(v * v))
    sigma2 = f32(sum_x2 / f32(len(x)))
    for b in range(0, len(x), 32):
        xb = x[b:b + 32]
        w = [f32(qw[b + j] * np.sqrt(f32(sigma2 + f32(v * v)))) for j, v in enumerate(xb)]
        if name in ("q4_0", "q5_0"):
            d, L = ref_qx(xb, w, 8 if name == "q4_0" else 16)
            out += half(d) + (high_bit_bytes(L) if name == "q5_0" else b"") + nibble_bytes(L)
        else:
            d, m, L = ref_qkx3(xb, w, 15 if name == "q4_1" else 31)
            out += half(d) + half(m) + (high_bit_bytes(L) if name == "q5_1" else b"") + nibble_bytes(L)
    return out


def sample(rows: int, cols: int, seed: int):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (rows, cols)) * rng.uniform(0.005, 0.3, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 32:64] = np.round(w[1, 32:64] * 16) / 16  # many equal magnitudes
    qw = (rng.standard_normal(cols) ** 2 * 5).astype(np.float32)
    qw[5] = 0.0  # a column no token activated
    return w, qw


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_1", "q5_1", "iq4_nl"])
def test_weighted_bytes_equal_the_plain_reference(name):
    w, qw = sample(3, 96, seed=1)
    ours = LlamaCppRules(name, qw).pack(w)
    for r in range(w.shape[0]):
        assert ours[r].tobytes() == ref_row(name, w[r], qw), (name, r)
    if name == "iq4_nl":  # no imatrix: llama.cpp still searches, with weights x^2
        ours = LlamaCppRules(name, None).pack(w)
        for r in range(w.shape[0]):
            assert ours[r].tobytes() == ref_row(name, w[r], None), (name, r)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_without_an_imatrix_the_legacy_types_are_our_rtn(name):
    w, _ = sample(8, 128, seed=2)
    assert np.array_equal(LlamaCppRules(name, None).pack(w), get_grid(name).pack(torch.from_numpy(w)))


def test_weighted_rounding_lowers_the_weighted_error():
    w, qw = sample(64, 256, seed=3)
    grid = get_grid("q4_0")
    rtn = grid.fakequant(torch.from_numpy(w)).numpy()
    raw = LlamaCppRules("q4_0", qw).pack(w)
    from gguf.quants import dequantize

    ours = dequantize(raw, T.Q4_0).reshape(w.shape)
    err = lambda q: float((qw[None, :] * (q - w) ** 2).sum())  # noqa: E731
    assert err(ours) < 0.9 * err(rtn)


def test_chunks_give_the_same_bytes_as_the_whole_tensor():
    w, qw = sample(40, 64, seed=4)
    rules = LlamaCppRules("q5_1", qw)
    whole = rules.pack(w)
    assert np.array_equal(rules.pack_rows(torch.from_numpy(w).split(7), w.shape), whole)


def test_an_imatrix_of_the_wrong_width_is_refused():
    w, qw = sample(4, 64, seed=5)
    with pytest.raises(ValueError, match="columns"):
        LlamaCppRules("q4_0", qw[:32]).pack(w)


# --- ggml itself -------------------------------------------------------------------------------------

def ggml_quantize(name: str, w: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    from npft_gguf.llamacpp import ggml_quantize as quantize

    return quantize(name, w, qw)


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("with_imatrix", [True, False])
def test_bytes_equal_ggml_quantize_chunk(name, with_imatrix):
    for seed, cols in ((10, 512), (11, 768)):
        w, qw = sample(96, cols, seed)
        q = qw if with_imatrix else None
        ours, theirs = LlamaCppRules(name, q).pack(w), ggml_quantize(name, w, q)
        bad = np.nonzero((ours != theirs).any(1))[0]
        assert bad.size == 0, f"{name}: rows {bad[:5].tolist()} of {w.shape[0]} differ from ggml"


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q6_k"])
def test_weighted_fakequant_is_the_dequantized_bytes(name):
    """What NPFT's rtn noise sees under an imatrix: the written bytes, dequantized by gguf-py."""
    from gguf.quants import dequantize

    w, qw = sample(5, 256, seed=6)
    rules = LlamaCppRules(name, qw)
    raw = rules.pack(w)
    expect = dequantize(raw, get_grid(name).ggml).reshape(w.shape)
    assert np.array_equal(rules.fakequant(torch.from_numpy(w)).numpy(), expect)
    if name == "q4_0":  # no imatrix entry: llama.cpp rounds to nearest, as our grid does
        assert torch.equal(LlamaCppRules(name, None).fakequant(torch.from_numpy(w)), get_grid(name).fakequant(torch.from_numpy(w)))
