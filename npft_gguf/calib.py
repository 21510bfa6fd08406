"""Calibration data: random fixed-length token segments, deterministic for a seed.

Sensitivity (Fisher), NPFT tuning, GPTQ and the Hessian-trace check all read the same tensor of
token ids, shape (samples, length). Sources, alone or comma-separated: `wiki` (the calibration
articles of the Wikipedia dump fetched from PyPI, texts.py), `news` (the Lee news corpus, same
wheel), the hub's WikiText-2 *train* split or C4 train (through `datasets`), local text files; or
`self` alone: text sampled from the model itself. Evaluation text is refused: `wiki-heldout`, and
files that hold WikiText-2 test text or held-out Wikipedia articles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import texts
from .errors import UsageError

NAMED = ("wiki", "news", "wikitext2", "c4", "self")
# wiki.test.raw as llama.cpp's scripts fetch it (docs/METHOD.md, "Texts"); also matched by content
WIKITEXT2_TEST_SHA256_EDGES = ("173c87a5", "dd08")
WIKITEXT2_TEST_FIRST_LINE = " = Robert Boulter = "


@dataclass(frozen=True)
class CalibSettings:
    calib: str = "c4"
    samples: int = 128
    length: int = 512
    seed: int = 0
    holdout: float = 0.0  # the share of the text, at its end, kept from calibration: convert's guard measures on it


def split_holdout(text: str, fraction: float) -> tuple[str, str]:
    """(calibration part, held-back part) of `text`: the last `fraction` of its characters, from
    the start of a line, is held back, so no segment drawn for calibration overlaps it."""
    if fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - fraction))
    line = text.find("\n", cut)
    cut = line + 1 if line >= 0 else cut
    return text[:cut], text[cut:]


def holdout_text(settings: CalibSettings) -> str:
    """The held-back part of the calibration text (empty without a hold-out, or for `self`)."""
    if settings.holdout <= 0 or settings.calib == "self":
        return ""
    return split_holdout(calibration_text(settings.calib), settings.holdout)[1]


def load_calibration(settings: CalibSettings, tokenizer, model=None, progress: bool = True) -> torch.Tensor:
    """LongTensor (samples, length) of token ids; `model` is needed only for `self`."""
    if settings.samples < 1 or settings.length < 2:
        raise UsageError("--calib-samples must be >= 1 and --calib-len >= 2")
    if settings.calib == "self":
        if model is None:
            raise UsageError("--calib self needs the model to sample from")
        return sample_from_model(model, tokenizer, settings, progress=progress)
    text = split_holdout(calibration_text(settings.calib), settings.holdout)[0]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return random_segments(torch.tensor(ids, dtype=torch.long), settings)


def calibration_text(spec: str) -> str:
    """The raw text for SPEC[,SPEC...], each 'wiki', 'news', 'wikitext2' (train split), 'c4' (train shard) or FILE."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--calib is empty; use {', '.join(NAMED)} or FILE[,FILE...]")
    return "\n\n".join(_one_calibration_text(item) for item in items)


def _one_calibration_text(item: str) -> str:
    if item == "wiki":
        return texts.wiki_calibration_text()
    if item == "news":
        return texts.news_text()
    if item == "wikitext2":
        local = texts.wikitext2_path("train")
        if local:
            return local.read_text(encoding="utf-8")
        return "\n\n".join(texts.hub_rows("wikitext", "wikitext-2-raw-v1", "train", "text",
                                           instead="use --calib wiki (needs no hub) or a local text file"))
    if item == "c4":
        rows = texts.hub_rows("allenai/c4", "en", "train", "text", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                              instead="use --calib wiki (needs no hub) or a local text file")
        return "\n\n".join(rows[:20000])
    if item == "wiki-heldout":
        raise UsageError("wiki-heldout is evaluation text (the Wikipedia articles held out from calibration); "
                         "calibrate on wiki, news, c4 or your own text")
    if item == "self":
        raise UsageError("--calib self samples from the model: use it alone, not in a list of texts")
    path = Path(item).expanduser()
    if path.is_dir():
        raise UsageError(f"calibration text {item!r} is a directory; give UTF-8 text files, or one of {', '.join(NAMED)}")
    if not path.is_file():
        raise UsageError(f"calibration text {item!r}: no such file; use {', '.join(NAMED)} or paths to UTF-8 text files")
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"calibration text {path} is not UTF-8") from None
    held = evaluation_text_in(body)
    if held:
        raise UsageError(f"{path} holds {held}, the evaluation set; calibrate on other text (wiki, news, c4, or self)")
    return body


