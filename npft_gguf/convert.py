"""The one-command pipeline and its first half on its own.

    convert:  source -> calibration -> NPFT tuning -> merge -> RTN onto a GGUF grid -> GGUF
              -> llama.cpp evaluation beside plain RTN and the float model
    finetune: source -> calibration -> NPFT tuning -> merge -> Hugging Face checkpoint

Both keep their working state (epoch checkpoints, reference files) in a run directory, so an
interrupted run continues with --resume and a repeated evaluation reuses what it already wrote.
Each is planned first (`plan_convert`, `plan_finetune`: every input resolved and checked, nothing
loaded), then run, so bad input fails before the hour of work rather than after it. A convert plan
is an ordered list of steps (`run_steps`), each with its estimated memory, disk and time (stages.py):
a run that cannot fit this machine is refused before it starts (`check_fits`), and `run_convert`
is a loop over the steps (STEPS), each measured beside its estimate in the report.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__, distributed
from .calib import CalibSettings, load_calibration
from .choices import BITS, EVAL_CHUNKS, METHODS, base_type
from .errors import UsageError
from .fingerprint import source_record
from .npft import NPFTSettings, tune
from .npft.report import write_report
from .sources import ModelSource, Source, open_source


@dataclass(frozen=True)
class ConvertSettings:
    bits: int = 4
    type: str | None = None
    method: str = "auto"           # resolved by the plan (resolve_method)
    eval_text: str = "wikitext2"  # or "none"
    ctx: int = 512
    chunks: int | None = EVAL_CHUNKS  # windows of the closing evaluation for each file (None: every one)
    threads: int | None = None
    eval_gpu_layers: int | None = None  # llama.cpp layers the guard and the evaluation offload (-1: all; None: the plan
                                        # decides, eval_offload)
    act_order: bool = True         # GPTQ/OWQ (see methods/gptq.py)
    owq_fraction: float = 0.01     # OWQ: weak columns kept in fp16, per linear
    tune_imatrix: bool | None = None  # npft+imatrix: rtn noise = the importance-weighted quantizer's error (None: on
                                      # where it applies, npft+imatrix with rtn noise)
    keep_tuned: bool = False       # keep the tuned file even where the guard measures it farther than the peer
    guard_chunks: int = 10         # windows of held-back calibration text the guard measures on (0: no guard)
    peers: bool = True             # the closing comparison adds the same-size files llama.cpp makes (choices.PEERS)
    fit_options: tuple[str, ...] = ("shard", "gradient_checkpointing", "fisher_stages", "trace_len", "trace_samples")
                                   # memory options the plan may switch on to fit the GPU (stages.fit_to_gpu): those
                                   # the user did not set (the CLI leaves out each option given)

    @property
    def simulated(self):
        """A per-channel min-max quantizer ('rtn4', 'rtn3', 'rtn4g128'): torch only, no GGUF."""
        from .methods.simulate import parse_simulated

        return parse_simulated(self.type) if self.type else None


@dataclass
class Plan:
    """A run with every input resolved and checked: made before any model is loaded, so a run that
    would fail at its last step fails in its first second instead."""

    spec: str
    source: Source
    calib: CalibSettings
    npft: NPFTSettings | None      # None: no tuning
    device: str | None             # the resolved torch device; None when no model runs in torch
    tokens: object                 # calibration segments (a LongTensor); None: not needed, or `self` (sampled later)
    run_dir: Path
    out: Path | None = None
    settings: ConvertSettings | None = None
    type_name: str | None = None   # the type written (and, for NPFT, tuned for)
    eval_text: tuple[str, str] | None = None  # (name, text) for the closing evaluation
    made_from: dict | None = None  # fingerprint.source_record: what the tuning checkpoint records and a resume must match
    guard: tuple[str, int, int] | None = None  # (held-back calibration text, windows, ctx) the guard measures on; None: none
    notes: tuple[str, ...] = ()    # what the plan decided that the user should hear before the run
    steps: tuple[str, ...] = ()    # what run_convert does, in order (run_steps; STEPS holds each one's code)
    load_dtype: str = "float32"    # the torch dtype the model is loaded in for the torch steps (bfloat16: tuning on CUDA)
    quantizer: str | None = None   # what the quantize step runs: gptq, owq or simulated (a per-channel min-max quantizer)
    torch_eval: bool = False       # evaluated in torch (simulated quantizers, OWQ): nothing GGUF is written
    eval_tokens: int = 0           # tokens of the closing evaluation's text (estimated where there is no tokenizer)
    stages: list | None = None     # stages.Stage, each with its estimated costs (set by check_fits)
    fitted: dict | None = None     # memory options the plan switched on to fit the GPU: {NPFTSettings field: value}


def eval_offload(settings: ConvertSettings, device: str | None, costs_only: bool) -> tuple[int, tuple[str, ...]]:
    """(layers, notes): what llama.cpp offloads to the GPU in the guard and the closing evaluation.
    --eval-gpu-layers as given (a GPU build checked, unless only planning); by default every layer
    where llama.cpp has a GPU backend and the run's device is CUDA, else none. A plan made for a
    GPU (`plan --device cuda`) on a machine whose llama.cpp has none assumes a GPU build, and says so."""
    from .llamacpp import gpu_offload_supported
    from .validate.models import require_gpu_offload

    if settings.eval_gpu_layers is not None:
        if not costs_only:
            require_gpu_offload(settings.eval_gpu_layers, "--eval-gpu-layers")
        return settings.eval_gpu_layers, ()
    if costs_only and device == "cuda":
        if gpu_offload_supported():
            return -1, ()
        return -1, ("plan: the evaluation is planned on the GPU, as a GPU build of llama-cpp-python runs it; this one has "
                    "none (--eval-gpu-layers 0 plans it on the CPU)",)
    if device in ("cpu", None) or not gpu_offload_supported():
        return 0, ()
    return (-1 if resolve_device(device) == "cuda" else 0), ()


def free_gpu_for_llamacpp() -> None:
    """What torch's allocator still caches goes back to the device, for llama.cpp's offloaded layers."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def resolve_method(method: str, type_name: str) -> str:
    """`auto` is what evals/RESULTS.md measures closest to the float model: NPFT, then llama.cpp's
    importance-weighted scales (the imatrix of the float model on the calibration tokens) where
    those rules exist for the type written; NPFT then plain RTN for every other type."""
    if method != "auto":
        return method
    from .imatrix import IMATRIX_TYPES

    return "npft+imatrix" if type_name in IMATRIX_TYPES else "npft"


