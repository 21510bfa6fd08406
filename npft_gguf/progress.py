"""One progress-bar style for every long step: tqdm on stderr, with rate and ETA.

On a terminal the bar redraws in place. In logs and pipes (CI, `make demo > log`, nohup) a bar
that has run for half a minute prints one plain line a minute and its final state, so a long
tuning run still says how far it is and when it will end, without carriage-return clutter.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_DELAY_S = 30     # bars shorter than this print nothing in a log
LOG_INTERVAL_S = 60  # one line a minute


class _Lines:
    """A file for tqdm in logs: each redraw becomes one line; clears and blank redraws vanish."""

    def __init__(self, f):
        self.f = f

    def write(self, s: str):
        s = s.replace("\r", "").replace("\x1b[A", "").strip()
        if s:
            self.f.write(s + "\n")

    def flush(self):
        self.f.flush()


class _LogBar(tqdm):
    """In a log, a new postfix (the loss) waits for the next timed line instead of printing now.

    No monitor thread: it redraws an iterating bar with the count of its last line (the loop keeps
    the live count to itself), which in a log reads as a stalled run ("5/16" at 2:22, "10/16" at 2:28).
    """

    monitor_interval = 0

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def bar(iterable=None, **kw):
    kw.setdefault("file", sys.stderr)
    if kw["file"].isatty():
        kw.setdefault("dynamic_ncols", True)
        kw.setdefault("leave", False)
        return tqdm(iterable, **kw)
    kw.update(file=_Lines(kw["file"]), ncols=100, ascii=True, leave=True, delay=LOG_DELAY_S,
              mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S)
    return _LogBar(iterable, **kw)
