"""The one-command pipeline on a tiny model, through the real console script: calibrate, tune,
merge, RTN, GGUF, and the closing llama.cpp evaluation beside plain RTN and the float model;
finetune's Hugging Face checkpoint exports like any other source; bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from npft_gguf.fingerprint import source_record
from npft_gguf.llamacpp import gpu_offload_supported
from npft_gguf.npft.train import CHECKPOINT, PICKLED_CHECKPOINT, checkpoint_record
from npft_gguf.sources import open_source
from tests.conftest import calib_text, make_tiny_llama
from tests.test_cli import assert_fails, cli, no_work, run  # noqa: F401 - no_work is a fixture

TINY = ["--recipe", "short", "--calib-samples", "6", "--calib-len", "32", "--fisher-samples", "2",
        "--trace-samples", "1", "--lr", "1e-3", "--outlier-pct", "1", "--threads", "2"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(calib_text(40_000))
    (d / "eval.txt").write_text(calib_text(200_000)[-30_000:])
    return d


def test_convert_writes_tuned_gguf_and_compares(tiny_bpe, texts, tmp_path):
    out = tmp_path / "tiny-npft-q4_0.gguf"
    r = cli("convert", tiny_bpe, "-o", out, "--bits", "4", "--calib", texts / "calib.txt", *TINY,
            "--eval-text", texts / "eval.txt", "--ctx", "64", "--chunks", "4", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert "quick CPU recipe" in r.stderr
    rows = {row["file"].rsplit("/", 1)[-1]: row for row in rec["comparison"]["rows"]}
    # the defaults at 4 bits: NPFT with the rtn noise, then importance-weighted Q4_0 (method auto),
    # measured beside plain RTN, the untuned model quantized with the same imatrix, and the files of
    # about the same size llama.cpp makes with it (IQ4_NL, Q4_K_M)
    guard = rec["guard"]
    swapped = guard["written"] == "peer"
    assert set(rows) == {"float-f32.gguf", "rtn-q4_0.gguf", "imatrix-q4_0.gguf", out.name, "peer-iq4_nl-imatrix.gguf",
                         "peer-q4_k_m-imatrix.gguf"} | ({"npft-q4_0.gguf"} if swapped else set())
    assert rows["float-f32.gguf"]["kld_mean"] == 0.0 and rows[out.name]["kld_mean"] > 0
    # the guard measured the tuned file and its peer on the held-back calibration text, and wrote the closer
    assert guard["peer_file"].endswith("imatrix-q4_0.gguf") and guard["chunks"] == 10 and guard["ctx"] == 64
    assert swapped == (guard["tuned_kld"] >= guard["peer_kld"])
    assert rec["calibration"]["holdout"] == 0.1
    run = out.with_name(out.stem + ".npft-run")
    assert (out.read_bytes() == (run / "imatrix-q4_0.gguf").read_bytes()) == swapped
    if not swapped:  # evaluated on other text, the tuned file's own numbers are in the comparison as the output's row
        assert guard["tuned_closer"]
    assert rec["convert"]["method"] == "npft+imatrix" and rec["imatrix"]["weights"] == "NPFT-tuned and merged"
    t = rec["tune"]
    assert t["trace_before"]["n"] == 2 and t["trace_after"]["n"] == 2 and len(t["history"]) >= 1
    # the GGUF is Q4_0 of the tuned weights, with the method in its provenance
    meta = GGUFReader(out).fields
    assert bytes(meta["general.npft.method"].parts[-1]).decode() == "npft+imatrix"
    assert '"noise": "rtn"' in bytes(meta["general.npft.settings"].parts[-1]).decode()
    report = (run / "report.md").read_text()
    assert report.count("Hessian trace") == 1 and "Guard: the tuned file" in report
    # every step measured beside the plan's stages in it (issue 29 #1): wall time and its own host peak
    import torch

    cuda = torch.cuda.is_available()  # --device auto
    steps = {row["step"]: row for row in rec["stages"]}
    assert list(steps) == ["imatrix", "source", "calibration", "tune", "write", "guard", "evaluate"]
    assert steps["tune"]["stages"] == ["sensitivity", "trace", "tune", "merge"]
    for row in steps.values():
        assert row["measured"]["seconds"] > 0 and 0 < row["measured"]["peak_host_bytes"] <= row["measured"]["peak_host_bytes_process"]
        assert row["planned"]["peak_host_bytes"] > 0 and ("peak_device_bytes" in row["measured"]) == cuda
    assert steps["evaluate"]["planned"]["seconds"] > 0 and "Stages: planned and measured" in report
    assert rec["convert"]["chunks"] == 4 and rec["comparison"]["chunks"] == 4
    assert rec["convert"]["eval_gpu_layers"] == (-1 if cuda and gpu_offload_supported() else 0)  # --eval-gpu-layers auto
    assert checkpoint_record(run)["source"] == source_record(open_source(str(tiny_bpe)))  # what a --resume must match
    # a second run without --force or --resume refuses to touch either
    again = cli("convert", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--eval-text", "none")
    assert_fails(again, 2, "exists", "--force")


def test_finetune_checkpoint_exports(tiny_bpe, texts, tmp_path):
    out = tmp_path / "tuned"
    r = cli("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--noise", "grid",
            env={"HF_HUB_DISABLE_PROGRESS_BARS": "0"})  # as a user runs it
    assert r.returncode == 0, r.stderr
    assert "outlier Hessian trace" in r.stdout
    assert "shards" not in r.stderr, r.stderr  # transformers' own save bar stays out of our log
    assert (out / "config.json").exists() and (out / "report.json").exists() and not list(out.glob(".partial-*"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["tune"]["settings"]["noise"] == "grid" and rep["tune"]["fisher_summary"]
    e = cli("export", out, "-o", tmp_path / "tuned.gguf", "--type", "q8_0")
    assert e.returncode == 0, e.stderr
    again = cli("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY)
    assert_fails(again, 2, "already holds", "config.json", "--force")


def test_finetune_refuses_an_output_holding_any_file_it_writes(tiny_bpe, texts, tmp_path, no_work):
    """Not only config.json: its report, its tokenizer and an earlier model's shards would be
    overwritten or mixed with the new model, so without --force each is refused before any work."""
    for i, name in enumerate(("report.md", "report.json", "tokenizer.json", "tokenizer_config.json",
                              "model-00001-of-00002.safetensors")):
        out = tmp_path / f"out{i}"
        out.mkdir()
        (out / name).write_text("mine")
        assert_fails(run("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY), 2, name, "--force")
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "mine"


def test_finetune_force_replaces_a_sharded_model_whole(tiny_bpe, texts, tmp_path):
    """--force over a sharded checkpoint: its index and shards go, so export (which reads the index)
    and eval (which reads model.safetensors) see the same, new, weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from npft_gguf.sources import open_source

    out = tmp_path / "tuned"
    old = AutoModelForCausalLM.from_pretrained(tiny_bpe)
    with torch.no_grad():
        for p in old.parameters():
            p.mul_(2)
    old.save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer.model").write_text("an earlier model's tokenizer")
    assert (out / "model.safetensors.index.json").exists()
    r = cli("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--epochs", "1", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    assert not (out / "tokenizer.model").exists() and (out / "report.md").exists()
    saved, source = load_file(out / "model.safetensors"), open_source(str(out))
    assert all(torch.equal(source.load(name), w) for name, w in saved.items())


@pytest.mark.parametrize("command", ["finetune", "convert"])
def test_a_diverged_tuning_saves_nothing(tiny_bpe, texts, tmp_path, command):
    """--lr 1e30 with a single update: every loss is finite (the only one comes before the update)
    and the merged weights are not; nothing is saved, not even the epoch checkpoint."""
    out = tmp_path / ("tuned" if command == "finetune" else "t.gguf")
    one_update = ["--lr", "1e30", "--epochs", "1", "--calib-samples", "4", "--batch", "4"]
    extra = ["--method", "npft", "--type", "q8_0", "--eval-text", "none", "--ctx", "64"] if command == "convert" else []
    r = cli(command, tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, *one_update, *extra)
    last = r.stderr.splitlines()[-1]  # after the run's progress lines
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert last.startswith("error: the tuning diverged") and "no longer finite" in last and "lower --lr" in last, last
    assert not out.exists() and not list(tmp_path.rglob("checkpoint.pt"))


def test_finetune_for_a_simulated_quantizer(tiny_bpe, texts, tmp_path):
    # tuned once for rtn4, the checkpoint can then meet RTN and GPTQ at rtn4 through convert
    out = tmp_path / "tuned4"
    r = cli("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--noise", "rtn", "--grid", "rtn4")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "report.json").read_text())["tune"]["settings"]
    assert settings["grid"] == "rtn4" and settings["noise"] == "rtn"
    assert_fails(cli("finetune", tiny_bpe, "-o", tmp_path / "bad", "--grid", "rtn9x", *TINY), 2, "--grid", "rtn9x")
    assert not (tmp_path / "bad").exists()


