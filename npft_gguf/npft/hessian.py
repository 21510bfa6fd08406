"""Hutchinson's estimate of the Hessian trace restricted to the outlier weights.

NPFT's claim is that tuning under noise at the outliers lowers Tr(H_OO), the curvature of the
loss along the outlier coordinates, which is what makes RTN's error there cheap. For a Rademacher
probe v that is +-1 on the outlier positions and 0 elsewhere, E[v^T H v] = Tr(H_OO); H v comes from
a second backward pass (a Hessian-vector product), so H itself is never formed, and neither is
the gradient of a whole weight: the derivatives are taken along an offset at the outliers only. The same samples
and probes (seeded) are used before and after tuning, so the two estimates are paired.
"""

from __future__ import annotations

import functools
import math

import torch

from ..progress import bar
from ..sensitivity import Outliers
from .noise import sparse_term


def outlier_trace(model, tokens: torch.Tensor, linears: dict[str, torch.nn.Linear], found: dict[str, Outliers],
                  probes: int = 2, seed: int = 0, progress: bool = True, desc: str = "hessian trace") -> dict:
    """{'trace': mean estimate, 'se': its standard error, 'per_module': {name: mean}, 'n': estimates}.

    The curvature is taken along a zero offset added to the outlier weights in each linear's forward
    pass (the sparse term the outlier noise uses), not along the weights: its gradient and the
    Hessian-vector products have the outliers' count, so no gradient of a whole weight is formed."""
    device = next(model.parameters()).device
    names = list(linears)
    at = [(found[n].rows.to(w.device), found[n].cols.to(w.device)) for n, w in ((n, linears[n].weight) for n in names)]
    offsets = [torch.zeros(len(found[n]), dtype=linears[n].weight.dtype, device=linears[n].weight.device, requires_grad=True)
               for n in names]
    hooks = [linears[n].register_forward_hook(functools.partial(_offset_hook, r, c, d)) for n, (r, c), d in zip(names, at, offsets)]
    attn = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    model.eval()  # not checkpointed (sensitivity.scoring_mode): a double backward keeps the recomputed layers anyway
    _set_attn(model, "eager")  # fused attention kernels have no double backward
    gen = torch.Generator().manual_seed(seed)
    estimates, per_module = [], {n: 0.0 for n in names}
    grad = functools.partial(torch.autograd.grad, inputs=offsets, allow_unused=True, materialize_grads=True)
    try:
        for i in bar(range(len(tokens)), desc=desc, unit="sample", disable=not progress):
            x = tokens[i:i + 1].to(device)
            grads = grad(model(input_ids=x, labels=x, use_cache=False).loss, create_graph=True)
            for p in range(probes):
                signs = [torch.randint(0, 2, (len(d),), generator=gen).to(d.device, d.dtype) * 2 - 1 for d in offsets]
                hvs = grad(sum((g * s).sum() for g, s in zip(grads, signs)), retain_graph=p < probes - 1)
                parts = [float((hv * s).sum()) for hv, s in zip(hvs, signs)]
                for n, part in zip(names, parts):
                    per_module[n] += part
                estimates.append(sum(parts))
            del grads
    finally:
        for h in hooks:
            h.remove()
        _set_attn(model, attn)
        model.train(was_training)
    k = len(estimates)
    mean = sum(estimates) / k
    var = sum((e - mean) ** 2 for e in estimates) / max(1, k - 1)
    return {"trace": mean, "se": math.sqrt(var / k), "n": k, "probes": probes, "samples": len(tokens),
            "estimates": estimates, "per_module": {n: v / k for n, v in per_module.items()}}


def _offset_hook(rows, cols, offset, module, inputs, out):
    return sparse_term(out, inputs[0], rows, cols, offset)


def paired_change(before: dict, after: dict) -> dict:
    """after - before over the same (sample, probe) pairs, with the standard error of that mean:
    pairing removes most of the probe noise that the two estimates' own errors carry."""
    d = [a - b for a, b in zip(after.get("estimates", []), before.get("estimates", []))]
    if len(d) < 2:
        return {"diff": after["trace"] - before["trace"], "se": float("nan")}
    mean = sum(d) / len(d)
    return {"diff": mean, "se": math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))}


def _set_attn(model, impl):
    if impl is None:
        return
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except Exception:  # noqa: BLE001 - older transformers, or wrapped models
            pass
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl
