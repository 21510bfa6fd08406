"""What each stage of a convert run costs, from the model's shapes and the settings alone.

The plan (convert.plan_convert) resolves a run into an ordered list of stages; this module says,
for each, its peak device memory, peak host RAM, the disk it writes, its work (FLOPs, tokens) and
a time estimate, without loading a weight, so `npft-gguf plan` (and convert, in its first second)
can say whether the run fits a machine, and which option makes a stage fit when it does not.

Every memory formula models the code AS IT IS, one function per stage, each naming the code it
models: when that code changes (bounded-memory Fisher scores, chunked noise, ...), its formula
changes here and nowhere else. The figures are estimates: memory to within tens of percent
(allocator slack, fragmentation and the CUDA context are not modelled beyond a fixed reserve),
seconds to within a factor of a few (nominal throughputs, below).

Several processes (`torchrun --nproc-per-node N`, Machine.processes; distributed.py): the tuning
runs under DDP, so every process holds the whole model on its own GPU and a stage's device figure
is per GPU, the same as one process's (plus DDP's copy of the adapters' gradients); the host holds
N processes. The imatrix, the Fisher scores and the tuning split their samples over the processes
(their time divided by N); the trace is computed by each process alike, and what follows the
tuning is rank 0's alone (both: one process's time). With --shard (FSDP2) the imatrix, the Fisher
scores and the tuning hold 1/N of the weights per GPU (per_process), the host one model (rank 0
alone reads it: distributed.load), and fit_to_gpu reasons from those per-GPU figures.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import UsageError

GiB = 2**30
CUDA_CONTEXT = GiB // 2   # the CUDA context and cuBLAS workspaces torch holds beside its tensors
PROCESS_BASE = 3 * GiB // 4  # torch, transformers and the interpreter, before any model (host; evals/README.md's
                             # "Memory by NPFT stage": 1.26 GiB with SmolLM2-135M's 0.5 GiB loaded)

# nominal sustained throughputs for the time estimates (FLOP/s, bytes/s); rough on purpose
GPU_FLOPS = {"H200": 4e14, "H100": 4e14, "A100": 1.5e14, "L40": 9e13, "4090": 8e13, "A10": 4e13, "3090": 3.5e13}
GPU_FLOPS_DEFAULT = 5e13     # an unnamed GPU
GPU_EFFICIENCY = 0.35        # of that, what eager transformers kernels reach
CPU_FLOPS_PER_CORE = 5e10    # torch and llama.cpp on CPU, per core (llama-bench pp512 of a 7B on 16 cores: ~60-300 t/s)
QUANTIZE_WEIGHTS_PER_S = 3e7 # our GGUF writer, per core-group (torch RTN/imatrix search and packing)
LLAMACPP_BPW = {"q4_k_m": 4.89, "q5_k_m": 5.69}  # llama.cpp's own mixes (llama-quantize's table), for the peers


@dataclass(frozen=True)
class Dims:
    """The model's size, from its tensor shapes and config (nothing loaded)."""

    params: int            # every parameter, tied ones once
    linear: int            # weights of the decoder linears the tuning perturbs (sensitivity.target_linears)
    linears: int           # how many such matrices (the most passes the Fisher scores can be cut into)
    largest_linear: int    # the largest such weight
    lora: int              # LoRA parameters (rank r on each --targets linear)
    rank: int              # r
    layers: int
    hidden: int
    ff: int
    heads: int
    vocab: int
    matmul: int            # weights a token multiplies by: the decoder linears and the output matrix
    imatrix_cols: int      # input columns of every decoder linear (the imatrix entries)

    @classmethod
    def of(cls, source, npft=None) -> "Dims":
        c = source.config
        shapes = source.shapes()
        perturbed = set(npft.perturbed if npft is not None and npft.perturbed else source.arch.perturbed)
        targets = set(npft.targets if npft is not None and npft.targets else source.arch.lora_targets)
        rank = npft.rank if npft is not None else 16
        decoder = {n.removesuffix(".weight"): s for n, s in shapes.items()
                   if len(s) == 2 and n.endswith(".weight") and source.arch.layer_name(n)}
        lin = [math.prod(s) for n, s in decoder.items() if n.rsplit(".", 1)[-1] in perturbed]
        lora = sum(rank * (s[0] + s[1]) for n, s in decoder.items() if n.rsplit(".", 1)[-1] in targets)
        vocab, hidden = int(c.vocab_size), int(c.hidden_size)
        return cls(params=sum(math.prod(s) for s in shapes.values()), linear=sum(lin), linears=len(lin),
                   largest_linear=max(lin, default=0),
                   lora=lora, rank=rank, layers=int(c.num_hidden_layers), hidden=hidden,
                   ff=int(getattr(c, "intermediate_size", 4 * hidden)), heads=int(c.num_attention_heads), vocab=vocab,
                   matmul=sum(math.prod(s) for s in decoder.values()) + vocab * hidden,
                   imatrix_cols=sum(s[1] for s in decoder.values()))


# --- activations: what a forward pass keeps for its backward ----------------------------------------
# docs/METHOD.md "Memory of the tuning": coefficients fitted on small llamas with peft's LoRA
# (tests/npft/memory.py counts every tensor torch makes), SDPA attention
def activation_bytes(d: Dims, tokens: int, elem: int, checkpointing: bool = False, rank: int = 0) -> int:
    """Saved activations of a backward pass over `tokens` tokens: (14h + 5f + 29r) elements per token
    and layer (r: the LoRA rank where adapters are attached); with gradient checkpointing
    (npft.train.checkpoint_layers) each layer keeps its input, h, and one layer at a time is recomputed."""
    per_layer = tokens * (14 * d.hidden + 5 * d.ff + 29 * rank) * elem
    if checkpointing:
        return d.layers * tokens * d.hidden * elem + per_layer
    return d.layers * per_layer


def logits_bytes(d: Dims, tokens: int, elem: int) -> int:
    """`model(labels=x).loss`: logits in the weights' dtype, their float32 upcast and its gradient."""
    return int(tokens * d.vocab * (elem + 8))