# WikiText-2's test text begins so; calib.py recognises the evaluation set by it (and by its digest)
WIKITEXT2_TEST_START = " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor .\n"


@pytest.fixture(scope="module")
def wiki_test_raw(tmp_path_factory) -> Path:
    """A file holding WikiText-2 test text, the evaluation set, as a user might pass it to --calib."""
    path = tmp_path_factory.mktemp("wikitext-2-raw") / "wiki.test.raw"
    path.write_text(WIKITEXT2_TEST_START + calib_text(20_000), encoding="utf-8")
    return path


def test_convert_bad_input(tiny_bpe, texts, wiki_test_raw, tmp_path):
    out = tmp_path / "x.gguf"
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--calib", wiki_test_raw, *TINY, "--eval-text", "none"), 2, "WikiText-2 test text")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--calib", tmp_path / "missing.txt", *TINY, "--eval-text", "none"), 2, "no such file")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--bits", "7"), 2, "--bits")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--bits", "3", *TINY), 2, "no 3-bit GGUF type fits")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--noise-scope", "all", *TINY), 2, "--noise grid")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--objective", "kl", "--noise", "none", *TINY), 2, "trains nothing")
    assert not out.exists()


def test_baseline_methods_through_convert(tiny_bpe, texts, tmp_path):
    from gguf.quants import dequantize

    from npft_gguf.grids import get_grid

    calib = ["--calib", texts / "calib.txt", "--calib-samples", "6", "--calib-len", "32", "--threads", "2"]
    out = tmp_path / "tiny-gptq.gguf"
    r = cli("convert", tiny_bpe, "-o", out, "--method", "gptq", "--type", "q4_0", *calib, "--eval-text", "none", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantizer"]["method"] == "gptq"
    t = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.ffn_down.weight")
    w = dequantize(t.data, t.tensor_type)
    # GPTQ's output sits on the Q4_0 grid: RTN of the file's weights gives them back unchanged
    import torch

    wt = torch.from_numpy(w.reshape(-1, 128).copy())
    assert torch.equal(get_grid("q4_0").fakequant(wt), wt)
    # OWQ and the simulated per-channel quantizer write no GGUF and are measured in torch
    # (plain RTN, simulated or not, needs no calibration: the default c4, absent here, is not asked for)
    # NPFT tuned against the simulated quantizer itself: --noise rtn draws rtn3's own error
    npft3 = ["--method", "npft", "--type", "rtn3", "--noise", "rtn", "--calib", texts / "calib.txt", *TINY]
    for extra, label in ((["--method", "owq", "--type", "q4_0", *calib], "owq"), (["--method", "rtn", "--type", "rtn3"], "rtn3"),
                         (npft3, "npft-rtn3")):
        o = tmp_path / f"tiny-{label}.gguf"
        r = cli("convert", tiny_bpe, "-o", o, *extra, "--eval-text", texts / "eval.txt", "--ctx", "64", "--chunks", "3", "--json")
        assert r.returncode == 0, r.stderr
        rec = json.loads(r.stdout)
        assert not o.exists()
        assert "no GGUF" in r.stderr or "GGUF cannot hold" in r.stderr
        c = rec["comparison"]
        assert c["backend"] == "torch" and c["kld"]["mean"] > 0 and c["ppl"] > 0
        if label == "npft-rtn3":
            assert rec["tune"]["settings"]["grid"] == "rtn3" and rec["quantizer"]["fake_quant"] == "minmax3"
    assert_fails(cli("convert", tiny_bpe, "-o", tmp_path / "y.gguf", "--type", "q9_9"), 2, "--type")


def test_convert_checks_every_input_before_any_work(tiny_bpe, texts, wiki_test_raw, tmp_path, no_work):
    """Each of these failed only after the model was loaded, tuned or written, or ran with it; now
    each is refused before any of that (no_work fails the test on any model load, tuning, export or
    evaluation)."""
    import torch

    out = tmp_path / "x.gguf"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    short_text = tmp_path / "short.txt"
    short_text.write_text("A text of a few words, far short of two windows.")
    calib = ["--calib", texts / "calib.txt", *TINY, "--eval-text", "none"]
    cases = [
        (["--calib", wiki_test_raw, *TINY, "--eval-text", "none"], ["wiki.test.raw", "WikiText-2 test text"]),
        (["--method", "rtn", "--type", "q8_0", "--eval-text", tmp_path / "nofile.txt", "--ctx", "64"], ["nofile.txt", "no such file"]),
        ([*calib, "--targets", "q_proj,foo_proj"], ["--targets foo_proj", "no such linear module", "gate_proj"]),
        ([*calib, "--targets", ""], ["--targets", "empty"]),
        ([*calib, "--dropout", "2"], ["--dropout", "range"]),
        ([*calib, "--dropout", "nan"], ["--dropout", "finite"]),
        ([*calib, "--outlier-pct", "0"], ["--outlier-pct"]),
        ([*calib, "--clean-weight", "-1"], ["--clean-weight"]),
        ([*calib, "--lr", "0"], ["--lr"]),
        (["--method", "owq", "--type", "q4_0", "--owq-fraction", "1", *calib], ["--owq-fraction"]),
        (["--method", "gptq", "--type", "q4_k", *calib], ["GPTQ onto q4_k", "not supported"]),
        ([*calib, "--run-dir", a_file], ["a-file", "is a file"]),
        (["--method", "rtn", "--type", "q8_0", "--run-dir", a_file / "sub"], ["a-file", "not a directory"]),
        ([*calib[:-2], "--eval-text", texts / "eval.txt", "--ctx", "1024"], ["--ctx 1024", "training context of 256"]),
        ([*calib[:-2], "--eval-text", short_text, "--ctx", "64"], ["2 x ctx = 128", "smaller --ctx"]),
    ]
    if not torch.cuda.is_available():
        cases.append(([*calib, "--ctx", "64", "--device", "cuda"], ["--device cuda", "no CUDA"]))
    if not gpu_offload_supported():
        cases.append((["--method", "rtn", "--type", "q8_0", "--eval-text", texts / "eval.txt", "--ctx", "64",
                       "--eval-gpu-layers", "-1"], ["--eval-gpu-layers", "no GPU backend"]))
    for args, words in cases:
        assert_fails(run("convert", tiny_bpe, "-o", out, *args), 2, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "short.txt"]


def test_finetune_checks_every_input_before_any_work(tiny_bpe, texts, wiki_test_raw, tmp_path, no_work):
    calib = ["--calib", texts / "calib.txt", *TINY]
    cases = [
        (tmp_path / "a", [*calib, "--targets", "foo_proj"], ["foo_proj", "no such linear module"]),
        (tmp_path / "a", ["--calib", wiki_test_raw, *TINY], ["WikiText-2 test text"]),
        (tmp_path / "a", [*calib, "--dropout", "1"], ["--dropout", "range"]),
        (Path("/proc/npft-test-dir"), calib, ["cannot write", "/proc"]),  # it failed when saving, after the tuning
    ]
    for out, args, words in cases:
        assert_fails(run("finetune", tiny_bpe, "-o", out, *args), 2, *words)
        assert not out.exists()


def test_resume_is_checked_before_loading_and_force_clears_only_a_run_that_starts(tiny_bpe, texts, tmp_path, no_work):
    from npft_gguf.npft import NPFTSettings
    from npft_gguf.npft.train import save_checkpoint

    out = tmp_path / "x.gguf"
    ckpt = tmp_path / "x.npft-run" / CHECKPOINT
    ckpt.parent.mkdir()
    made_from = source_record(open_source(str(tiny_bpe)))
    save_checkpoint(ckpt, {"settings": NPFTSettings(lr=0.5).as_dict(), "tokens": "0" * 16, "source": made_from}, {})
    args = ["convert", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--eval-text", "none"]
    assert_fails(run(*args), 2, "unfinished or earlier run", "--resume", "--force")
    assert_fails(run(*args, "--resume"), 2, "holds a run with different", "lr", "--force")
    # --force starts over, but only once every input has passed: a refused run keeps the checkpoint
    assert_fails(run(*args, "--force", "--targets", "foo_proj"), 2, "foo_proj")
    assert ckpt.exists()
    ckpt.write_bytes(b"torn")
    assert_fails(run(*args, "--resume"), 2, "not a readable checkpoint", "--force")


@pytest.fixture(scope="module")
def tiny_bpe_b(tmp_path_factory) -> Path:
    """Another tiny llama of tiny_bpe's shapes, other weights: what a stale run directory held."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-bpe-b"), seed=1)


def test_a_resume_from_another_model_is_refused_before_loading(tiny_bpe, tiny_bpe_b, texts, tmp_path, no_work):
    """Issue 27 #3: --resume took a checkpoint tuned from another model of the same shapes: only
    the settings and the calibration tokens were compared."""
    from npft_gguf.npft import NPFTSettings
    from npft_gguf.npft.train import save_checkpoint

    out = tmp_path / "x.gguf"
    made_from = source_record(open_source(str(tiny_bpe)))
    (tmp_path / "x.npft-run").mkdir()
    save_checkpoint(tmp_path / "x.npft-run" / CHECKPOINT,
                    {"settings": NPFTSettings(lr=0.5).as_dict(), "tokens": "0" * 16, "source": made_from}, {})
    args = ["-o", out, "--calib", texts / "calib.txt", *TINY, "--eval-text", "none", "--resume"]
    line = assert_fails(run("convert", tiny_bpe_b, *args), 2, "tuned from", made_from["fingerprint"], "--force")
    assert str(tiny_bpe) in line and str(tiny_bpe_b) in line
    assert_fails(run("convert", tiny_bpe, *args), 2, "run with different", "lr")  # the same model gets past that check


def test_the_run_directory_s_references_are_remade_for_another_model(tiny_bpe, tiny_bpe_b, tmp_path, monkeypatch):
    """Issue 27 #2: float-f32.gguf and rtn-<type>.gguf left in the run directory by model A were
    reused (even with --force) to measure model B. Each records the source's fingerprint and is
    reused only for the same one."""
    import numpy as np
    from safetensors.numpy import load_file

    import npft_gguf.validate.compare as compare_mod
    from npft_gguf.convert import ConvertSettings, evaluate_beside_baselines
    from npft_gguf.sources import open_source

    monkeypatch.setattr(compare_mod, "compare", lambda files, ref, *a, **k: {"rows": []})  # llama.cpp's part is not tested here
    monkeypatch.setattr(compare_mod, "markdown", lambda report: "")
    out = tmp_path / "out.gguf"
    settings = ConvertSettings(type="q8_0", method="npft")

    def baselines(model):
        lines = []
        evaluate_beside_baselines(open_source(str(model)), out, "q8_0", settings, tmp_path, ("t", "text"), False, lines.append)
        q = next(t for t in GGUFReader(tmp_path / "float-f32.gguf").tensors if t.name == "blk.0.ffn_down.weight")
        return lines, np.asarray(q.data).reshape(tuple(reversed(q.shape)))

    lines, _ = baselines(tiny_bpe)
    assert [x.split()[:2] for x in lines] == [["writing", "float-f32.gguf"], ["writing", "rtn-q8_0.gguf"]]
    lines, q = baselines(tiny_bpe_b)
    assert [x.split()[:2] for x in lines] == [["remaking", "float-f32.gguf"], ["remaking", "rtn-q8_0.gguf"]], lines
    assert np.array_equal(q, load_file(tiny_bpe_b / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])
    assert baselines(tiny_bpe_b)[0] == []  # made from this model: reused


def test_the_run_directory_apart_from_the_output(tiny_bpe, texts, tmp_path, no_work):
    """Issue 27 #21: --run-dir equal to -o (or one inside the other) passed the plan."""
    calib = ["--calib", texts / "calib.txt", *TINY, "--eval-text", "none"]
    for out, run_dir in ((tmp_path / "x.gguf", tmp_path / "x.gguf"), (tmp_path / "r" / "x.gguf", tmp_path / "r"),
                         (tmp_path / "y.gguf", tmp_path / "y.gguf" / "run")):
        assert_fails(run("convert", tiny_bpe, "-o", out, "--run-dir", run_dir, *calib), 2, "run directory", "--run-dir")
        assert not out.exists() and not run_dir.exists()


def test_a_pickled_checkpoint_is_refused_without_running_it(tiny_bpe, texts, tmp_path, no_work):
    """Issue 27 #4: --resume read <run dir>/checkpoint.pt with torch.load(weights_only=False): a
    crafted one ran code. It is refused, unread."""
    import torch

    from tests.broken import Planted

    marker = tmp_path / "PWNED"
    out = tmp_path / "x.gguf"
    (tmp_path / "x.npft-run").mkdir()
    torch.save({"settings": Planted(marker)}, tmp_path / "x.npft-run" / PICKLED_CHECKPOINT)  # as older versions wrote it
    args = ["convert", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--eval-text", "none"]
    assert_fails(run(*args, "--resume"), 2, "older npft-gguf", "not loaded", "--force")
    assert_fails(run(*args), 2, "unfinished or earlier run")
    assert not marker.exists()


def test_convert_tunes_for_the_type_it_writes(tiny_bpe, texts, tmp_path, monkeypatch):
    """--bits 5 --noise rtn tuned against q4_0's error (the grid was fixed before --bits was
    resolved) and then wrote q5_0; the grid tuned for is now the type written."""
    seen = []

    class Stop(Exception):
        pass

    def tune(model, tokens, settings, run_dir, **kw):
        seen.append(settings.grid)
        raise Stop

    monkeypatch.setattr("npft_gguf.convert.tune", tune)
    for args, grid in ((["--bits", "5"], "q5_0"), (["--bits", "8"], "q8_0"), (["--type", "q4_1"], "q4_1")):
        try:
            run("convert", tiny_bpe, "-o", tmp_path / "x.gguf", *args, "--noise", "rtn", "--calib", texts / "calib.txt", *TINY,
                "--eval-text", "none", "--ctx", "64")
        except Stop:
            pass
        assert seen.pop() == grid, args


def test_the_default_method_follows_the_type_written(tiny_bpe, texts, tmp_path):
    """--method auto (the default) is NPFT then importance-weighted scales where llama.cpp's
    imatrix rules exist for the type, NPFT then plain RTN elsewhere; a method asked for is kept."""
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, plan_convert
    from npft_gguf.npft import NPFTSettings

    calib = CalibSettings(calib=str(texts / "calib.txt"), samples=4, length=32)
    cases = ((dict(bits=4), "npft+imatrix"), (dict(type="q5_1"), "npft+imatrix"), (dict(bits=8), "npft"),
             (dict(type="rtn3"), "npft"), (dict(bits=4, method="npft"), "npft"), (dict(bits=4, method="gptq"), "gptq"))
    for kw, method in cases:
        plan = plan_convert(str(tiny_bpe), tmp_path / "x.gguf", ConvertSettings(eval_text="none", ctx=64, **kw), calib,
                            NPFTSettings())
        assert plan.settings.method == method, kw
        assert (plan.npft is not None) == ("npft" in method), kw


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # huggingface_hub, when the test env disables them
def test_save_checkpoint_keeps_the_callers_progress_bar_setting(tmp_path):
    """Turning HF's bars back on unasked would override HF_HUB_DISABLE_PROGRESS_BARS (and warn)."""
    from transformers.utils import logging as hf_logging

    from npft_gguf.convert import save_checkpoint

    class Saves:
        def save_pretrained(self, d):
            Path(d).mkdir(exist_ok=True)
            (Path(d) / "config.json").write_text("{}")

    was = hf_logging.is_progress_bar_enabled()
    try:
        for on in (False, True):
            (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
            save_checkpoint(Saves(), Saves(), tmp_path / str(on))
            assert hf_logging.is_progress_bar_enabled() is on and (tmp_path / str(on) / "config.json").exists()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("keep_tuned", [False, True])
def test_the_guard_writes_the_peer_where_the_tuned_file_is_not_closer(tiny_bpe, texts, tmp_path, monkeypatch, keep_tuned):
    """Issue 28: never farther than llama.cpp's own file. With the verdict 'not closer' (the
    measurement itself is llama.cpp's, in the test above), OUT becomes the peer's bytes and the tuned
    file moves to the run directory; --keep-tuned keeps it."""
    import npft_gguf.validate.guard as guard_mod
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, guard_output, plan_convert
    from npft_gguf.npft import NPFTSettings
    from npft_gguf.writer import ExportSettings, export

    out = tmp_path / "x.gguf"
    plan = plan_convert(str(tiny_bpe), out, ConvertSettings(bits=4, method="npft", eval_text="none", ctx=64, keep_tuned=keep_tuned),
                        CalibSettings(calib=str(texts / "calib.txt"), samples=4, length=32), NPFTSettings(noise="rtn"))
    assert plan.guard is not None and plan.guard[1] == 10 and plan.calib.holdout == 0.1
    export(open_source(str(tiny_bpe)), out, ExportSettings("q8_0"), progress=False)  # stands for the tuned file
    tuned = out.read_bytes()
    seen = {}

    def judge(tuned_path, peer, label, ref, text, ctx, chunks, *a, **k):
        seen.update(text=text, peer=peer)
        return guard_mod.Verdict(tuned_kld=0.5, peer_kld=0.25, peer=label, text="t", ctx=ctx, chunks=chunks)

    monkeypatch.setattr(guard_mod, "judge", judge)
    lines = []
    rec = guard_output(plan, None, False, lines.append)
    assert seen["text"] == plan.guard[0] and seen["peer"].name == "rtn-q4_0.gguf"
    assert rec["tuned_kld"] == 0.5 and rec["peer_kld"] == 0.25 and not rec["tuned_closer"]
    if keep_tuned:
        assert rec["written"] == "tuned" and out.read_bytes() == tuned and "--keep-tuned" in lines[-1]
    else:
        assert rec["written"] == "peer" and out.read_bytes() == seen["peer"].read_bytes()
        assert Path(rec["tuned_file"]).read_bytes() == tuned and "NOT closer" in lines[-1] and "0.5000" in lines[-1]


def test_no_guard_without_text_to_hold_back(tiny_bpe, texts, tmp_path):
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, plan_convert
    from npft_gguf.npft import NPFTSettings

    (tmp_path / "short.txt").write_text(calib_text(1_000))  # its last 10 %: under one 64-token window
    for calib, chunks in ((str(tmp_path / "short.txt"), 10), (str(texts / "calib.txt"), 0)):
        plan = plan_convert(str(tiny_bpe), tmp_path / "x.gguf", ConvertSettings(bits=4, eval_text="none", ctx=64, guard_chunks=chunks),
                            CalibSettings(calib=calib, samples=4, length=32), NPFTSettings(noise="rtn"))
        assert plan.guard is None and plan.calib.holdout == 0.0
        assert bool(plan.notes) == (chunks > 0)  # said before the run, when the guard was asked for


def test_convert_tunes_the_q4_k_m_mix_it_writes(texts, tmp_path, monkeypatch):
    """NPFT for a K mix (issue 30 #3): `convert --type q4_k_m` on a model whose rows are multiples of
    256 is NPFT + imatrix by default, tunes with the noise of the mix's own rules per linear
    (Q4_K and Q6_K searches with the float model's imatrix: imatrix.tuning_quantizers on q4_k_m, the
    tensor grid q4_k for what has no rule of its own) and writes the Q4_K_M mix."""
    from npft_gguf import imatrix

    seen, real = {}, imatrix.tuning_quantizers

    def spy(path, file_type, linears, arch, config):
        out = real(path, file_type, linears, arch, config)
        seen.update(file_type=file_type, imatrix=path, rules={n: type(f.__self__).__name__ for n, f in out.items()})
        return out

    monkeypatch.setattr(imatrix, "tuning_quantizers", spy)  # npft/train.py imports it when it tunes
    d = make_tiny_llama(tmp_path / "wide", hidden=256, ffn=512, layers=2, heads=4, kv_heads=1)
    out = tmp_path / "tiny-q4_k_m.gguf"
    r = run("convert", d, "-o", out, "--type", "q4_k_m", "--calib", texts / "calib.txt", *TINY, "--eval-text", "none",
            "--ctx", "64", "--guard-chunks", "0", "--epochs", "1", "--max-steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["convert"]["method"] == "npft+imatrix" and rec["convert"]["type"] == "q4_k_m"
    assert seen["file_type"] == "q4_k_m" and seen["imatrix"]
    assert set(seen["rules"].values()) == {"SearchRule"}, seen["rules"]  # every linear under its written rule's search
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert {k for n, k in kinds.items() if n.startswith("blk.") and n.endswith("_proj.weight") or
            n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_up.weight",
                        "ffn_gate.weight", "ffn_down.weight"))} == {"Q4_K", "Q6_K"}
