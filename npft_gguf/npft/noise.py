"""The perturbation z, added in the forward pass of each targeted linear as x @ z^T.

No weight is copied or modified: a forward hook on the (frozen) linear adds the noise term to its
output. Outlier noise is sparse (index vectors and values: out[..., r] += x[..., c] * z_rc), so a
step costs a gather of 0.05% of the columns; grid noise on every weight (`noise_scope=all`) is a
dense z, one extra matmul.

Noise kinds (docs/METHOD.md):
- paper: per output row holding outliers, z ~ U[min, max] of that row's outlier values,
  mean-subtracted over the row, at the outlier positions only (a row with one outlier gets none);
- grid:  z ~ U[-D/2, D/2], D the step of the target GGUF block holding the weight, so z has the
  variance D^2/12 of the rounding error RTN will make there (for a simulated target such as rtn3,
  the scale of the weight's channel or group);
- rtn (ours, every weight): z = RTN(W + BA) - (W + BA), the error the final RTN will actually make,
  recomputed from the current adapter at each draw and held constant in the backward pass (a
  straight-through estimator), so L(W + BA + z) is the loss of the quantized merged model. When the
  file will be written with an importance matrix, Q(W + BA) is llama.cpp's importance-weighted
  quantizer with that matrix instead (grids/weighted.py), the error the written file will have.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..grids import get_grid
from ..methods.simulate import parse_simulated
from ..sensitivity import Outliers


def target_quantizer(name: str):
    """The quantizer the tuned model will meet: a GGUF grid ('q4_0') or a simulated per-channel
    one ('rtn3'); both offer fits, step and fakequant."""
    return parse_simulated(name) or get_grid(name)


class Perturbation:
    """Noise on one linear layer. `resample` draws a new z; the hook applies it while active."""

    def __init__(self, linear: torch.nn.Linear, kind: str, scope: str, grid_name: str, found: Outliers | None,
                 merged=None, quantize=None):
        w = linear.weight.detach().float()
        self.kind, self.active = kind, False
        self.dense = scope == "all" or kind == "rtn"
        if kind == "rtn":
            self.grid = target_quantizer(grid_name)
            self.quantize = quantize or self.grid.fakequant  # quantize-dequantize, as the written file will
            self.merged = merged or (lambda: linear.weight.detach())
            self.z = torch.zeros_like(w)
        elif self.dense:
            grid = target_quantizer(grid_name)
            self.scale = grid.step(w) if grid.fits(w.shape[1]) else torch.zeros_like(w)
            self.z = torch.zeros_like(w)
        else:
            self.rows, self.cols = found.rows.to(w.device), found.cols.to(w.device)
            vals = w[self.rows, self.cols]
            if kind == "paper":
                n_rows = w.shape[0]
                lo = torch.full((n_rows,), float("inf"), device=w.device).scatter_reduce(0, self.rows, vals, "amin")
                hi = torch.full((n_rows,), float("-inf"), device=w.device).scatter_reduce(0, self.rows, vals, "amax")
                self.lo, self.width = lo[self.rows], (hi - lo)[self.rows]
                self.count = torch.zeros(n_rows, device=w.device).index_add(0, self.rows, torch.ones_like(vals))
            else:
                grid = target_quantizer(grid_name)
                self.width = grid.step(w)[self.rows, self.cols] if grid.fits(w.shape[1]) else torch.zeros_like(vals)
            self.z = torch.zeros_like(vals)
        self.handle = linear.register_forward_hook(self._hook)

    @torch.no_grad()
    def resample(self, gen: torch.Generator):
        if self.kind == "rtn":
            w = self.merged().float()
            self.z = self.quantize(w) - w if self.grid.fits(w.shape[1]) else torch.zeros_like(w)
            return
        u = torch.rand(self.z.shape, generator=gen).to(self.z.device)
        if self.dense:
            self.z = (u - 0.5) * self.scale
        elif self.kind == "paper":
            u = self.lo + self.width * u
            mean = torch.zeros_like(self.count).index_add(0, self.rows, u) / self.count.clamp(min=1)
            self.z = u - mean[self.rows]
        else:
            self.z = (u - 0.5) * self.width

    def _hook(self, module, inputs, out):
        if not self.active:
            return out
        x = inputs[0]
        if self.dense:
            return out + F.linear(x, self.z.to(x.dtype))
        return out.index_add(-1, self.rows, x[..., self.cols] * self.z.to(x.dtype))

    def remove(self):
        self.handle.remove()


class Perturbations:
    """All layers' perturbations together: draw, switch on for the noisy loss, remove."""

    def __init__(self, linears: dict, found: dict[str, Outliers] | None, kind: str, scope: str, grid_name: str,
                 perturbed: tuple[str, ...], adapters: dict | None = None, quantizers: dict | None = None):
        self.layers = {}
        if kind == "none":
            return
        for name, lin in linears.items():
            if name.rsplit(".", 1)[-1] in perturbed:
                merged = (adapters or {}).get(name)
                self.layers[name] = Perturbation(lin, kind, scope, grid_name, None if found is None else found[name], merged,
                                                 (quantizers or {}).get(name))

    def resample(self, gen: torch.Generator):
        for p in self.layers.values():
            p.resample(gen)

    @contextlib.contextmanager
    def on(self):
        for p in self.layers.values():
            p.active = True
        try:
            yield
        finally:
            for p in self.layers.values():
                p.active = False

    def remove(self):
        for p in self.layers.values():
            p.remove()
        self.layers = {}

    def rms(self) -> float:
        """Root mean square of the current noise over the perturbed positions (for the report; a
        strided sample of dense noise, so the per-step cost stays small)."""
        zs = [p.z.flatten()[:: 101 if p.dense else 1] for p in self.layers.values()]  # dense z: a strided sample
        tot = sum(float(z.float().square().sum()) for z in zs)
        n = sum(z.numel() for z in zs)
        return (tot / n) ** 0.5 if n else 0.0


def merged_weights(peft_model) -> dict:
    """HF linear name -> a function giving W + BA (scaled) for the peft LoRA layers, no copy kept."""
    from ..arch import of_model

    family = of_model(peft_model)
    out = {}
    for name, mod in peft_model.named_modules():
        clean = family.layer_name(name)
        if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight") and clean:

            def merged(mod=mod):
                w = mod.base_layer.weight.detach()
                return w + mod.get_delta_weight("default").detach().to(w.dtype)

            out[clean] = merged
    return out
