"""One progress-bar style for every long step: tqdm on stderr, with rate and ETA."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(iterable=None, **kw):
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    if not kw["file"].isatty():  # no carriage-return redraws in logs and pipes
        kw["disable"] = True
    return tqdm(iterable, **kw)
