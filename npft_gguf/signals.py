"""SIGTERM ends a run the way Ctrl-C does, and a test-only hook that holds a run at a named point.

A `kill PID` (SIGTERM, what systemd, Kubernetes, `timeout` and batch schedulers send) raises
`Terminated`, a KeyboardInterrupt, in the main thread, so the same `finally` blocks that clean up
after Ctrl-C remove every temporary; the CLI prints its usual 'interrupted' line and exits with
143 (128 + SIGTERM, the shell's convention) instead of Ctrl-C's 130 (128 + SIGINT). Further
SIGTERMs are ignored while that cleanup runs, so nothing may catch the interrupt and carry on: an
interrupted measurement never returns as if it were complete. Python handles signals between
bytecodes, so one that arrives during a long C call (llama.cpp's quantizer) takes effect when the
call returns. SIGKILL cannot be caught: what it leaves is recognised by its name and removed by
the next run (atomic.remove_stale).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, after Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread was, so it unwinds like Ctrl-C."""


_received = threading.Event()


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    _received.set()
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated; an exit with status 130 (the CLI's interrupted
    path) after a SIGTERM becomes 143. A SIGTERM that the parent set to be ignored stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SystemExit as e:
        if _received.is_set() and e.code == EXIT_INTERRUPTED:
            raise SystemExit(EXIT_TERMINATED) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- for tests only ------------------------------------------------------------------------------
PAUSE_ENV = "NPFT_GGUF_TEST_PAUSE_AT"
_arrivals: Counter = Counter()


def pause_for_tests(stage: str) -> None:
    """Test hook, not a feature: with NPFT_GGUF_TEST_PAUSE_AT=STAGE[#N] the N-th arrival (default
    the first) at `stage` prints 'paused at STAGE' on stderr and sleeps until SIGUSR1 (or ten
    minutes), so a test can signal a run at a known point. Without the variable it returns at once."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, nth = want.partition("#")
    if name != stage:
        return
    _arrivals[stage] += 1
    if _arrivals[stage] != int(nth or 1):
        return
    previous = signal.signal(signal.SIGUSR1, _resume)  # SIGUSR1 lets the run go on
    try:
        print(f"paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(600)
    except _Resumed:
        pass
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _Resumed(Exception):
    pass


def _resume(signum, frame):
    raise _Resumed()