def type_for_bits(bits: int, source: Source) -> str:
    """The best pure-RTN GGUF type of `bits` that every decoder linear's row length allows."""
    from .grids import get_grid

    if bits not in BITS:
        raise UsageError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, BITS))} or give --type")
    cols = {s[1] for n, s in source.shapes().items() if len(s) == 2 and ".layers." in n}
    for name in BITS[bits]:
        if all(get_grid(name).fits(c) for c in cols):
            return name
    raise UsageError(f"no {bits}-bit GGUF type fits this model's row lengths {sorted(cols)} "
                     f"(tried {', '.join(BITS[bits])}); pick one with --type")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return device


def tuning_dtype(device: str):
    """The precision base weights are held in on `device` while tuning (CUDA: bf16; the adapters
    train in fp32)."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def decoder_linears(source: Source) -> dict[str, tuple[int, ...]]:
    """HF module name of each linear of the decoder layers -> its weight's (out, in), from the headers."""
    return {n.removesuffix(".weight"): tuple(s) for n, s in source.shapes().items()
            if len(s) == 2 and source.arch.layer_name(n) and n.endswith(".weight")}


def check_targets(targets: tuple[str, ...], source: Source) -> None:
    """LoRA targets must name linear modules of the decoder, as peft matches them (a module whose
    name is the target or ends in `.target`), checked on the tensor names before any loading."""
    modules = list(decoder_linears(source))
    if not targets:
        raise UsageError("--targets is empty; name the linear modules to adapt, e.g. q_proj,v_proj")
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        names = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise UsageError(f"--targets {','.join(missing)}: no such linear module in this model; choose from {', '.join(names)}")


