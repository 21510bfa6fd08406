"""Calibration data: seeded random segments, several files and named texts, `self`, and the
evaluation texts refused."""

import pytest
import torch

from npft_gguf.calib import CalibSettings, calibration_text, is_evaluation_text, load_calibration
from npft_gguf.errors import UsageError
from npft_gguf.texts import join_articles, news_text, wiki_articles, wiki_calibration_text, wikitext2_path


@pytest.fixture(scope="module")
def news_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("news") / "lee_news.txt"
    path.write_text(news_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_bpe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bpe)


def test_segments_are_seeded_and_shaped(tok, news_file):
    spec = str(news_file)
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


def test_named_texts_alone_and_with_files(tmp_path):
    assert calibration_text("wiki") == wiki_calibration_text()
    assert calibration_text("news") == news_text() and news_text().count("\n") >= 290  # 300 articles, one a line
    own = tmp_path / "own.txt"
    own.write_text("my own words " * 20)
    both = calibration_text(f"wiki, news,{own}")
    assert both.startswith(wiki_calibration_text()) and both.endswith(own.read_text())
    assert news_text() in both


def test_heldout_articles_are_refused(tok, tmp_path):
    with pytest.raises(UsageError, match="wiki-heldout is evaluation text"):
        load_calibration(CalibSettings(calib="wiki-heldout", samples=2, length=8), tok)
    with pytest.raises(UsageError, match="evaluation text"):
        calibration_text("news,wiki-heldout")
    held = wiki_articles()[1]
    copy = tmp_path / "articles.txt"  # one held-out article, renamed and re-wrapped, is still refused
    copy.write_text("some intro\n" + join_articles(held[3:4]).replace("\n", "\n\n"), encoding="utf-8")
    with pytest.raises(UsageError, match="held-out Wikipedia articles"):
        calibration_text(str(copy))
    calib = tmp_path / "wiki-calib.txt"  # the calibration articles as a file are fine
    calib.write_text(wiki_calibration_text(), encoding="utf-8")
    assert calibration_text(str(calib)) == wiki_calibration_text()


def test_self_cannot_be_combined():
    with pytest.raises(UsageError, match="alone"):
        calibration_text("wiki,self")


def test_wikitext2_test_text_is_refused_without_a_local_copy(tmp_path):
    piece = tmp_path / "piece.txt"  # WikiText-2 test's first article heading, as the raw file has it
    piece.write_text(" = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor .\n")
    with pytest.raises(UsageError, match="WikiText-2 test text, the evaluation set"):
        calibration_text(str(piece))


def test_evaluation_text_is_refused(tok, tmp_path, news_file):
    wiki = wikitext2_path()
    if wiki is None:
        pytest.skip("no local WikiText-2 test text")
    with pytest.raises(UsageError, match="evaluation set"):
        load_calibration(CalibSettings(calib=str(wiki), samples=2, length=8), tok)
    part = tmp_path / "excerpt.txt"  # a piece of it, renamed, is refused too
    part.write_text("intro\n" + wiki.read_text(encoding="utf-8")[200_000:400_000])
    assert is_evaluation_text(part.read_text())
    assert not is_evaluation_text(news_file.read_text(encoding="utf-8"))


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


def test_the_held_back_end_of_the_text_is_never_calibrated_on(tiny_bpe, tmp_path):
    """convert's guard measures on the last 10 % of the calibration text: no segment may overlap it."""
    from transformers import AutoTokenizer

    from npft_gguf.calib import CalibSettings, holdout_text, load_calibration, split_holdout

    body = "\n".join(f"line {i} " + "word " * 20 for i in range(400))
    head, tail = split_holdout(body, 0.1)
    assert head + tail == body and tail.startswith("line ") and 0.09 < len(tail) / len(body) < 0.11
    assert split_holdout(body, 0.0) == (body, "")
    path = tmp_path / "calib-held.txt"
    path.write_text(body)
    tok = AutoTokenizer.from_pretrained(tiny_bpe)
    settings = CalibSettings(calib=str(path), samples=64, length=16, holdout=0.1)
    assert holdout_text(settings) == tail
    first_held = int(tail.split()[1])
    seen = {int(w) for row in load_calibration(settings, tok, progress=False) for w in tok.decode(row).split()
            if w.isdigit()}
    assert seen and max(seen) < first_held
