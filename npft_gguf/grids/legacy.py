"""llama.cpp's 32-weight block types, quantized by exactly the rules of ggml's reference quantizer.

Symmetric (Q4_0, Q5_0, Q8_0): one fp16 scale d per block. Q4_0/Q5_0 take d = m / -2^(b-1) with m
the signed value of largest magnitude, so m lands on the most negative code; Q8_0 takes
d = amax / 127 and rounds half away from zero. Asymmetric (Q4_1, Q5_1): d = (max - min) / (2^b - 1)
and an fp16 offset m = min. Codes are computed from the fp32 scale, values are rebuilt from the
fp16 one, in the same float32 operation order as ggml and gguf-py, so results match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .base import Codes, Grid, as_f32, fp16_bytes, high_bits, nibbles, round_half_away, safe_inverse, signed_absmax


@dataclass(frozen=True)
class _Symmetric(Grid):
    """d = m / -half, code = min(top, trunc(x/d + half + 0.5)), value = d * (code - half)."""

    bits = 4

    def encode(self, x: torch.Tensor) -> Codes:
        half = 1 << (self.bits - 1)
        d = signed_absmax(x) / -float(half)
        q = torch.clamp(torch.trunc(x * safe_inverse(d) + (half + 0.5)), max=2 * half - 1)
        return {"d": d, "q": q.to(torch.uint8)}

    def decode(self, c: Codes) -> torch.Tensor:
        half = 1 << (self.bits - 1)
        return as_f32(c["d"]) * (c["q"].to(torch.float32) - half)


@dataclass(frozen=True)
class Q4_0(_Symmetric):
    ggml = T.Q4_0
    bits = 4

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), nibbles(c["q"])], axis=1)


@dataclass(frozen=True)
class Q5_0(_Symmetric):
    ggml = T.Q5_0
    bits = 5

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), high_bits(c["q"]), nibbles(c["q"])], axis=1)


@dataclass(frozen=True)
class _Affine(Grid):
    """d = (max - min) / (2^b - 1), code = trunc((x - min)/d + 0.5), value = d * code + min."""

    bits = 4

    def encode(self, x: torch.Tensor) -> Codes:
        top = (1 << self.bits) - 1
        lo = x.min(dim=1, keepdim=True).values
        hi = x.max(dim=1, keepdim=True).values
        d = (hi - lo) / float(top)
        q = torch.trunc((x - lo) * safe_inverse(d) + 0.5)
        # ggml clamps 4-bit codes with MIN(15, .) and lets 5-bit codes wrap through a uint8 cast
        q = torch.clamp(q, max=top) if self.bits == 4 else torch.remainder(q, top + 1)
        return {"d": d, "m": lo, "q": q.to(torch.uint8)}

    def decode(self, c: Codes) -> torch.Tensor:
        return as_f32(c["d"]) * c["q"].to(torch.float32) + as_f32(c["m"])


@dataclass(frozen=True)
class Q4_1(_Affine):
    ggml = T.Q4_1
    bits = 4

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), fp16_bytes(c["m"]), nibbles(c["q"])], axis=1)


@dataclass(frozen=True)
class Q5_1(_Affine):
    ggml = T.Q5_1
    bits = 5

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), fp16_bytes(c["m"]), high_bits(c["q"]), nibbles(c["q"])], axis=1)


@dataclass(frozen=True)
class Q8_0(Grid):
    ggml = T.Q8_0

    def encode(self, x: torch.Tensor) -> Codes:
        d = x.abs().amax(dim=1, keepdim=True) / 127.0
        q = round_half_away(x * safe_inverse(d))
        return {"d": d, "q": q.to(torch.int8)}

    def decode(self, c: Codes) -> torch.Tensor:
        return as_f32(c["d"]) * c["q"].to(torch.float32)

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), c["q"].cpu().numpy().view(np.uint8)], axis=1)