def check_directory_target(path: Path, what: str) -> None:
    """A directory the run will create or write into: not a file, and creatable where it would go."""
    from .atomic import check_target, refuse_dangling_link

    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file; give a directory")
    refuse_dangling_link(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    check_target(existing / ".npft-write-probe", force=True)  # its parent must be a writable directory


def check_run_dir(run_dir: Path, force: bool, resume: bool):
    """A run directory with a checkpoint is only reused with --resume, or cleared with --force."""
    from .npft.train import CHECKPOINT, PICKLED_CHECKPOINT

    check_directory_target(run_dir, "the run directory")
    if any((run_dir / f).exists() for f in (CHECKPOINT, PICKLED_CHECKPOINT)) and not resume and not force:
        raise UsageError(f"{run_dir} holds an unfinished or earlier run; pass --resume to continue it or --force to start over")


def check_apart(out: Path, run_dir: Path) -> None:
    """The output file and the run directory (its references, checkpoint and report) must not be
    the same path or lie one inside the other, where each would overwrite or hide the other."""
    o, r = out.resolve(), run_dir.resolve()
    if o == r or r.is_relative_to(o) or o.is_relative_to(r):
        how = "is" if o == r else "is inside" if o.is_relative_to(r) else "holds"
        raise UsageError(f"-o {out} {how} the run directory {run_dir}, where the run keeps its references, checkpoint and "
                         "report; give --run-dir a folder apart from the output")


def check_resume(run_dir: Path, npft: NPFTSettings, tokens, source: dict) -> None:
    """--resume of a checkpoint made from another model, with other settings or with other
    calibration tokens fails now, before the model is loaded (tune checks again, for callers of the
    library). Only the checkpoint's header is read."""
    from .npft.train import checkpoint_record, resume_problem, tokens_digest

    record = checkpoint_record(run_dir)
    if record is None:
        return
    problem = resume_problem(run_dir, record, npft, tokens_digest(tokens) if tokens is not None else None, source)
    if problem:
        raise UsageError(problem)


def check_tuning_imatrix(npft: NPFTSettings, source: Source) -> None:
    """finetune --imatrix: a readable imatrix file, a grid llama.cpp has importance-weighted rules
    for, and entries that fit the linears tune quantizes with them: imatrix.tuning_quantizers,
    given the linears' widths from the headers instead of the loaded model."""
    from types import SimpleNamespace

    from .imatrix import IMATRIX_TYPES, load_imatrix, tuning_quantizers

    if npft.grid not in IMATRIX_TYPES:
        raise UsageError(f"--imatrix tunes for llama.cpp's importance-weighted {', '.join(IMATRIX_TYPES)}, "
                         f"not --grid {npft.grid}")
    load_imatrix(npft.imatrix)
    perturbed = set(source.arch.perturbed)  # the linears tune gives quantizers (sensitivity.target_linears)
    widths = {n: SimpleNamespace(out_features=s[0], in_features=s[1])
              for n, s in decoder_linears(source).items() if n.rsplit(".", 1)[-1] in perturbed}
    tuning_quantizers(npft.imatrix, npft.grid, widths, source.arch, source.config)


def clear_run_dir(run_dir: Path, force: bool, resume: bool):
    """--force without --resume starts over: the old checkpoint goes, once every check has passed."""
    from .npft.train import CHECKPOINT, PICKLED_CHECKPOINT

    if force and not resume:
        for f in (CHECKPOINT, PICKLED_CHECKPOINT):
            (run_dir / f).unlink(missing_ok=True)


def calibration_tokens(calib: CalibSettings, source: Source):
    """The calibration segments, read, checked (the WikiText-2 test text is refused) and tokenized
    before any model is loaded; None for `self`, which samples the loaded model."""
    if calib.calib == "self":
        return None
    return load_calibration(calib, source.tokenizer(), progress=False)


def trained_context(source: Source) -> int:
    """The model's training context from its config (0 where it does not say)."""
    return int(getattr(source.config, "max_position_embeddings", 0) or 0)


def guard_context(ctx: int, source: Source) -> int:
    """The guard's window: --ctx, within the model's training context (--ctx is checked against it
    only when there is an evaluation text)."""
    trained = trained_context(source)
    return min(ctx, trained) if trained else ctx


def check_context(ctx: int, source: Source) -> None:
    from .validate.perplexity import check_ctx

    check_ctx(ctx, trained_context(source))


def count_tokens(text: str, source: Source) -> int:
    """Tokens of `text` by the source's tokenizer (llama.cpp's count differs by a few at most)."""
    return len(source.tokenizer()(text, add_special_tokens=False, verbose=False)["input_ids"])


def check_eval_text(text: str, ctx: int, source: Source) -> int:
    """The closing evaluation's text must fill two windows; counted with the source's tokenizer,
    before the run rather than after it. Returns the count."""
    from .validate.perplexity import check_length

    n = count_tokens(text, source)
    check_length(n, ctx)
    return n


def calibrated_model(source: Source, calib: CalibSettings, device: str, progress: bool, log, notice: str | None = None,
                     tokens=None, shard: bool = False):
    """The model on its device in the tuning's precision (CUDA: bf16 base weights; the adapters train
    in fp32) and its calibration tokens (`tokens` when the plan already read them). Sharded tuning
    (`shard`, several processes): on rank 0's CPU alone (the others: the meta device), FSDP2 giving
    each process its shard on the device (distributed.load, distributed.shard)."""
    dev = resolve_device(device)
    model = distributed.load(source, tuning_dtype(dev), dev, shard)
    if tokens is None:
        tokens = distributed.from_main(load_calibration, calib, source.tokenizer(), model=model, progress=progress)
    log(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens from {calib.calib}")
    if notice:
        log(notice)
    return model, tokens


def tuned_model(plan: Plan, force: bool, resume: bool, progress: bool, log, notice: str | None = None):
    """Load, calibrate, tune and merge; returns the tuning result and the calibration tokens."""
    model, tokens = calibrated_model(plan.source, plan.calib, plan.device, progress, log, notice, tokens=plan.tokens,
                                     shard=plan.npft.shard)
    clear_run_dir(plan.run_dir, force, resume)
    return tune(model, tokens, plan.npft, plan.run_dir, resume=resume, progress=progress, log=log, source=plan.made_from), tokens


# an earlier Hugging Face checkpoint's files, in any sharding or tokenizer kind (every *.safetensors:
# sources.HFDirSource reads them all when there is no index)
MODEL_FILES = re.compile(r"(generation_)?config\.json|.+\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
                         r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
                         r"|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)")
REPORT_FILES = ("report.json", "report.md")


def tokenizer_files(tokenizer) -> set[str]:
    """The names `tokenizer.save_pretrained` writes (they differ between tokenizers), found by
    saving it into a scratch folder: a few small files."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return {p.name for p in Path(scratch).iterdir()}


def finetune_files(out_dir: Path, tokenizer_names: set[str]) -> list[Path]:
    """The files in `out_dir` that finetune writes (model, tokenizer, report) or that belong to an
    earlier model there (its shards, its index): what finetune needs --force to replace."""
    if not out_dir.is_dir():
        return []
    ours = tokenizer_names | set(REPORT_FILES)
    return sorted(p for p in out_dir.iterdir() if (p.name in ours or MODEL_FILES.fullmatch(p.name)) and not p.is_dir())


def check_finetune_output(out_dir: Path, tokenizer_names: set[str], force: bool) -> None:
    """Without --force, an output folder holding any of finetune's files is refused before any work."""
    existing = [p.name for p in finetune_files(out_dir, tokenizer_names)]
    if existing and not force:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise UsageError(f"{out_dir} already holds {shown}, which finetune would overwrite; pass --force to replace them")


@contextmanager
def output_folder(out_dir: Path, run_dir: Path):
    """`out_dir`, created if need be and locked (atomic.folder_lock) while this run writes into it;
    the folders this run created go again if it fails before writing anything in them."""
    from .atomic import folder_lock

    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out_dir) if distributed.is_main() else nullcontext():  # rank 0 writes here
            new_run_dir = not run_dir.exists()  # looked at under the lock: another run's is not ours to remove
            try:
                yield
            finally:
                if new_run_dir:
                    _remove_if_empty([run_dir])
    finally:
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Innermost first; stops at the first one that holds something."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def plan_finetune(spec: str, out_dir: Path, calib: CalibSettings, npft: NPFTSettings, device: str = "auto",
                  force: bool = False, resume: bool = False) -> Plan:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file; give a directory for the checkpoint")
    check_directory_target(out_dir, "the output")
    source = open_source(spec)
    check_finetune_output(out_dir, tokenizer_files(source.tokenizer()), force)
    run_dir = out_dir / "npft-run"
    check_run_dir(run_dir, force, resume)
    npft = npft.for_family(source.arch)
    check_targets(npft.targets, source)
    if npft.imatrix:
        check_tuning_imatrix(npft, source)
    tokens = calibration_tokens(calib, source)
    made_from = source_record(source)
    if resume:
        check_resume(run_dir, npft, tokens, made_from)
    return Plan(spec, source, calib, npft, resolve_device(device), tokens, run_dir, made_from=made_from)


