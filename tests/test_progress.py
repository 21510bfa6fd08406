"""Progress bars in logs and pipes: plain lines, no carriage returns, short bars silent."""

import io

from npft_gguf import progress


def test_log_bars_print_plain_lines_and_their_end(monkeypatch):
    log = io.StringIO()
    for _ in progress.bar(range(100), desc="quick", file=log):  # under LOG_DELAY_S: silent
        pass
    assert log.getvalue() == ""
    monkeypatch.setattr(progress, "LOG_DELAY_S", 0)
    b = progress.bar(range(4), desc="tune", unit="batch", file=log)
    for i in b:
        b.set_postfix(loss=f"{3 - i:.3f}")  # waits for the next line, does not print one
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("tune: 100%") and "4/4" in lines[-1] and "loss=0.000" in lines[-1]


def test_log_lines_never_repeat_a_stale_count():
    """tqdm's monitor thread redraws an iterating bar with its last printed count; in a log that
    reads as a stall. With the monitor made eager, every line but the last must show a new count.
    A fresh interpreter: a monitor left by an earlier test keeps its own period."""
    import re
    import subprocess
    import sys

    script = """
import io, time
from tqdm import tqdm
from npft_gguf import progress
progress.LOG_DELAY_S, progress.LOG_INTERVAL_S, tqdm.monitor_interval = 0, 0.3, 0.05
log = io.StringIO()
for i in progress.bar(range(40), desc="tune", file=log):
    time.sleep(0.5 if i in (20, 30) else 0.02)
print(log.getvalue())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True).stdout
    counts = [int(m.group(1)) for m in re.finditer(r"\| *(\d+)/40 ", out)]
    assert counts[-1] == 40 and len(counts) >= 3, out
    assert all(a < b for a, b in zip(counts[:-1], counts[1:-1])), out
