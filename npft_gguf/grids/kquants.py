"""llama.cpp's K-quants (Q2_K..Q6_K): 256-weight super-blocks of 16 or 32-weight sub-blocks.

Plain round-to-nearest, deliberately without llama.cpp's scale search (make_qx_quants and
make_qkx2_quants), so results are deterministic and cheap on GPU. Each sub-block gets a scale
(and, for the affine types, a min) straight from its min/max or signed absmax; those are quantized
to the type's 4/6/8-bit fields against fp16 super-block scales, and every weight is then rounded to
the nearest code of the *decoded* sub-block grid. Decoding repeats gguf-py's float32 arithmetic
(d * sc first, then times q, minus dmin * m), so fakequant matches GGUF dequantization bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .base import Codes, Grid, as_f32, fp16_bytes, signed_absmax


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, and 0 where b is 0 (an all-zero sub-block or super-block)."""
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _interleave(v: np.ndarray, bits: int, width: int) -> np.ndarray:
    """(n, k) values < 2^bits -> bytes: runs of `width` values share bytes, run j at bit bits*j.

    This is the one packing pattern every K-quant field uses, e.g. Q4_K's qs (bits=4, width=32):
    byte 32c + l holds element 64c + l in its low nibble and element 64c + 32 + l in the high one.
    """
    per = 8 // bits
    v = v.astype(np.uint8).reshape(v.shape[0], -1, per, width)
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    return np.bitwise_or.reduce(v << shifts, axis=2).reshape(v.shape[0], -1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().reshape(t.shape[0], -1)


@dataclass(frozen=True)
class _AffineK(Grid):
    """x ~ d*sc*q - dmin*m with q in 0..qmax, and sc, m in 0..smax per sub-block of `sub` weights."""

    sub = 32
    qmax = 15
    smax = 63

    def encode(self, x: torch.Tensor) -> Codes:
        xs = x.reshape(x.shape[0], -1, self.sub)
        lo = xs.amin(dim=2).clamp(max=0.0)  # m is unsigned, so the offset -dmin*m is never positive
        scale = (xs.amax(dim=2) - lo) / float(self.qmax)
        mins = -lo
        d = scale.amax(dim=1, keepdim=True) / float(self.smax)
        dmin = mins.amax(dim=1, keepdim=True) / float(self.smax)
        sc = torch.round(_ratio(scale, as_f32(d))).clamp(0, self.smax)
        m = torch.round(_ratio(mins, as_f32(dmin))).clamp(0, self.smax)
        de = (as_f32(d) * sc).unsqueeze(2)
        dm = (as_f32(dmin) * m).unsqueeze(2)
        q = torch.round(_ratio(xs + dm, de)).clamp(0, self.qmax)
        return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8), "q": q.reshape(x.shape).to(torch.uint8)}

    def decode(self, c: Codes) -> torch.Tensor:
        de = (as_f32(c["d"]) * c["sc"].to(torch.float32)).unsqueeze(2)
        dm = (as_f32(c["dmin"]) * c["m"].to(torch.float32)).unsqueeze(2)
        q = c["q"].to(torch.float32).reshape(de.shape[0], de.shape[1], -1)
        return (de * q - dm).reshape(c["q"].shape)


@dataclass(frozen=True)
class Q2_K(_AffineK):
    ggml = T.Q2_K
    sub = 16
    qmax = 3
    smax = 15

    def pack_blocks(self, c: Codes) -> np.ndarray:
        scales = _np(c["sc"]) | (_np(c["m"]) << 4)
        qs = _interleave(_np(c["q"]), 2, 32)
        return np.concatenate([scales, qs, fp16_bytes(c["d"]), fp16_bytes(c["dmin"])], axis=1)


def _scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes for 8 scales and 8 mins of 6 bits (gguf-py's get_scale_min, inverted)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return np.concatenate(
        [lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)], axis=1
    ).astype(np.uint8)


@dataclass(frozen=True)
class Q4_K(_AffineK):
    ggml = T.Q4_K
    qmax = 15

    def pack_blocks(self, c: Codes) -> np.ndarray:
        scales = _scales_6bit(_np(c["sc"]), _np(c["m"]))
        qs = _interleave(_np(c["q"]), 4, 32)
        return np.concatenate([fp16_bytes(c["d"]), fp16_bytes(c["dmin"]), scales, qs], axis=1)


@dataclass(frozen=True)
class Q5_K(_AffineK):
    ggml = T.Q5_K
    qmax = 31

    def pack_blocks(self, c: Codes) -> np.ndarray:
        q = _np(c["q"])
        scales = _scales_6bit(_np(c["sc"]), _np(c["m"]))
        qh = _interleave(q >> 4, 1, 32)
        qs = _interleave(q & 0x0F, 4, 32)
        return np.concatenate([fp16_bytes(c["d"]), fp16_bytes(c["dmin"]), scales, qh, qs], axis=1)


@dataclass(frozen=True)
class _SymmetricK(Grid):
    """x ~ d*sc*q with q in -half..half-1 and signed sc in -shalf..shalf-1 per 16-weight sub-block.

    As in Q4_0, the sub-block's signed absmax lands on the most negative code (-half), and the
    largest sub-block scale on the most negative scale code (-shalf).
    """

    sub = 16
    half = 32
    shalf = 128

    def encode(self, x: torch.Tensor) -> Codes:
        xs = x.reshape(x.shape[0], -1, self.sub)
        scale = signed_absmax(xs.reshape(-1, self.sub)).reshape(xs.shape[:2]) / -float(self.half)
        d = signed_absmax(scale) / -float(self.shalf)
        sc = torch.round(_ratio(scale, as_f32(d))).clamp(-self.shalf, self.shalf - 1)
        de = (as_f32(d) * sc).unsqueeze(2)
        q = torch.round(_ratio(xs, de)).clamp(-self.half, self.half - 1)
        return {"d": d, "sc": sc.to(torch.int8), "q": q.reshape(x.shape).to(torch.int8)}

    def decode(self, c: Codes) -> torch.Tensor:
        de = (as_f32(c["d"]) * c["sc"].to(torch.float32)).unsqueeze(2)
        q = c["q"].to(torch.float32).reshape(de.shape[0], de.shape[1], -1)
        return (de * q).reshape(c["q"].shape)


@dataclass(frozen=True)
class Q3_K(_SymmetricK):
    ggml = T.Q3_K
    half = 4
    shalf = 32

    def pack_blocks(self, c: Codes) -> np.ndarray:
        q = _np(c["q"]).astype(np.int16) + 4  # 0..7; a set hmask bit means "no -4 offset"
        u = _np(c["sc"]).astype(np.int16) + 32  # 0..63
        hmask = _interleave(q >> 2, 1, 32)
        qs = _interleave(q & 3, 2, 32)
        scales = np.concatenate([_interleave(u & 0x0F, 4, 8), _interleave(u >> 4, 2, 4)], axis=1)
        return np.concatenate([hmask, qs, scales, fp16_bytes(c["d"])], axis=1)


@dataclass(frozen=True)
class Q6_K(_SymmetricK):
    ggml = T.Q6_K
    half = 32
    shalf = 128

    def pack_blocks(self, c: Codes) -> np.ndarray:
        q = _np(c["q"]).astype(np.int16) + 32  # 0..63
        ql = _interleave(q & 0x0F, 4, 64)
        qh = _interleave(q >> 4, 2, 32)
        return np.concatenate([ql, qh, _np(c["sc"]).view(np.uint8), fp16_bytes(c["d"])], axis=1)


KQUANTS: tuple[Grid, ...] = (Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())