def finetune(spec: str, out_dir: Path, calib: CalibSettings, npft: NPFTSettings, device: str = "auto",
             force: bool = False, resume: bool = False, progress: bool = True, log=print, notice: str | None = None) -> dict:
    """Tune SOURCE with NPFT and save the merged model as a Hugging Face checkpoint in `out_dir`."""
    plan = plan_finetune(spec, out_dir, calib, npft, device, force, resume)
    out_dir, tokenizer = Path(out_dir), plan.source.tokenizer()
    names = tokenizer_files(tokenizer)
    with output_folder(out_dir, plan.run_dir):
        check_finetune_output(out_dir, names, force)  # again, now that no other run can write here
        result, _ = tuned_model(plan, force, resume, progress, log, notice)
        report = run_record(spec, calib, result)
        distributed.on_main(save_checkpoint, result.model, tokenizer, out_dir, report,
                            replaces=tuple(finetune_files(out_dir, names)))
    return {"output": str(out_dir), **report}


def save_checkpoint(model, tokenizer, out_dir: Path, report: dict | None = None, replaces: tuple[Path, ...] = ()):
    """save_pretrained (and the run report) into a scratch folder in `out_dir` (atomic.staged_dir:
    removed however the run ends, or by the next run after a SIGKILL), then move files in, once the
    earlier model's `replaces` are gone; config.json last, so a folder with a config.json is one
    complete model."""
    from transformers.utils import logging as hf_logging

    from .atomic import staged_dir

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its one-shard "Writing model shards" bar only adds noise to our log
    try:
        with staged_dir(out_dir, last=("config.json",), replaces=replaces) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if report is not None:
                write_report(report, tmp)
    finally:
        if bars_were_on:  # give back the caller's setting, not ours
            hf_logging.enable_progress_bar()


def run_header(spec: str) -> dict:
    from .validate.compare import machine_label

    return {"source": spec, "version": __version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_label()}


def run_record(spec: str, calib: CalibSettings, result) -> dict:
    return {**run_header(spec), "calibration": asdict(calib), "tune": result.as_dict()}


def plan_convert(spec: str, out: Path, settings: ConvertSettings, calib: CalibSettings, npft: NPFTSettings,
                 device: str = "auto", run_dir: Path | None = None, force: bool = False, resume: bool = False,
                 source: Source | None = None, costs_only: bool = False, machine=None) -> Plan:
    """Resolve and check the whole run: outputs, source (headers only), type, method, the tuning
    grid, evaluation and calibration texts, device, and the steps it takes. Nothing is loaded, tuned
    or written. `costs_only` (`npft-gguf plan`): --device cuda is taken as asked, whether or not
    torch sees a GPU here, and a source without a tokenizer (stages.ConfigSource) is planned from
    estimated token counts. A tuning on CUDA gets the memory options that make it fit the GPU of
    `machine` (default: this one's free memory), of those the user left to the plan
    (settings.fit_options; stages.fit_to_gpu)."""
    from .atomic import check_target
    from .texts import load_text

    out = Path(out)
    if settings.method not in METHODS:
        raise UsageError(f"--method {settings.method!r}: choose one of {', '.join(METHODS)}")
    run_dir = Path(run_dir) if run_dir else out.with_name(out.stem + ".npft-run")
    check_apart(out, run_dir)
    check_target(out, force)
    source = source or open_source(spec)
    has_tokenizer = source.kind != "config"
    type_name = (settings.type or type_for_bits(settings.bits, source)).lower()
    settings = replace(settings, method=resolve_method(settings.method, type_name))
    tuning = "npft" in settings.method
    if settings.tune_imatrix is None:  # the default: tune against the quantizer that writes the file
        settings = replace(settings, tune_imatrix=settings.method == "npft+imatrix" and npft.noise == "rtn")
    if settings.tune_imatrix and (settings.method != "npft+imatrix" or npft.noise != "rtn"):
        raise UsageError(f"--tune-imatrix tunes the rtn noise for --method npft+imatrix; this run is --method "
                         f"{settings.method} --noise {npft.noise}")
    if tuning:
        check_run_dir(run_dir, force, resume)
    else:
        check_directory_target(run_dir, "the run directory")
    if not settings.simulated:
        from .grids import get_grid

        get_grid(base_type(type_name))  # a mix: its base type's grid
    if settings.method in GPTQ_FAMILY:
        gptq_settings(settings, type_name).quantizer()  # an unsupported target fails here
    if "imatrix" in settings.method:
        from .imatrix import IMATRIX_TYPES

        if type_name not in IMATRIX_TYPES:
            raise UsageError(f"--method {settings.method} writes {', '.join(IMATRIX_TYPES)} (llama.cpp's importance-weighted "
                             f"rules are reproduced for those), not {type_name}")
    if tuning:
        npft = replace(npft, grid=type_name).for_family(source.arch)  # tuned for the grid it is written on
        if settings.tune_imatrix:  # ... and for the quantizer that writes it
            npft = replace(npft, imatrix=str(run_dir / "imatrix.gguf"))  # calibration_imatrix writes it before tuning
        check_targets(npft.targets, source)
    in_torch = settings.method != "rtn" or settings.simulated
    eval_text, eval_tokens = None, 0
    if settings.eval_text != "none":
        check_context(settings.ctx, source)
        eval_text = load_text(settings.eval_text)
        eval_tokens = check_eval_text(eval_text[1], settings.ctx, source) if has_tokenizer else len(eval_text[1]) // 4
    guard, notes = None, ()
    if tuning and not settings.simulated and settings.guard_chunks > 0:
        if has_tokenizer:
            guard, calib, notes = plan_guard(calib, settings, source)
        else:  # planned as if the held-back text filled --guard-chunks windows
            guard = ("", settings.guard_chunks, guard_context(settings.ctx, source))
    tokens = calibration_tokens(calib, source) if settings.method != "rtn" and has_tokenizer else None
    made_from = source_record(source) if tuning else None
    device_asked = device
    if in_torch:
        device = "cuda" if costs_only and device == "cuda" else resolve_device(device)
    quantizer = ("owq" if settings.method == "owq" else "gptq" if settings.method in GPTQ_FAMILY
                 else "simulated" if settings.simulated else None)
    torch_eval = quantizer in ("owq", "simulated")
    notes_offload = ()
    if (eval_text is not None and not torch_eval) or guard is not None:
        layers, notes_offload = eval_offload(settings, device if in_torch else device_asked, costs_only)
        settings = replace(settings, eval_gpu_layers=layers)
    notes = notes + notes_offload
    plan = Plan(spec, source, calib, npft if tuning else None, device if in_torch else None, tokens, run_dir,
                out=out, settings=settings, type_name=type_name, eval_text=eval_text, made_from=made_from, guard=guard,
                notes=notes, steps=run_steps(settings, tuning, quantizer, torch_eval, eval_text is not None, guard is not None),
                load_dtype=str(tuning_dtype(device)).removeprefix("torch.") if tuning else "float32", quantizer=quantizer,
                torch_eval=torch_eval, eval_tokens=eval_tokens)
    if tuning and plan.device == "cuda" and settings.fit_options:
        from .stages import fit_to_gpu, this_machine

        machine = machine or this_machine(plan.device, out.parent, settings.threads)
        plan, choices = fit_to_gpu(plan, machine, settings.fit_options)
        if choices:
            plan = replace(plan, fitted={k: v for k, (v, _) in choices.items()},
                           notes=tuple(line for _, line in choices.values()) + plan.notes)
    if tuning and resume:  # with the options the plan chose, as the checkpoint recorded them
        check_resume(run_dir, plan.npft, tokens, made_from)
    return plan


