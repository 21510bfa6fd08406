"""Named texts: the Wikipedia split (disjoint, deterministic, by title), evaluation names, the
WikiText-2 lookup with its one-line failure, and calibration text refused for evaluation."""

import hashlib

import pytest

from npft_gguf import texts
from npft_gguf.errors import NpftError, UsageError
from npft_gguf.texts import is_heldout, load_text, resolve_text, wiki_articles


def test_split_is_disjoint_and_covers_the_dump():
    from npft_gguf.fetch import fetch
    from npft_gguf.wikimarkup import read_articles

    calib, held = wiki_articles()
    every = read_articles(fetch("enwiki-dump"))
    assert {a.title for a in calib} | {a.title for a in held} == {a.title for a in every}
    assert not {a.title for a in calib} & {a.title for a in held}
    assert 60 <= len(calib) <= 80 and 20 <= len(held) <= 40  # about a quarter held out
    assert all(not is_heldout(a.title) for a in calib) and all(is_heldout(a.title) for a in held)
    # no held-out paragraph appears in the calibration text
    calib_text = texts.wiki_calibration_text()
    assert not any(line in calib_text for a in held for line in a.text.splitlines() if len(line) > 200)
    for a in held:
        assert f" = {a.title} =\n" not in calib_text


def test_split_rule_is_fixed_by_title():
    # the rule is sha256(title) mod 4 == 0, so it never depends on order, process or machine
    for title in ("Anarchism", "Autism", "Albert Einstein", "Abraham Lincoln", "x"):
        assert is_heldout(title) == (int(hashlib.sha256(title.encode()).hexdigest(), 16) % 4 == 0)
    assert is_heldout("Anarchism") and not is_heldout("Autism")
    held = [a.title for a in wiki_articles()[1]]
    assert held[:3] == ["Anarchism", "Ayn Rand", "Alain Connes"]


def test_wiki_heldout_says_what_it_is():
    name, body = load_text("wiki-heldout")
    n = len(wiki_articles()[1])
    assert name == f"wiki-heldout (gensim 4.4.0 enwiki test dump, {n} articles never used for calibration)"
    assert body.startswith(" = Anarchism =\n\n") and len(body) > 500_000
    assert resolve_text("wiki-heldout") == name


def test_calibration_texts_are_not_evaluation_texts():
    for spec in ("wiki", "news"):
        with pytest.raises(UsageError, match=f"'{spec}' is calibration text.*wiki-heldout"):
            load_text(spec)


def test_files_and_bad_names(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo", encoding="utf-8")
    assert load_text(str(f)) == (str(f), "héllo")
    with pytest.raises(UsageError, match="no such file; use wiki-heldout, wikitext2, c4"):
        resolve_text("wiki-heldot")
    bad = tmp_path / "b.bin"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_text(str(bad))


def test_wikitext2_from_the_environment(tmp_path, monkeypatch):
    test = tmp_path / "wiki.test.raw"
    test.write_text(" = A = \n\n text .\n", encoding="utf-8")
    monkeypatch.setenv("NPFT_GGUF_WIKITEXT2", str(test))
    assert load_text("wikitext2") == (f"wikitext2 ({test})", test.read_text())
    assert texts.wikitext2_path("train") is None
    (tmp_path / "wiki.train.raw").write_text("train", encoding="utf-8")
    assert texts.wikitext2_path("train") == tmp_path / "wiki.train.raw"
    monkeypatch.setenv("NPFT_GGUF_WIKITEXT2", str(tmp_path / "missing.raw"))
    with pytest.raises(UsageError, match="NPFT_GGUF_WIKITEXT2=.*missing.raw: no such file"):
        resolve_text("wikitext2")


def test_wikitext2_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("NPFT_GGUF_WIKITEXT2", raising=False)
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("local", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_text("wikitext2")[1] == "local"


def test_wikitext2_nowhere_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("NPFT_GGUF_WIKITEXT2", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub answers as it does on a machine without it, at once
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(texts, "_HUB", {})
    with pytest.raises(NpftError) as e:
        resolve_text("wikitext2")
    msg = str(e.value)
    assert "\n" not in msg and "NPFT_GGUF_WIKITEXT2" in msg and "--text FILE" in msg and "--text wiki-heldout" in msg


def test_hub_without_datasets_says_what_to_do(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(NpftError, match="`datasets` package is not installed; do this"):
        texts.hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text", instead="do this")


def test_an_unresolvable_hub_fails_at_once(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(NpftError, match=r"Hub cannot be reached \(hub.invalid: .*\); do this"):
        texts.hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text", instead="do this")


def test_a_directory_is_named_as_one(tmp_path):
    from npft_gguf.calib import calibration_text

    with pytest.raises(UsageError, match="is a directory"):
        load_text(str(tmp_path))
    with pytest.raises(UsageError, match="is a directory"):
        calibration_text(str(tmp_path))
