"""The one-command pipeline and its first half on its own.

    convert:  source -> calibration -> NPFT tuning -> merge -> RTN onto a GGUF grid -> GGUF
              -> llama.cpp evaluation beside plain RTN and the float model
    finetune: source -> calibration -> NPFT tuning -> merge -> Hugging Face checkpoint

Both keep their working state (epoch checkpoints, reference files) in a run directory, so an
interrupted run continues with --resume and a repeated evaluation reuses what it already wrote.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .calib import CalibSettings, load_calibration
from .errors import UsageError
from .npft import NPFTSettings, tune
from .npft.report import write_report
from .sources import ModelSource, Source, open_source

BITS = {2: ("q2_k",), 3: ("q3_k",), 4: ("q4_0",), 5: ("q5_0",), 6: ("q6_k", "q8_0"), 8: ("q8_0",)}
METHODS = ("npft", "rtn", "gptq", "npft+gptq", "owq")


@dataclass(frozen=True)
class ConvertSettings:
    bits: int = 4
    type: str | None = None
    method: str = "npft"
    eval_text: str = "wikitext2"  # or "none"
    ctx: int = 512
    chunks: int | None = None
    threads: int | None = None
    act_order: bool = True         # GPTQ/OWQ (see methods/gptq.py)
    owq_fraction: float = 0.01     # OWQ: weak columns kept in fp16, per linear

    @property
    def simulated(self):
        """A per-channel min-max quantizer ('rtn4', 'rtn3', 'rtn4g128'): torch only, no GGUF."""
        from .methods.simulate import parse_simulated

        return parse_simulated(self.type) if self.type else None


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


def calibrated_model(source: Source, calib: CalibSettings, device: str, progress: bool, log, notice: str | None = None,
                     dtype=None):
    """The model on its device (CUDA: bf16 base weights; the adapters train in fp32) and its
    calibration tokens."""
    import torch

    dev = resolve_device(device)
    model = source.load_model(dtype=dtype or (torch.bfloat16 if dev == "cuda" else torch.float32), device=dev)
    tokens = load_calibration(calib, source.tokenizer(), model=model, progress=progress)
    log(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens from {calib.calib}")
    if notice:
        log(notice)
    return model, tokens


def tuned_model(source: Source, calib: CalibSettings, npft: NPFTSettings, device: str, run_dir: Path,
                resume: bool, progress: bool, log, notice: str | None = None):
    """Load, calibrate, tune and merge; returns the tuning result and the calibration tokens."""
    model, tokens = calibrated_model(source, calib, device, progress, log, notice)
    return tune(model, tokens, npft, run_dir, resume=resume, progress=progress, log=log), tokens


def check_run_dir(run_dir: Path, force: bool, resume: bool):
    """A run directory with a checkpoint is only reused with --resume, or cleared with --force."""
    from .npft.train import CHECKPOINT

    if (run_dir / CHECKPOINT).exists() and not resume:
        if not force:
            raise UsageError(f"{run_dir} holds an unfinished or earlier run; pass --resume to continue it or --force to start over")
        (run_dir / CHECKPOINT).unlink()


def finetune(spec: str, out_dir: Path, calib: CalibSettings, npft: NPFTSettings, device: str = "auto",
             force: bool = False, resume: bool = False, progress: bool = True, log=print, notice: str | None = None) -> dict:
    """Tune SOURCE with NPFT and save the merged model as a Hugging Face checkpoint in `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not force:
        raise UsageError(f"{out_dir} already holds a model; pass --force to overwrite it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file; give a directory for the checkpoint")
    run_dir = out_dir / "npft-run"
    check_run_dir(run_dir, force, resume)
    source = open_source(spec)
    result, _ = tuned_model(source, calib, npft, device, run_dir, resume, progress, log, notice)
    save_checkpoint(result.model, source.tokenizer(), out_dir)
    report = run_record(spec, calib, result)
    write_report(report, out_dir)
    return {"output": str(out_dir), **report}


def save_checkpoint(model, tokenizer, out_dir: Path):
    """save_pretrained into a scratch folder, then move files in; config.json last, so a folder
    with a config.json is a complete model."""
    from transformers.utils import logging as hf_logging

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its one-shard "Writing model shards" bar only adds noise to our log
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        for f in files:
            os.replace(f, out_dir / f.name)
    finally:
        if bars_were_on:  # give back the caller's setting, not ours
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)


def run_header(spec: str) -> dict:
    from .validate.compare import machine_label

    return {"source": spec, "version": __version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_label()}


def run_record(spec: str, calib: CalibSettings, result) -> dict:
    return {**run_header(spec), "calibration": asdict(calib), "tune": result.as_dict()}


def convert(spec: str, out: Path, settings: ConvertSettings, calib: CalibSettings, npft: NPFTSettings,
            device: str = "auto", run_dir: Path | None = None, force: bool = False, resume: bool = False,
            progress: bool = True, log=print, notice: str | None = None) -> dict:
    """Write OUT.gguf by `settings.method` and evaluate it beside plain RTN and the float model."""
    from .atomic import check_target
    from .writer import ExportSettings, export

    out = Path(out)
    if settings.method not in METHODS:
        raise UsageError(f"--method {settings.method!r}: choose one of {', '.join(METHODS)}")
    check_target(out, force)
    run_dir = Path(run_dir) if run_dir else out.with_name(out.stem + ".npft-run")
    if "npft" in settings.method:
        check_run_dir(run_dir, force, resume)
    source = open_source(spec)
    type_name = (settings.type or type_for_bits(settings.bits, source)).lower()
    if not settings.simulated:
        from .grids import get_grid

        get_grid(type_name)
    record: dict = {**run_header(spec), "convert": asdict(settings) | {"type": type_name}}
    if settings.method == "rtn" and not settings.simulated:
        report = export(source, out, ExportSettings(type=type_name), force=force, progress=progress)
        record["output"] = report.__dict__
        log(f"wrote {out}: {report.size_bytes / 1e6:.1f} MB ({type_name}, method rtn)")
    else:
        import torch

        if "npft" in settings.method:
            result, tokens = tuned_model(source, calib, npft, device, run_dir, resume, progress, log, notice)
            record.update(run_record(spec, calib, result))
            model = result.model.float()
        elif settings.method == "rtn":  # a simulated RTN needs no calibration text
            model = source.load_model(dtype=torch.float32, device=resolve_device(device))
        else:  # GPTQ/OWQ want float32 Hessians
            model, tokens = calibrated_model(source, calib, device, progress, log, notice, dtype=torch.float32)
        if settings.method in ("gptq", "npft+gptq", "owq"):
            record["quantizer"] = apply_gptq_family(model, tokens, settings, type_name, progress, log)
        elif settings.simulated:
            from .methods.simulate import fake_quantize_minmax_

            q = settings.simulated
            record["quantizer"] = fake_quantize_minmax_(model, q.bits, q.group)
        if settings.simulated or settings.method == "owq":
            from .methods.owq import OWQ_WARNING

            log("note: " + (OWQ_WARNING if settings.method == "owq" else
                            f"{type_name} is a simulated per-channel quantizer with no GGUF form; nothing is written, "
                            "the model is evaluated in torch"))
            if settings.eval_text != "none":
                record["comparison"] = evaluate_in_torch(source, model, f"{settings.method} {type_name}", settings, progress)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_report(record | {"evaluation": record.get("comparison", {}).get("markdown")}, run_dir)
            return record
        provenance = {"method": settings.method, "calibration": asdict(calib)}
        if "npft" in settings.method:
            provenance["npft"] = npft.as_dict()
        if "quantizer" in record:
            provenance["quantizer"] = {k: v for k, v in record["quantizer"].items() if k != "linears"}
        tuned = ModelSource(source, model, settings.method)
        report = export(tuned, out, ExportSettings(type=type_name), force=force, provenance=provenance, progress=progress)
        record["output"] = report.__dict__
        log(f"wrote {out}: {report.size_bytes / 1e6:.1f} MB ({type_name}, method {settings.method})")
    if settings.eval_text != "none":
        record["comparison"] = evaluate_beside_baselines(source, out, type_name, settings, run_dir, progress, log)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_report(record | {"evaluation": record.get("comparison", {}).get("markdown")}, run_dir)
    return record


def apply_gptq_family(model, tokens, settings: ConvertSettings, type_name: str, progress: bool, log) -> dict:
    """GPTQ (onto the GGUF grid or the simulated quantizer) or OWQ, in place; returns its summary."""
    from .methods import GPTQSettings, OWQSettings, gptq_model_, owq_model_

    g = GPTQSettings(target=type_name, act_order=settings.act_order)
    g.quantizer()  # an unsupported target fails before any work
    log(f"{settings.method}: layer by layer on {tokens.shape[0]} x {tokens.shape[1]} calibration tokens")
    if settings.method == "owq":
        from .methods.owq import mean_bits

        rep = owq_model_(model, tokens, OWQSettings(gptq=g, weak_fraction=settings.owq_fraction), progress=progress)
        return {"method": "owq", "target": type_name, "weak_fraction": settings.owq_fraction, "bits_per_weight": mean_bits(rep),
                "seconds": rep.seconds}
    rep = gptq_model_(model, tokens, g, progress=progress)
    return {"method": "gptq", "target": type_name, "act_order": settings.act_order, "seconds": rep.seconds}


def evaluate_in_torch(source: Source, model, label: str, settings: ConvertSettings, progress: bool) -> dict:
    """Simulated quantizers: the same perplexity/KLD protocol in torch, against the float model."""
    import torch

    from .texts import load_text
    from .validate.models import TorchBackend
    from .validate.perplexity import EvalSettings, evaluate

    text_name, body = load_text(settings.eval_text)
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


def evaluate_beside_baselines(source: Source, out: Path, type_name: str, settings: ConvertSettings, run_dir: Path,
                              progress: bool, log) -> dict:
    """PPL and KLD of OUT beside plain RTN of the untuned source, against the float model, in llama.cpp."""
    from .texts import load_text
    from .validate.compare import compare, markdown
    from .validate.perplexity import EvalSettings
    from .writer import ExportSettings, export

    text_name, body = load_text(settings.eval_text)
    run_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(math.prod(s) for s in source.shapes().values())
    ref_type = "f32" if n_params < 2e9 else "f16"
    ref = run_dir / f"float-{ref_type}.gguf"
    files = [out]
    wanted = [(ref, ref_type)]
    if settings.method != "rtn":
        rtn = run_dir / f"rtn-{type_name}.gguf"
        wanted.append((rtn, type_name))
        files = [rtn, out]
    for path, t in wanted:
        if not path.exists():
            log(f"writing {path.name} (untuned {t}, for comparison)")
            export(source, path, ExportSettings(type=t), progress=progress)
    report = compare(files, ref, body, text_name, EvalSettings(ctx=settings.ctx, chunks=settings.chunks), None,
                     settings.threads, progress=progress)
    report["markdown"] = markdown(report)
    return report
