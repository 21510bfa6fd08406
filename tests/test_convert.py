"""The one-command pipeline on a tiny model, through the real console script: calibrate, tune,
merge, RTN, GGUF, and the closing llama.cpp evaluation beside plain RTN and the float model;
finetune's Hugging Face checkpoint exports like any other source; bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from tests.conftest import calib_text
from tests.test_cli import assert_fails, cli

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
    assert set(rows) == {"float-f32.gguf", "rtn-q4_0.gguf", out.name}
    assert rows["float-f32.gguf"]["kld_mean"] == 0.0 and rows[out.name]["kld_mean"] > 0
    t = rec["tune"]
    assert t["trace_before"]["n"] == 2 and t["trace_after"]["n"] == 2 and len(t["history"]) >= 1
    # the GGUF is RTN Q4_0 of the tuned weights, with the method in its provenance
    meta = GGUFReader(out).fields
    assert bytes(meta["general.npft.method"].parts[-1]).decode() == "npft"
    assert '"noise": "paper"' in bytes(meta["general.npft.settings"].parts[-1]).decode()
    run = out.with_name(out.stem + ".npft-run")
    assert (run / "report.md").read_text().count("Hessian trace") == 1 and (run / "checkpoint.pt").exists()
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
    assert_fails(again, 2, "already holds a model", "--force")


def test_finetune_for_a_simulated_quantizer(tiny_bpe, texts, tmp_path):
    # tuned once for rtn4, the checkpoint can then meet RTN and GPTQ at rtn4 through convert
    out = tmp_path / "tuned4"
    r = cli("finetune", tiny_bpe, "-o", out, "--calib", texts / "calib.txt", *TINY, "--noise", "rtn", "--grid", "rtn4")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "report.json").read_text())["tune"]["settings"]
    assert settings["grid"] == "rtn4" and settings["noise"] == "rtn"
    assert_fails(cli("finetune", tiny_bpe, "-o", tmp_path / "bad", "--grid", "rtn9x", *TINY), 2, "--grid", "rtn9x")
    assert not (tmp_path / "bad").exists()


def test_convert_bad_input(tiny_bpe, texts, tmp_path):
    from npft_gguf.texts import wikitext2_path

    out = tmp_path / "x.gguf"
    if wikitext2_path():
        assert_fails(cli("convert", tiny_bpe, "-o", out, "--calib", wikitext2_path(), *TINY), 2, "evaluation set")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--calib", tmp_path / "missing.txt", *TINY), 2, "no such file")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--bits", "7"), 2, "--bits")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--bits", "3", *TINY), 2, "no 3-bit GGUF type fits")
    assert_fails(cli("convert", tiny_bpe, "-o", out, "--noise-scope", "all", *TINY), 2, "--noise grid")
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
