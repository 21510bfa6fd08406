"""Runs killed at known points leave nothing that outlives the next run.

Each case runs the real console script on a tiny model, held at a named point of the run by the
test-only hook NPFT_GGUF_TEST_PAUSE_AT (signals.pause_for_tests), and then:
- SIGKILL: nothing can clean up, so temporaries are left; the next run removes them;
- SIGTERM: handled as Ctrl-C is: exit 143, one `error: interrupted ...` line, no temporary left;
and a last run completes. An interrupted measurement never passes for a complete one. A killed resumable finetune continues with --resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from npft_gguf.atomic import TEMP
from npft_gguf.signals import PAUSE_ENV
from tests.conftest import calib_text
from tests.test_cli import CLI, ROOT, _env, assert_fails, cli, error_line, listing

PAUSED = "paused at "


def temps(d: Path) -> list[Path]:
    """Every npft temporary below `d`."""
    return sorted(p for p in d.rglob(".*") if TEMP.match(p.name))


def start(args, stage: str, logs: Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI, started and held at `stage`; returns once it is there. SIGINT is at its default
    (as a terminal's Ctrl-C finds it) even when the tests run in the background."""
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.err")))
    err, out = logs / f"{n}.err", logs / f"{n}.out"
    with open(err, "w") as e, open(out, "w") as o:
        proc = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, env=_env({PAUSE_ENV: stage, **(env or {})}), stdout=o,
                                stderr=e, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.err, proc.out = err, out
    deadline = time.monotonic() + 600
    while PAUSED + stage.split("#")[0] not in err.read_text():
        if proc.poll() is not None:
            pytest.fail(f"{args[0]} ended (exit {proc.returncode}) before it reached {stage}:\n{err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{args[0]} did not reach {stage}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, list[str]]:
    """Send `sig`; the exit status and what the run printed on stderr, less the pause line and
    blank lines (click writes one when a KeyboardInterrupt passes through it, as after Ctrl-C)."""
    proc.send_signal(sig)
    rc = proc.wait(timeout=300)
    return rc, [line for line in proc.err.read_text().splitlines() if line.strip() and not line.startswith(PAUSED)]


def kill_then_term(args, stage: str, where: Path, logs: Path) -> list[str]:
    """SIGKILL a run at `stage` (its temporaries stay), then SIGTERM the next one at the same point:
    by then the dead run's temporaries are gone, and the terminated one leaves none of its own.
    Returns the terminated run's stderr."""
    rc, _ = stop(start(args, stage, logs), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = temps(where)
    assert left, f"nothing to clean up at {stage}: the test point is not inside a write"
    proc = start(args, stage, logs)
    assert not set(left) & set(temps(where)), "the next run did not remove the killed run's temporaries"
    rc, lines = stop(proc, signal.SIGTERM)
    assert rc == 143, f"exit {rc} after SIGTERM at {stage}:\n" + "\n".join(lines)
    assert temps(where) == [], f"SIGTERM at {stage} left {temps(where)}"
    return lines


# --- export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer,stages", [
    ("rtn", ["export:tensor", "export:tensor#12", "commit:m.gguf"]),
    # f32 intermediate half written; f32 complete and llama.cpp not started; llama.cpp done
    ("llama.cpp", ["export:tensor#12", "llamacpp:quantize", "commit:m.gguf"]),
])
def test_export_killed_at_any_point_leaves_nothing(tiny_bpe, tmp_path, quantizer, stages):
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", tiny_bpe, "-o", out / "m.gguf", "--type", "q4_k_m" if quantizer == "llama.cpp" else "q4_0",
            "--quantizer", quantizer]
    for stage in stages:
        lines = kill_then_term(args, stage, out, tmp_path / "logs")
        assert error_line("\n".join(lines)) == "error: interrupted; nothing was written"
        assert listing(out) == []
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert listing(out) == ["m.gguf"]