def forward_flops(d: Dims, tokens: int, seq: int) -> float:
    """2 FLOPs per weight per token, and the attention's 4 s h per layer per token (causal: half)."""
    return tokens * (2.0 * d.matmul + 2.0 * d.layers * seq * d.hidden)


# --- the stages, each modelling the code named in its docstring --------------------------------------
@dataclass
class Stage:
    name: str
    what: str
    step: str                # the run step that executes it (convert.STEPS); sensitivity, trace and merge run in `tune`
    where: str               # cuda / cpu / llama.cpp
    device_bytes: int = 0    # peak memory on the GPU (0 on a CPU run: it is all host memory)
    host_bytes: int = 0      # peak resident host memory of the process
    disk_bytes: int = 0      # what it writes and keeps
    flops: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    fix: str | None = None   # the option that makes it fit, where it does not (set by `verdict`)

    def figures(self) -> dict:
        return {"name": self.name, "peak_device_bytes": self.device_bytes, "peak_host_bytes": self.host_bytes,
                "disk_bytes": self.disk_bytes, "seconds": self.seconds}


@dataclass(frozen=True)
class Machine:
    """What a run may use: free GPU memory (None: no GPU), available host RAM, free disk."""

    gpu_bytes: int | None
    host_bytes: int
    disk_bytes: int | None
    gpu_flops: float = GPU_FLOPS_DEFAULT
    cores: int = 1
    label: str = "this machine"
    processes: int = 1  # one per GPU under a launcher; gpu_bytes is then each GPU's

    @property
    def cpu_flops(self) -> float:
        return self.cores * CPU_FLOPS_PER_CORE


def this_machine(device: str | None, where: Path, threads: int | None = None) -> Machine:
    """Free device memory (torch.cuda.mem_get_info, when the run uses CUDA), available host RAM
    (psutil), free disk where the run writes, and the processes a launcher started (WORLD_SIZE)."""
    from .distributed import launched
    import psutil

    gpu, flops, label = None, GPU_FLOPS_DEFAULT, "this machine"
    import torch

    if device == "cuda" and torch.cuda.is_available():  # (a plan for a GPU made where there is none: no GPU here)
        gpu = torch.cuda.mem_get_info()[0]
        name = torch.cuda.get_device_name()
        flops = next((f for k, f in GPU_FLOPS.items() if k in name), GPU_FLOPS_DEFAULT)
        label = f"this machine ({name})"
    existing = next(p for p in (where, *where.parents) if p.exists())
    cores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    processes = int(os.environ["WORLD_SIZE"]) if launched() else 1
    return Machine(gpu, psutil.virtual_memory().available, shutil.disk_usage(existing).free, flops, cores, label, processes)


def named_machine(base: Machine, gpu: int | None, host: int | None, disk: int | None, cores: int | None = None,
                  processes: int | None = None) -> Machine:
    """`base` with the figures the user named (--gpu-memory, --host-memory, --disk, --cpu-cores, --processes)."""
    return replace(base, gpu_bytes=gpu if gpu is not None else base.gpu_bytes, host_bytes=host or base.host_bytes,
                   disk_bytes=disk if disk is not None else base.disk_bytes, cores=cores or base.cores,
                   processes=processes or base.processes,
                   label="as named" + ("" if None not in (gpu, host, disk, cores) else " (the rest: this machine)"))


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '24G', '64 GB', '512MiB' -> bytes (K, M, G, T and KiB... are binary; KB, MB, GB, TB decimal)."""
    m = SIZE.match(text or "")
    if not m:
        raise ValueError(f"{text!r} is not a size; write it like 24GiB, 64GB or 512MiB")
    unit = m[2].lower()
    letter = unit[:1] if unit not in ("", "b") else ""
    scale = 1000 ** "kmgt".index(letter) * 1000 if unit.endswith("b") and "i" not in unit and letter else UNITS[letter]
    return int(float(m[1]) * scale)


def human(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# --- one function per stage -----------------------------------------------------------------------
def source_stage(d: Dims, elem: int, dev: str, download: int) -> Stage:
    """sources.*.load_model(dtype, device): the model is built on the host in `elem` bytes per weight
    (from_pretrained, or fill_model for a GGUF source), then moved to the device."""
    model = d.params * elem
    return Stage("source", f"load the model ({'bf16' if elem == 2 else 'fp32'})", "source", dev,
                 device_bytes=model if dev == "cuda" else 0, host_bytes=PROCESS_BASE + model, disk_bytes=download,
                 seconds=model / 1e9)  # ~1 GB/s from disk


def calibration_stage(tokens: int, self_sampled: bool, d: Dims, seq: int) -> Stage:
    """calib.load_calibration: text read and tokenized in the plan; --calib self samples the model."""
    flops = forward_flops(d, tokens, seq) * seq / 2 if self_sampled else 0.0  # generation: one token at a time
    return Stage("calibration", "calibration segments" + (" (sampled from the model)" if self_sampled else ""),
                 "calibration", "cpu", tokens=tokens, flops=flops, host_bytes=PROCESS_BASE)


def imatrix_stage(d: Dims, elem: int, dev: str, tokens: int, seq: int) -> Stage:
    """imatrix.calibration_imatrix: the float model in the tuning's precision, one window per forward
    (no gradient, logits_to_keep=1), float64 sums per input column of every decoder linear."""
    model, sums = d.params * elem, d.imatrix_cols * 8 * 2
    act = int(seq * (8 * d.hidden + 2.25 * d.ff + 2.5 * d.heads * seq) * elem)  # one layer's forward, transient
    on_dev = model + sums + act + CUDA_CONTEXT
    return Stage("imatrix", "llama.cpp's importance matrix of the float model", "imatrix", dev,
                 device_bytes=on_dev if dev == "cuda" else 0, host_bytes=PROCESS_BASE + (model if dev == "cuda" else on_dev),
                 disk_bytes=d.imatrix_cols * 4 + 2**20, flops=forward_flops(d, tokens, seq), tokens=tokens)


def lora_state_bytes(d: Dims) -> int:
    """The adapters (fp32) with their gradients and AdamW's two moments."""
    return d.lora * 4 * 4


