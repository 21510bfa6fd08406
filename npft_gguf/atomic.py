"""Outputs appear whole or not at all: written to a temporary file beside the target, then renamed."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


def check_target(path: Path, force: bool) -> None:
    """Fail before any work when the output cannot or must not be written."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for the output")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is a file, not a directory; choose another output path")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist; create it first")
    try:  # root ignores permission bits, so ask the file system itself
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UsageError(f"cannot write in {parent} ({e.strerror}); choose another output path") from None


@contextmanager
def atomic_output(path: Path, force: bool = False):
    """Yield a temporary path; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    check_target(path, force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
