"""Sensitivity: the Fisher diagonal of every targeted linear weight, and per-module outlier masks.

The score of weight w is F_w = sum over calibration samples of (dL_sample/dw)^2, per sample (not
the square of the batch mean), the diagonal of the empirical Fisher and NPFT's (and SqueezeLLM's)
Hessian proxy. Under several processes each squares the gradients of its share of the samples
and the sums are added across processes (distributed.py): a data-parallel average of gradients
would square the mean, not sum the squares. Outliers are the top p% of each module's weights by that score. When a LoRA
adapter is active the gradients are those of the merged weights W + BA, which is what "outliers
re-identified on the merged model" needs, without merging.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .progress import bar

def target_linears(model, suffixes: tuple[str, ...] | None = None) -> dict[str, torch.nn.Linear]:
    """HF name of each decoder linear ('model.layers.0.self_attn.q_proj') -> its (base) nn.Linear.

    Works on plain transformers models and on peft-wrapped ones (where the frozen weight lives in
    `.base_layer`). `suffixes` default: every decoder linear of the model's family (arch/)."""
    from .arch import of_model

    family = of_model(model)
    suffixes = suffixes or family.perturbed
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(".base_layer"):
            continue
        base = getattr(mod, "base_layer", mod)
        clean = family.layer_name(name)
        if isinstance(base, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes and clean:
            out[clean] = base
    return out


def fisher_diagonal(model, tokens: torch.Tensor, linears: dict[str, torch.nn.Linear], progress: bool = True,
                    desc: str = "fisher", by_hooks: bool | None = None) -> dict[str, torch.Tensor]:
    """Sum over samples of squared per-sample gradients, float32, on the weights' device. Each
    weight's gradient is squared into its sum as soon as the backward pass makes it, and dropped:
    one module's gradient exists at a time, not all of them (and no other parameter's gradient is
    made: a LoRA adapter's stays as it was). Several processes: each takes its share of the samples,
    and the sums are added over them; every process ends with the same scores. Sharded weights
    (FSDP2), or `by_hooks`: fisher_by_hooks, which never asks for a weight's gradient."""
    from . import distributed

    if by_hooks is None:
        by_hooks = any(is_sharded(m.weight) for m in linears.values())
    if by_hooks:
        return fisher_by_hooks(model, tokens, linears, progress, desc)
    tokens = tokens[distributed.share(len(tokens))]
    device = next(model.parameters()).device
    fisher = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in linears.items()}
    weights = [m.weight for m in linears.values()]
    saved = [(w.requires_grad, w.grad) for w in weights]
    hooks = []
    try:
        for w, f in zip(weights, fisher.values()):
            w.requires_grad_(True)
            w.grad = None
            hooks.append(w.register_post_accumulate_grad_hook(functools.partial(_square_into, f)))
        with scoring_mode(model):
            for i in bar(range(len(tokens)), desc=desc, unit="sample", disable=not progress):
                x = tokens[i:i + 1].to(device)
                torch.autograd.backward(model(input_ids=x, labels=x, use_cache=False).loss, inputs=weights)
    finally:
        for h in hooks:
            h.remove()
        for w, (requires_grad, grad) in zip(weights, saved):
            w.requires_grad_(requires_grad)
            w.grad = grad
    distributed.all_reduce_sum(list(fisher.values()))
    return fisher


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (a weight FSDP2 has sharded across the processes)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or the whole of a sharded weight (gathered from every process: all must call)."""
    return t.full_tensor() if is_sharded(t) else t


def fisher_by_hooks(model, tokens: torch.Tensor, linears: dict[str, torch.nn.Linear], progress: bool = True,
                    desc: str = "fisher") -> dict[str, torch.Tensor]:
    """fisher_diagonal from module hooks: a linear y = x W^T has, for one sample, dL/dW = G^T X (G the
    gradient at its output, X its input, rows the sample's tokens), so each sample's squared
    gradient comes from the input a forward hook keeps and the output gradient autograd.grad
    returns. No parameter's .grad is made, so a wrapper's gradient sync (FSDP2 reduce-scatters an
    average) never meets it; the weights may be sharded, since the hooks run inside the forward,
    where FSDP2 has gathered them. Sharded, every process runs the same number of passes (each
    forward and backward gathers the layers with every process): one left without a sample runs
    one at weight 0. The sums are added over the processes."""
    from . import distributed

    mine = tokens[distributed.share(len(tokens))]
    passes = -(-len(tokens) // distributed.world()) if any(is_sharded(m.weight) for m in linears.values()) else len(mine)
    device = next(model.parameters()).device
    fisher = {n: torch.zeros(tuple(m.weight.shape), dtype=torch.float32, device=device) for n, m in linears.items()}
    seen: dict[str, tuple] = {}
    capturing = [False]

    def keep(name, module, inputs, out):
        if capturing[0]:  # not in a checkpointed layer's recomputation
            seen[name] = (inputs[0].detach(), out)

    def input_needs_grad(module, inputs, out):  # so every linear's output is in the graph, frozen weights or not
        return out.requires_grad_(True) if not out.requires_grad else out

    hooks = [m.register_forward_hook(functools.partial(keep, n)) for n, m in linears.items()]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None:
        hooks.append(embed.register_forward_hook(input_needs_grad))
    try:
        with scoring_mode(model):
            for i in bar(range(passes), desc=desc, unit="sample", disable=not progress):
                x = mine[min(i, len(mine) - 1):][:1] if len(mine) else tokens[:1]
                weight = 1.0 if i < len(mine) else 0.0
                seen.clear()
                capturing[0] = True
                loss = model(input_ids=x.to(device), labels=x.to(device), use_cache=False).loss
                capturing[0] = False
                names = list(seen)
                grads = torch.autograd.grad(loss, [seen[n][1] for n in names])
                for n, g in zip(names, grads):
                    x_in = seen[n][0]
                    gw = g.reshape(-1, g.shape[-1]).float().T @ x_in.reshape(-1, x_in.shape[-1]).float()
                    fisher[n].addcmul_(gw, gw, value=weight)
                seen.clear()
    finally:
        for h in hooks:
            h.remove()
    distributed.all_reduce_sum(list(fisher.values()))
    return fisher


@contextlib.contextmanager
def scoring_mode(model):
    """Eval mode (no dropout) for a pass that takes gradients, with the decoder layers still
    checkpointed where gradient checkpointing is on: transformers checkpoints a layer only while
    the layer itself is in training mode, a flag nothing else in the layer reads (its attention
    and dropouts are modules of their own, and stay in eval mode)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m.training = True
    try:
        yield
    finally:
        model.train(was_training)


def _square_into(total: torch.Tensor, weight: torch.Tensor):
    total.addcmul_(weight.grad, weight.grad)
    weight.grad = None


def find_outliers(model, tokens: torch.Tensor, linears: dict[str, torch.nn.Linear], pct: float, stages: int = 1,
                  progress: bool = True, desc: str = "fisher") -> tuple[dict[str, "Outliers"], list[dict]]:
    """(outliers per module, summary rows): the modules are scored in `stages` passes over the
    samples, each for a run of consecutive modules of about equal size, and only the outliers and
    the summary of a run are kept: float32 scores exist for one run at a time (4 bytes a weight of
    the run), for `stages` times the passes. The result does not depend on `stages`."""
    found, rows = {}, []
    runs = _runs(linears, stages)
    for k, run in enumerate(runs):
        fisher = fisher_diagonal(model, tokens, run, progress, desc if len(runs) == 1 else f"{desc} {k + 1}/{len(runs)}")
        part = outliers(fisher, pct)
        found.update(part)
        rows += summary(run, fisher, part)
        del fisher
    return found, rows


def _runs(linears: dict[str, torch.nn.Linear], stages: int) -> list[dict[str, torch.nn.Linear]]:
    """`linears` in model order cut into at most `stages` runs of about equal weight count."""
    total = sum(m.weight.numel() for m in linears.values())
    runs, run, count = [], {}, 0
    for name, m in linears.items():
        run[name] = m
        count += m.weight.numel()
        if count * stages >= total * (len(runs) + 1):
            runs.append(run)
            run = {}
    return runs + [run] if run else runs


@dataclass
class Outliers:
    """Positions of one module's outliers as (row, col) index vectors: 0.05% of a matrix is small."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __len__(self):
        return int(self.rows.numel())

    def mask(self, shape) -> torch.Tensor:
        m = torch.zeros(shape, dtype=torch.bool, device=self.rows.device)
        m[self.rows, self.cols] = True
        return m


def outliers(fisher: dict[str, torch.Tensor], pct: float) -> dict[str, Outliers]:
    """Top `pct` percent of each module's weights by Fisher score (at least one per module)."""
    out = {}
    for name, f in fisher.items():
        k = max(1, round(f.numel() * pct / 100.0))
        idx = torch.topk(f.flatten(), k).indices
        out[name] = Outliers(idx // f.shape[1], idx % f.shape[1])
    return out


def summary(linears: dict[str, torch.nn.Linear], fisher: dict[str, torch.Tensor], found: dict[str, Outliers]) -> list[dict]:
    """Per module: outlier count, mean |w| of outliers and of the rest, and the mean-score ratio."""
    rows = []
    for name, o in found.items():
        w = whole(linears[name].weight.detach()).float()
        f = fisher[name]
        m = o.mask(w.shape)
        rest = (~m).sum().clamp(min=1)
        rows.append({
            "module": name, "n": int(w.numel()), "outliers": len(o),
            "mean_abs_w_outliers": float(w.abs()[m].mean()), "mean_abs_w_rest": float((w.abs() * ~m).sum() / rest),
            "score_ratio": float(f[m].mean() / ((f * ~m).sum() / rest).clamp(min=1e-30)),
        })
    return rows
