"""The paper's quantizer, simulated in torch: asymmetric min-max RTN at b bits per output channel
(or per group of columns along the row), as GPTQ's reference `Quantizer(perchannel=True, sym=False)`.

scale = (max - min) / (2^b - 1) with the range stretched to include 0, zero = round(-min / scale),
q = clamp(round(x / scale) + zero, 0, 2^b - 1), value = scale * (q - zero). No file format holds it
(GGUF's grids are blocks of 32; see ongrid.py for GPTQ onto those): results are fake-quantized float
weights evaluated in torch. The same class is GPTQ's column quantizer for 3- and 4-bit per-channel
runs, so RTN, NPFT+RTN and GPTQ are compared on one quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ongrid import Params, _masked_extreme


@dataclass(frozen=True)
class MinMax:
    bits: int = 4
    group: int = 0  # columns per group along the row; 0 = one scale per output channel

    @property
    def name(self) -> str:
        return f"minmax{self.bits}" + (f"g{self.group}" if self.group else "")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def fit(self, w: torch.Tensor, mask: torch.Tensor | None = None) -> Params:
        lo = torch.clamp(_masked_extreme(w, mask, float("inf"), largest=False)[0], max=0)
        hi = torch.clamp(_masked_extreme(w, mask, float("-inf"), largest=True)[0], min=0)
        empty = (lo == 0) & (hi == 0)
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        scale = (hi - lo) / self.maxq
        return {"scale": scale, "zero": torch.round(-lo / scale)}

    def quantize(self, x: torch.Tensor, p: Params, j: int = 0) -> torch.Tensor:
        scale, zero = (p["scale"], p["zero"]) if x.ndim == 1 else (p["scale"][:, None], p["zero"][:, None])
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return scale * (q - zero)

    def fits(self, ncols: int) -> bool:
        return not self.group or ncols % self.group == 0

    def step(self, w: torch.Tensor) -> torch.Tensor:
        """Per weight, the scale of the channel (or group) that holds it: NPFT's grid noise for this
        quantizer is U[-scale/2, scale/2], as for a GGUF block's step (grids/base.py)."""
        w = w.detach().to(torch.float32)
        blocks = w.reshape(-1, self.group or w.shape[1])
        return self.fit(blocks)["scale"][:, None].expand_as(blocks).reshape(w.shape)

    def fakequant(self, w: torch.Tensor) -> torch.Tensor:
        """RTN of a 2-D weight (rows along dim 1); float32 of w's shape."""
        w = w.detach().to(torch.float32)
        g = self.group or w.shape[1]
        if w.shape[1] % g:
            raise ValueError(f"rows of {w.shape[1]} do not split into groups of {g}")
        blocks = w.reshape(-1, g)
        return self.quantize(blocks, self.fit(blocks)).reshape(w.shape)


def parse_simulated(spec: str) -> MinMax | None:
    """'rtn3', 'rtn4', 'rtn4g128' (bits, optional group) -> MinMax; anything else -> None."""
    import re

    m = re.fullmatch(r"(?:rtn|minmax)(\d)(?:g(\d+))?", spec.lower())
    return MinMax(int(m.group(1)), int(m.group(2) or 0)) if m else None


def fake_quantize_minmax_(model, bits: int = 4, group: int = 0) -> dict:
    """Replace every decoder linear weight by its per-channel (or grouped) min-max RTN, in place."""
    from ..arch import of_model

    family = of_model(model)
    q = MinMax(bits, group)
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and family.layer_name(name) == name:
                mod.weight.copy_(q.fakequant(mod.weight).to(mod.weight.dtype))
                n += 1
    return {"fake_quant": q.name, "fake_quant_layers": n}
