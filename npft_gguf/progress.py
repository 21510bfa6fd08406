"""One progress-bar style for every long step: tqdm on stderr, with rate and ETA."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(iterable=None, **kw):
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)