def test_two_exports_to_one_output_one_fails(tiny_bpe, tmp_path):
    """The slower of two concurrent runs finds the output taken when it is about to put its own
    in place: one line, exit 2, and the winner's file stays."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", tiny_bpe, "-o", out / "m.gguf", "--type", "q8_0"]
    slow = start(args, "commit:m.gguf", tmp_path / "logs")  # finished writing, not yet in place
    fast = cli(*args)
    assert fast.returncode == 0 and "wrote" in fast.stdout, fast.stderr
    winner = (out / "m.gguf").read_bytes()
    rc, lines = stop(slow, signal.SIGUSR1)  # let it go on
    assert rc == 2, lines
    line = error_line("\n".join(lines))
    assert "already exists" in line and "--force" in line
    assert listing(out) == ["m.gguf"] and (out / "m.gguf").read_bytes() == winner


# --- measurements --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tiny_bpe, tmp_path_factory) -> Path:
    """f32.gguf and q8_0.gguf of the tiny model, and text.txt, several 64-token windows long."""
    from npft_gguf.sources import open_source
    from npft_gguf.writer import ExportSettings, export

    d = tmp_path_factory.mktemp("measured")
    for t in ("f32", "q8_0"):
        export(open_source(str(tiny_bpe)), d / f"{t}.gguf", ExportSettings(type=t), progress=False)
    (d / "text.txt").write_text(calib_text(30_000))
    return d


@pytest.mark.parametrize("stage,sig,code", [
    ("perplexity:chunk#2", signal.SIGTERM, 143),  # in the reference's evaluation
    ("perplexity:chunk#6", signal.SIGINT, 130),  # in the compared file's
    ("bench:rep", signal.SIGTERM, 143),
])
def test_an_interrupted_compare_writes_no_report(measured, tmp_path, stage, sig, code):
    """compare caught the interrupt inside an evaluation and went on: exit 0, and a report whose
    reference row covered the chunks measured before the signal and every other row all of them."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    bench = ["--pp", "8", "--tg", "2", "--reps", "2"] if stage.startswith("bench") else ["--no-bench"]
    args = ["compare", measured / "q8_0.gguf", "--ref", measured / "f32.gguf", "--text", measured / "text.txt",
            "--ctx", "64", "--chunks", "4", *bench, "-o", out / "r.md"]
    rc, lines = stop(start(args, stage, tmp_path / "logs", env={"TMPDIR": str(tmp)}), sig)
    assert rc == code, f"exit {rc} after {sig!r} at {stage}:\n" + "\n".join(lines)
    assert error_line(lines[-1]) == "error: interrupted; nothing was written"
    assert listing(out) == [] and listing(tmp) == []  # no report, and the reference's record is gone


def test_an_interrupted_eval_shows_what_it_measured_as_such(measured, tmp_path):
    """eval printed its partial figures; it must mark them, write them to no file, and exit 130."""
    target = tmp_path / "r.json"
    args = ["eval", measured / "q8_0.gguf", "--ref", measured / "f32.gguf", "--text", measured / "text.txt",
            "--ctx", "64", "--chunks", "4", "--json", target]
    proc = start(args, "perplexity:chunk#2", tmp_path / "logs")
    rc, lines = stop(proc, signal.SIGINT)
    assert rc == 130, lines
    shown = proc.out.read_text()
    assert "2 chunks of 64" in shown and "[interrupted]" in shown, shown
    line = error_line(lines[-1])
    assert "interrupted" in line and "r.json was not written" in line and not target.exists()


def test_a_convert_interrupted_in_its_closing_evaluation_writes_no_report(tiny_bpe, measured, tmp_path):
    """convert's closing evaluation (a compare) caught the interrupt as compare did, and wrote its
    report from the reference's first chunks and every chunk of the new file."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    args = ["convert", tiny_bpe, "--method", "rtn", "--type", "q8_0", "-o", out / "t.gguf", "--eval-text",
            measured / "text.txt", "--ctx", "64", "--chunks", "4", "--threads", "1"]
    rc, lines = stop(start(args, "perplexity:chunk#2", tmp_path / "logs", env={"TMPDIR": str(tmp)}), signal.SIGTERM)
    assert rc == 143, lines
    line = error_line(lines[-1])
    assert f"{out / 't.gguf'} was written" in line and "no report" in line
    assert listing(out / "t.npft-run") == ["float-f32.gguf"] and temps(out) == [] and listing(tmp) == []


# --- finetune and convert ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("texts") / "calib.txt"
    f.write_text(calib_text(40_000))
    return f


TUNE = ["--recipe", "short", "--calib-samples", "4", "--calib-len", "32", "--fisher-samples", "2", "--batch", "2",
        "--trace-samples", "0", "--outlier-pct", "1", "--threads", "1"]


def test_a_convert_interrupted_in_its_guard_says_the_output_is_unchecked(tiny_bpe, calib, tmp_path):
    """The guard measures after the output is written: interrupted there, the output is the tuned
    file that no check has passed, and the message says so (not 'resume from the checkpoints')."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["convert", tiny_bpe, "-o", out / "t.gguf", "--calib", calib, *TUNE, "--eval-text", "none", "--ctx", "64"]
    rc, lines = stop(start(args, "perplexity:chunk#2", tmp_path / "logs"), signal.SIGTERM)
    assert rc == 143, lines
    line = error_line(lines[-1])
    assert f"{out / 't.gguf'} holds the tuned file" in line and "not yet checked by the guard" in line, line
    assert (out / "t.gguf").is_file() and temps(out) == []


