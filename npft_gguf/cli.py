"""The `npft-gguf` command line: parse, call one stage function, print. Errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import NpftError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
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
    """


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
@click.option("--type", "type_", default="q4_0", show_default=True, type=click.Choice(TYPES, case_sensitive=False),
              help="Tensor type for the 2-D weights (RTN). Norms stay f32.")
@click.option("--pure", is_flag=True, help="One type everywhere (no q6_k/q8_0 output matrix), as llama-quantize --pure.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(source, output, type_, pure, force, as_json):
    """Convert SOURCE to a GGUF file with plain round-to-nearest quantization.

    \b
    SOURCE is a hub id (meta-llama/Llama-2-7b-hf), a Hugging Face directory,
    a .gguf file, or the demo 'smollm2-135m'. Tensors are streamed one at a
    time; the output appears only when complete.

    \b
    Examples:
      npft-gguf export smollm2-135m -o smol-f32.gguf --type f32
      npft-gguf export ./Llama-2-7b-hf -o llama2-q4_0.gguf --type q4_0
      npft-gguf export model.gguf -o model-q8.gguf --type q8_0 --pure --force
    """
    from .atomic import check_target
    from .sources import open_source
    from .writer import ExportSettings
    from .writer import export as run_export

    check_target(output, force)
    src = open_source(source)
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


if __name__ == "__main__":  # pragma: no cover
    main()
