"""Named texts for evaluation and calibration, none of which needs anything beside the clone.

Real text with no hub comes from the test data of the PyPI wheel gensim 4.4.0 (fetch.py): an
English Wikipedia dump of about 100 articles, which wikimarkup.py turns into prose, and the Lee
news corpus. The Wikipedia articles are split by title, never by position: an article is held out
for evaluation when sha256(title) is divisible by HELDOUT_EVERY, so the split does not move when
the cleaning changes which stubs survive. `wiki` (calibration) and `wiki-heldout` (evaluation)
are disjoint by construction. WikiText-2 and C4 come from a local copy or the `datasets` hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .errors import NpftError, UsageError

EVAL_NAMED = ("wiki-heldout", "wikitext2", "c4")
CALIB_ONLY = ("wiki", "news")
HELDOUT_EVERY = 4
WIKI_SOURCE = "gensim 4.4.0 enwiki test dump"
NO_WIKITEXT2 = ("set NPFT_GGUF_WIKITEXT2 to a local wiki.test.raw, pass --text FILE, "
                "or use --text wiki-heldout (needs no hub)")


def wikitext2_path(split: str = "test") -> Path | None:
    """A local WikiText-2 raw file: $NPFT_GGUF_WIKITEXT2 (the test file; train is looked for beside
    it), else ./wikitext-2-raw/wiki.<split>.raw; None when there is none."""
    env = os.environ.get("NPFT_GGUF_WIKITEXT2")
    if env:
        test = Path(env).expanduser()
        if not test.is_file():
            raise UsageError(f"NPFT_GGUF_WIKITEXT2={env}: no such file; point it at wiki.test.raw or unset it")
        path = test if split == "test" else test.with_name(f"wiki.{split}.raw")
        return path if path.is_file() else None
    path = Path.cwd() / "wikitext-2-raw" / f"wiki.{split}.raw"
    return path if path.is_file() else None


def is_heldout(title: str) -> bool:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % HELDOUT_EVERY == 0


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple, tuple]:
    """(calibration articles, held-out articles) of the fetched Wikipedia dump, in dump order."""
    from .fetch import fetch
    from .wikimarkup import read_articles

    articles = read_articles(fetch("enwiki-dump"))
    if not articles:
        raise NpftError("the fetched Wikipedia dump holds no articles; delete the cache entry and retry")
    return (tuple(a for a in articles if not is_heldout(a.title)), tuple(a for a in articles if is_heldout(a.title)))


def join_articles(articles) -> str:
    """WikiText-2's layout: ' = Title = ', a blank line, the paragraphs, a blank line."""
    return "".join(f" = {a.title} =\n\n{a.text}\n\n" for a in articles)


def wiki_calibration_text() -> str:
    return join_articles(wiki_articles()[0])


def wiki_heldout() -> tuple[str, str]:
    held = wiki_articles()[1]
    return f"wiki-heldout ({WIKI_SOURCE}, {len(held)} articles never used for calibration)", join_articles(held)


@lru_cache(maxsize=1)
def news_text() -> str:
    """The Lee news corpus: 300 short ABC news articles, one per line."""
    from .fetch import fetch

    return fetch("lee-background").read_text(encoding="utf-8")


def resolve_text(spec: str) -> str:
    """The evaluation text's name, after checking that it can be had (fetched, found or loaded):
    call at the start of a command so a bad --text fails before any work. Named texts stay in
    memory, so the later load_text is free."""
    return load_text(spec)[0]


def load_text(spec: str) -> tuple[str, str]:
    """(name, text) for 'wiki-heldout', 'wikitext2', 'c4' or a file path."""
    if spec in EVAL_NAMED:
        return _named_eval(spec)
    if spec in CALIB_ONLY:
        raise UsageError(f"{spec!r} is calibration text (--calib {spec}); evaluate on wiki-heldout "
                         "(the Wikipedia articles calibration never sees), wikitext2, c4 or a file")
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UsageError(f"text {spec!r} is a directory; give a UTF-8 text file, or one of {', '.join(EVAL_NAMED)}")
    if not path.is_file():
        raise UsageError(f"text {spec!r}: no such file; use {', '.join(EVAL_NAMED)} or a path to a UTF-8 text file")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


_HUB: dict[str, tuple[str, str]] = {}  # hub texts already loaded in this process


def _named_eval(spec: str) -> tuple[str, str]:
    if spec == "wiki-heldout":
        return wiki_heldout()
    if spec == "wikitext2":
        local = wikitext2_path()
        if local:
            return f"wikitext2 ({local})", local.read_text(encoding="utf-8")
    if spec not in _HUB:
        if spec == "wikitext2":
            _HUB[spec] = "wikitext2 (hub)", "".join(hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text", instead=NO_WIKITEXT2))
        else:
            rows = hub_rows("allenai/c4", "en", "validation", "text",
                            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
            _HUB[spec] = "c4 validation shard 0 (hub)", "\n\n".join(rows[:1100])
    return _HUB[spec]


def hub_rows(name, config, split, column, instead: str = "pass a local text file instead", **kw) -> list[str]:
    """One column of a hub dataset through `datasets`; `instead` says what to do when that fails."""
    try:
        import datasets
    except ImportError:
        raise NpftError(f"{name} is not on this machine and the `datasets` package is not installed; {instead}") from None
    unreachable = hub_unreachable()
    if unreachable:
        raise NpftError(f"could not fetch {name}: the Hugging Face Hub cannot be reached ({unreachable}); {instead}")
    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "datasets")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:  # its retry warnings, one per attempt, are not our one-line error
            q.setLevel(logging.ERROR)
        ds = datasets.load_dataset(name, config, split=split, **kw)
        return list(ds[column])
    except Exception as e:  # noqa: BLE001 - offline, missing, gated
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise NpftError(f"could not fetch {name} from the Hugging Face Hub ({first}); {instead}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def hub_unreachable() -> str | None:
    """Why the hub surely cannot be reached (its host name does not resolve), or None. Saves the
    half minute of retries `datasets` spends on a machine without it; with a proxy, or in the hub's
    offline mode (a local `datasets` cache), `datasets` decides."""
    if any(os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None