def sensitivity_stage(d: Dims, elem: int, dev: str, samples: int, seq: int, epochs: int, stages: int = 1,
                      checkpointing: bool = False) -> Stage:
    """sensitivity.find_outliers, once per epoch, one sample at a time in eval mode: `stages` passes
    (--fisher-stages), each holding the float32 scores of one run of modules (4 P_t / k) and one
    module's gradient at a time (sensitivity.fisher_diagonal), the activations (checkpointed with
    --gradient-checkpointing) and the next-token head, about 12 s V (docs/METHOD.md, "Memory of the
    tuning")."""
    peak = (d.params * elem + lora_state_bytes(d) + d.linear * 4 // stages + d.largest_linear * elem
            + activation_bytes(d, seq, elem, checkpointing) + 12 * seq * d.vocab + CUDA_CONTEXT)
    tokens = samples * seq * epochs
    return _torch_stage("sensitivity", "Fisher scores of every perturbed weight, per epoch"
                        + (f", in {stages} passes" if stages > 1 else ""), dev, peak, d, elem,
                        flops=stages * (3 + checkpointing) * forward_flops(d, tokens, seq), tokens=tokens)


def trace_stage(d: Dims, elem: int, dev: str, samples: int, seq: int, probes: int) -> Stage:
    """npft.hessian.outlier_trace, before and after, one sample of `seq` tokens (--trace-len) at a
    time: eager attention and a double backward, s L (24h + 14f + 5 n_h s) d + 28 s V; the
    derivatives are taken along an offset at the outliers, so no term in the perturbed weights, and
    checkpointing does not lower it (docs/METHOD.md, "Memory of the tuning")."""
    peak = (d.params * elem + lora_state_bytes(d)
            + seq * d.layers * (24 * d.hidden + 14 * d.ff + 5 * d.heads * seq) * elem + 28 * seq * d.vocab + CUDA_CONTEXT)
    tokens = 2 * samples * seq
    return _torch_stage("trace", f"Hutchinson trace at the outliers, before and after ({seq} tokens a sample)", dev,
                        peak, d, elem, flops=(3 + 6 * probes) * forward_flops(d, tokens, seq), tokens=tokens)


KL_CHUNKS = 2 * 64 * 2**20  # npft.objective: the KL's two chunks of float32 logits


def noise_bytes(d: Dims, elem: int, npft) -> int:
    """npft.noise.Perturbations: rtn noise formed in each layer's forward in the weight's dtype, every
    layer's z saved for the backward (with checkpointing, one layer's, recomputed with it); dense grid
    noise (--noise-scope all) holds every z; outlier noise a few numbers per outlier."""
    if npft.noise == "none":
        return 0
    if npft.noise == "rtn":
        return d.linear * elem // (d.layers if npft.gradient_checkpointing else 1)
    if npft.noise_scope == "all":
        return d.linear * elem
    return int(d.linear * npft.outlier_pct / 100 * 24)


