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
