"""The NPFT tuning loop, readable top to bottom.

    for each epoch:
        Fisher diagonal on the current (LoRA-merged) weights -> top-p% outliers per module
        perturbations on those positions of the ORIGINAL weights
        for each batch:  loss = L(W + z + BA) + lambda * L(W + BA);  step the LoRA factors only
                         (L: next-token CE, or KL from the float model, objective.py)
                         (z drawn afresh each step, or once per epoch)
        checkpoint (adapter, optimizer, schedule, history) so an interrupted run resumes exactly
    Hutchinson trace over the first epoch's outliers, before and after
    merge BA into the clean W

Every random draw of an epoch (data order, noise, dropout) comes from generators seeded by
(seed, epoch), so a run resumed from an epoch checkpoint gives the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_output
from ..errors import NpftError, UsageError
from ..progress import bar
from ..arch import of_model
from ..sensitivity import fisher_diagonal, outliers, summary, target_linears
from .config import NPFTSettings
from .hessian import outlier_trace
from .noise import Perturbations, merged_weights
from .objective import SENSITIVITY_LOSS, TRACE_LOSS, get_objective, teacher_hidden
from .objective import loss as objective_loss

CHECKPOINT = "checkpoint.pt"


@dataclass
class TuneResult:
    model: object  # the merged transformers model
    settings: dict
    history: list = field(default_factory=list)  # one row per optimizer step
    fisher_summary: list = field(default_factory=list)  # first epoch, per module
    outliers_per_epoch: list = field(default_factory=list)
    trace_before: dict | None = None
    trace_after: dict | None = None
    seconds: float = 0.0
    peak_memory_mb: dict = field(default_factory=dict)
    resumed_at_epoch: int | None = None
    device: str = "cpu"
    losses: dict = field(default_factory=dict)  # what each stage's loss is, for the report

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def _seed(settings: NPFTSettings, epoch: int, stream: int) -> int:
    return (settings.seed * 1_000_003 + epoch) * 7 + stream


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


def tune(model, tokens: torch.Tensor, settings: NPFTSettings, run_dir: Path, resume: bool = False,
         progress: bool = True, on_step=None, log=print) -> TuneResult:
    """Tune `model` (a transformers causal LM, modified in place) on calibration `tokens`
    (samples, length); checkpoints go to `run_dir`. Returns the merged model and the run's record."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    t0 = time.time()
    settings = settings.for_family(of_model(model))  # the family's LoRA targets and perturbed set where none were given
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    n = len(tokens)
    micro_per_epoch = math.ceil(n / settings.batch)
    if settings.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, settings.max_steps_per_epoch * settings.grad_accum)
    steps_per_epoch = math.ceil(micro_per_epoch / settings.grad_accum)

    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)  # LoRA A's initialisation
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    linears = target_linears(peft_model)
    quantizers = None
    if settings.imatrix:  # rtn noise (NPFTSettings requires it): the error of the file export --imatrix will write
        from ..imatrix import tuning_quantizers

        quantizers = tuning_quantizers(settings.imatrix, settings.grid, linears, of_model(model), model.config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, settings.warmup_steps, steps_per_epoch * settings.epochs)
    objective = get_objective(settings.objective)
    result = TuneResult(model=None, settings=settings.as_dict(), device=str(device),
                        losses={"tuning": objective.summary, "fisher": SENSITIVITY_LOSS, "hessian_trace": TRACE_LOSS})
    trace_tokens = tokens[: settings.trace_samples, : settings.trace_len or tokens.shape[1]]
    fisher_tokens = tokens[: settings.fisher_samples] if settings.fisher_samples else tokens
    digest = tokens_digest(tokens)

    start_epoch, first_outliers, elapsed_before = 0, None, 0.0
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        changed = settings.same_run(state["settings"])
        if changed or state["tokens"] != digest:
            what = ", ".join(changed) if changed else "the calibration data"
            raise UsageError(f"{run_dir} holds a run with different {what}; rerun with the same settings, or --force to start over")
        set_peft_model_state_dict(peft_model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, first_outliers = state["epoch_done"], state["first_outliers"]
        for k in ("history", "fisher_summary", "outliers_per_epoch", "trace_before"):
            setattr(result, k, state[k])
        elapsed_before = state["seconds"]
        result.resumed_at_epoch = start_epoch
        log(f"resuming {run_dir} after epoch {start_epoch} of {settings.epochs}")
    elif resume:
        log(f"no checkpoint in {run_dir}; starting from the beginning")

    for epoch in range(start_epoch, settings.epochs):
        fisher = fisher_diagonal(peft_model, fisher_tokens, linears, progress, desc=f"epoch {epoch + 1}: fisher")
        found = outliers(fisher, settings.outlier_pct)
        result.outliers_per_epoch.append(sum(len(o) for o in found.values()))
        if epoch == 0:
            first_outliers = found
            result.fisher_summary = summary(linears, fisher, found)
            if settings.trace_samples:
                result.trace_before = outlier_trace(peft_model, trace_tokens, linears, found, settings.trace_probes,
                                                    settings.seed, progress, desc="hessian trace (before)")
        del fisher
        noise = Perturbations(linears, found, settings.noise, settings.noise_scope, settings.grid, settings.perturbed,
                              merged_weights(peft_model), quantizers)
        try:
            _train_epoch(peft_model, tokens, settings, epoch, noise, opt, sched, micro_per_epoch, result, progress, on_step)
        finally:
            noise.remove()
        _check_weights(((n, w()) for n, w in merged_weights(peft_model).items()), settings, f"in epoch {epoch + 1}")
        with atomic_output(ckpt_path, force=True) as tmp:  # .checkpoint.pt.npft-PID.part until complete
            torch.save({
                "epoch_done": epoch + 1, "adapter": get_peft_model_state_dict(peft_model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "settings": settings.as_dict(), "tokens": digest,
                "first_outliers": first_outliers, "history": result.history, "fisher_summary": result.fisher_summary,
                "outliers_per_epoch": result.outliers_per_epoch, "trace_before": result.trace_before,
                "seconds": elapsed_before + time.time() - t0,
            }, tmp)

    if settings.trace_samples and first_outliers is not None:
        result.trace_after = outlier_trace(peft_model, trace_tokens, linears, first_outliers, settings.trace_probes,
                                           settings.seed, progress, desc="hessian trace (after)")
    if settings.gradient_checkpointing:
        peft_model.base_model.model.gradient_checkpointing_disable()
    result.model = peft_model.merge_and_unload().eval()
    _check_weights(result.model.named_parameters(), settings, "when merged")
    for p in result.model.parameters():
        p.requires_grad_(False)
    result.seconds = elapsed_before + time.time() - t0
    result.peak_memory_mb = peak_memory_mb(device)
    return result


def _train_epoch(model, tokens, settings: NPFTSettings, epoch: int, noise: Perturbations, opt, sched,
                 n_micro: int, result: TuneResult, progress: bool, on_step):
    device = next(model.parameters()).device
    objective = get_objective(settings.objective)
    torch.manual_seed(_seed(settings, epoch, 0))  # dropout
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(_seed(settings, epoch, 1)))
    gen = torch.Generator().manual_seed(_seed(settings, epoch, 2))
    noise.resample(gen)
    model.train()
    sums = {"noisy": 0.0, "clean": 0.0}
    pbar = bar(range(n_micro), desc=f"epoch {epoch + 1}/{settings.epochs}: tune", unit="batch", disable=not progress)
    for micro in pbar:
        x = tokens[order[micro * settings.batch:(micro + 1) * settings.batch]].to(device)
        if settings.resample == "step" and micro % settings.grad_accum == 0 and micro:
            noise.resample(gen)
        teacher = _teacher(model, x) if objective.needs_teacher else None
        with noise.on():
            noisy = objective_loss(objective, model, x, teacher)
        _check(noisy, epoch, micro)
        (noisy / settings.grad_accum).backward()
        sums["noisy"] += noisy.item()
        if settings.clean_weight > 0:
            clean = objective_loss(objective, model, x, teacher)
            _check(clean, epoch, micro)
            (settings.clean_weight * clean / settings.grad_accum).backward()
            sums["clean"] += clean.item()
        if (micro + 1) % settings.grad_accum == 0 or micro + 1 == n_micro:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            k = (micro % settings.grad_accum) + 1
            row = {"epoch": epoch + 1, "step": len(result.history) + 1, "loss_noisy": sums["noisy"] / k,
                   "loss_clean": sums["clean"] / k if settings.clean_weight > 0 else None,
                   "lr": sched.get_last_lr()[0], "noise_rms": noise.rms()}
            result.history.append(row)
            sums = {"noisy": 0.0, "clean": 0.0}
            if progress and hasattr(pbar, "set_postfix"):
                pbar.set_postfix(loss=f"{row['loss_noisy']:.3f}")
            if on_step is not None:
                on_step(row)
    model.eval()


def _teacher(model, x):
    """The float model's hidden states for `x`, in eval mode (no dropout), noise off."""
    model.eval()
    try:
        return teacher_hidden(model, x)
    finally:
        model.train()


def _check(loss: torch.Tensor, epoch: int, micro: int):
    if not torch.isfinite(loss):
        raise NpftError(f"the loss became {float(loss.detach())} at epoch {epoch + 1}, batch {micro + 1}; the last good "
                        "checkpoint is kept; lower --lr (and start over with --force) or check the data")


def _check_weights(named_weights, settings: NPFTSettings, when: str):
    """The last updates can diverge with every loss before them finite (the step after the last
    loss, or W + BA overflowing): weights that are not finite are refused before they are saved."""
    for name, w in named_weights:
        if not torch.isfinite(w).all():
            raise NpftError(f"the tuning diverged {when}: the weights of {name} are no longer finite; nothing of it was saved; "
                            f"lower --lr (it was {settings.lr:g}) and start over with --force")


def peak_memory_mb(device) -> dict:
    out = {"process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.device(device).type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
