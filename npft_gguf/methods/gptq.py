"""GPTQ (Frantar et al., arXiv 2210.17323) in torch: accumulate a layer's Hessian, then quantize.

For one linear layer y = W x the objective is ||W X - Q X||^2 with H = 2 X X^T / n. Columns are
quantized one at a time; the error of column i, divided by [H^-1]_ii, is spread over the columns
not yet quantized through row i of H^-1's upper Cholesky factor (the "Cholesky-inverse"
formulation), lazily in blocks of 128 columns. Damping adds 1% of mean(diag H) to the diagonal.
Act-order processes columns by decreasing H_ii. It is the default because llama-family models
have massive activations: on SmolLM2-135M the first token's input to some down_proj layers holds
one channel near 3000 (99.8% of tr H in layer 11). In natural order GPTQ still lowers every
layer's own loss, yet WikiText-2 perplexity ends above plain RTN; with act-order it ends well
below (evals/gptq_smollm2.md has the numbers; evals/massive_activations.py finds the channels).

Groups (GGUF's 32-weight blocks along the row) are contiguous in the original column order. A
group's parameters are fitted, by the target grid's own rule, from the group's error-updated
weights at the moment its first column is reached, whatever the order (with act-order the columns
of a group not yet in the current block are brought up to date exactly for the fit), or, with
`static_groups`, from the original weights before any update. Either way every later column of
the group uses those parameters, and ongrid.py pins each block's anchor weight, so the result is
exactly on the grid and survives re-quantization by RTN unchanged (tested).

`keep` columns (OWQ's weak columns) are moved to the end of the order and never quantized: they
stay float and absorb the error feedback of all the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTQSettings:
    target: str = "q4_0"  # a GGUF grid (q4_0 q4_1 q5_0 q5_1 q8_0) or simulated min-max: rtn4, rtn3, rtn4g128
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block: int = 128  # columns per lazy-update block
    act_order: bool = True  # columns by decreasing H_ii (see the module docstring)
    static_groups: bool = False  # group parameters from the original weights, not the updated ones
    true_sequential: bool = False  # q,k,v | o | gate,up | down each see the already-quantized ones
    batch_size: int = 8  # calibration sequences per forward of one decoder layer

    def quantizer(self):
        """The column quantizer this target names (ongrid.GridColumns or simulate.MinMax)."""
        from .ongrid import grid_columns
        from .simulate import parse_simulated

        return parse_simulated(self.target) or grid_columns(self.target)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # float32, same shape and device as the input weight
    loss: float  # sum of squared errors weighted by 1/[H^-1]_ii^2, halved (GPTQ's reported loss)
    seconds: float


class GPTQ:
    """Accumulates H = 2/n * sum x x^T over calibration inputs of one linear layer, then quantizes."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.columns = columns
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """inp: (..., columns), the layer's input activations (every token counts as one sample)."""
        x = inp.reshape(-1, self.columns).to(self.H.device, torch.float32)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.T, x)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, quantizer, settings: GPTQSettings = GPTQSettings(),
                 keep: torch.Tensor | None = None) -> GPTQResult:
        """Quantize `weight` (rows, columns) column by column; `keep`: column indices left in float."""
        t0 = time.perf_counter()
        dev = self.H.device
        W = weight.detach().to(dev, torch.float32).clone()
        rows, cols = W.shape
        if cols != self.columns:
            raise ValueError(f"weight has {cols} columns, the Hessian {self.columns}")
        g = quantizer.group or cols
        if cols % g:
            raise ValueError(f"rows of {cols} do not split into groups of {g}")

        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        kept = torch.zeros(cols, dtype=torch.bool, device=dev)
        if keep is not None:
            kept[keep.to(dev)] = True
        order = torch.argsort(torch.diag(H), descending=True) if settings.act_order else torch.arange(cols, device=dev)
        order = torch.cat([order[~kept[order]], order[kept[order]]])
        n_quant = int(cols - kept.sum())
        position = torch.argsort(order)  # column -> its place in the order
        include = ~kept.view(-1, g)  # per group, the columns its parameters are fitted from

        params = [None] * (cols // g)
        if settings.static_groups:
            params = [quantizer.fit(W[:, k * g:(k + 1) * g], include[k]) for k in range(cols // g)]

        W0 = W
        W = W[:, order]
        H = H[order][:, order]
        H.diagonal().add_(settings.damp * torch.mean(torch.diag(H)))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        del H, W0

        Q = W.clone()
        loss = torch.zeros((), device=dev)
        order_list = order.tolist()
        for i1 in range(0, n_quant, settings.block):
            i2 = min(i1 + settings.block, n_quant)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                k, j = divmod(order_list[i1 + i], g)
                if params[k] is None:
                    params[k] = quantizer.fit(self._current(W, W1, Err1, Hinv, position[k * g:(k + 1) * g], i1, i2, i), include[k])
                w = W1[:, i]
                d = Hinv1[i, i]
                q = quantizer.quantize(w, params[k], j)
                Q1[:, i] = q
                err = (w - q) / d
                loss += (err * err).sum() / 2
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
        Q[:, n_quant:] = W[:, n_quant:]  # kept columns: float, with every update applied
        Q = Q[:, position]
        if dev != weight.device:
            Q = Q.to(weight.device)
        return GPTQResult(Q, float(loss), time.perf_counter() - t0)

    @staticmethod
    def _current(W, W1, Err1, Hinv, pos, i1, i2, i):
        """Up-to-date values of the (not yet quantized) columns at order positions `pos`: those in
        the current block are in W1; later ones still lack the block's pending updates."""
        out = torch.empty(W.shape[0], len(pos), device=W.device)
        here = pos < i2
        if bool((pos[here] < i1 + i).any()):
            raise AssertionError("a group's column was quantized before its parameters were fitted")
        out[:, here] = W1[:, pos[here] - i1]
        later = pos[~here]
        out[:, ~here] = W[:, later] - Err1[:, :i] @ Hinv[i1:i1 + i, later]
        return out

    def free(self) -> None:
        self.H = None
