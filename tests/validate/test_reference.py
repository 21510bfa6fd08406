"""The reference's logits, recorded once and replayed: the same KLD to the bit, one reference pass."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from npft_gguf.sources import open_source
from npft_gguf.validate.compare import compare
from npft_gguf.atomic import TEMP
from npft_gguf.validate.models import Backend, LlamaCppBackend
from npft_gguf.validate.perplexity import EvalSettings, evaluate
from npft_gguf.validate.reference import RECORD_NAME, RecordedBackend, recorded
from npft_gguf.writer import ExportSettings, export
from tests.test_atomic import dead_pid

CTX = 64
N_CHARS = 8_000  # a dozen windows: enough to tell a replay from a rerun, cheap enough to run often


@pytest.fixture(scope="module")
def files(tiny_bpe, tmp_path_factory):
    src = open_source(str(tiny_bpe))
    d = tmp_path_factory.mktemp("ref")
    for t in ("f32", "q8_0", "q4_0"):
        export(src, d / f"{t}.gguf", ExportSettings(t, pure=True), progress=False)
    return d


@pytest.fixture(scope="module")
def direct(files, wiki_text):
    """q4_0 and q8_0 against F32 the plain way: the reference run beside each file."""
    return {t: evaluate(LlamaCppBackend(files / f"{t}.gguf", CTX), wiki_text[:N_CHARS], "wiki", EvalSettings(CTX),
                        ref=LlamaCppBackend(files / "f32.gguf", CTX), progress=False) for t in ("q4_0", "q8_0")}


class Counting(LlamaCppBackend):
    calls = 0

    def logits(self, tokens, first=0):
        Counting.calls += 1
        return super().logits(tokens, first)


def test_replayed_reference_gives_the_same_kld_to_the_bit(files, direct, wiki_text, tmp_path):
    text, s = wiki_text[:N_CHARS], EvalSettings(CTX)
    Counting.calls = 0
    ref = RecordedBackend(Counting(files / "f32.gguf", CTX), tmp_path)
    first = evaluate(ref, text, "wiki", s, progress=False)
    again = [evaluate(LlamaCppBackend(files / f"{t}.gguf", CTX), text, "wiki", s, ref=ref, progress=False)
             for t in ("q4_0", "q8_0")]
    assert Counting.calls == first.chunks > 1  # the reference ran once per window, for three evaluations
    assert ref.replayed == 2 * first.chunks and ref.recorded > 0
    assert again[0].kld == direct["q4_0"].kld and again[0].ppl_ref == direct["q4_0"].ppl_ref
    assert again[1].kld == direct["q8_0"].kld
    assert first.ppl == pytest.approx(direct["q4_0"].ppl_ref, rel=1e-6)  # float32 NLL there, float64 log-softmax here
    assert again[1].kld["mean"] < again[0].kld["mean"]  # q8_0 is closer than q4_0: the replay is not one answer


def test_a_reference_over_its_budget_runs_again_with_the_same_result(files, direct, wiki_text, tmp_path):
    text, s = wiki_text[:N_CHARS], EvalSettings(CTX)
    Counting.calls = 0
    ref = RecordedBackend(Counting(files / "f32.gguf", CTX), tmp_path, budget=1)
    first = evaluate(ref, text, "wiki", s, progress=False)
    r = evaluate(LlamaCppBackend(files / "q4_0.gguf", CTX), text, "wiki", s, ref=ref, progress=False)
    assert ref.recorded == ref.replayed == 0 and not list(tmp_path.iterdir())
    assert Counting.calls == 2 * first.chunks
    assert r.kld == direct["q4_0"].kld


def test_the_record_is_removed_when_the_block_ends_even_by_interrupt(files):
    seen: list[Path] = []
    with pytest.raises(KeyboardInterrupt):
        with recorded(LlamaCppBackend(files / "f32.gguf", CTX)) as ref:
            ref.logits(list(range(1, CTX + 1)), CTX // 2)
            seen += list(ref.directory.iterdir())
            raise KeyboardInterrupt
    assert len(seen) == 1 and not seen[0].parent.exists()


def test_compare_matches_file_by_file_evaluation(files, direct, wiki_text):
    rep = compare([files / "q4_0.gguf", files / "q8_0.gguf"], files / "f32.gguf", wiki_text[:N_CHARS], "wiki",
                  EvalSettings(CTX), None, progress=False)
    by = {Path(r["file"]).name: r for r in rep["rows"]}
    for t in ("q4_0", "q8_0"):
        assert by[f"{t}.gguf"]["kld"] == direct[t].kld and by[f"{t}.gguf"]["ppl"] == direct[t].ppl


class CountingByFile(LlamaCppBackend):
    """llama.cpp's decodes, counted per file."""

    decodes: dict = {}

    def logits(self, tokens, first=0):
        CountingByFile.decodes[self.label] = CountingByFile.decodes.get(self.label, 0) + 1
        return super().logits(tokens, first)


