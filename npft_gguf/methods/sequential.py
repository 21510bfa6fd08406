"""Run a per-linear method through a llama-family model one decoder layer at a time (GPTQ's driver).

1. Capture what the first decoder layer receives for every calibration batch (hidden states and
   the keyword arguments the model passes: position embeddings, mask, position ids), with a
   pre-hook that stops the forward there.
2. For each layer: hook the linears, run the calibration batches through the layer, accumulate
   one Hessian per distinct input (q/k/v share one, gate/up share one), hand each linear and its
   Hessian to the method, then run the batches through the now-quantized layer: its outputs are
   the next layer's inputs.

With `true_sequential`, q/k/v, then o, then gate/up, then down are done in turn, each seeing the
inputs produced by the ones already quantized (one more pass through the layer per step).

The method is a callable `method(name, linear, gptq) -> dict` that replaces `linear.weight` in
place and returns a few numbers for the report; gptq.GPTQ holds the Hessian.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .gptq import GPTQ

Method = Callable[[str, torch.nn.Linear, GPTQ], dict]


@dataclass
class SequentialReport:
    layers: int = 0
    tokens: int = 0
    seconds: float = 0.0
    linears: dict[str, dict] = field(default_factory=dict)


class _Stop(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    from ..arch import of_model

    return of_model(model).decoder_layers(model)


@torch.no_grad()
def capture_inputs(model, calib: torch.Tensor, batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) that the first decoder layer receives, one pair per calibration batch."""
    from ..arch import of_model

    family = of_model(model)
    layers = family.decoder_layers(model)
    seen = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hs = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hs, kwargs))
        raise _Stop

    # only what runs before the first layer needs to be on the device
    front = family.front_modules(model)
    homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in front]
    for m in front:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m, home in zip(front, homes):
            m.to(home)
    return seen


def _run_layer(layer, inputs):
    outs = []
    for hs, kw in inputs:
        out = layer(hs, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def run_layerwise(model, calib: torch.Tensor, method: Method, *, device=None, batch_size: int = 8,
                  true_sequential: bool = False, steps=None, progress: bool = True) -> SequentialReport:
    """Apply `method` to every listed linear of every decoder layer, in order, on calibration ids."""
    from ..progress import bar

    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    calib = torch.as_tensor(calib, dtype=torch.long)
    was_training = model.training
    model.eval()
    from ..arch import of_model

    family = of_model(model)
    steps = steps or family.steps  # the family's linears in the order a layer computes them
    layers = family.decoder_layers(model)
    inputs = capture_inputs(model, calib, batch_size, device)
    report = SequentialReport(layers=len(layers), tokens=int(calib.numel()))
    plan = [steps] if not true_sequential else [(s,) for s in steps]
    for li in bar(range(len(layers)), desc="gptq layers", unit="layer", disable=not progress):
        layer = layers[li]
        home = next(layer.parameters()).device
        layer.to(device)
        for part in plan:
            hessians, handles = {}, []
            for names in part:
                lin = layer.get_submodule(names[0])
                h = hessians[names] = GPTQ(lin.in_features, device)
                handles.append(lin.register_forward_hook(lambda _m, inp, _out, h=h: h.add_batch(inp[0])))
            try:
                _run_layer(layer, inputs)
            finally:
                for hd in handles:
                    hd.remove()
            for names, h in hessians.items():
                for name in names:
                    full = f"{family.layers}.{li}.{name}"
                    report.linears[full] = method(full, layer.get_submodule(name), h)
                h.free()
        inputs = [(out, kw) for out, (_, kw) in zip(_run_layer(layer, inputs), inputs)]
        layer.to(home)
    model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def gptq_method(settings, quantizer_for: Callable[[str, torch.nn.Linear], object] | None = None) -> Method:
    """GPTQ as a `method`: every linear onto `settings.quantizer()` (or quantizer_for(name, linear);
    None there leaves the linear as it is, e.g. a row length a grid's blocks do not fit)."""
    default = settings.quantizer()

    def apply(name, linear, h):
        q = quantizer_for(name, linear) if quantizer_for else default
        if q is None or (q.group and linear.in_features % q.group):
            return {"skipped": True}
        r = h.quantize(linear.weight, q, settings)
        linear.weight.copy_(r.weight.to(linear.weight.dtype))
        return {"quantizer": q.name, "loss": r.loss, "seconds": round(r.seconds, 3)}

    return apply


def gptq_model_(model, calib: torch.Tensor, settings, *, device=None, progress: bool = True,
                quantizer_for=None) -> SequentialReport:
    """GPTQ every decoder linear (q,k,v,o,gate,up,down) of `model` in place; returns the report."""
    return run_layerwise(model, calib, gptq_method(settings, quantizer_for), device=device,
                         batch_size=settings.batch_size, true_sequential=settings.true_sequential, progress=progress)
