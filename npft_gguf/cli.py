"""The `npft-gguf` command line: parse, call one stage function, print. Errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import NpftError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# llama.cpp's own file types beside ours, for `export --quantizer llama.cpp` (methods/llamacpp_quant.py)
LLAMACPP_ONLY = ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "iq4_xs",
                 "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")
EXPORT_TYPES = TYPES + LLAMACPP_ONLY
SOURCE_HELP = "SOURCE is a hub id (meta-llama/Llama-2-7b-hf), a Hugging Face directory, a .gguf file, or the demo 'smollm2-135m'."


class Cli(click.Group):
    """Turns every failure into `error: <one line>` and an exit code: 2 usage, 1 runtime."""

    def main(self, *args, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted; nothing was written", 1)
        except click.ClickException as e:
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see `{ctx.command_path} --help`)"
            _fail(e.format_message() + hint, e.exit_code)
        except NpftError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 1)
        except BrokenPipeError:
            sys.exit(1)


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _emit(data: dict, as_json: bool, text: str):
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="npft-gguf")
def main():
    """Make a causal LM robust to round-to-nearest (NPFT), write it as GGUF, and check it in llama.cpp.

    \b
    Examples:
      npft-gguf export smollm2-135m -o smol-q4_0.gguf --type q4_0
      npft-gguf inspect smol-q4_0.gguf --json
      npft-gguf eval smol-q4_0.gguf --ref smol-f32.gguf --chunks 40
      npft-gguf bench smol-q4_0.gguf
    """


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
@click.option("--type", "type_", default="q4_0", show_default=True, type=click.Choice(EXPORT_TYPES, case_sensitive=False),
              help="Tensor type for the 2-D weights (RTN), or with --quantizer llama.cpp one of llama.cpp's file types "
                   "(q4_k_m, q4_k_s, q5_k_m, q3_k_m, q2_k, q6_k, iq4_nl, iq4_xs, q4_0, ...). Norms stay f32.")
@click.option("--quantizer", default="rtn", show_default=True, type=click.Choice(["rtn", "llama.cpp"]),
              help="rtn: ours, round-to-nearest by ggml's rules; llama.cpp: our f32 export, then llama_model_quantize (no imatrix).")
@click.option("--pure", is_flag=True, help="One type everywhere (no q6_k/q8_0 output matrix), as llama-quantize --pure.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(source, output, type_, quantizer, pure, force, as_json):
    """Convert SOURCE to a GGUF file with plain round-to-nearest quantization (or llama.cpp's quantizer).

    \b
    SOURCE is a hub id (meta-llama/Llama-2-7b-hf), a Hugging Face directory,
    a .gguf file, or the demo 'smollm2-135m'. Tensors are streamed one at a
    time; the output appears only when complete.

    \b
    Examples:
      npft-gguf export smollm2-135m -o smol-f32.gguf --type f32
      npft-gguf export ./Llama-2-7b-hf -o llama2-q4_0.gguf --type q4_0
      npft-gguf export model.gguf -o model-q8.gguf --type q8_0 --pure --force
      npft-gguf export smollm2-135m -o smol-q4_k_m.gguf --quantizer llama.cpp --type q4_k_m
    """
    from .atomic import check_target
    from .errors import UsageError
    from .sources import open_source

    if quantizer == "rtn" and type_.lower() not in TYPES:
        raise UsageError(f"--type {type_} is one of llama.cpp's mixes; pass --quantizer llama.cpp, or choose one of: {', '.join(TYPES)}")
    check_target(output, force)
    src = open_source(source)  # bad sources fail here, before torch is imported
    if quantizer == "llama.cpp":
        from .methods.llamacpp_quant import export_llamacpp

        report = export_llamacpp(src, output, type_, pure=pure, force=force)
    else:
        from .writer import ExportSettings
        from .writer import export as run_export

        report = run_export(src, output, ExportSettings(type=type_.lower(), pure=pure), force=force)
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items()))
    _emit(report.__dict__, as_json, f"wrote {report.path}: {report.size_bytes / 1e6:.1f} MB, {report.n_tensors} tensors ({mix})")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(file, as_json):
    """Summarise a GGUF FILE: architecture, tensor types, size, bits/weight, tokenizer, provenance.

    \b
    Example:
      npft-gguf inspect smol-q4_0.gguf --json
    """
    from .errors import UsageError
    from .inspect import format_text
    from .inspect import inspect as run_inspect

    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    info = run_inspect(file)
    _emit(info, as_json, format_text(info))


def _write_json(path: Path | None, data: dict):
    if path is None:
        return
    from .atomic import atomic_output

    with atomic_output(Path(path), force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def _backend(model: str, ctx: int, threads, n_gpu_layers: int, flash_attn: bool, fake_quant, device: str):
    """A GGUF file runs in llama.cpp; any other SOURCE runs in torch (optionally fake-quantized)."""
    from .validate.models import LlamaCppBackend, TorchBackend, fake_quantize_

    if model.endswith(".gguf") and Path(model).exists():
        if fake_quant:
            raise click.UsageError("--fake-quant applies to float models run in torch, not to GGUF files")
        return LlamaCppBackend(Path(model), ctx, threads, n_gpu_layers, flash_attn)
    if model.endswith(".gguf"):
        from .errors import UsageError

        raise UsageError(f"{model}: no such file")
    import torch

    from .sources import open_source

    src = open_source(model)
    if threads:
        torch.set_num_threads(threads)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    m = src.load_model(dtype=torch.float32, device=dev)
    extra = fake_quantize_(m, fake_quant) if fake_quant else {}
    return TorchBackend(m, src.tokenizer(), label=model + (f" (fake {fake_quant})" if fake_quant else ""), device=dev, settings=extra)


@main.command(name="eval")
@click.argument("model")
@click.option("--text", default="wikitext2", show_default=True, help="wikitext2, c4, or a UTF-8 text file.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Context (window) length.")
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--ref", "ref", help="Reference model (GGUF or SOURCE) for KL divergence on the same tokens.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores of this process).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int, help="Layers to offload to the GPU (llama.cpp).")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--fake-quant", type=click.Choice(TYPES, case_sensitive=False), help="torch only: RTN-simulate this grid on the decoder's linear weights.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="torch only.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the result as JSON here.")
def eval_(model, text, ctx, chunks, ref, threads, n_gpu_layers, flash_attn, fake_quant, device, json_out):
    """Perplexity of MODEL by llama-perplexity's protocol, and KL divergence against --ref.

    \b
    MODEL is a .gguf file (run by llama.cpp) or any SOURCE (run by torch, float
    or --fake-quant), so all numbers share one scale: non-overlapping windows of
    --ctx tokens, second half scored, BOS first when the vocabulary adds it.

    \b
    Examples:
      npft-gguf eval smol-q4_0.gguf --chunks 40
      npft-gguf eval smol-q4_0.gguf --ref smol-f32.gguf --chunks 40 --json q4.json
      npft-gguf eval smollm2-135m --fake-quant q4_0 --chunks 40
    """
    from .texts import load_text
    from .validate.perplexity import EvalSettings, evaluate, format_text

    text_name, body = load_text(text)
    backend = _backend(model, ctx, threads, n_gpu_layers, flash_attn, fake_quant, device)
    ref_backend = _backend(ref, ctx, threads, n_gpu_layers, flash_attn, None, device) if ref else None
    result = evaluate(backend, body, text_name, EvalSettings(ctx=ctx, chunks=chunks), ref=ref_backend)
    click.echo(format_text(result))
    _write_json(json_out, result.as_dict())
    if result.interrupted:
        _fail("interrupted; the figures above cover the chunks measured so far", 1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--pp", default=512, show_default=True, type=click.IntRange(min=0), help="Prompt length for the prompt-processing test (0: skip).")
@click.option("--tg", default=128, show_default=True, type=click.IntRange(min=0), help="Tokens to generate one at a time (0: skip).")
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1), help="Repetitions (after one warm-up).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores of this process).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=int, help="Layers to offload (needs a GPU build of llama-cpp-python).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the result as JSON here.")
def bench(model, pp, tg, reps, threads, n_gpu_layers, json_out):
    """Throughput of a GGUF MODEL in llama.cpp, as llama-bench: pp and tg tokens/s, mean +- sd.

    \b
    Examples:
      npft-gguf bench smol-q4_0.gguf
      npft-gguf bench smol-q4_0.gguf --pp 512 --tg 128 --reps 5 --threads 2 --json b.json
      npft-gguf bench llama2-q4_0.gguf --n-gpu-layers 99
    """
    from .validate.bench import BenchSettings, format_text
    from .validate.bench import bench as run_bench

    result = run_bench(model, BenchSettings(pp=pp, tg=tg, reps=reps, threads=threads, n_gpu_layers=n_gpu_layers))
    click.echo(format_text(result))
    _write_json(json_out, result.summary())
    if result.interrupted:
        _fail("interrupted; the figures above are what was measured", 1)


# --- NPFT: finetune and convert share the calibration and tuning options -----------------------
# The paper's recipe (LLaMA) is the default; `--recipe short` is a few-minute CPU recipe for small
# models (the demo). Options given explicitly win over either recipe.
RECIPES = {
    "paper": dict(calib_samples=128, calib_len=512, epochs=3, lr=5e-5, batch=2, rank=16, alpha=32,
                  fisher_samples=None, max_steps=None, trace_samples=8),
    "short": dict(calib_samples=64, calib_len=256, epochs=2, lr=5e-4, batch=4, rank=16, alpha=32,
                  fisher_samples=16, max_steps=None, trace_samples=2),
}


def npft_options(f):
    opts = [
        click.option("--recipe", type=click.Choice(list(RECIPES)), default="paper", show_default=True,
                     help="paper: the paper's settings (GPU-sized); short: a few minutes on a CPU for small models."),
        click.option("--calib", default="c4", show_default=True,
                     help="Calibration text: wikitext2 (train split), c4, FILE[,FILE...] or self (sampled from the model)."),
        click.option("--calib-samples", type=click.IntRange(min=1), help="Random segments [recipe: 128]."),
        click.option("--calib-len", type=click.IntRange(min=8), help="Tokens per segment [recipe: 512]."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for data, noise, dropout and LoRA init."),
        click.option("--outlier-pct", default=0.05, show_default=True, type=float, help="Outliers per module, percent, by Fisher score."),
        click.option("--fisher-samples", type=click.IntRange(min=1), help="Samples for each Fisher pass [recipe: all]."),
        click.option("--noise", type=click.Choice(["paper", "grid", "rtn", "none"]), default="paper", show_default=True,
                     help="paper: U[min,max] of the row's outliers, mean-subtracted; grid: U[-D/2,D/2] of the target block's step; "
                          "rtn (ours): the exact RTN error of W+BA on every weight, straight-through; none: a plain-LoRA control."),
        click.option("--noise-scope", type=click.Choice(["outliers", "all"]), default="outliers", show_default=True,
                     help="Perturb only the outliers (the method) or every weight (grid noise only)."),
        click.option("--resample", type=click.Choice(["step", "epoch"]), default="step", show_default=True, help="Draw new noise every step or once per epoch."),
        click.option("--clean-weight", default=0.5, show_default=True, type=float, help="lambda in L(W+z+BA) + lambda L(W+BA); 0 drops the clean term."),
        click.option("--rank", type=click.IntRange(min=1), help="LoRA rank [recipe: 16]."),
        click.option("--alpha", type=click.IntRange(min=1), help="LoRA alpha [recipe: 32]."),
        click.option("--dropout", default=0.05, show_default=True, type=float, help="LoRA dropout."),
        click.option("--targets", default="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj", show_default=True, help="LoRA target modules."),
        click.option("--lr", type=float, help="Learning rate (AdamW, linear decay) [recipe: 5e-5]."),
        click.option("--epochs", type=click.IntRange(min=1), help="Epochs [recipe: 3]."),
        click.option("--batch", type=click.IntRange(min=1), help="Batch size [recipe: 2]."),
        click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Gradient accumulation steps."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Stop each epoch after this many optimizer steps."),
        click.option("--trace-samples", type=click.IntRange(min=0), help="Samples for the Hutchinson trace before/after (0: skip) [recipe: 8]."),
        click.option("--trace-probes", default=2, show_default=True, type=click.IntRange(min=1), help="Rademacher probes per trace sample."),
        click.option("--trace-len", type=click.IntRange(min=8), help="Tokens per trace sample [default: --calib-len]."),
        click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory (large models on GPU)."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and llama.cpp."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch checkpoint."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _tuning_settings(kw: dict, grid: str = "q4_0"):
    from .calib import CalibSettings
    from .npft import NPFTSettings

    r = RECIPES[kw["recipe"]]
    pick = lambda k: kw.get(k) if kw.get(k) is not None else r[k]  # noqa: E731
    if kw.get("threads"):
        import torch

        torch.set_num_threads(kw["threads"])
    calib = CalibSettings(calib=kw["calib"], samples=pick("calib_samples"), length=pick("calib_len"), seed=kw["seed"])
    npft = NPFTSettings(
        outlier_pct=kw["outlier_pct"], fisher_samples=pick("fisher_samples"), noise=kw["noise"], noise_scope=kw["noise_scope"],
        grid=grid, resample=kw["resample"], clean_weight=kw["clean_weight"], rank=pick("rank"), alpha=pick("alpha"),
        dropout=kw["dropout"], targets=tuple(t.strip() for t in kw["targets"].split(",") if t.strip()), lr=pick("lr"),
        epochs=pick("epochs"), batch=pick("batch"), grad_accum=kw["grad_accum"], max_steps_per_epoch=pick("max_steps"),
        seed=kw["seed"], gradient_checkpointing=kw["gradient_checkpointing"], trace_samples=pick("trace_samples"),
        trace_probes=kw["trace_probes"], trace_len=kw["trace_len"],
    )
    return calib, npft


def _convert_type(value, hint="'--type'"):
    if value is None or value.lower() in TYPES:
        return value
    from .methods.simulate import parse_simulated

    if parse_simulated(value):
        return value
    raise click.BadParameter(f"{value!r} is neither a GGUF type ({', '.join(TYPES)}) nor a simulated quantizer (rtn3, rtn4, rtn4g128)",
                             param_hint=hint)


SHORT_NOTE = "note: --recipe short is the quick CPU recipe, not the paper's full one (the default, for real models on a GPU)"


def _notice(kw: dict) -> str | None:
    return SHORT_NOTE if kw["recipe"] == "short" else None


def _interrupted_run(run_dir: Path):
    _fail(f"interrupted; epoch checkpoints are in {run_dir}: run the same command with --resume to continue", 1)


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Directory for the merged Hugging Face checkpoint.")
@click.option("--grid", default="q4_0", show_default=True, callback=lambda c, p, v: _convert_type(v, "'--grid'"),
              help="The quantizer the model is tuned for (--noise grid or rtn): a GGUF type (" + " ".join(TYPES) + ") "
                   "or a simulated per-channel rtn3 / rtn4 / rtn4g128.")
@click.option("--force", is_flag=True, help="Overwrite a model in OUTPUT, or start over instead of resuming.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@npft_options
def finetune(source, output, grid, force, as_json, **kw):
    """Tune SOURCE with NPFT and save the merged model as a Hugging Face checkpoint.

    \b
    Fisher outliers per module, LoRA (peft) trained while the outliers are perturbed,
    merged into the clean weights. OUTPUT gets the model, its tokenizer, and
    report.json / report.md (settings, loss curve, outliers, Hessian trace
    before/after, wall time, peak memory); OUTPUT/npft-run holds epoch checkpoints.

    \b
    Examples:
      npft-gguf finetune smollm2-135m -o smol-npft --recipe short --calib wiki.txt
      npft-gguf finetune ./Llama-2-7b-hf -o llama2-npft --calib c4 --device cuda
      npft-gguf finetune ./Llama-2-7b-hf -o llama2-npft --calib c4 --resume
    """
    from .convert import finetune as run_finetune

    calib, npft = _tuning_settings(kw, grid.lower())
    try:
        record = run_finetune(source, output, calib, npft, device=kw["device"], force=force, resume=kw["resume"],
                              log=lambda m: click.echo(m, err=True), notice=_notice(kw))
    except KeyboardInterrupt:
        _interrupted_run(output / "npft-run")
    t = record["tune"]
    b, a = t.get("trace_before"), t.get("trace_after")
    trace = f"; outlier Hessian trace {b['trace']:.4g} -> {a['trace']:.4g}" if b and a else ""
    _emit(record, as_json, f"wrote {output} (merged model, report.md, report.json) in {t['seconds']:.0f} s{trace}")


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="GGUF file to write [default: <name>-<method>-<type>.gguf].")
@click.option("--bits", default=4, show_default=True, type=int, help="Pick the best pure-RTN GGUF type of this width the shapes allow (4 -> q4_0).")
@click.option("--type", "type_", callback=lambda c, p, v: _convert_type(v),
              help="Override --bits: a GGUF type (" + " ".join(TYPES) + "), or a simulated per-channel "
                   "min-max quantizer rtn3 / rtn4 / rtn4g128 (torch only, no GGUF).")
@click.option("--method", default="npft", show_default=True, type=click.Choice(["npft", "rtn", "gptq", "npft+gptq", "owq"]),
              help="npft: tune, merge, then RTN; rtn: RTN only; gptq: GPTQ onto the same grid; npft+gptq: both; "
                   "owq: weak columns in fp16 + GPTQ (simulated in torch: GGUF cannot hold it).")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ/OWQ: quantize columns by decreasing Hessian diagonal (needed on models with massive activations).")
@click.option("--owq-fraction", default=0.01, show_default=True, type=float, help="OWQ: fraction of each linear's input columns kept in fp16.")
@click.option("--eval-text", default="wikitext2", show_default=True, help="Text for the closing evaluation (wikitext2, c4, FILE) or 'none'.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Evaluation context.")
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Checkpoints and comparison files [default: <output stem>.npft-run].")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT, and start over instead of resuming.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@npft_options
def convert(source, output, bits, type_, method, act_order, owq_fraction, eval_text, ctx, chunks, run_dir, force, as_json, **kw):
    """Calibrate, tune (NPFT), merge, quantize (RTN) and write SOURCE as GGUF, then measure it.

    \b
    The closing evaluation runs the new file, plain RTN of the untuned model and
    the float model in llama.cpp (perplexity by llama-perplexity's protocol, KL
    divergence against the float model) and prints them side by side.
    `--recipe short` is the quick CPU recipe (the demo uses it); the default is
    the paper's recipe, meant for real models on a GPU.

    \b
    Examples:
      npft-gguf convert smollm2-135m --bits 4 --recipe short --calib wiki.txt --chunks 40
      npft-gguf convert meta-llama/Llama-2-7b-hf --bits 4 --calib c4 -o llama2-npft-q4_0.gguf
      npft-gguf convert ./model --type q5_0 --noise grid --clean-weight 0
      npft-gguf convert ./model --method rtn --bits 4   # the baseline alone
      npft-gguf convert ./model --method gptq --type q4_0 --calib c4
      npft-gguf convert ./model --method npft --type rtn3   # the paper's 3-bit per-channel RTN, simulated
    """
    from .convert import ConvertSettings
    from .convert import convert as run_convert

    if bits not in (2, 3, 4, 5, 6, 8):
        raise click.UsageError("--bits must be one of 2, 3, 4, 5, 6, 8")
    target = (type_ or "").lower() or None
    if output is None:
        stem = Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"
        output = Path(f"{stem}-{method}-{target or f'{bits}bit'}.gguf")
    calib, npft = _tuning_settings(kw, target or "q4_0")
    settings = ConvertSettings(bits=bits, type=target, method=method, eval_text=eval_text, ctx=ctx, chunks=chunks,
                               threads=kw["threads"], act_order=act_order, owq_fraction=owq_fraction)
    try:
        record = run_convert(source, output, settings, calib, npft, device=kw["device"], run_dir=run_dir, force=force,
                             resume=kw["resume"], log=lambda m: click.echo(m, err=True), notice=_notice(kw))
    except KeyboardInterrupt:
        _interrupted_run(run_dir or output.with_name(output.stem + ".npft-run"))
    cmp = record.get("comparison")
    _emit(record, as_json, cmp["markdown"] if cmp else f"wrote {output}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--ref", "ref", required=True, type=click.Path(path_type=Path), help="Reference GGUF (usually the f32/f16 export).")
@click.option("--text", default="wikitext2", show_default=True, help="wikitext2, c4, or a UTF-8 text file.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8))
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--pp", default=512, show_default=True, type=click.IntRange(min=0))
@click.option("--tg", default=128, show_default=True, type=click.IntRange(min=0))
@click.option("--reps", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--no-bench", is_flag=True, help="Skip the throughput columns.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Markdown report (JSON is written beside it).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG plot of perplexity against size.")
def compare(files, ref, text, ctx, chunks, threads, pp, tg, reps, no_bench, output, plot_path):
    """One table for several GGUF FILES against --ref: size, bits/weight, PPL, KLD, speed.

    \b
    Examples:
      npft-gguf compare q4_0.gguf q8_0.gguf --ref f32.gguf --chunks 40 -o report.md --plot report.png
      npft-gguf compare *.gguf --ref f16.gguf --text my.txt --no-bench -o r.md
    """
    from .errors import UsageError
    from .texts import load_text
    from .validate.bench import BenchSettings
    from .validate.compare import compare as run_compare
    from .validate.compare import markdown, write
    from .validate.perplexity import EvalSettings

    for f in (ref, *files):
        if not Path(f).is_file():
            raise UsageError(f"{f}: no such file")
    text_name, body = load_text(text)
    bench_settings = None if no_bench else BenchSettings(pp=pp, tg=tg, reps=reps, threads=threads)
    report = run_compare(list(files), ref, body, text_name, EvalSettings(ctx=ctx, chunks=chunks), bench_settings, threads)
    write(report, output, plot_path)
    click.echo(markdown(report))
    click.echo(f"wrote {output} and {output.with_suffix('.json')}" + (f" and {plot_path}" if plot_path else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