def test_compare_decodes_the_reference_once_per_window_for_every_file(files, direct, wiki_text, monkeypatch):
    """Three files against one reference: the reference is decoded once per window, not once per file."""
    import npft_gguf.validate.compare as compare_module

    monkeypatch.setattr(compare_module, "LlamaCppBackend", CountingByFile)
    CountingByFile.decodes = {}
    heard = []
    others = [files / "q4_0.gguf", files / "q8_0.gguf", files / "f32.gguf"]  # the reference itself is one row
    rep = compare([*others, files / "q4_0.gguf"], files / "f32.gguf", wiki_text[:N_CHARS], "wiki", EvalSettings(CTX),
                  None, progress=False, log=heard.append)
    n = rep["chunks"]
    assert n > 1 and CountingByFile.decodes == {str(files / "f32.gguf"): n, str(files / "q4_0.gguf"): 2 * n,
                                                 str(files / "q8_0.gguf"): n}
    assert rep["reference"]["decodes"] == n and rep["reference"]["replayed"] == 3 * n and heard == []
    assert rep["reference"]["shortfall"] is None and rep["reference"]["recorded_bytes"] == rep["reference"]["logits_bytes"]
    by = {Path(r["file"]).name: r for r in rep["rows"]}
    assert by["q4_0.gguf"]["kld"] == direct["q4_0"].kld  # replayed, the same to the bit


def test_compare_says_when_the_reference_s_logits_pass_the_budget(files, direct, wiki_text, monkeypatch):
    """Where the record cannot hold every window, compare says so before its first pass and decodes
    the reference again, for each file, on the windows past the budget: the same numbers."""
    import npft_gguf.validate.compare as compare_module
    from npft_gguf.validate import reference

    monkeypatch.setattr(compare_module, "LlamaCppBackend", CountingByFile)
    one_window = CTX // 2 * LlamaCppBackend(files / "f32.gguf", CTX).n_vocab * 4
    monkeypatch.setattr(reference, "BUDGET_BYTES", 3 * one_window)
    CountingByFile.decodes = {}
    heard = []
    rep = compare([files / "q4_0.gguf", files / "q8_0.gguf"], files / "f32.gguf", wiki_text[:N_CHARS], "wiki",
                  EvalSettings(CTX), None, progress=False, log=heard.append)
    n = rep["chunks"]
    assert len(heard) == 1 and "past the record's budget" in heard[0] and "runs again for each of the 2 files" in heard[0]
    assert rep["reference"]["recorded_bytes"] == 3 * one_window and rep["reference"]["shortfall"]
    assert CountingByFile.decodes[str(files / "f32.gguf")] == n + 2 * (n - 3)
    by = {Path(r["file"]).name: r for r in rep["rows"]}
    assert by["q4_0.gguf"]["kld"] == direct["q4_0"].kld and by["q8_0.gguf"]["kld"] == direct["q8_0"].kld


HOLD_A_RECORD = """
import sys, time
from npft_gguf.validate.models import Backend
from npft_gguf.validate.reference import recorded
with recorded(Backend("live", 1, False, None, 0)) as ref:
    print(ref.directory, flush=True)
    time.sleep(120)
"""


def test_a_record_left_by_a_killed_compare_goes_with_the_next_one(tmp_path, monkeypatch):
    """A SIGKILL left npft-gguf-ref-* (up to 16 GB of logits) in the temporary directory, and no run
    removed it: the record is one of atomic.py's temporaries, so the next comparison removes a dead
    process's record, and never a live one's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f".{RECORD_NAME}.npft-{dead_pid()}.ref"
    dead.mkdir()
    (dead / "0.npy").write_bytes(b"logits of a killed comparison")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_RECORD], env={**os.environ, "TMPDIR": str(tmp_path)},
                              stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.parent == tmp_path and live.is_dir(), live
        with recorded(Backend("ours", 1, False, None, 0)) as ref:
            assert not dead.exists() and live.is_dir()
            assert TEMP.match(ref.directory.name) and ref.directory.parent == tmp_path
        assert not ref.directory.exists() and live.is_dir()
    finally:
        holder.kill()
        holder.wait()
