"""IQ4_NL: 16 non-uniform levels (llama.cpp's codebook), one fp16 scale per 32 weights.

Plain round-to-nearest: d = m / -127 with m the signed value of largest magnitude (so m lands on
the codebook's end), each weight to the nearest level. llama.cpp's own IQ4_NL quantizer adds a
small scale search on top; this is deliberately the RTN version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .base import Codes, Grid, as_f32, fp16_bytes, nibbles, safe_inverse, signed_absmax

IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class IQ4_NL(Grid):
    ggml = T.IQ4_NL
    level_spacing = (IQ4NL_LEVELS[-1] - IQ4NL_LEVELS[0]) / (len(IQ4NL_LEVELS) - 1)  # mean gap

    def encode(self, x: torch.Tensor) -> Codes:
        levels = torch.tensor(IQ4NL_LEVELS, dtype=torch.float32, device=x.device)
        d = signed_absmax(x) / -127.0
        scaled = x * safe_inverse(d)
        q = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1)
        return {"d": d, "q": q.to(torch.uint8)}

    def decode(self, c: Codes) -> torch.Tensor:
        levels = torch.tensor(IQ4NL_LEVELS, dtype=torch.float32, device=c["q"].device)
        return as_f32(c["d"]) * levels[c["q"].long()]

    def pack_blocks(self, c: Codes) -> np.ndarray:
        return np.concatenate([fp16_bytes(c["d"]), nibbles(c["q"])], axis=1)