def tune_stage(d: Dims, elem: int, dev: str, npft, samples: int, seq: int) -> Stage:
    """npft.train._train_epoch: per micro-batch of b sequences one backward at a time (noisy, then
    clean) under the noise (noise_bytes); the head: kl keeps b s h (4 + d) and two chunks of float32
    logits (npft.objective), ce b s V 4; rtn noise forms one matrix's error at a time, about
    8 P_1 + 64 MiB (docs/METHOD.md, "Memory of the tuning")."""
    tokens_step = npft.batch * seq
    head = ((tokens_step * d.hidden * (4 + elem) + KL_CHUNKS if "kl" in npft.objective else 0)
            + (tokens_step * d.vocab * 4 if "ce" in npft.objective else 0))
    transient = 8 * d.largest_linear + 64 * 2**20 if npft.noise == "rtn" else 0
    peak = (d.params * elem + lora_state_bytes(d) + noise_bytes(d, elem, npft) + transient
            + activation_bytes(d, tokens_step, elem, npft.gradient_checkpointing, d.rank) + head + CUDA_CONTEXT)
    per_epoch = min(samples, (npft.max_steps_per_epoch or 10**12) * npft.grad_accum * npft.batch)
    tokens = npft.epochs * per_epoch * seq
    backwards = 1 + (npft.clean_weight > 0)
    passes = (3 + npft.gradient_checkpointing) * backwards + ("kl" in npft.objective)
    return _torch_stage("tune", f"LoRA under {npft.noise} noise, {npft.epochs} epochs", dev, peak, d, elem,
                        flops=passes * forward_flops(d, tokens, seq), tokens=tokens,
                        disk=lora_state_bytes(d) * 3 // 4 + 2**20)  # checkpoint: adapter and AdamW moments


def merge_stage(d: Dims, elem: int, dev: str) -> Stage:
    """peft merge_and_unload in place (one matrix's float32 delta at a time); the writer then reads
    the merged model tensor by tensor in its own dtype (convert.step_tune; docs/METHOD.md, "Memory
    of the tuning")."""
    peak = d.params * elem + 4 * d.largest_linear + CUDA_CONTEXT
    return _torch_stage("merge", "merge the adapters in place", dev, peak, d, elem)


def quantize_stage(d: Dims, dev: str, method: str, tokens: int, seq: int) -> Stage:
    """methods.gptq / owq (layer by layer on a float32 model: each layer's inputs and outputs for every
    calibration token, and a float32 Hessian per linear input) or the simulated quantizer (in place)."""
    peak = d.params * 4 + CUDA_CONTEXT
    flops = 0.0
    if method != "simulated":
        peak += 2 * tokens * d.hidden * 4 + 4 * (4 * d.hidden**2 + d.ff**2)
        flops = 2.0 * tokens * (4 * d.hidden**2 + d.ff**2) * d.layers + forward_flops(d, tokens, seq)
    return _torch_stage("quantize", method, dev, peak, d, 4, flops=flops, tokens=tokens)


def write_stage(d: Dims, size: int, from_model: bool, dev: str, cores: int) -> Stage:
    """writer.export: tensors streamed one at a time (a float32 copy, its blocks, the packed bytes),
    quantized on the CPU; from a tuned model (sources.ModelSource) it stays where it is."""
    host = PROCESS_BASE + 3 * d.largest_linear * 4 + (d.params * 4 if from_model and dev != "cuda" else 0)
    return Stage("write", "quantize and write the GGUF file", "write", "cpu", host_bytes=host, disk_bytes=size,
                 seconds=d.params / (QUANTIZE_WEIGHTS_PER_S * max(1, cores) / 2))


def llamacpp_stage(name: str, what: str, files: list[int], new_files: int, tokens: int, d: Dims, m: Machine,
                   ctx: int, gpu_layers: int = 0) -> Stage:
    """validate.compare / guard: llama.cpp runs each file over `tokens` in windows of `ctx`, one file
    at a time, on the CPU or with `gpu_layers` offloaded (-1: all): the offloaded share of the largest
    file, its KV cache and a window's logits on the device; the comparison files it writes first go
    through writer.export, on the CPU."""
    share = 1.0 if gpu_layers < 0 else min(1.0, gpu_layers / d.layers)
    kv, logits = d.layers * ctx * d.hidden * 2 * 2, ctx * d.vocab * 4
    host = PROCESS_BASE + int(max(files, default=0) * (1 - share)) + logits * 2 + (kv if share < 1 else 0)
    device = int(max(files, default=0) * share) + kv + logits + CUDA_CONTEXT if share else 0
    flops = sum(2.0 * tokens * d.matmul for _ in files)
    writing = new_files * d.params / (QUANTIZE_WEIGHTS_PER_S * max(1, m.cores) / 2)
    seconds = flops * share / (m.gpu_flops * GPU_EFFICIENCY) + flops * (1 - share) / m.cpu_flops
    return Stage(name, what, name, "llama.cpp" + (" (gpu)" if share else ""), device_bytes=device, host_bytes=host,
                 flops=flops, tokens=tokens * len(files), seconds=seconds + writing)


def _torch_stage(name, what, dev, peak, d: Dims, elem, flops=0.0, tokens=0, disk=0) -> Stage:
    """On CUDA the peak is on the device and the host holds the interpreter; on the CPU it is all host memory."""
    on_gpu = dev == "cuda"
    return Stage(name, what, "tune" if name in ("sensitivity", "trace", "merge") else name, dev,
                 device_bytes=peak if on_gpu else 0, host_bytes=PROCESS_BASE + (0 if on_gpu else peak - CUDA_CONTEXT),
                 disk_bytes=disk, flops=flops, tokens=tokens)


# --- the whole run ----------------------------------------------------------------------------------
def file_bytes(source, type_name: str) -> int:
    """The GGUF file of `source` in `type_name`, by the writer's own tensor plan (llama.cpp's mixes by
    their nominal bits per weight)."""
    from .writer import ExportSettings, plan

    if type_name in LLAMACPP_BPW:
        return int(Dims.of(source).params * LLAMACPP_BPW[type_name] / 8)
    return sum(t.nbytes for t in plan(source, ExportSettings(type=type_name)))


def tuning_stages(plan, d: Dims | None = None) -> list[Stage]:
    """The stages of the `tune` step (sensitivity, trace, tune, merge) of a tuning plan."""
    npft, calib, dev = plan.npft, plan.calib, plan.device or "cpu"
    d = d or Dims.of(plan.source, npft)
    elem = 2 if plan.load_dtype == "bfloat16" else 4
    seq, samples = calib.length, calib.samples
    stages = [sensitivity_stage(d, elem, dev, min(samples, npft.fisher_samples or samples), seq, npft.epochs,
                                npft.fisher_stages, npft.gradient_checkpointing)]
    if npft.trace_samples:
        stages.append(trace_stage(d, elem, dev, min(samples, npft.trace_samples), trace_len(plan), npft.trace_probes))
    return stages + [tune_stage(d, elem, dev, npft, samples, seq), merge_stage(d, elem, dev)]


def trace_len(plan) -> int:
    """Tokens of a trace sample: --trace-len, at most the calibration length (npft.train.tune)."""
    return min(plan.calib.length, plan.npft.trace_len or plan.calib.length)


# --- options the plan switches on to fit the GPU, where the user left them to it ----------------------
FIT_OPTIONS = ("shard", "gradient_checkpointing", "fisher_stages", "trace_len", "trace_samples")  # NPFTSettings fields
TRACE_LENS = (256, 128)  # --trace-len tried, in this order, before --trace-samples 0


def fit_to_gpu(plan, machine: Machine, free: tuple[str, ...] = FIT_OPTIONS):
    """(plan, choices): the tuning plan with the memory options of `free` (FIT_OPTIONS the user did not
    set) switched on where a stage of the tune step would not fit `machine`'s GPU otherwise: --shard
    (FSDP2) first, on several processes whose GPUs cannot each hold the whole model; then
    --gradient-checkpointing for the tuning step, the fewest --fisher-stages for the Fisher scores
    (checkpointing too, where they cannot fit without), a shorter --trace-len, or --trace-samples 0,
    for the trace (neither where the user gave either). Choices: {option: (value, the line that says why)}. Nothing else changes; an option
    the user gave is left as it is (the verdict then says whether the run fits)."""
    if plan.npft is None or plan.device != "cuda" or machine.gpu_bytes is None:
        return plan, {}
    d = Dims.of(plan.source, plan.npft)
    budget, elem = machine.gpu_bytes, 2 if plan.load_dtype == "bfloat16" else 4

    def peak(p, name) -> int:  # per GPU: several processes, and --shard, change what each holds (per_process)
        st = tuning_stages(p, d)
        if machine.processes > 1:
            st = per_process(st, d, machine.processes, p.npft.shard, elem)
        return next((s.device_bytes for s in st if s.name == name), 0)

    choices = {}
    whole = d.params * elem  # the model's weights, which every process holds unsharded (DDP)
    if "shard" in free and machine.processes > 1 and not plan.npft.shard and whole > budget:
        plan = _npft(plan, shard=True)
        choices["shard"] = (True, f"plan: --shard on (the weights, {_gib(whole)}, do not fit one GPU's {_gib(budget)}: "
                                  f"FSDP2 shares them out over the {machine.processes} processes)")
    if "gradient_checkpointing" in free and not plan.npft.gradient_checkpointing and peak(plan, "tune") > budget:
        on = _npft(plan, gradient_checkpointing=True)
        if peak(on, "tune") < peak(plan, "tune"):
            choices["gradient_checkpointing"] = (True, f"plan: --gradient-checkpointing on (tune: {_gib(peak(plan, 'tune'))} "
                                                       f"without, {_gib(peak(on, 'tune'))} with)")
            plan = on
    if "fisher_stages" in free and peak(plan, "sensitivity") > budget:
        before, found = peak(plan, "sensitivity"), None
        tries = [plan] + ([_npft(plan, gradient_checkpointing=True)] if "gradient_checkpointing" in free
                          and not plan.npft.gradient_checkpointing else [])
        for base in tries:
            found = next((k for k in range(plan.npft.fisher_stages, max(1, d.linears) + 1)
                          if peak(_npft(base, fisher_stages=k), "sensitivity") <= budget), None)
            if found is not None:
                if base is not plan:
                    choices["gradient_checkpointing"] = (True, f"plan: --gradient-checkpointing on (sensitivity: "
                                                               f"{_gib(before)} without, needed beside --fisher-stages)")
                plan = _npft(base, fisher_stages=found)
                choices["fisher_stages"] = (found, f"plan: --fisher-stages {found} (sensitivity: {_gib(before)} in one pass, "
                                                   f"{_gib(peak(plan, 'sensitivity'))} in {found})")
                break
    if plan.npft.trace_samples and peak(plan, "trace") > budget:
        before, length = peak(plan, "trace"), trace_len(plan)
        shorter = [n for n in TRACE_LENS if n < length] if "trace_len" in free else []
        n = next((n for n in shorter if peak(_npft(plan, trace_len=n), "trace") <= budget), None)
        if n is not None:
            plan = _npft(plan, trace_len=n)
            choices["trace_len"] = (n, f"plan: --trace-len {n} (trace: {_gib(before)} at {length} tokens a sample, "
                                       f"{_gib(peak(plan, 'trace'))} at {n})")
        elif "trace_samples" in free and "trace_len" in free:  # a trace length the user gave asks for the trace
            plan = _npft(plan, trace_samples=0)
            choices["trace_samples"] = (0, f"plan: --trace-samples 0 (trace: {_gib(before)} at {length} tokens a sample; "
                                           "the Hessian trace is not measured)")
    return plan, choices


def _gib(n: int) -> str:
    return f"{n / GiB:.0f} GiB" if n >= 10 * GiB else f"{n / GiB:.1f} GiB"


def plan_stages(plan, machine: Machine) -> list[Stage]:
    """The run's stages in order, each with its costs on `machine` (plan: convert.Plan)."""
    from .choices import PEERS

    s, source, npft, calib = plan.settings, plan.source, plan.npft, plan.calib
    d = Dims.of(source, npft)
    dev = plan.device or "cpu"
    elem = 2 if plan.load_dtype == "bfloat16" else 4
    seq, samples = calib.length, calib.samples
    tokens = samples * seq
    download = 0  # a hub model is fetched by open_source, before the plan
    stages: list[Stage] = []
    steps = plan.steps
    if "imatrix" in steps:  # in the tuning's precision (convert.tuning_dtype), whatever the method
        stages.append(imatrix_stage(d, 2 if dev == "cuda" else 4, dev, tokens, seq))
    if "source" in steps:
        stages.append(source_stage(d, elem, dev, download))
    if "calibration" in steps:
        stages.append(calibration_stage(tokens, calib.calib == "self", d, seq))
    if "tune" in steps:
        stages += tuning_stages(plan, d)
    if "quantize" in steps:
        stages.append(quantize_stage(d, dev, plan.quantizer, tokens, seq))
    out_size = 0 if s.simulated else file_bytes(source, plan.type_name)
    if "write" in steps:
        stages.append(write_stage(d, out_size, "source" in steps, dev, machine.cores))
    ref_size = d.params * (4 if d.params < 2e9 else 2)  # convert.reference_file: F32, F16 from 2B parameters on
    if "guard" in steps:
        text, chunks, guard_ctx = plan.guard
        stages.append(llamacpp_stage("guard", f"tuned file beside its peer, {chunks} held-back windows",
                                     [ref_size, out_size, out_size], 2, chunks * guard_ctx, d, machine, guard_ctx,
                                     s.eval_gpu_layers or 0))
        stages[-1].disk_bytes = ref_size + out_size * 2  # the reference, the peer and the kept tuned file
    if "evaluate" in steps:
        n_tok = plan.eval_tokens if s.chunks is None else min(plan.eval_tokens, s.chunks * s.ctx)
        if plan.torch_eval:
            st = replace(_torch_stage("evaluate", "perplexity and KLD in torch beside the float model", dev,
                                      2 * d.params * 4 + activation_bytes(d, s.ctx, 4) // d.layers
                                      + logits_bytes(d, s.ctx, 4) + CUDA_CONTEXT, d, 4,
                                      flops=2 * forward_flops(d, n_tok, s.ctx), tokens=2 * n_tok))
            stages.append(st)
        else:
            peers = [int(file_bytes(source, t)) for t in PEERS.get(plan.type_name, ())] if s.peers else []
            files = [ref_size, out_size] + ([out_size] * (1 + ("imatrix" in s.method)) if s.method != "rtn" else []) + peers
            new = len(files) - 1 - ("guard" in steps) * 2  # the guard's reference and peer are reused
            stages.append(llamacpp_stage("evaluate", f"perplexity and KLD of {len(files) - 1} files beside the float model, "
                                         f"{n_tok // s.ctx} windows each", files, new, n_tok, d, machine, s.ctx,
                                         s.eval_gpu_layers or 0))
            stages[-1].disk_bytes = sum(files[2:]) + (0 if "guard" in steps else ref_size)
            stages[-1].what += reference_passes(stages[-1], ref_size, len(files) - 1, n_tok, d, machine, s)
    for st in stages:
        if not st.seconds:
            rate = machine.gpu_flops * GPU_EFFICIENCY if st.where == "cuda" else machine.cpu_flops
            st.seconds = st.flops / rate
    shard = bool(npft and npft.shard)
    return per_process(stages, d, machine.processes, shard, elem) if machine.processes > 1 else stages


SPLIT = ("imatrix", "sensitivity", "tune")   # stages whose samples are shared out over the processes
EVERY = ("imatrix", "source", "calibration", "sensitivity", "trace", "tune", "merge")  # run by every process


SHARDED = ("imatrix", "sensitivity", "tune")  # under --shard (FSDP2): each process's device holds 1/n of the weights
ROOT_LOADS = ("imatrix", "source")  # under --shard: the weights read on rank 0 alone (distributed.load)


def per_process(stages: list[Stage], d: Dims, n: int, shard: bool = False, elem: int = 2) -> list[Stage]:
    """The stages on `n` processes (npft.train, distributed.py): the samples of SPLIT shared out (time
    / n; the FLOPs and tokens stay the run's), each process's device peak its own, with DDP's bucket
    of the adapters' gradients in the tuning; the host holding n processes for the stages of EVERY.
    `shard` (--shard, FSDP2): in SHARDED the whole weights and adapter state become 1/n of them plus
    two layers gathered whole (the one running and the one prefetched); the model of the source (and
    the imatrix's) is loaded on rank 0's CPU alone, the others building it on the meta device and
    receiving their shards from rank 0 (distributed.load, distributed.shard): the host holds one
    model, not n; the trace is not measured; the merge gathers every weight onto rank 0's CPU, the
    others holding none. The imatrix is sharded too (imatrix.calibration_imatrix: no adapters there)."""
    out = []
    for st in stages:
        st = replace(st)
        if shard and st.name == "trace":
            continue
        if st.name in SPLIT:
            st.seconds /= n
        on_host = st.host_bytes
        if shard and st.name in ROOT_LOADS:  # rank 0's host: the whole model; the others': what remains, and on
            model = d.params * (elem if st.name == "source" else 2 if st.where == "cuda" else 4)  # the CPU their shard
            on_host = st.host_bytes - model + (0 if st.device_bytes else model // n)
        if shard and st.name in SHARDED and st.device_bytes:
            whole = d.params * elem + (lora_state_bytes(d) if st.name != "imatrix" else 0)
            st.device_bytes += whole // n - whole + 2 * (d.params // d.layers) * elem
        if shard and st.name == "source" and st.device_bytes:
            st.device_bytes, st.where = 0, "cpu"
        if shard and st.name == "merge":  # rank 0 alone holds the gathered model
            st.host_bytes += st.device_bytes - CUDA_CONTEXT if st.device_bytes else 0
            st.device_bytes, st.where, on_host = 0, "cpu", PROCESS_BASE
        if st.name == "tune" and not shard:
            st.device_bytes += d.lora * 4 if st.device_bytes else 0
            st.host_bytes += 0 if st.device_bytes else d.lora * 4
            on_host = st.host_bytes
        if st.name in EVERY:
            st.host_bytes += (n - 1) * on_host
        out.append(st)
    return out


def reference_passes(st: Stage, ref_size: int, others: int, tokens: int, d: Dims, m: Machine, s) -> str:
    """validate.reference: the reference is decoded once and its logits replayed for the other files,
    up to the record's budget; past it, decoded again for each of the `others` (added to `st`). Says which."""
    from .validate.reference import BUDGET_BYTES, logits_bytes

    record = logits_bytes(tokens // s.ctx, s.ctx, d.vocab)
    if record <= BUDGET_BYTES:
        return f"; the reference decoded once, its logits ({human(record)}) replayed from the temporary directory"
    again = llamacpp_stage("evaluate", "", [ref_size], 0, int(tokens * others * (1 - BUDGET_BYTES / record)),
                           d, m, s.ctx, s.eval_gpu_layers or 0)
    st.flops, st.tokens, st.seconds = st.flops + again.flops, st.tokens + again.tokens, st.seconds + again.seconds
    return (f"; the reference's logits ({human(record)}) pass the record's budget of {human(BUDGET_BYTES)}: the "
            "windows past it are decoded again for each file")


@dataclass
class Verdict:
    fits: bool
    machine: Machine
    stages: list[Stage]
    problems: list[str] = field(default_factory=list)  # one line per stage that does not fit, with its fix
    hints: list[str] = field(default_factory=list)     # how to shorten what takes longest
    certain: list[str] = field(default_factory=list)   # the problems beyond the estimates' uncertainty (MARGIN)

    def as_dict(self) -> dict:
        return {"fits": self.fits, "machine": {k: v for k, v in asdict(self.machine).items()},
                "peak_device_bytes": max((s.device_bytes for s in self.stages), default=0),
                "peak_host_bytes": max((s.host_bytes for s in self.stages), default=0),
                "disk_bytes": sum(s.disk_bytes for s in self.stages), "seconds": sum(s.seconds for s in self.stages),
                "stages": [s.figures() | {"what": s.what, "where": s.where, "flops": s.flops, "tokens": s.tokens,
                                          "fix": s.fix} for s in self.stages],
                "problems": self.problems, "refused": bool(self.certain), "hints": self.hints}


MARGIN = 0.15  # the memory estimates' uncertainty: convert refuses a run only when a stage needs this much more


def over(st: Stage, m: Machine, margin: float = 0.0) -> str | None:
    """What of `m` the stage exceeds ('GPU memory', 'host memory') by more than `margin`, or None."""
    if st.device_bytes and (m.gpu_bytes is None or st.device_bytes > m.gpu_bytes * (1 + margin)):
        return "GPU memory"
    if st.host_bytes > m.host_bytes * (1 + margin):
        return "host memory"
    return None


# settings that lower a stage's memory, tried in this order (convert option, how the plan changes)
FIXES = (
    ("--gradient-checkpointing", lambda p: _npft(p, gradient_checkpointing=True), ("tune",)),
    ("--batch 1", lambda p: _npft(p, batch=1, grad_accum=p.npft.grad_accum * p.npft.batch), ("tune",)),
    ("--fisher-stages 4", lambda p: _npft(p, fisher_stages=max(4, p.npft.fisher_stages)), ("sensitivity",)),
    ("--fisher-stages 16", lambda p: _npft(p, fisher_stages=max(16, p.npft.fisher_stages)), ("sensitivity",)),
    ("--trace-len 256", lambda p: _npft(p, trace_len=min(256, trace_len(p))), ("trace",)),
    ("--trace-samples 0", lambda p: _npft(p, trace_samples=0), ("trace",)),
    ("--calib-len 256", lambda p: replace(p, calib=replace(p.calib, length=min(256, p.calib.length))),
     ("sensitivity", "trace", "tune", "imatrix")),
    ("--eval-gpu-layers 0", lambda p: replace(p, settings=replace(p.settings, eval_gpu_layers=0)), ("guard", "evaluate")),
    ("--device cpu", lambda p: replace(p, device="cpu", load_dtype="float32"), None),
)


def _npft(p, **kw):
    return replace(p, npft=replace(p.npft, **kw))


def verdict(plan, machine: Machine) -> Verdict:
    """Does every stage fit `machine`? For each that does not, the first option of FIXES that makes
    it fit (with the options before it that it needs), or what it would need."""
    stages = plan_stages(plan, machine)
    problems, certain = [], []
    disk = sum(s.disk_bytes for s in stages)
    for st in stages:
        short = over(st, machine)
        if short is None:
            continue
        st.fix, then = _fix(plan, st, machine)
        need = st.device_bytes if short == "GPU memory" else st.host_bytes
        have = (machine.gpu_bytes or 0) if short == "GPU memory" else machine.host_bytes
        problems.append(f"stage {st.name} ({st.what}) needs {human(need)} of {short}, {human(have)} "
                        f"{'is free' if short == 'GPU memory' else 'is available'}; "
                        + (f"{st.fix} makes it fit" + (f" (it then takes {duration(then)})" if then and then >= 1 else "")
                           if st.fix else "no option of this version makes it fit"))
        if over(st, machine, MARGIN):
            certain.append(problems[-1])
    if machine.disk_bytes is not None and disk > machine.disk_bytes:
        problems.append(f"the run writes {human(disk)}, {human(machine.disk_bytes)} of disk is free; "
                        "--no-peers, --guard-chunks 0 or --eval-text none write less")
        certain.append(problems[-1])
    return Verdict(not problems, machine, stages, problems, time_hints(plan, stages, machine), certain)


def time_hints(plan, stages: list[Stage], machine: Machine) -> list[str]:
    """Where the closing evaluation (in llama.cpp) takes most of the run: what a quarter of its
    windows (--eval-chunks) would take, and, where it runs on the CPU of a GPU run, --eval-gpu-layers."""
    slowest = max(stages, key=lambda s: s.seconds, default=None)
    if (slowest is None or slowest.name != "evaluate" or plan.torch_eval
            or slowest.seconds <= sum(s.seconds for s in stages) / 2):
        return []
    s = plan.settings
    windows = plan.eval_tokens // s.ctx if s.chunks is None else min(s.chunks, plan.eval_tokens // s.ctx)
    hints = []
    fewer = windows // 4
    if fewer >= 1:
        quicker = replace(plan, settings=replace(s, chunks=fewer))
        again = next(st for st in plan_stages(quicker, machine) if st.name == "evaluate")
        hints.append(f"the closing evaluation takes most of the run ({windows} windows, {duration(slowest.seconds)}); "
                     f"--eval-chunks {fewer} measures {fewer} of them ({duration(again.seconds)})")
    if not s.eval_gpu_layers and plan.device == "cuda":
        hints.append("it runs in llama.cpp on the CPU: --eval-gpu-layers -1, with a GPU build of llama-cpp-python "
                     "(README, GPU), runs it on the GPU")
    return hints


def _fix(plan, st: Stage, machine: Machine) -> tuple[str | None, float | None]:
    """The first option of FIXES that alone makes `st` fit, else the fewest of them together (all of
    them, then each one dropped that is not needed), else None."""
    usable = [(o, change) for o, change, helps in FIXES
              if (helps is None or st.name in helps)
              and (plan.npft is not None or o in ("--calib-len 256", "--eval-gpu-layers 0", "--device cpu"))
              and (o != "--device cpu" or plan.device == "cuda")]

    def fits(chosen) -> Stage | None | bool:
        p = plan
        try:
            for _, change in chosen:
                p = change(p)
        except (AttributeError, TypeError, UsageError):
            return False
        again = next((s for s in plan_stages(p, machine) if s.name == st.name), None)
        return again if again is None or over(again, machine) is None else False

    def said(chosen, again) -> tuple[str, float | None]:
        return " ".join(o for o, _ in chosen), None if again is None else again.seconds

    for u in usable:
        again = fits([u])
        if again is not False:
            return said([u], again)
    chosen = list(usable)
    if len(chosen) < 2 or fits(chosen) is False:
        return None, None
    for u in list(chosen):
        if fits([c for c in chosen if c is not u]) is not False:
            chosen.remove(u)
    return said(chosen, fits(chosen))


def table(v: Verdict) -> str:
    """The plan as a table, a total line and the verdict."""
    rows = [("stage", "where", "GPU peak", "host peak", "disk", "work", "time"), ]
    for s in v.stages:
        work = f"{s.flops:.2g} FLOP" if s.flops else ""
        if s.tokens:
            work = (work + ", " if work else "") + f"{s.tokens:,} tok"
        rows.append((s.name + (" !" if s.fix is not None or over(s, v.machine) else ""), s.where,
                     human(s.device_bytes) if s.device_bytes else "-", human(s.host_bytes),
                     human(s.disk_bytes) if s.disk_bytes else "-", work, duration(s.seconds)))
    d = v.as_dict()
    rows.append(("total", "", human(d["peak_device_bytes"]) if d["peak_device_bytes"] else "-", human(d["peak_host_bytes"]),
                 human(d["disk_bytes"]), "", duration(d["seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    m = v.machine
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    each = f"{m.processes} processes, each " if m.processes > 1 else ""
    lines.append(f"machine ({m.label}): {each}GPU {human(m.gpu_bytes) + ' free' if m.gpu_bytes else 'none'}, host "
                 f"{human(m.host_bytes)} available, disk {human(m.disk_bytes) + ' free' if m.disk_bytes is not None else 'not checked'}, "
                 f"{m.cores} CPU cores (llama.cpp and the writer)")
    lines.append("verdict: fits" if v.fits else "verdict: does NOT fit" if v.certain else
                 f"verdict: may not fit (within the estimates' {MARGIN:.0%} uncertainty: convert warns and runs)")
    lines += ["  " + p for p in v.problems]
    lines += ["hint: " + h for h in v.hints]
    lines.append("(estimates: memory to tens of percent, time to a factor of a few)")
    return "\n".join(lines)


def refusal(v: Verdict) -> str:
    """convert's one line when the plan says the run cannot fit, beyond the estimates' uncertainty."""
    return "this run cannot fit: " + v.certain[0] + " (`npft-gguf plan` shows every stage)"


# --- measured beside planned -----------------------------------------------------------------------
class measure:
    """A run step's wall time, its peak resident host memory and, on CUDA, torch's peak allocation
    during it (max_memory_allocated, reset when the step begins). The host peak is sampled
    (RSS every SAMPLE_S on a watcher thread, and at both ends), so each step shows its own peak, not
    the process's high-water mark since it began (getrusage's, kept beside it as
    `peak_host_bytes_process`); a spike shorter than the interval can be missed. On CUDA the
    device's memory in use is sampled too (`peak_device_used_bytes`: torch's cache, llama.cpp's
    buffers when the evaluation is offloaded, and any other process's), since torch's own count
    does not see llama.cpp."""

    SAMPLE_S = 0.05

    def __init__(self, device: str | None):
        self.cuda = device == "cuda"
        self.figures: dict = {}

    def __enter__(self) -> dict:
        import threading
        import time

        import psutil

        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._proc, self._done = psutil.Process(), threading.Event()
        self._peak = self._proc.memory_info().rss
        self._used = self._device_used()
        self._watcher = threading.Thread(target=self._watch, name="measure-rss", daemon=True)
        self._watcher.start()
        self.t0 = time.perf_counter()
        return self.figures

    def _device_used(self) -> int:
        if not self.cuda:
            return 0
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _watch(self):
        while not self._done.wait(self.SAMPLE_S):
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._used = max(self._used, self._device_used())

    def __exit__(self, *exc):
        import resource
        import time

        self.figures["seconds"] = time.perf_counter() - self.t0
        self._done.set()
        self._watcher.join()
        self.figures["peak_host_bytes"] = max(self._peak, self._proc.memory_info().rss)
        self.figures["peak_host_bytes_process"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                                      self.figures["peak_host_bytes"])  # the kernel's mark lags a little
        if self.cuda:
            import torch

            self.figures["peak_device_bytes"] = torch.cuda.max_memory_allocated()
            self.figures["peak_device_used_bytes"] = max(self._used, self._device_used())
        return False


def stage_report(plan, measured: dict[str, dict]) -> list[dict]:
    """Per run step: the plan's stages in it (their estimates) and what was measured."""
    stages = plan.stages if plan.stages is not None else plan_stages(plan, this_machine(plan.device, plan.run_dir))
    out = []
    for step, got in measured.items():
        mine = [s for s in stages if s.step == step]
        out.append({"step": step, "stages": [s.name for s in mine],
                    "planned": {"peak_device_bytes": max((s.device_bytes for s in mine), default=0),
                                "peak_host_bytes": max((s.host_bytes for s in mine), default=0),
                                "seconds": sum(s.seconds for s in mine)},
                    "measured": got})
    return out


def report_markdown(rows: list[dict]) -> str:
    """The stage table of report.md: planned beside measured (the GPU: torch's peak allocation, and
    in brackets the device's memory in use, llama.cpp's buffers included)."""
    lines = ["## Stages: planned and measured", "",
             "| step | stages | GPU peak plan / measured (device in use) | host peak plan / measured | time plan / measured |",
             "|---|---|---|---|---|"]
    for r in rows:
        p, m = r["planned"], r["measured"]
        gpu = (f"{human(p['peak_device_bytes'])} / {human(m['peak_device_bytes'])}"
               + (f" ({human(m['peak_device_used_bytes'])})" if "peak_device_used_bytes" in m else "")
               if "peak_device_bytes" in m else "-")
        lines.append(f"| {r['step']} | {', '.join(r['stages'])} | {gpu} | {human(p['peak_host_bytes'])} / "
                     f"{human(m['peak_host_bytes'])} | {duration(p['seconds'])} / {duration(m['seconds'])} |")
    return "\n".join(lines) + "\n"


# --- a model from its config alone, for `npft-gguf plan` ---------------------------------------------
class ConfigSource:
    """A folder with a config.json and no weights (or a transformers config): tensor shapes from the
    model transformers builds on the meta device. Enough to plan a run, nothing to run it with."""

    kind = "config"

    def __init__(self, spec: str, path: Path, config):
        from . import arch as families

        self.spec, self.path, self.config = spec, path, config
        self.arch = families.for_config(config)
        self._shapes = meta_shapes(config)

    def shapes(self):
        return dict(self._shapes)

    def extra_tensors(self):
        return self.arch.extra_tensors(self.config)

    def tokenizer(self):
        raise UsageError(f"{self.spec} is a config without weights or tokenizer; only `npft-gguf plan` reads one")

    def load_model(self, dtype=None, device="cpu"):
        self.tokenizer()


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of the model `config` makes (tied ones once), built on
    the meta device: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = getattr(config, "tie_word_embeddings", False)
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=True)
            if not (tied and n == "lm_head.weight")}


def open_for_plan(spec: str):
    """What `npft-gguf plan` plans from: any source convert takes, or a folder holding a config.json
    and no weights (ConfigSource)."""
    from .sources import open_source

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")) \
            and not any(path.glob("pytorch_model*.bin")):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise UsageError(f"{path}/config.json cannot be read as a model config ({str(e).splitlines()[0][:200]})") from None
        return ConfigSource(spec, path, config)
    return open_source(spec)