@pytest.mark.slow
def test_finetune_killed_at_any_point_resumes_and_leaves_nothing(tiny_bpe, calib, tmp_path):
    out, logs = tmp_path / "tuned", tmp_path / "logs"
    args = ["finetune", tiny_bpe, "-o", out, "--calib", calib, *TUNE, "--epochs", "2"]
    # SIGTERM while the first epoch checkpoint is written: nothing of it stays
    rc, lines = stop(start(args, "commit:checkpoint.safetensors", logs), signal.SIGTERM)
    assert rc == 143 and "interrupted" in lines[-1] and "--resume" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert temps(tmp_path) == [] and not (out / "npft-run" / "checkpoint.safetensors").exists()
    # SIGKILL while the second is written: the first one stays, beside the dead run's temporary
    rc, _ = stop(start(args, "commit:checkpoint.safetensors#2", logs), signal.SIGKILL)
    assert rc == -signal.SIGKILL and (out / "npft-run" / "checkpoint.safetensors").exists() and temps(out / "npft-run")
    # --resume continues after epoch 1; terminated while the merged model is staged
    rc, lines = stop(start([*args, "--resume"], f"commit:{out.name}/", logs), signal.SIGTERM)
    assert rc == 143 and any("resuming" in line and "after epoch 1" in line for line in lines), lines
    assert "interrupted" in lines[-1] and temps(tmp_path) == [] and not (out / "config.json").exists()
    # killed there: the staged directory stays until the next run
    rc, _ = stop(start([*args, "--resume"], f"commit:{out.name}/", logs), signal.SIGKILL)
    assert rc == -signal.SIGKILL and temps(out)
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "after epoch 2" in r.stderr and temps(tmp_path) == [] and (out / "config.json").exists()
    assert json.loads((out / "report.json").read_text())["tune"]["resumed_at_epoch"] == 2


def test_two_finetunes_into_one_folder_the_second_fails(tiny_bpe, calib, tmp_path):
    """While one run tunes into a folder, a second one into the same folder fails at once in one
    line instead of both writing a model there and reporting success."""
    out = tmp_path / "tuned"
    args = ["finetune", tiny_bpe, "-o", out, "--calib", calib, *TUNE, "--epochs", "1"]
    first = start(args, "commit:checkpoint.safetensors", tmp_path / "logs")  # tuning, nothing in place yet
    assert_fails(cli(*args), 2, str(out), "already being written by another run", f"PID {first.pid}")
    rc, lines = stop(first, signal.SIGUSR1)  # let it go on
    assert rc == 0, lines
    assert (out / "config.json").exists() and not (out / ".npft.lock").exists() and temps(out) == []


@pytest.mark.slow
def test_convert_killed_at_any_point_leaves_nothing(tiny_bpe, calib, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    evaltxt = tmp_path / "eval.txt"
    evaltxt.write_text(calib_text(200_000)[-20_000:])
    target = out / "t.gguf"
    # q5_0: llama.cpp on some CPUs (AMX advertised, not usable in a VM) dies of SIGILL on q4_0/q8_0 matmuls
    args = ["convert", tiny_bpe, "-o", target, "--type", "q5_0", "--calib", calib, *TUNE, "--epochs", "1",
            "--eval-text", evaltxt, "--ctx", "64", "--chunks", "1"]
    rc, _ = stop(start(args, "commit:checkpoint.safetensors", logs), signal.SIGKILL)  # while tuning
    assert rc == -signal.SIGKILL and temps(out)
    # the next run (the checkpoint was never committed, so no --resume) writes its own, then is
    # terminated while it writes the GGUF: the dead run's temporary went, and so does its own
    rc, lines = stop(start(args, "export:tensor#3", logs), signal.SIGTERM)
    assert rc == 143 and "interrupted" in lines[-1], lines
    assert temps(out) == [] and not target.exists() and (out / "t.npft-run" / "checkpoint.safetensors").exists()
    # killed while the untuned float reference for the comparison is written (after the output)
    rc, _ = stop(start([*args, "--resume"], "commit:float-f32.gguf", logs), signal.SIGKILL)
    assert rc == -signal.SIGKILL and target.exists() and temps(out)
    assert_fails(cli(*args, "--resume"), 2, "already exists", "--force")
    r = cli(*args, "--resume", "--force")
    assert r.returncode == 0, r.stderr
    assert temps(out) == [] and {"float-f32.gguf", "rtn-q5_0.gguf"} <= set(listing(out / "t.npft-run"))
