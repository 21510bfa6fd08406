"""The `npft-gguf` console script on bad input: each case runs the real command in a subprocess and
checks the exit code (2 usage, 1 runtime), that stderr is exactly one `error: ...` line naming the
problem, that there is no traceback, and that no output file or `.part` leftover is written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "npft_gguf.cli"]
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, **QUIET_ENV, **(extra or {})}


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `npft-gguf ARGS` from the repository root (works from a clean clone with an editable install)."""
    return subprocess.run([*CLI, *map(str, args)], cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str, stdout: str = "") -> str:
    """The single `error: ...` line, after checking there is nothing else and no traceback."""
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = stderr.splitlines()  # splits on \r as well: no progress-bar redraws may precede the error
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    assert stdout.strip() == "", f"nothing should go to stdout on failure, got: {stdout!r}"
    return line


def assert_fails(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr:\n{r.stderr}"
    line = error_line(r.stderr, r.stdout)
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    return line


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty output directory; every failing test checks it stays empty."""
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_bpe, tmp_path_factory) -> Path:
    """A real small GGUF file: `tiny_bpe` exported as f32 (in-process: the CLI's export path is covered below)."""
    from npft_gguf.sources import open_source
    from npft_gguf.writer import ExportSettings, export

    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf"
    export(open_source(str(tiny_bpe)), path, ExportSettings(type="f32"), progress=False)
    assert path.read_bytes()[:4] == b"GGUF"
    return path


@pytest.fixture(scope="module")
def truncated_gguf(tiny_gguf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("truncated") / "truncated.gguf"
    data = tiny_gguf.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.fixture(scope="module")
def corrupt_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.gguf"
    data = random.Random(0).randbytes(64 * 1024)
    assert data[:4] != b"GGUF"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module", params=["f64", "q8_1"])
def odd_type_gguf(request, tiny_gguf, tmp_path_factory) -> Path:
    """tiny_gguf with blk.0.attn_q.weight stored as F64 or Q8_1: valid GGUF, but a type neither
    llama.cpp's CPU backend (no matmul for it) nor gguf-py (no dequantizer) handles."""
    from tests.broken import retype_gguf

    return retype_gguf(tiny_gguf, tmp_path_factory.mktemp("odd") / f"tiny-{request.param}.gguf", "blk.0.attn_q.weight",
                       request.param)


# --- export: the source -----------------------------------------------------------------------
def test_export_missing_path(out):
    r = cli("export", "/nonexistent/model", "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "/nonexistent/model", "no such file")
    assert listing(out) == []


def test_export_hub_id_offline(out, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    r = cli("export", "someorg/some-model", "-o", out / "m.gguf", "--type", "q4_0", env=env)
    assert_fails(r, 1, "someorg/some-model", "hub")
    assert listing(out) == []


def test_export_empty_directory(out, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("export", empty, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "config.json")
    assert listing(out) == []


def test_export_non_causal_model(out, tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    r = cli("export", d, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "BertModel", "causal")
    assert listing(out) == []


def test_export_unsupported_architecture(out, tmp_path):
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 256, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 1,
    }))
    r = cli("export", d, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "gpt_neox", "not supported", "llama", "qwen2")
    assert listing(out) == []


def test_export_gpt2_lm_head_model(out, tmp_path):
    """GPT2LMHeadModel is a causal LM whose class name does not end in ForCausalLM; still one line, exit 2."""
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 256, "n_positions": 64,
        "n_embd": 16, "n_layer": 1, "n_head": 2, "bos_token_id": 0, "eos_token_id": 1,
    }))
    r = cli("export", d, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "gpt2")
    assert listing(out) == []


def test_export_truncated_gguf(out, truncated_gguf):
    r = cli("export", truncated_gguf, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "truncated")
    assert listing(out) == []


def test_export_corrupt_gguf(out, corrupt_gguf):
    r = cli("export", corrupt_gguf, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "not a readable GGUF")
    assert listing(out) == []


# --- export: the options and the output -----------------------------------------------------------
def test_export_unknown_type(out, tiny_bpe):
    r = cli("export", tiny_bpe, "-o", out / "m.gguf", "--type", "q9_9")
    assert_fails(r, 2, "--type", "q9_9")
    assert listing(out) == []


def test_export_output_exists_needs_force(out, tiny_bpe):
    target = out / "m.gguf"
    target.write_bytes(b"do not overwrite me\n")
    r = cli("export", tiny_bpe, "-o", target, "--type", "f32")
    assert_fails(r, 2, "already exists", "--force")
    assert target.read_bytes() == b"do not overwrite me\n"
    assert listing(out) == ["m.gguf"]

    r = cli("export", tiny_bpe, "-o", target, "--type", "f32", "--force")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr
    assert "wrote" in r.stdout
    assert target.read_bytes()[:4] == b"GGUF"
    assert listing(out) == ["m.gguf"]


def test_export_output_in_unwritable_directory(tiny_gguf):
    # the tests run as root, so chmod would not stop the write; nobody can create files in /proc
    target = Path("/proc/npft-test.gguf")
    r = cli("export", tiny_gguf, "-o", target, "--type", "f32")
    assert_fails(r, 2, "cannot write", "/proc")
    assert not target.exists()
    assert not list(Path("/proc").glob(".npft-test.gguf*"))


def test_export_output_parent_is_a_file(tmp_path, tiny_gguf):
    parent = tmp_path / "not-a-dir"
    parent.write_bytes(b"a regular file\n")
    r = cli("export", tiny_gguf, "-o", parent / "m.gguf", "--type", "f32")
    assert_fails(r, 2, "not-a-dir", "directory")
    assert parent.read_bytes() == b"a regular file\n"
    assert listing(tmp_path) == ["not-a-dir"]


def test_export_ctrl_c_leaves_nothing(out, smollm2):
    """SIGINT while the 135M demo is being written: exit 130, one line, no output and no `.part`."""
    target = out / "smol-q4_0.gguf"
    for _attempt in range(3):  # on a very busy machine the export may finish before the signal is sent
        stdout, stderr, code = _interrupt_export(smollm2, target, out)
        if code is not None:
            break
        target.unlink(missing_ok=True)
    else:
        pytest.skip("the export always finished before it could be interrupted")
    assert code == 130, f"exit {code}; stderr:\n{stderr}"
    # the progress bar redraws itself with \r and clears itself on close; what a terminal shows must be
    # exactly one error line
    shown = [seg.rsplit("\r", 1)[-1] for seg in stderr.split("\n")]
    shown = [s for s in shown if s.strip()]
    line = error_line("\n".join(shown), stdout)
    assert "interrupted" in line
    assert listing(out) == []


def _interrupt_export(smollm2, target: Path, out: Path):
    """Start an export, SIGINT it once tensor data is being written; code None if it ended first."""
    # a terminal's Ctrl-C: SIGINT at its default even when the test runner itself was started in the
    # background (where the shell ignores SIGINT and a child Python would inherit that)
    proc = subprocess.Popen([*CLI, "export", str(smollm2.path), "-o", str(target), "--type", "q4_0"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # bytes: keep the \r
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while True:  # the .part file exists and is past the header (~2 MB): tensor data is being written
            parts = [p for p in out.iterdir() if p.name.endswith(".part")]
            if parts and _size(parts[0]) > 8 << 20:
                break
            assert proc.poll() is None, f"export ended (exit {proc.returncode}) before its .part file filled"
            assert time.monotonic() < deadline, "no .part file appeared"
            time.sleep(0.01)
        if proc.poll() is not None:
            proc.communicate()
            return "", "", None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stdout.decode(), stderr.decode(), proc.returncode


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


# --- inspect -----------------------------------------------------------------------------------
def test_inspect_missing_file(tmp_path):
    r = cli("inspect", tmp_path / "missing.gguf")
    assert_fails(r, 2, "missing.gguf", "no such file")


def test_inspect_corrupt_file(corrupt_gguf):
    r = cli("inspect", corrupt_gguf)
    assert_fails(r, 2, "corrupt.gguf", "not a readable GGUF")


# --- eval / bench: files llama.cpp cannot load -------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_truncated_gguf_gives_one_line(command, truncated_gguf):
    r = cli(command, truncated_gguf)
    assert_fails(r, 2, "truncated.gguf", "truncated")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_corrupt_gguf_gives_one_line(command, corrupt_gguf):
    r = cli(command, corrupt_gguf)
    assert_fails(r, 2, "corrupt.gguf", "not a readable GGUF")


def test_tensor_types_llama_cpp_cannot_run_give_one_line(odd_type_gguf, tiny_gguf, text_file, tmp_path):
    """eval/bench of an F64 tensor: llama.cpp aborted the process (exit 134, ~170 lines of gdb output)."""
    type_name = odd_type_gguf.stem.split("-")[1].upper()
    words = [odd_type_gguf.name, "blk.0.attn_q.weight", type_name, "llama.cpp cannot compute"]
    for command in ("eval", "bench"):
        assert_fails(cli(command, odd_type_gguf, *(["--text", text_file] if command == "eval" else [])), 2, *words)
    r = cli("compare", tiny_gguf, odd_type_gguf, "--ref", tiny_gguf, "--text", text_file, "-o", tmp_path / "r.md")
    assert_fails(r, 2, *words)  # before the first file is evaluated
    assert listing(tmp_path) == []


def test_tensor_types_gguf_py_cannot_read_are_refused_from_the_header(odd_type_gguf, tmp_path):
    """An F64 or Q8_1 tensor in a GGUF source failed mid-export: `error: NotImplementedError`, exit 1."""
    type_name = odd_type_gguf.stem.split("-")[1].upper()
    r = cli("export", odd_type_gguf, "-o", tmp_path / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, odd_type_gguf.name, "blk.0.attn_q.weight", type_name, "gguf-py cannot dequantize")
    assert listing(tmp_path) == []


# --- in-process runs: every input is checked before any work ---------------------------------------
# A check that fails after an hour of tuning or evaluation is a failure of its own, so these runs make
# every kind of work (loading a model in torch or llama.cpp, tuning, writing a GGUF, evaluating) fail
# the test: an input the command refuses must be refused before any of them starts.
WORK = ("npft_gguf.sources.HFDirSource.load_model", "npft_gguf.sources.GGUFSource.load_model", "npft_gguf.llamacpp.load",
        "npft_gguf.writer.export", "npft_gguf.convert.tune", "npft_gguf.validate.perplexity.evaluate",
        "npft_gguf.validate.compare.evaluate")


@pytest.fixture
def no_work(monkeypatch):
    def work(*_a, **_k):
        raise AssertionError("work started before the input was checked")

    for target in WORK:
        monkeypatch.setattr(target, work)


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`npft-gguf ARGS` in this process (click's runner), as a CompletedProcess for assert_fails."""
    from click.testing import CliRunner

    from npft_gguf.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Evaluation text for the tiny models (a few thousand tokens)."""
    from tests.conftest import calib_text

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(calib_text(30_000), encoding="utf-8")
    return path


def _gpu_build() -> bool:
    from npft_gguf import llamacpp

    return llamacpp.gpu_offload_supported()


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tiny_gguf):
    """A bug is still one line, naming the exception; --debug (or NPFT_GGUF_DEBUG=1) gives the traceback."""
    boom = ("import sys, npft_gguf.inspect as i\n"
            "def boom(*a, **k): raise RuntimeError('boom\\nsecond line')\n"
            "i.inspect = boom\n"
            "from npft_gguf.cli import main\n"
            "sys.argv[0] = 'npft-gguf'\n"
            "main()\n")

    def py(*args, env=None):
        return subprocess.run([sys.executable, "-c", boom, *map(str, args)], cwd=ROOT, env=_env(env), capture_output=True,
                              text=True, timeout=120)

    line = assert_fails(py("inspect", tiny_gguf), 1)
    assert line == "error: RuntimeError: boom (rerun with --debug for the traceback)"
    for r in (py("--debug", "inspect", tiny_gguf), py("inspect", tiny_gguf, env={"NPFT_GGUF_DEBUG": "1"})):
        assert r.returncode == 1
        assert "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr and "rerun with --debug" not in r.stderr


@pytest.mark.parametrize("command, args, words", [
    ("eval", ["--n-gpu-layers", "-2"], ["--n-gpu-layers", "range"]),
    ("bench", ["--n-gpu-layers", "-2"], ["--n-gpu-layers", "range"]),
    ("compare", ["--n-gpu-layers", "-2"], ["--n-gpu-layers", "range"]),
    ("bench", ["--pp", "0", "--tg", "0"], ["--pp 0", "--tg 0", "nothing"]),
])
def test_measuring_options_out_of_range(command, args, words, tiny_gguf, text_file, tmp_path, no_work):
    extra = {"eval": ["--text", text_file], "bench": [],
             "compare": ["--ref", tiny_gguf, "--text", text_file, "-o", tmp_path / "r.md"]}[command]
    assert_fails(run(command, tiny_gguf, *extra, *args), 2, *words)
    assert listing(tmp_path) == []


def test_outputs_are_checked_before_any_work(tiny_gguf, truncated_gguf, text_file, tmp_path, no_work):
    kept = tmp_path / "kept.json"
    kept.write_text("keep me")
    (tmp_path / "r.json").write_text("keep me")  # the JSON beside -o r.md
    dir_gguf = tmp_path / "dir.gguf"
    dir_gguf.mkdir()
    ev = ["eval", tiny_gguf, "--text", text_file]
    cmp = ["compare", tiny_gguf, "--ref", tiny_gguf, "--text", text_file]
    cases = [
        ([*ev, "--json", "/nonexistent/x.json"], ["/nonexistent", "does not exist"]),
        (["bench", tiny_gguf, "--json", "/nonexistent/x.json"], ["/nonexistent", "does not exist"]),
        ([*ev, "--json", kept], ["kept.json", "already exists", "--force"]),
        (["bench", tiny_gguf, "--json", kept], ["kept.json", "already exists", "--force"]),
        ([*cmp, "-o", tmp_path / "new.md", "--plot", "/nonexistent/p.png"], ["/nonexistent", "does not exist"]),
        ([*cmp, "-o", tmp_path / "r.md"], ["r.json", "already exists", "--force"]),
        ([*cmp, "-o", tmp_path / "new.md", "--plot", kept], ["kept.json", "already exists"]),
        ([*cmp, "-o", tmp_path / "new.md", "--plot", tmp_path / "new.json"], ["--plot", "own name"]),
        ([*cmp, "-o", tmp_path / "new.json"], ["-o", ".md"]),
        ([*cmp, "-o", tiny_gguf, "--force"], ["one of the files compared"]),
        # inputs named wrongly are said to be what they are
        (["eval", dir_gguf, "--text", text_file], ["dir.gguf", "is a directory"]),
        (["bench", tmp_path], ["is a directory"]),
        (["inspect", tmp_path], ["is a directory", "GGUF"]),
        (["compare", tiny_gguf, "--ref", dir_gguf, "-o", tmp_path / "new.md"], ["dir.gguf", "is a directory"]),
        # a reference or compared file that cannot be read fails before anything is evaluated
        ([*ev, "--ref", truncated_gguf], ["truncated"]),
        ([*cmp, truncated_gguf, "-o", tmp_path / "new.md"], ["truncated"]),
    ]
    for args, words in cases:
        assert_fails(run(*args), 2, *words)
    assert listing(tmp_path) == ["dir.gguf", "kept.json", "r.json"]
    assert kept.read_text() == "keep me" and (tmp_path / "r.json").read_text() == "keep me"


def test_an_output_that_is_a_dangling_symlink_is_refused_up_front(tiny_gguf, tiny_bpe, text_file, tmp_path, no_work):
    """It passed the up-front check, and the finished output was then refused with an untrue
    'another run wrote it meanwhile'."""
    link, gone = tmp_path / "link", tmp_path / "gone"
    link.symlink_to(gone)
    tune = ["--calib", text_file, "--recipe", "short"]
    cases = [
        ["export", tiny_gguf, "-o", link],
        ["imatrix", tiny_bpe, "--calib", text_file, "-o", link],
        ["eval", tiny_gguf, "--text", text_file, "--json", link],
        ["bench", tiny_gguf, "--json", link],
        ["compare", tiny_gguf, "--ref", tiny_gguf, "--text", text_file, "-o", link],
        ["compare", tiny_gguf, "--ref", tiny_gguf, "--text", text_file, "-o", tmp_path / "r.md", "--plot", link],
        ["convert", tiny_bpe, *tune, "-o", link],
        ["convert", tiny_bpe, *tune, "-o", tmp_path / "m.gguf", "--run-dir", link],
        ["convert", tiny_bpe, *tune, "-o", tmp_path / "m.gguf", "--run-dir", link / "run"],
        ["finetune", tiny_bpe, *tune, "-o", link],
        ["finetune", tiny_bpe, *tune, "-o", link / "sub"],
    ]
    for args in cases:
        for force in ([], ["--force"]):
            assert_fails(run(*args, *force), 2, f"{link} is a symlink to a missing file", "remove it")
    assert listing(tmp_path) == ["link"] and link.is_symlink() and not gone.exists()


def test_eval_of_a_source_checks_the_context_before_loading(tiny_bpe, text_file, no_work):
    # the tiny models are trained for 256 positions
    assert_fails(run("eval", tiny_bpe, "--text", text_file, "--ctx", "512"), 2, "--ctx 512", "training context of 256")


def test_eval_reference_of_the_same_vocabulary_in_the_other_library(tiny_gguf, tiny_bpe, text_file, tmp_path):
    """eval GGUF --ref SOURCE of the very same model was refused, 'different vocabulary (400 vs 400
    tokens)': llama.cpp's detokenizer and transformers' decode differ on special tokens and partial
    UTF-8. The token pieces of one vocabulary are the same in both; another vocabulary of the same size
    (two ids swapped) is still refused."""
    from tests.broken import copy_model

    common = ["--text", text_file, "--ctx", "64", "--chunks", "2", "--json", "-"]
    for model, ref in ((tiny_gguf, tiny_bpe), (tiny_bpe, tiny_gguf)):
        r = run("eval", model, "--ref", ref, *common)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["kld"]["mean"] < 1e-4  # the same f32 weights in llama.cpp and torch
    other = copy_model(tiny_bpe, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    pieces = {i: p for p, i in tok["model"]["vocab"].items()}
    tok["model"]["vocab"][pieces[300]], tok["model"]["vocab"][pieces[301]] = 301, 300
    (other / "tokenizer.json").write_text(json.dumps(tok))
    for model, ref in ((tiny_gguf, other), (other, tiny_gguf)):
        assert_fails(run("eval", model, "--ref", ref, *common), 2, "different vocabulary")


@pytest.mark.skipif("_gpu_build()", reason="this llama-cpp-python build can offload to a GPU")
def test_gpu_offload_on_a_cpu_build_is_refused_everywhere(tiny_gguf, tiny_bpe, text_file, tmp_path, no_work):
    """eval and compare ran on the CPU without a word when asked for GPU layers; bench refused (exit 2)."""
    for args in (["eval", tiny_gguf, "--text", text_file, "--n-gpu-layers", "99"],
                 ["bench", tiny_gguf, "--n-gpu-layers", "99"],
                 ["compare", tiny_gguf, "--ref", tiny_gguf, "--text", text_file, "-o", tmp_path / "r.md", "--n-gpu-layers", "-1"]):
        assert_fails(run(*args), 2, "--n-gpu-layers", "no GPU backend")
    # a SOURCE runs in torch, where the option means nothing
    assert_fails(run("eval", tiny_bpe, "--text", text_file, "--ctx", "64", "--n-gpu-layers", "1"), 2, "--n-gpu-layers", "torch")
    assert listing(tmp_path) == []


def test_json_outputs_need_force_and_dash_prints_json(tiny_gguf, text_file, tmp_path):
    """eval --json and bench --json overwrote an existing file without --force; `--json -` prints the JSON."""
    target = tmp_path / "r.json"
    ev = ["eval", tiny_gguf, "--text", text_file, "--ctx", "64", "--chunks", "2"]
    target.write_text("keep me")
    assert_fails(cli(*ev, "--json", target), 2, "already exists", "--force")
    assert target.read_text() == "keep me"
    r = cli(*ev, "--json", target, "--force")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and json.loads(target.read_text())["chunks"] == 2
    r = cli(*ev, "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ppl"] > 0
    r = cli("bench", tiny_gguf, "--pp", "16", "--tg", "0", "--reps", "1", "--json", "-")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["pp"]["n"] == 1 and out["tg"] is None


def test_compare_writes_its_files_only_with_force_over_old_ones(tiny_gguf, text_file, tmp_path):
    report = tmp_path / "r.md"
    report.write_text("old report")
    args = ["compare", tiny_gguf, "--ref", tiny_gguf, "--text", text_file, "--ctx", "64", "--chunks", "2", "--no-bench", "-o", report]
    assert_fails(cli(*args), 2, "already exists", "--force")
    assert report.read_text() == "old report" and listing(tmp_path) == ["r.md"]
    r = cli(*args, "--force", "--flash-attn")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["eval_settings"]["flash_attn"] is True
    from npft_gguf.llamacpp import gpu_offload_supported

    assert rows[0]["eval_settings"]["n_gpu_layers"] == (-1 if gpu_offload_supported() else 0)  # --n-gpu-layers auto
    assert "| file |" in report.read_text()


def test_gguf_is_known_by_its_magic_not_its_suffix(tiny_gguf, text_file, tmp_path):
    """export writes any name; eval and inspect took only *.gguf (.GGUF and .bin were 'not a .gguf')."""
    for name in ("m.bin", "m.GGUF"):
        path = tmp_path / name
        path.write_bytes(tiny_gguf.read_bytes())
        r = cli("eval", path, "--text", text_file, "--ctx", "64", "--chunks", "2", "--json", "-")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["settings"]["backend"] == "llama.cpp"
        r = cli("inspect", path, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["architecture"] == "llama"
        r = cli("export", path, "--type", "q8_0", "-o", tmp_path / f"{name}.q8_0.gguf")  # and as a source
        assert r.returncode == 0, r.stderr
    not_gguf = tmp_path / "notes.bin"
    not_gguf.write_text("just text")
    assert_fails(cli("export", not_gguf, "-o", tmp_path / "x.gguf"), 2, "not a GGUF file")


def test_inspect_takes_the_demo_name(smollm2):
    r = cli("inspect", "smollm2-135m", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(smollm2.path) and info["architecture"] == "llama" and info["n_layers"] == 30


@pytest.fixture
def model_said(monkeypatch):
    """Every way a command starts its work (fetching the demo, loading a model in torch or
    llama.cpp, writing a GGUF file) stops it instead, with an error line naming the model it was given."""
    from npft_gguf.errors import UsageError

    def stop(what):
        def said(*args, **_kw):
            raise UsageError(what(args[0]))
        return said

    monkeypatch.setattr("npft_gguf.demo.fetch", stop(lambda name: f"would fetch the demo {name}"))
    for target in ("npft_gguf.sources.HFDirSource.load_model", "npft_gguf.sources.GGUFSource.load_model"):
        monkeypatch.setattr(target, stop(lambda src: f"would load {src.path}"))
    monkeypatch.setattr("npft_gguf.llamacpp.load", stop(lambda path: f"would load {path}"))
    monkeypatch.setattr("npft_gguf.writer.export", stop(lambda src: f"would export {src.path}"))


@pytest.mark.parametrize("local", ["folder", "file"])
def test_a_local_path_named_like_the_demo_wins_in_every_command(local, tiny_bpe, tiny_gguf, text_file, tmp_path,
                                                                monkeypatch, model_said):
    """export/eval/imatrix/finetune/convert took the demo over ./smollm2-135m, inspect and bench the local one."""
    import shutil

    from npft_gguf.demo import DEMOS

    (name,) = DEMOS
    monkeypatch.chdir(tmp_path)
    if local == "folder":  # the tiny Hugging Face model
        shutil.copytree(tiny_bpe, name)
    else:  # the tiny model as a GGUF file
        shutil.copy(tiny_gguf, name)
    calib = ["--calib", text_file, "--calib-samples", "2", "--calib-len", "16", "--recipe", "short"]
    runs = {
        "export": ["-o", "x.gguf"],
        "eval": ["--text", text_file, "--ctx", "64"],
        "imatrix": ["-o", "x.imatrix.gguf", "--calib", text_file, "--ctx", "64"],
        "finetune": ["-o", "tuned", *calib],
        "convert": ["-o", "c.gguf", "--method", "rtn", "--eval-text", "none"],
        "bench": [],
        "inspect": ["--json"],
    }
    for command, args in runs.items():
        r = run(command, name, *args)
        if command == "inspect" and local == "file":
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["n_layers"] == 2  # the tiny model's, not the demo's 30
            continue
        line = assert_fails(r, 2, name)
        if command in ("inspect", "bench") and local == "folder":
            assert "is a directory" in line, (command, line)
        else:
            assert line == f"error: would {'export' if command in ('export', 'convert') else 'load'} {name}", (command, line)


# --- --help --------------------------------------------------------------------------------------
def test_help_shows_recipe_defaults_and_bits_values():
    """Options whose default depends on --recipe show each recipe's value, from the table itself."""
    from npft_gguf.choices import BITS
    from npft_gguf.cli import RECIPES, main

    for command in ("convert", "finetune"):
        helps = {p.opts[0]: p.help for p in main.commands[command].params}
        for option, key in (("--calib-samples", "calib_samples"), ("--calib-len", "calib_len"), ("--lr", "lr"),
                            ("--epochs", "epochs"), ("--batch", "batch"), ("--rank", "rank"), ("--trace-samples", "trace_samples")):
            shown = ", ".join(f"{name}: {format(r[key], 'g') if isinstance(r[key], float) else r[key]}" for name, r in RECIPES.items())
            assert f"[{shown}]" in helps[option], (command, option, helps[option])
        assert "[paper: all, short: 16]" in helps["--fisher-samples"]
    bits = next(p for p in main.commands["convert"].params if p.name == "bits")
    assert list(bits.type.choices) == [str(b) for b in BITS] and "5 -> q5_0" in bits.help
    assert "[2|3|4|5|6|8]" in run("convert", "--help").stdout


def test_every_command_has_examples_and_every_option_help():
    import click

    from npft_gguf.cli import main

    for name, command in main.commands.items():
        assert "Examples:" in (command.help or ""), name
        for p in command.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts[0]} has no help text"
    assert any("--debug" in p.opts for p in main.params)


def test_an_interrupt_is_one_error_line_with_no_blank_line_before(tiny_gguf, monkeypatch, capsys):
    """Ctrl-C inside a command: click's own handler would print an empty line before ours."""
    import npft_gguf.inspect as inspect_module

    from npft_gguf.cli import main

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_module, "inspect", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tiny_gguf)])
    assert e.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; nothing was written\n"
