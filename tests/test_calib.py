"""Calibration data: seeded random segments, several files, `self`, and the evaluation text refused."""

from pathlib import Path

import pytest
import torch

from npft_gguf.calib import CalibSettings, is_evaluation_text, load_calibration
from npft_gguf.errors import UsageError
from npft_gguf.texts import wikitext2_path

CALIB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "calib"


@pytest.fixture(scope="module")
def tok(tiny_bpe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bpe)


def test_segments_are_seeded_and_shaped(tok):
    spec = str(CALIB / "lee_news.txt")
    a = load_calibration(CalibSettings(calib=spec, samples=6, length=40, seed=1), tok)
    b = load_calibration(CalibSettings(calib=spec, samples=6, length=40, seed=1), tok)
    c = load_calibration(CalibSettings(calib=spec, samples=6, length=40, seed=2), tok)
    assert a.shape == (6, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(open(spec, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, ids))
    assert " ".join(map(str, a[0].tolist())) in joined  # a real contiguous segment of the text


def test_several_files(tok, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("alpha beta gamma " * 50)
    two = tmp_path / "two.txt"
    two.write_text("delta epsilon " * 50)
    t = load_calibration(CalibSettings(calib=f"{one},{two}", samples=20, length=8), tok)
    assert t.shape == (20, 8)


def test_evaluation_text_is_refused(tok, tmp_path):
    wiki = wikitext2_path()
    if wiki is None:
        pytest.skip("no local WikiText-2 test text")
    with pytest.raises(UsageError, match="evaluation set"):
        load_calibration(CalibSettings(calib=str(wiki), samples=2, length=8), tok)
    part = tmp_path / "excerpt.txt"  # a piece of it, renamed, is refused too
    part.write_text("intro\n" + wiki.read_text(encoding="utf-8")[200_000:400_000])
    assert is_evaluation_text(part.read_text())
    assert not is_evaluation_text((CALIB / "lee_news.txt").read_text(encoding="utf-8"))


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_calibration(CalibSettings(calib=str(tmp_path / "nope.txt")), tok)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(UsageError, match="fewer than --calib-len"):
        load_calibration(CalibSettings(calib=str(short), samples=2, length=64), tok)
    with pytest.raises(UsageError, match="needs the model"):
        load_calibration(CalibSettings(calib="self"), tok)


def test_self_sampling(tok, tiny_bpe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe)
    s = CalibSettings(calib="self", samples=3, length=12, seed=0)
    a = load_calibration(s, tok, model=model, progress=False)
    b = load_calibration(s, tok, model=model, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert int(a.max()) < model.config.vocab_size
