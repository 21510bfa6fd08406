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

Several processes (distributed.py; `torchrun --nproc-per-node N`): every process holds the whole
model and draws the same order and noise; each takes its share of every global micro-batch
(`--batch` stays the global batch), its loss weighted by its share, and DDP averages the LoRA
gradients, so each step equals the one-process step up to float rounding. Fisher scores are
summed over the processes' samples (sensitivity.py); the Hutchinson trace (a double backward) is
computed by every process on the same samples, without communication, so it equals the one-process
estimate; rank 0 alone writes the checkpoint, which holds nothing of the process count, so a run
resumes with any number of processes. By default DDP (CPU and CUDA alike): every process holds the
whole model, so N GPUs tune N times faster, not an N times larger model.

`--shard` (settings.shard, several processes): FSDP2 instead. `fully_shard` on each decoder layer
(in a _Layer shell, so it can be taken off again) and on a _Loss root: the frozen base weights and
the LoRA factors alike are split across the processes, each layer gathered only for its forward
and backward; the optimizer steps the adapters' shards. The model is loaded whole on rank 0's CPU
alone, the other processes holding it on the meta device (distributed.load), and each process
receives its shards from rank 0 (distributed.shard): adapters and resumed checkpoint included. What reads weights does so inside a forward, where the
layer is gathered: rtn noise forms z there (noise.py); outlier and grid noise gather each weight
once per epoch (sensitivity.whole). The Fisher scores come from module hooks (G^T X per sample,
sensitivity.fisher_by_hooks), never from the weights' .grad, which FSDP2 would average. The
Hutchinson trace is not measured (its double backward does not run under FSDP2). The checkpoint
gathers the adapter and the optimizer's moments whole (the same file one process writes, so a run
resumes sharded or not, with any process count); at the end every weight is gathered, one at a
time, onto rank 0's CPU, which merges and goes on alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..atomic import atomic_output
from ..errors import NpftError, UsageError
from ..grids import GRIDS
from ..progress import bar
from ..arch import of_model
from ..sensitivity import find_outliers, target_linears
from .config import NPFTSettings
from .hessian import outlier_trace
from .noise import Perturbations, merged_weights
from .objective import SENSITIVITY_LOSS, TRACE_LOSS, get_objective, teacher_hidden
from .objective import loss as objective_loss

CHECKPOINT = "checkpoint.safetensors"  # tensors, and the rest as JSON in its header: nothing is unpickled
PICKLED_CHECKPOINT = "checkpoint.pt"    # what versions before issue 27 wrote: refused, never loaded
CHECKPOINT_KEY = "npft_checkpoint"      # the header's metadata entry that holds the JSON


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


def save_checkpoint(path: Path, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, written atomically: `tensors`, and `record` (plain JSON) in its header."""
    from safetensors.torch import save_file

    with atomic_output(path, force=True) as tmp:  # .checkpoint.safetensors.npft-PID.part until complete
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={CHECKPOINT_KEY: json.dumps(record)})


def checkpoint_record(run_dir: Path) -> dict | None:
    """The JSON part of `run_dir`'s checkpoint (its header only; no tensor is read), or None when
    there is none. A pickled checkpoint of an older version, or a file that is not one, is refused."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    old, path = run_dir / PICKLED_CHECKPOINT, run_dir / CHECKPOINT
    if old.exists():
        raise UsageError(f"{old} is a checkpoint of an older npft-gguf, a pickle, which is not loaded (unpickling can run "
                         "code); pass --force to start over")
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()[CHECKPOINT_KEY])
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); pass --force to start over") from None


def resume_problem(run_dir: Path, record: dict, settings: NPFTSettings, digest: str | None, source: dict | None) -> str | None:
    """Why the checkpoint `record` cannot be resumed by this run (another model, other settings,
    other calibration tokens), as one line; None when it can. `digest` None: not known yet."""
    saved = record.get("source") or {}
    if saved.get("fingerprint") != (source or {}).get("fingerprint"):
        def name(s):
            return f"{s.get('spec', 'an unnamed model')} (fingerprint {s.get('fingerprint')})"
        return (f"{run_dir} holds a run tuned from {name(saved)}, not from {name(source or {})}; resume it with that "
                "model, or pass --force to start over")
    changed = settings.same_run(record["settings"])
    if digest is not None and record["tokens"] != digest:
        changed.append("calibration data")
    if changed:
        return f"{run_dir} holds a run with different {', '.join(changed)}; rerun with the same settings, or --force to start over"
    return None