def run_steps(settings: ConvertSettings, tuning: bool, quantizer: str | None, torch_eval: bool, evaluate: bool,
              guard: bool) -> tuple[str, ...]:
    """The steps of a run, resolved once from the method (STEPS holds the code of each):
    imatrix (on the float model), source (the model in torch), calibration, tune (sensitivity,
    trace, LoRA under noise, merge), quantize (GPTQ/OWQ, or a simulated quantizer), write (quantize
    onto the GGUF grid and write), guard, evaluate. Plain RTN writes straight from the source."""
    if settings.method == "rtn" and not settings.simulated:
        return ("write",) + (("evaluate",) if evaluate else ())
    steps = ["imatrix"] if "imatrix" in settings.method else []
    steps.append("source")
    if settings.method != "rtn":  # a simulated RTN needs no calibration text
        steps.append("calibration")
    if tuning:
        steps.append("tune")
    if quantizer:
        steps.append("quantize")
    if not torch_eval:
        steps.append("write")
    if guard:
        steps.append("guard")
    if evaluate:
        steps.append("evaluate")
    return tuple(steps)


GPTQ_FAMILY = ("gptq", "npft+gptq", "owq")


def plan_guard(calib: CalibSettings, settings: ConvertSettings, source: Source):
    """(guard, calibration settings, notes): the end of the calibration text is held back from
    calibration, the imatrix and the tuning, for the guard (validate/guard.py) to measure the tuned
    file against its peer on; no guard where there is no text to hold back, or too little of it."""
    from .calib import holdout_text
    from .validate.guard import HOLDOUT

    if calib.calib == "self":
        return None, calib, ("guard: off (--calib self has no text to hold back); the tuned file is written unchecked",)
    held = replace(calib, holdout=HOLDOUT)
    text = holdout_text(held)
    ctx = guard_context(settings.ctx, source)
    n = count_tokens(text, source) // ctx
    if n < 1:
        return None, calib, (f"guard: off (the last {HOLDOUT:.0%} of the calibration text holds less than one "
                             f"{ctx}-token window); the tuned file is written unchecked",)
    return (text, min(n, settings.guard_chunks), ctx), held, ()


def convert(spec: str, out: Path, settings: ConvertSettings, calib: CalibSettings, npft: NPFTSettings,
            device: str = "auto", run_dir: Path | None = None, force: bool = False, resume: bool = False,
            progress: bool = True, log=print, notice: str | None = None) -> dict:
    """Write OUT.gguf by `settings.method` and evaluate it beside plain RTN and the float model."""
    plan = plan_convert(spec, out, settings, calib, npft, device, run_dir, force, resume)
    if distributed.active() and "tune" not in plan.steps:  # only the tuning is shared out over processes
        raise UsageError(f"--method {plan.settings.method} does no tuning, which is all that runs on several processes: "
                         "start it without torchrun / accelerate launch")
    check_fits(plan, log=log)
    return run_convert(plan, force, resume, progress, log, notice)


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after the output was written (in the guard or the closing evaluation): the
    output is complete, its report is not written; `unchecked`: the guard had not decided yet."""

    def __init__(self, out: Path, unchecked: bool = False):
        super().__init__(str(out))
        self.out, self.unchecked = out, unchecked


@dataclass
class RunState:
    """What the steps of a run hand on to the ones after them."""

    record: dict
    tokens: object = None          # calibration segments
    model: object = None           # the model in torch (loaded, tuned and merged, or quantized)
    imatrix: Path | None = None    # the run's importance matrix file
    extra: tuple[Path, ...] = ()   # files the closing comparison adds (the tuned file the guard set aside)


@dataclass(frozen=True)
class RunOptions:
    force: bool = False
    resume: bool = False
    progress: bool = True
    log: object = print
    notice: str | None = None


def run_convert(plan: Plan, force: bool = False, resume: bool = False, progress: bool = True, log=print,
                notice: str | None = None) -> dict:
    """The work of a checked plan: its steps in order (plan.steps), each measured (wall time, peak
    host and device memory) beside the plan's estimate, then the report."""
    from .stages import measure, stage_report

    opts = RunOptions(force, resume, progress, log, notice)
    for note in plan.notes:
        log(note)
    state = RunState(record={**run_header(plan.spec), "convert": asdict(plan.settings) | {"type": plan.type_name},
                             "fitted_by_plan": plan.fitted or {}}, tokens=plan.tokens)
    measured = {}
    for step in plan.steps:
        with measure(plan.device) as measured[step]:
            STEPS[step](plan, state, opts)
        if step == "tune" and not distributed.is_main():  # several processes: what follows the tuning is rank 0's
            return state.record
    state.record["stages"] = stage_report(plan, measured)
    write_run_report(state.record, plan)
    return state.record


