"""Outputs appear whole or not at all: written to a temporary file beside the target, then renamed."""

from __future__ import annotations

import os
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
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist; create it first")


@contextmanager
def atomic_output(path: Path, force: bool = False):
    """Yield a temporary path; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    check_target(path, force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.open("wb").close()
    except OSError as e:
        raise UsageError(f"cannot write in {path.parent or '.'} ({e.strerror}); choose another output path") from None
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
