"""What every GGUF grid offers: encode to codes, decode to floats, pack codes into GGUF block bytes.

Encoding is done in torch (CPU or CUDA) on blocks of one row; the codes are the single source of
truth, so `fakequant(w) == dequantize(pack(encode(w)))` holds by construction and is tested against
gguf-py's independent dequantizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Codes = dict[str, torch.Tensor]
PACK_CHUNK = 1 << 18  # weights per chunk in Grid.pack: 1 MiB of float32


@dataclass(frozen=True)
class Grid:
    """One GGUF tensor type. Subclasses set `ggml` and implement encode/decode/pack_blocks."""

    ggml: ClassVar[GGMLQuantizationType]

    @property
    def name(self) -> str:
        return self.ggml.name.lower()

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def fits(self, ncols: int) -> bool:
        return ncols % self.block == 0

    def row_bytes(self, ncols: int) -> int:
        return ncols // self.block * self.block_bytes

    # --- to implement -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Codes:
        """x: float32 blocks of shape (n_blocks, block) -> integer codes and float scales."""
        raise NotImplementedError

    def decode(self, c: Codes) -> torch.Tensor:
        """Codes -> float32 blocks (n_blocks, block), by the same arithmetic as llama.cpp/gguf-py."""
        raise NotImplementedError

    def pack_blocks(self, c: Codes) -> np.ndarray:
        """Codes -> uint8 array (n_blocks, block_bytes) in GGUF's byte layout."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def _check(self, w: torch.Tensor) -> None:
        if w.ndim != 2 or not self.fits(w.shape[1]):
            raise ValueError(f"{self.name} needs a 2-D weight whose rows are a multiple of {self.block}, got {tuple(w.shape)}")

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        self._check(w)
        return w.detach().to(torch.float32).reshape(-1, self.block)

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize a 2-D weight (rows along dim 1); returns float32 of w's shape."""
        return self.decode(self.encode(self._blocks(w))).reshape(w.shape)

    level_spacing: ClassVar[float] = 1.0  # distance between adjacent codes, in units of the scale d

    def step(self, w: torch.Tensor) -> torch.Tensor:
        """Per weight, the quantization step D of the block that holds it (NPFT's grid noise is
        U[-D/2, D/2]): |d| times the code spacing; for grids without one scale per block (K-quants),
        the block's range over its levels, an approximation."""
        blocks = self._blocks(w)
        codes = self.encode(blocks)
        d = codes.get("d")
        if d is not None and d.shape == (blocks.shape[0], 1):
            step = as_f32(d).abs() * self.level_spacing
        else:
            levels = 2 ** int(self.bits_per_weight) - 1
            step = (blocks.amax(1, keepdim=True) - blocks.amin(1, keepdim=True)) / levels
        return step.expand(-1, blocks.shape[1]).reshape(w.shape)

    def chunk_rows(self, ncols: int) -> int:
        """Rows per chunk for pack_rows: about PACK_CHUNK weights."""
        return max(1, PACK_CHUNK // ncols)

    def pack(self, w: torch.Tensor) -> np.ndarray:
        """Quantize a 2-D weight to GGUF bytes: uint8 array (rows, row_bytes)."""
        self._check(w)
        return self.pack_rows(w.split(self.chunk_rows(w.shape[1])), tuple(w.shape))

    def pack_rows(self, chunks: Iterable[torch.Tensor], shape: tuple[int, int]) -> np.ndarray:
        """GGUF bytes, uint8 (rows, row_bytes), of a 2-D weight of `shape` given as consecutive row
        chunks. Blocks never cross rows, so chunks pack independently into the same bytes as the
        whole tensor; chunks of about PACK_CHUNK weights keep the encoder's temporaries small and
        in cache (several times faster on CPU than whole-tensor passes), and a source can read
        the weight chunk by chunk instead of whole."""
        out = np.empty((shape[0], self.row_bytes(shape[1])), np.uint8)
        r = 0
        for chunk in chunks:
            out[r : r + chunk.shape[0]] = self._pack_chunk(chunk)
            r += chunk.shape[0]
        if r != shape[0]:
            raise ValueError(f"row chunks hold {r} rows of a weight of {shape[0]}")
        return out

    def _pack_chunk(self, w: torch.Tensor) -> np.ndarray:
        return self.pack_blocks(self.encode(self._blocks(w))).reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# helpers shared by the block types


def fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """float tensor (n, 1) -> uint8 (n, 2), IEEE half little-endian (round to nearest even)."""
    return x.to(torch.float16).cpu().numpy().reshape(-1, 1).view(np.uint8)


def as_f32(x16: torch.Tensor) -> torch.Tensor:
    return x16.to(torch.float16).to(torch.float32)


def nibbles(q: torch.Tensor) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: element j in the low nibble, element j+16 in the high one."""
    q = q.to(torch.uint8).cpu().numpy()
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | ((q[:, half:] & 0x0F) << 4)


def high_bits(q: torch.Tensor) -> np.ndarray:
    """(n, 32) codes 0..31 -> (n, 4) bytes: bit 4 of element j at bit j of a little-endian uint32."""
    bits = ((q.to(torch.int64).cpu().numpy() >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").reshape(-1, 1).view(np.uint8)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: ties away from zero (torch.round ties to even)."""
    t = torch.trunc(x)
    frac = x - t
    return torch.where(frac.abs() >= 0.5, t + torch.sign(x), t)


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block, the signed value of largest magnitude; the first one wins ties (as in ggml)."""
    idx = x.abs().argmax(dim=1, keepdim=True)
    return x.gather(1, idx)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
