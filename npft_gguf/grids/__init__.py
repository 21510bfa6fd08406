"""GGUF tensor types as a registry of small classes, looked up by name ("q4_0") or ggml type id."""

from __future__ import annotations

from gguf import GGMLQuantizationType

from ..errors import UsageError
from .base import Grid
from .floats import BF16, F16, F32
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .nonuniform import IQ4_NL

GRIDS: dict[str, Grid] = {g.name: g for g in (F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), IQ4_NL())}

try:  # K-quants register themselves when their module is present
    from .kquants import KQUANTS

    GRIDS.update({g.name: g for g in KQUANTS})
except ImportError:  # pragma: no cover
    pass


def get_grid(name: str | GGMLQuantizationType) -> Grid:
    """The grid for a type name (case-insensitive) or ggml type; a UsageError lists the known ones."""
    key = name.name.lower() if isinstance(name, GGMLQuantizationType) else str(name).lower()
    if key not in GRIDS:
        raise UsageError(f"unknown tensor type {name!r}; choose one of: {', '.join(GRIDS)}")
    return GRIDS[key]


__all__ = ["GRIDS", "Grid", "get_grid"]
