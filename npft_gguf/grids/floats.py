"""Float storage types: F32, F16, BF16 (round to nearest even, as ggml converts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .base import Grid


@dataclass(frozen=True)
class _Float(Grid):
    dtype = torch.float32

    def fits(self, ncols: int) -> bool:
        return True

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().to(self.dtype).to(torch.float32)

    def step(self, w: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(w, dtype=torch.float32)

    def pack(self, w: torch.Tensor) -> np.ndarray:
        a = w.detach().to(self.dtype).cpu().contiguous()
        if self.dtype is torch.bfloat16:  # numpy has no bfloat16: hand over the raw bytes
            return a.view(torch.int16).numpy().view(np.uint8)
        return a.numpy()

    def _pack_chunk(self, w: torch.Tensor) -> np.ndarray:
        return self.pack(w).view(np.uint8).reshape(w.shape[0], -1)


@dataclass(frozen=True)
class F32(_Float):
    ggml = T.F32
    dtype = torch.float32


@dataclass(frozen=True)
class F16(_Float):
    ggml = T.F16
    dtype = torch.float16


@dataclass(frozen=True)
class BF16(_Float):
    ggml = T.BF16
    dtype = torch.bfloat16