def step_imatrix(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """On the float model, before any tuning (imatrix.calibration_imatrix)."""
    from .imatrix import calibration_imatrix

    state.imatrix, state.record["imatrix"] = calibration_imatrix(plan, opts.progress, opts.log)


def step_source(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """The model on its device, in plan.load_dtype (CUDA tuning: bf16 base weights; the adapters train
    in fp32; GPTQ/OWQ want float32 Hessians)."""
    import torch

    shard = plan.npft is not None and plan.npft.shard  # rank 0 alone reads the weights; FSDP2 hands out the shards
    state.model = distributed.load(plan.source, getattr(torch, plan.load_dtype), plan.device, shard)


def step_calibration(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """The tokens the plan read, or (--calib self) a sample of the loaded model."""
    if state.tokens is None:
        state.tokens = distributed.from_main(load_calibration, plan.calib, plan.source.tokenizer(), model=state.model,
                                             progress=opts.progress)
    opts.log(f"calibration: {state.tokens.shape[0]} x {state.tokens.shape[1]} tokens from {plan.calib.calib}")
    if opts.notice:
        opts.log(opts.notice)


def step_tune(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """Sensitivity, trace, LoRA under noise and the merge (npft.tune). The export reads the merged
    model tensor by tensor (ModelSource.load, to the CPU) in its own dtype; a float32 copy of the
    whole model on the tuning device is made only for the quantizers that work on it in torch."""
    clear_run_dir(plan.run_dir, opts.force, opts.resume)
    result = tune(state.model, state.tokens, plan.npft, plan.run_dir, resume=opts.resume, progress=opts.progress,
                  log=opts.log, source=plan.made_from)
    state.record.update(run_record(plan.spec, plan.calib, result))
    state.model = result.model if plan.quantizer is None or result.model is None else result.model.float()  # None: not rank 0


def step_quantize(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """GPTQ/OWQ, or a simulated per-channel quantizer, in place."""
    settings = plan.settings
    if plan.quantizer == "simulated":
        from .methods.simulate import fake_quantize_minmax_

        q = settings.simulated
        state.record["quantizer"] = fake_quantize_minmax_(state.model, q.bits, q.group)
    else:
        state.record["quantizer"] = apply_gptq_family(state.model, state.tokens, settings, plan.type_name, opts.progress,
                                                      opts.log)
    if plan.torch_eval:
        from .methods.owq import OWQ_WARNING

        opts.log("note: " + (OWQ_WARNING if plan.quantizer == "owq" else
                             f"{plan.type_name} is a simulated per-channel quantizer with no GGUF form; nothing is written, "
                             "the model is evaluated in torch"))


def step_write(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """Quantize onto the GGUF grid and write OUT: straight from the source (plain RTN), or from the
    model in memory with what made it in the file's provenance."""
    from .writer import ExportSettings, export

    settings, out, type_name = plan.settings, plan.out, plan.type_name
    if state.model is None:
        report = export(plan.source, out, ExportSettings(type=type_name), force=opts.force, progress=opts.progress)
    else:
        provenance = {"method": settings.method, "calibration": asdict(plan.calib)}
        if plan.npft is not None:
            provenance["npft"] = plan.npft.as_dict()
        if "quantizer" in state.record:
            provenance["quantizer"] = {k: v for k, v in state.record["quantizer"].items() if k != "linears"}
        if state.imatrix is not None:
            provenance["imatrix"] = state.record["imatrix"]
        tuned = ModelSource(plan.source, state.model, settings.method)
        report = export(tuned, out, ExportSettings(type=type_name, imatrix=str(state.imatrix) if state.imatrix else None),
                        force=opts.force, provenance=provenance, progress=opts.progress)
        state.model = tuned = None  # written: the evaluation needs the memory more
    state.record["output"] = report.__dict__
    opts.log(f"wrote {out}: {report.size_bytes / 1e6:.1f} MB ({type_name}, method {settings.method})")


def step_guard(plan: Plan, state: RunState, opts: RunOptions) -> None:
    if plan.settings.eval_gpu_layers:
        free_gpu_for_llamacpp()
    try:
        guard = state.record["guard"] = guard_output(plan, state.imatrix, opts.progress, opts.log)
    except KeyboardInterrupt:
        raise InterruptedAfterWriting(plan.out, unchecked=True) from None
    state.extra = (Path(guard["tuned_file"]),) if guard["written"] == "peer" else ()


def step_evaluate(plan: Plan, state: RunState, opts: RunOptions) -> None:
    """In torch where nothing GGUF was written, else in llama.cpp beside the baselines."""
    settings = plan.settings
    if plan.torch_eval:
        state.record["comparison"] = evaluate_in_torch(plan.source, state.model, f"{settings.method} {plan.type_name}",
                                                       settings, plan.eval_text, opts.progress)
        return
    if settings.eval_gpu_layers:
        free_gpu_for_llamacpp()
    try:
        state.record["comparison"] = evaluate_beside_baselines(
            plan.source, plan.out, plan.type_name, settings, plan.run_dir, plan.eval_text, opts.progress, opts.log,
            imatrix=state.record.get("imatrix", {}).get("file"), extra=state.extra)
    except KeyboardInterrupt:
        raise InterruptedAfterWriting(plan.out) from None


STEPS = {"imatrix": step_imatrix, "source": step_source, "calibration": step_calibration, "tune": step_tune,
         "quantize": step_quantize, "write": step_write, "guard": step_guard, "evaluate": step_evaluate}


def write_run_report(record: dict, plan: Plan) -> None:
    """report.json and report.md in the run directory: the evaluation, what quantized the file and
    whether the guard kept it, and each stage's measured cost beside the plan's."""
    from .stages import report_markdown

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    if "guard" in record:
        from .validate.guard import note

        parts.append(note(record["guard"]))
    if "imatrix" in record:
        from .imatrix import imatrix_note

        parts.append(imatrix_note(record["imatrix"]))
    if record.get("comparison", {}).get("markdown"):
        parts.append(record["comparison"]["markdown"])
    parts.append(report_markdown(record["stages"]))
    write_report(record | {"evaluation": "\n".join(parts)}, plan.run_dir)


def check_fits(plan: Plan, machine=None, log=print):
    """The run's stages against this machine (or `machine`): refused, naming the stage that cannot
    fit and the option that makes it fit, before anything is loaded, where a stage needs more than
    the estimates' uncertainty (stages.MARGIN) above what there is; within it, a warning. Returns
    the verdict."""
    from .stages import refusal, this_machine, verdict

    if machine is None:
        machine = this_machine(plan.device, plan.out.parent, plan.settings.threads)
    result = verdict(plan, machine)
    plan.stages = result.stages
    if result.certain:
        raise UsageError(refusal(result))
    for problem in result.problems:
        log(f"warning: may not fit: {problem}")
    return result


def guard_output(plan: Plan, imatrix: Path | None, progress: bool, log) -> dict:
    """Never farther than the peer (validate/guard.py): the written file and the peer's against the
    float model on the held-back calibration text; where the tuned file is not closer (and not
    --keep-tuned), it moves to <run dir>/npft-TYPE.gguf and OUT becomes the peer's file."""
    import shutil

    from .atomic import atomic_output
    from .validate.guard import judge

    out, run_dir, settings = plan.out, plan.run_dir, plan.settings
    text, chunks, ctx = plan.guard
    ref = reference_file(plan.source, run_dir, log, progress)
    peer, label = peer_file(plan.source, run_dir, plan.type_name, log, progress, str(imatrix) if imatrix else None)
    log(f"guard: {out.name} beside {peer.name} on the held-back end of the calibration text ({chunks} x {ctx} tokens)")
    verdict = judge(out, peer, label, ref, text, ctx, chunks, settings.threads, progress, settings.eval_gpu_layers or 0)
    record = verdict.as_dict() | {"peer_file": str(peer), "written": "tuned"}
    if verdict.tuned_closer:
        log(f"guard: the tuned file is closer to the float model; {verdict.sentence()}")
        return record
    if settings.keep_tuned:
        log(f"guard: the tuned file is NOT closer to the float model ({verdict.sentence()}); kept, as --keep-tuned asks")
        return record
    kept = run_dir / f"npft-{plan.type_name}.gguf"
    shutil.move(out, kept)
    with atomic_output(out, force=True) as tmp:
        shutil.copyfile(peer, tmp)
    log(f"guard: the tuned file is NOT closer to the float model ({verdict.sentence()}), so {out} is {label} "
        f"instead; the tuned file is kept as {kept} (--keep-tuned writes it)")
    return record | {"written": "peer", "tuned_file": str(kept)}


def gptq_settings(settings: ConvertSettings, type_name: str):
    from .methods import GPTQSettings

    return GPTQSettings(target=type_name, act_order=settings.act_order)


def apply_gptq_family(model, tokens, settings: ConvertSettings, type_name: str, progress: bool, log) -> dict:
    """GPTQ (onto the GGUF grid or the simulated quantizer) or OWQ, in place; returns its summary."""
    from .methods import OWQSettings, gptq_model_, owq_model_

    g = gptq_settings(settings, type_name)
    log(f"{settings.method}: layer by layer on {tokens.shape[0]} x {tokens.shape[1]} calibration tokens")
    if settings.method == "owq":
        from .methods.owq import mean_bits

        rep = owq_model_(model, tokens, OWQSettings(gptq=g, weak_fraction=settings.owq_fraction), progress=progress)
        return {"method": "owq", "target": type_name, "weak_fraction": settings.owq_fraction, "bits_per_weight": mean_bits(rep),
                "seconds": rep.seconds}
    rep = gptq_model_(model, tokens, g, progress=progress)
    return {"method": "gptq", "target": type_name, "act_order": settings.act_order, "seconds": rep.seconds}


def evaluate_in_torch(source: Source, model, label: str, settings: ConvertSettings, text: tuple[str, str],
                      progress: bool) -> dict:
    """Simulated quantizers: the same perplexity/KLD protocol in torch, against the float model."""
    import torch

    from .validate.models import TorchBackend
    from .validate.perplexity import EvalSettings, evaluate

    text_name, body = text
    es = EvalSettings(ctx=settings.ctx, chunks=settings.chunks)
    dev = str(next(model.parameters()).device)
    tok = source.tokenizer()
    ref = TorchBackend(source.load_model(dtype=torch.float32, device=dev), tok, label="float (torch)", device=dev)
    ref_r = evaluate(ref, body, text_name, es, progress=progress)
    r = evaluate(TorchBackend(model.eval(), tok, label=label, device=dev), body, text_name, es, ref=ref, progress=progress)
    rows = [("float (torch)", ref_r.ppl, ref_r.ppl_se, 0.0, 100.0), (label, r.ppl, r.ppl_se, r.kld["mean"], r.kld["same_top1_pct"])]
    md = ["| model | PPL | delta-PPL % | mean KLD | same top-1 % |", "|---|---|---|---|---|"]
    md += [f"| {n} | {p:.4f} ± {se:.4f} | {100 * (p / ref_r.ppl - 1):+.2f} | {k:.5f} | {t:.2f} |" for n, p, se, k, t in rows]
    md = f"torch, {text_name}, ctx {settings.ctx}, {r.chunks} chunks\n\n" + "\n".join(md) + "\n"
    return {"backend": "torch", "rows": [dict(zip(("model", "ppl", "ppl_se", "kld_mean", "same_top1_pct"), x)) for x in rows],
            "ppl_float": ref_r.ppl, "ppl": r.ppl, "kld": r.kld, "chunks": r.chunks, "markdown": md}


def comparison_file(source: Source, run_dir: Path, name: str, t: str, log, progress: bool, imatrix: str | None = None,
                    llamacpp: bool = False) -> Path:
    """<run dir>/NAME: the untuned source written as `t` (with `imatrix`; by llama.cpp's own
    quantizer where `llamacpp`), for comparison. Reused only when made from this source, with these
    settings and this imatrix's bytes (writer.written_as), else (re)made."""
    from .fingerprint import file_digest, source_fingerprint
    from .writer import ExportSettings, export, written_as

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    made_from = {"source": source_fingerprint(source)}
    if imatrix:
        made_from["imatrix_digest"] = file_digest(Path(imatrix))
    if llamacpp:  # written from an F32 export, whose keys llama_model_quantize keeps: the type goes in the record
        made_from["llama.cpp"] = t
    if written_as(path, ExportSettings(type="f32" if llamacpp else t, imatrix=None if llamacpp else imatrix), made_from):
        return path
    what = f"untuned {t}" + (" with the same imatrix" if imatrix else "") + (", llama.cpp's quantizer" if llamacpp else "")
    log(f"{'remaking' if path.exists() else 'writing'} {path.name} ({what}, for comparison)"
        + (": the one there was made from another model, version, imatrix or settings" if path.exists() else ""))
    if llamacpp:
        from .methods.llamacpp_quant import export_llamacpp

        export_llamacpp(source, path, t, force=True, progress=progress, imatrix=Path(imatrix) if imatrix else None,
                        provenance_extra=made_from)
    else:
        export(source, path, ExportSettings(type=t, imatrix=imatrix), force=True, provenance=made_from, progress=progress)
    return path


def reference_file(source: Source, run_dir: Path, log, progress: bool) -> Path:
    """The float model as GGUF (F32; F16 from 2B parameters on), the reference every KLD is against."""
    n_params = sum(math.prod(s) for s in source.shapes().values())
    ref_type = "f32" if n_params < 2e9 else "f16"
    return comparison_file(source, run_dir, f"float-{ref_type}.gguf", ref_type, log, progress)


def peer_file(source: Source, run_dir: Path, type_name: str, log, progress: bool, imatrix: str | None) -> tuple[Path, str]:
    """What the user would get without the tuning, in the same type: llama.cpp's quantization of the
    untuned model (with the run's imatrix where the method has one; `export --imatrix` is byte-identical
    to llama-quantize --imatrix), and its label."""
    if imatrix:
        return (comparison_file(source, run_dir, f"imatrix-{type_name}.gguf", type_name, log, progress, imatrix),
                f"llama.cpp's {type_name} of the untuned model with the same imatrix")
    return comparison_file(source, run_dir, f"rtn-{type_name}.gguf", type_name, log, progress), f"untuned {type_name}"


def same_size_peers(source: Source, run_dir: Path, type_name: str, log, progress: bool, imatrix: str | None) -> list[Path]:
    """The files of about the same size llama.cpp makes of the untuned model (choices.PEERS: for Q4_0,
    IQ4_NL and Q4_K_M), with the run's imatrix where there is one, so the user sees the trade."""
    from .choices import FILE_TYPES, PEERS

    out = []
    for t in PEERS.get(type_name, ()):
        ours = FILE_TYPES[t].written  # our writer's bytes are llama-quantize's (grids/mix.py); else llama.cpp's own
        name = f"peer-{t}{'-imatrix' if imatrix else ''}.gguf"
        out.append(comparison_file(source, run_dir, name, t, log, progress, imatrix, llamacpp=not ours))
    return out


def evaluate_beside_baselines(source: Source, out: Path, type_name: str, settings: ConvertSettings, run_dir: Path,
                              text: tuple[str, str], progress: bool, log, imatrix: str | None = None,
                              extra: tuple[Path, ...] = ()) -> dict:
    """PPL and KLD of OUT beside plain RTN of the untuned source (and, with an imatrix, llama.cpp's
    imatrix quantization of the untuned source with the same imatrix), the same-size files llama.cpp
    makes (settings.peers) and `extra` files, against the float model, in llama.cpp."""
    from .validate.compare import compare, markdown
    from .validate.perplexity import EvalSettings

    text_name, body = text
    run_dir.mkdir(parents=True, exist_ok=True)
    ref = reference_file(source, run_dir, log, progress)
    files = [out]
    if settings.method != "rtn":
        files = [comparison_file(source, run_dir, f"rtn-{type_name}.gguf", type_name, log, progress)]
        if imatrix and settings.method == "npft+imatrix":
            files.append(peer_file(source, run_dir, type_name, log, progress, imatrix)[0])
        files += [*extra, out]
    if settings.peers:
        files += same_size_peers(source, run_dir, type_name, log, progress, imatrix)
    report = compare(files, ref, body, text_name, EvalSettings(ctx=settings.ctx, chunks=settings.chunks), None,
                     settings.threads, progress=progress, n_gpu_layers=settings.eval_gpu_layers or 0, log=log)
    report["markdown"] = markdown(report)
    return report