def tune(model, tokens: torch.Tensor, settings: NPFTSettings, run_dir: Path, resume: bool = False,
         progress: bool = True, on_step=None, log=print, source: dict | None = None) -> TuneResult:
    """Tune `model` (a transformers causal LM, modified in place) on calibration `tokens`
    (samples, length); checkpoints go to `run_dir`. Returns the merged model and the run's record.
    `source` (fingerprint.source_record) is kept in the checkpoint: a resume needs the same one."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    t0 = time.time()
    if not distributed.is_main():  # rank 0 alone shows progress and logs
        progress, log = False, (lambda *a, **k: None)
    settings = settings.for_family(of_model(model))  # the family's LoRA targets and perturbed set where none were given
    sharded = distributed.sharding(settings.shard)  # one process: nothing to shard
    trace_samples = 0 if sharded else settings.trace_samples
    if sharded and settings.trace_samples:
        log("the Hessian trace is not measured under --shard (its double backward does not run under FSDP2)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    n = len(tokens)
    micro_per_epoch = math.ceil(n / settings.batch)
    if settings.max_steps_per_epoch:
        micro_per_epoch = min(micro_per_epoch, settings.max_steps_per_epoch * settings.grad_accum)
    steps_per_epoch = math.ceil(micro_per_epoch / settings.grad_accum)

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)  # LoRA A's initialisation
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    linears = target_linears(peft_model)
    quantizers = None
    if settings.noise == "rtn" and settings.tensor_grid in GRIDS:  # the error of the file the writer will make, per tensor
        from ..imatrix import tuning_quantizers

        quantizers = tuning_quantizers(settings.imatrix, settings.grid, linears, of_model(model), model.config)
    adapters = merged_weights(peft_model)  # by module, before sharding renames the layers
    adapter_keys = _adapter_keys(peft_model)
    if resume and distributed.is_main() and (record := checkpoint_record(run_dir)) is not None and not resume_problem(
            run_dir, record, settings, tokens_digest(tokens), source):  # before sharding, which sends rank 0's weights to all
        set_peft_model_state_dict(peft_model, unpack_checkpoint(record, run_dir / CHECKPOINT, device)[0])
    root = _shard(peft_model) if sharded else None
    device = next(peft_model.parameters()).device  # sharded: where fully_shard put the shards (loaded on the CPU)
    params = [p for p in (root or peft_model).parameters() if p.requires_grad]
    losses = root if sharded else _data_parallel(peft_model, device)  # None: one process
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, settings.warmup_steps, steps_per_epoch * settings.epochs)
    objective = get_objective(settings.objective)
    result = TuneResult(model=None, settings=settings.as_dict(), device=str(device),
                        losses={"tuning": objective.summary, "fisher": SENSITIVITY_LOSS, "hessian_trace": TRACE_LOSS})
    trace_tokens = tokens[: trace_samples, : settings.trace_len or tokens.shape[1]]
    fisher_tokens = tokens[: settings.fisher_samples] if settings.fisher_samples else tokens
    digest = tokens_digest(tokens)

    start_epoch, first_outliers, elapsed_before = 0, None, 0.0
    ckpt_path = run_dir / CHECKPOINT
    record = checkpoint_record(run_dir) if resume else None
    if record is not None:
        problem = resume_problem(run_dir, record, settings, digest, source)
        if problem:
            raise UsageError(problem)
        adapter, opt_state, first_outliers = unpack_checkpoint(record, ckpt_path, device)
        if not sharded:  # sharded: loaded above, before the weights were sharded
            set_peft_model_state_dict(peft_model, adapter)
        opt.load_state_dict(_sharded_like(opt_state, params) if sharded else opt_state)
        sched.load_state_dict(record["scheduler"])
        start_epoch = record["epoch_done"]
        for k in ("history", "fisher_summary", "outliers_per_epoch", "trace_before"):
            setattr(result, k, record[k])
        elapsed_before = record["seconds"]
        result.resumed_at_epoch = start_epoch
        log(f"resuming {run_dir} after epoch {start_epoch} of {settings.epochs}")
    elif resume:
        log(f"no checkpoint in {run_dir}; starting from the beginning")

    noise = Perturbations(linears, None, "none", settings.noise_scope, settings.tensor_grid, settings.perturbed)  # none yet
    if settings.gradient_checkpointing:  # from here on, the Fisher passes included; the recomputations meet `noise` as it is then
        checkpoint_layers(peft_model, lambda: noise.checkpoint_contexts())
    for epoch in range(start_epoch, settings.epochs):
        found, fisher_rows = find_outliers(root or peft_model, fisher_tokens, linears, settings.outlier_pct, settings.fisher_stages,
                                           progress, desc=f"epoch {epoch + 1}: fisher")
        result.outliers_per_epoch.append(sum(len(o) for o in found.values()))
        if epoch == 0:
            first_outliers = found
            result.fisher_summary = fisher_rows
            if trace_samples:
                result.trace_before = outlier_trace(peft_model, trace_tokens, linears, found, settings.trace_probes,
                                                    settings.seed, progress, desc="hessian trace (before)")
        noise = Perturbations(linears, found, settings.noise, settings.noise_scope, settings.tensor_grid, settings.perturbed,
                              adapters, quantizers)
        try:
            _train_epoch(peft_model, tokens, settings, epoch, noise, opt, sched, micro_per_epoch, result, progress, on_step,
                         losses)
        finally:
            noise.remove()
        if sharded:
            gathered = _gathered_adapter(root)
            _check_weights(gathered.items(), settings, f"in epoch {epoch + 1}")
            adapter, opt_state = dict(zip(adapter_keys, gathered.values())), _whole_state(opt.state_dict())
        else:
            _check_weights(((n, w()) for n, w in adapters.items()), settings, f"in epoch {epoch + 1}")
            adapter, opt_state = get_peft_model_state_dict(peft_model), opt.state_dict()
        if distributed.is_main():  # every process holds the same adapter and optimizer state
            save_checkpoint(ckpt_path, *pack_checkpoint(adapter, opt_state, first_outliers, {
                "epoch_done": epoch + 1, "scheduler": sched.state_dict(), "settings": settings.as_dict(), "tokens": digest,
                "source": source, "history": result.history, "fisher_summary": result.fisher_summary,
                "outliers_per_epoch": result.outliers_per_epoch, "trace_before": result.trace_before,
                "seconds": elapsed_before + time.time() - t0,
            }))
        distributed.barrier()  # no process runs ahead of a checkpoint a resume would start from

    if trace_samples and first_outliers is not None:
        result.trace_after = outlier_trace(peft_model, trace_tokens, linears, first_outliers, settings.trace_probes,
                                           settings.seed, progress, desc="hessian trace (after)")
    if settings.gradient_checkpointing:
        checkpoint_layers(peft_model, None)
    if sharded:
        _unshard_into_rank0(root, peft_model)
    if distributed.is_main() or not sharded:  # sharded: rank 0 alone holds the whole tuned model, on the CPU
        result.model = peft_model.merge_and_unload().eval()
        _check_weights(result.model.named_parameters(), settings, "when merged")
        for p in result.model.parameters():
            p.requires_grad_(False)
    result.seconds = elapsed_before + time.time() - t0
    result.peak_memory_mb = peak_memory_mb(device)
    return result


def pack_checkpoint(adapter: dict, opt_state: dict, first_outliers: dict, record: dict) -> tuple[dict, dict]:
    """(record, tensors): the adapter, the optimizer's per-parameter tensors and the first epoch's
    outlier positions as named tensors; everything else (the optimizer's groups and scalars, the
    schedule, the history) in the JSON record."""
    tensors = {f"adapter:{k}": v for k, v in adapter.items()}
    scalars = {}
    for pid, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer:{pid}:{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    for name, o in first_outliers.items():
        tensors[f"outliers:{name}:rows"], tensors[f"outliers:{name}:cols"] = o.rows, o.cols
    record = {**record, "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars,
                                      "params": [int(p) for p in opt_state["state"]]},
              "outlier_modules": list(first_outliers)}
    return record, tensors


def unpack_checkpoint(record: dict, path: Path, device) -> tuple[dict, dict, dict]:
    """pack_checkpoint undone: (adapter state, optimizer state, first outliers). Read on the CPU:
    load_state_dict moves the adapter and the optimizer's moments to their parameters' device (and
    leaves AdamW's step counts on the CPU, where it keeps them); the outliers go to `device`."""
    from safetensors.torch import load_file

    from ..sensitivity import Outliers

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a file torn after its header was read
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); pass --force to start over") from None
    adapter = {k.removeprefix("adapter:"): v for k, v in tensors.items() if k.startswith("adapter:")}
    opt = record["optimizer"]
    state = {}
    for pid in opt["params"]:
        entries = {k.split(":", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optimizer:{pid}:")}
        state[pid] = {**entries, **opt["scalars"].get(str(pid), {})}
    first = {n: Outliers(tensors[f"outliers:{n}:rows"].to(device), tensors[f"outliers:{n}:cols"].to(device))
             for n in record["outlier_modules"]}
    return adapter, {"state": state, "param_groups": opt["param_groups"]}, first


class _Loss(torch.nn.Module):
    """The objective on a micro-batch as one module's forward, so DDP sees every forward the loss
    makes (the KL objective calls the decoder and reads the head directly, past the model's own
    forward) and syncs the gradients of its backward; sharded (FSDP2), the root that gathers the
    weights outside the decoder layers (embeddings, norm, head) for every pass: the loss, the
    teacher (`npft="teacher"`) and the model's own forward (no `npft`: the Fisher pass)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, npft=None, **kwargs):
        if npft is None:
            return self.model(*args, **kwargs)
        if npft == "teacher":
            return teacher_hidden(self.model, *args)
        objective_name, teacher, weight = npft
        return weight * objective_loss(get_objective(objective_name), self.model, args[0], teacher)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()


class _Layer(torch.nn.Module):
    """A decoder layer inside a shell that FSDP2 shards (fully_shard changes the class of the module
    it is given and hooks it): taking the shell away after the tuning leaves the layer as it was."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def _decoder_layers(peft_model) -> torch.nn.ModuleList:
    return peft_model.get_base_model().get_decoder().layers


def _shard(peft_model):
    """FSDP2 over `peft_model` (distributed.shard): each decoder layer its own unit, in a _Layer
    shell, the rest (embeddings, norm, head) the root's, frozen base weights and LoRA factors alike
    sharded across the processes. Returns the root (a _Loss)."""
    return distributed.shard(_decoder_layers(peft_model), _Loss(peft_model), wrap=_Layer)


def _adapter_keys(peft_model) -> list[str]:
    """The names peft's adapter state dict gives the trainable parameters, in parameter order
    (peft drops the adapter's name from the parameter's)."""
    from peft import get_peft_model_state_dict

    keys = list(get_peft_model_state_dict(peft_model))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if [n.replace(".default.", ".") for n in names] != keys:
        raise NpftError("this version of peft names the adapter's tensors otherwise; --shard cannot save its checkpoint")
    return keys


def _gathered_adapter(root) -> dict[str, torch.Tensor]:
    """The LoRA factors, whole, on the CPU (every process gathers each in turn)."""
    from ..sensitivity import whole

    return {n: whole(p.detach()).cpu() for n, p in root.named_parameters() if p.requires_grad}


def _whole_state(opt_state: dict) -> dict:
    """An optimizer state over sharded parameters with each sharded tensor gathered: the state one
    process would hold, so a checkpoint resumes with any number of processes, sharded or not."""
    from ..sensitivity import whole

    return {"state": {pid: {k: whole(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
                      for pid, entries in opt_state["state"].items()},
            "param_groups": opt_state["param_groups"]}


def _sharded_like(opt_state: dict, params: list) -> dict:
    """_whole_state undone: each whole tensor of a parameter's shape becomes that parameter's shard."""
    from torch.distributed.tensor import distribute_tensor

    state = {}
    for pid, entries in opt_state["state"].items():
        p = params[int(pid)]
        state[pid] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v for k, v in entries.items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


@torch.no_grad()
def _unshard_into_rank0(root, peft_model):
    """FSDP2 undone: every weight gathered, one at a time, and kept whole on rank 0's CPU (the other
    processes drop theirs), the layers taken out of their shells. A weight two modules share (tied
    embeddings) is gathered once. Rank 0 then holds the plain peft model, which merges as usual."""
    from ..sensitivity import whole

    done = {}
    slots = [(m, name, p) for m in root.modules() for name, p in m._parameters.items() if p is not None]
    for module, name, p in slots:  # listed first: the same order on every process, whatever rank 0 replaces
        if id(p) not in done:
            full = whole(p.detach()).cpu()  # every process takes part in the gather
            done[id(p)] = torch.nn.Parameter(full, requires_grad=p.requires_grad) if distributed.is_main() else None
        if distributed.is_main():
            module._parameters[name] = done[id(p)]
    if distributed.is_main():
        for b_module in root.modules():
            for name, b in list(b_module._buffers.items()):
                if b is not None:
                    b_module._buffers[name] = b.cpu()
        layers = _decoder_layers(peft_model)
        for i in range(len(layers)):
            layers[i] = layers[i].layer


def _data_parallel(peft_model, device):
    """DDP over the loss of `peft_model` where several processes run, else None. Only the LoRA
    factors need grad, so only they are synced; buffers are the same everywhere (not broadcast)."""
    if distributed.world() == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [device] if torch.device(device).type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers (and warns on the old name)
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(_Loss(peft_model), device_ids=ids, **{quiet: False})


def _my_part(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's share of a global micro-batch's sample indices, and the weight of its mean loss
    that makes DDP's average the global batch's mean: a share / the batch, times the process count.
    A process left without samples (a last batch smaller than the process count) runs one sample
    at weight 0, so that it still takes part in the gradient sync."""
    world = distributed.world()
    mine = idx[distributed.share(len(idx))]
    if len(mine) == 0:
        return idx[:1], 0.0
    return mine, len(mine) * world / len(idx)


def _train_epoch(model, tokens, settings: NPFTSettings, epoch: int, noise: Perturbations, opt, sched,
                 n_micro: int, result: TuneResult, progress: bool, on_step, losses=None):
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
        idx = order[micro * settings.batch:(micro + 1) * settings.batch]
        weight = 1.0
        if losses is not None:
            idx, weight = _my_part(idx)
        x = tokens[idx].to(device)
        if settings.resample == "step" and micro % settings.grad_accum == 0 and micro:
            noise.resample(gen)
        teacher = _teacher(model, x, losses if isinstance(losses, _Loss) else None) if objective.needs_teacher else None
        with noise.on():
            noisy = objective_loss(objective, model, x, teacher) if losses is None else losses(x, npft=(objective.name, teacher, weight))
        _check(noisy, epoch, micro)
        (noisy / settings.grad_accum).backward()
        sums["noisy"] += _global(noisy, losses)
        if settings.clean_weight > 0:
            clean = objective_loss(objective, model, x, teacher) if losses is None else losses(x, npft=(objective.name, teacher, weight))
            _check(clean, epoch, micro)
            (settings.clean_weight * clean / settings.grad_accum).backward()
            sums["clean"] += _global(clean, losses)
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


def _global(loss: torch.Tensor, losses) -> float:
    """The global micro-batch's mean loss, for the log: this process's own (one process), or the
    processes' weighted losses summed (the weights make that the mean over the global batch)."""
    if losses is None:
        return loss.item()
    return distributed.sum_float(loss.item() / distributed.world())


def checkpoint_layers(peft_model, context_fn):
    """Gradient checkpointing of the decoder layers, non-reentrant, each recomputation run inside
    `context_fn`'s second context (the noise as the layer's forward met it); None: switched off."""
    lm = peft_model.get_base_model()
    # transformers 5 renamed gradient_* to activation_*; the first argument is the checkpoint's kwargs in both
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    disable = getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable
    if context_fn is None:
        disable()
    else:
        enable({"use_reentrant": False, "context_fn": context_fn})


def _teacher(model, x, root=None):
    """The float model's hidden states for `x`, in eval mode (no dropout), noise off; sharded,
    through the root (`root`), which gathers the weights outside the layers."""
    model.eval()
    try:
        return teacher_hidden(model, x) if root is None else root(x, npft="teacher")
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