def is_evaluation_text(body: str) -> bool:
    """True when `body` is, or contains a recognisable part of, an evaluation text."""
    return evaluation_text_in(body) is not None


def evaluation_text_in(body: str) -> str | None:
    """Which evaluation text `body` holds a recognisable part of: the WikiText-2 test text (by
    digest, first heading, or lines of a local copy), or held-out Wikipedia articles (when the
    dump is already cached: checking a file must not download anything); None if neither."""
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if digest.startswith(WIKITEXT2_TEST_SHA256_EDGES[0]) and digest.endswith(WIKITEXT2_TEST_SHA256_EDGES[1]):
        return "WikiText-2 test text"
    if WIKITEXT2_TEST_FIRST_LINE in body:
        return "WikiText-2 test text"
    test = texts.wikitext2_path()
    if test is not None and _occurs(_probes(test.read_text(encoding="utf-8").splitlines(), 40), body):
        return "WikiText-2 test text"
    from .fetch import cached

    if cached("enwiki-dump") and _occurs([p for a in texts.wiki_articles()[1] for p in _probes(a.text.splitlines(), 2)], body):
        return "held-out Wikipedia articles (wiki-heldout)"
    return None


def _probes(lines: list[str], n: int) -> list[str]:
    """`n` evenly spread 120-character pieces from the middle of the long lines (a piece from a
    line's middle survives a different cleaning of the line's ends)."""
    long_lines = [ln for ln in lines if len(ln) > 300]
    return [ln[100:220] for ln in long_lines[:: max(1, len(long_lines) // n)][:n]]


def _occurs(probes: list[str], body: str) -> bool:
    return any(p in body for p in probes)


def random_segments(ids: torch.Tensor, settings: CalibSettings) -> torch.Tensor:
    """`samples` windows of `length` tokens at seeded random offsets (GPTQ's loaders do the same)."""
    n = ids.numel()
    if n <= settings.length:
        raise UsageError(f"the calibration text has {n} tokens, fewer than --calib-len {settings.length}; give more text")
    g = torch.Generator().manual_seed(settings.seed)
    starts = torch.randint(0, n - settings.length, (settings.samples,), generator=g)
    return torch.stack([ids[s:s + settings.length] for s in starts.tolist()])


@torch.no_grad()
def sample_from_model(model, tokenizer, settings: CalibSettings, batch: int = 16, progress: bool = True) -> torch.Tensor:
    """Text the model writes itself (LLM-QAT's data-free recipe): a random first token, then sampling."""
    from .progress import bar

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(settings.seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    n_batches = -(-settings.samples // batch)
    for _ in bar(range(n_batches), desc="calib: sampling from the model", unit="batch", disable=not progress):
        b = min(batch, settings.samples - sum(len(x) for x in out))
        first = torch.randint(0, vocab, (b, 1), generator=g)
        for i in range(b):
            while int(first[i, 0]) in special:
                first[i, 0] = int(torch.randint(0, vocab, (1,), generator=g))
        x = first.to(device)
        past = None
        seq = [x]
        for _ in range(settings.length - 1):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float(), -1).cpu()
            x = torch.multinomial(probs, 1, generator=g).to(device)
            seq.append(x)
        out.append(torch.cat(seq, 1).cpu())
    return torch.cat(out)[: settings.samples]
