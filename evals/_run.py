"""What every eval script shares: running the project's own commands (printed as a user would
type them, timed, stopped at the first failure) and naming the machine the numbers came from."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "npft-gguf")


class Log(list):
    """The commands run, with their wall times, saved after each one: a continued run still lists
    what the first one ran."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.exists() else [])
        self.path = path

    def append(self, item) -> None:
        super().append(item)
        self.path.write_text(json.dumps(self, indent=1))


def shown(cmd: list) -> str:
    """The command as a reader would type it from the repository root."""
    return shlex.join([str(c) for c in cmd]).replace(CLI, "npft-gguf").replace(str(ROOT) + "/", "")


def run(cmd: list, log: list | None = None, label: str | None = None) -> tuple[float, str]:
    """Run `cmd` from the repository root, its stderr (progress bars) relayed as it comes; exit with
    that stderr's tail if it fails. Returns (seconds, stdout) and, given a log, appends
    {command, seconds, label} to it."""
    cmd = [str(c) for c in cmd]
    line = shown(cmd)
    print("$", line, flush=True)
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail = bytearray()

    def relay():  # progress bars and messages reach the reader as they come; the tail explains a failure
        while chunk := os.read(p.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-3000]

    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    stdout = p.stdout.read().decode()
    p.wait()
    relaying.join()
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {line}\n{tail.decode(errors='replace')}")
    seconds = time.time() - t
    if log is not None:
        log.append({"command": line, "seconds": round(seconds, 1), "label": label})
    return seconds, stdout


def npft(*args, log: list | None = None, label: str | None = None) -> tuple[float, str]:
    """`npft-gguf ARGS` from this checkout's .venv."""
    return run([CLI, *args], log, label)


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"
