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
  quantizer with that matrix instead (grids/mix.tuning_rule), the error the written file will have.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..grids import get_grid
from ..methods.simulate import parse_simulated
from ..sensitivity import Outliers, whole


def target_quantizer(name: str):
    """The quantizer the tuned model will meet: a GGUF grid ('q4_0') or a simulated per-channel
    one ('rtn3'); both offer fits, step and fakequant."""
    return parse_simulated(name) or get_grid(name)


NOISE_CHUNK = 2**22  # weights per row chunk of the rtn error: its float32 temporaries stay small


def sparse_term(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
    """out + x @ z^T for a z that is `values` at (rows, cols) and zero elsewhere: a gather and an
    index_add, no dense z."""
    return out.index_add(-1, rows, x[..., cols] * values.to(x.dtype))


class Perturbation:
    """Noise on one linear layer. `resample` draws a new z; the hook applies it while active.

    No float32 copy of the weight is kept: rtn noise is formed in the hook, in row chunks, in the
    weight's dtype (autograd keeps that one copy for the backward pass, and gradient checkpointing
    drops it and forms it again in the recomputation); dense grid noise is held in the weight's
    dtype; outlier noise is a vector of the outliers' count."""

    def __init__(self, linear: torch.nn.Linear, kind: str, scope: str, grid_name: str, found: Outliers | None,
                 merged=None, quantize=None):
        self.kind, self.active, self.linear = kind, False, linear
        self.dense = scope == "all" or kind == "rtn"
        weight = linear.weight
        if kind == "rtn":
            self.grid = target_quantizer(grid_name)
            self.quantize = quantize or self.grid.fakequant  # quantize-dequantize, as the written file will
            self.merged = merged or (lambda: linear.weight.detach())
            self.fits = self.grid.fits(weight.shape[1])
            self.square_sum = 0.0  # of the last error formed, for rms()
        elif self.dense:
            self.grid = target_quantizer(grid_name)
            self.z = torch.zeros(tuple(weight.shape), dtype=weight.dtype, device=weight.device)
        else:
            w = whole(weight.detach())  # sharded (FSDP2): gathered once here, one module at a time
            self.rows, self.cols = found.rows.to(w.device), found.cols.to(w.device)
            vals = w[self.rows, self.cols].float()
            if kind == "paper":
                n_rows = w.shape[0]
                lo = torch.full((n_rows,), float("inf"), device=w.device).scatter_reduce(0, self.rows, vals, "amin")
                hi = torch.full((n_rows,), float("-inf"), device=w.device).scatter_reduce(0, self.rows, vals, "amax")
                self.lo, self.width = lo[self.rows], (hi - lo)[self.rows]
                self.count = torch.zeros(n_rows, device=w.device).index_add(0, self.rows, torch.ones_like(vals))
            else:
                grid = target_quantizer(grid_name)
                self.width = _step(grid, w, self.rows, self.cols) if grid.fits(w.shape[1]) else torch.zeros_like(vals)
            self.z = torch.zeros_like(vals)
        self.handle = linear.register_forward_hook(self._hook)

    @torch.no_grad()
    def resample(self, gen: torch.Generator):
        if self.kind == "rtn":  # z follows the adapter: the hook forms it from the weights as they are
            return
        u = torch.rand(self.z.shape, generator=gen).to(self.z.device)
        if self.dense:
            w = whole(self.linear.weight.detach())
            self.z = torch.zeros_like(w)
            if self.grid.fits(w.shape[1]):
                for r in range(0, w.shape[0], _chunk_rows(w)):
                    chunk = slice(r, r + _chunk_rows(w))
                    self.z[chunk] = ((u[chunk] - 0.5) * self.grid.step(w[chunk].float())).to(w.dtype)
        elif self.kind == "paper":
            u = self.lo + self.width * u
            mean = torch.zeros_like(self.count).index_add(0, self.rows, u) / self.count.clamp(min=1)
            self.z = u - mean[self.rows]
        else:
            self.z = (u - 0.5) * self.width

    @torch.no_grad()
    def rtn_error(self) -> torch.Tensor | None:
        """Q(W + BA) - (W + BA) for the adapter as it is now, in the weight's dtype, formed in row
        chunks of about NOISE_CHUNK weights (float32 only inside a chunk); None where the target
        cannot hold this weight (its rows are not a whole number of blocks)."""
        if not self.fits:
            return None
        merged = self.merged()
        z = torch.empty_like(merged)
        square_sum = 0.0
        for r in range(0, merged.shape[0], _chunk_rows(merged)):
            w = merged[r:r + _chunk_rows(merged)].float()
            err = self.quantize(w) - w
            square_sum += float(err.square().sum())
            z[r:r + len(w)] = err
        self.square_sum = square_sum
        return z

    def _hook(self, module, inputs, out):
        if not self.active:
            return out
        x = inputs[0]
        if self.kind == "rtn":
            z = self.rtn_error()
            return out if z is None else out + F.linear(x, z.to(x.dtype))
        if self.dense:
            return out + F.linear(x, self.z.to(x.dtype))
        return sparse_term(out, x, self.rows, self.cols, self.z)

    def remove(self):
        self.handle.remove()


def _chunk_rows(w: torch.Tensor) -> int:
    return max(1, NOISE_CHUNK // w.shape[1])


def _step(grid, w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The target's step at the positions (rows, cols) of w, from row chunks (no float32 copy of w)."""
    out = torch.empty(len(rows), dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], _chunk_rows(w)):
        at = (rows >= r) & (rows < r + _chunk_rows(w))
        if at.any():
            step = grid.step(w[r:r + _chunk_rows(w)].float())
            out[at] = step[rows[at] - r, cols[at]]
    return out


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

    def on(self):
        """Noise on for the forward passes inside."""
        return self._switched(True)

    @contextlib.contextmanager
    def _switched(self, active: bool):
        before = [p.active for p in self.layers.values()]
        for p in self.layers.values():
            p.active = active
        try:
            yield
        finally:
            for p, was in zip(self.layers.values(), before):
                p.active = was

    def checkpoint_contexts(self):
        """torch.utils.checkpoint's `context_fn`: a checkpointed layer is recomputed in the backward
        pass, after `on()` has ended, and must meet the noise as its original forward did (on or off);
        anything else changes its result and what it saves for the gradient."""
        active = any(p.active for p in self.layers.values())
        return contextlib.nullcontext(), self._switched(active)

    def remove(self):
        for p in self.layers.values():
            p.remove()
        self.layers = {}

    def rms(self) -> float:
        """Root mean square of the current noise over the perturbed positions (for the report): rtn
        noise's exact sum, kept when the hook last formed it; dense grid noise a strided sample, so the
        per-step cost stays small."""
        tot, n = 0.0, 0
        for p in self.layers.values():
            if p.kind == "rtn":
                tot, n = tot + p.square_sum, n + p.linear.weight.numel()
            else:
                z = p.z.flatten()[:: 101 if p.dense else 1]
                tot, n = tot + float(z.float().square().sum()), n + z.numel()
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
