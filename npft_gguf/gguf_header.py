"""A lean reader of a GGUF file's header: metadata as plain Python values, and where each tensor's
data lies. gguf-py's GGUFReader builds a numpy view for every string and array item (about 160 MB
and 2.5 s for a 49k-token vocabulary) and maps the whole file; an export needs only the values,
and reads each tensor's bytes itself."""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import GGUFValueType as V

from .errors import UsageError

ALIGNMENT = 32  # GGUF's default, unless general.alignment says otherwise
SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
           V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


class Value(NamedTuple):
    value: object  # str, int, float, bool, or a list of them
    type: V
    sub_type: V | None = None  # the item type of an ARRAY


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order: shape[-1] is the row length
    type: GGMLQuantizationType
    data_offset: int  # from the start of the file
    n_bytes: int


class Header(NamedTuple):
    fields: dict[str, Value]
    tensors: list[TensorInfo]


class _Cursor:
    """Little-endian reads from a buffer; struct.error when the buffer ends too early."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple:
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return out

    def string(self) -> str:
        (n,) = self.take("Q")
        return self.take(f"{n}s")[0].decode("utf-8")

    def value(self, vtype: V) -> Value:
        if vtype == V.STRING:
            return Value(self.string(), vtype)
        if vtype == V.ARRAY:
            values, item = self.array()
            return Value(values, vtype, item)
        return Value(self.take(SCALARS[vtype])[0], vtype)

    def array(self) -> tuple[list, V]:
        """An array's values and item type (nested arrays come back as lists of lists)."""
        item, n = self.take("IQ")
        item = V(item)
        if item == V.STRING:
            return [self.string() for _ in range(n)], item
        if item == V.ARRAY:
            return [self.array()[0] for _ in range(n)], item
        return list(self.take(f"{n}{SCALARS[item]}")), item


def read_header(path: Path) -> Header:
    """The header of a GGUF file (versions 2 and 3, little-endian). ValueError, struct.error or
    UnicodeDecodeError where the file is not one."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        magic, version, n_tensors, n_kv = c.take("4sIQQ")
        if magic != b"GGUF":
            raise ValueError("no GGUF magic")
        if version not in (2, 3):  # a big-endian file reads as a huge version
            raise ValueError(f"GGUF version {version} (or byte order) is not supported")
        fields: dict[str, Value] = {}
        for _ in range(n_kv):
            key = c.string()
            if key in fields:
                raise ValueError(f"duplicate key {key!r}")
            fields[key] = c.value(V(c.take("I")[0]))
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            (n_dims,) = c.take("I")
            dims = c.take(f"{n_dims}Q")
            ggml_type, offset = c.take("IQ")
            raw.append((name, dims, GGMLQuantizationType(ggml_type), offset))
        align = fields["general.alignment"].value if "general.alignment" in fields else ALIGNMENT
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-c.pos // align) * align
    tensors = []
    for name, dims, ggml_type, offset in raw:
        block, size = GGML_QUANT_SIZES[ggml_type]
        if offset % align:  # llama.cpp refuses such a file; read anyway, its bytes would be garbage
            raise ValueError(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {align}")
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name!r} has rows of {dims[0]}, not a multiple of {ggml_type.name}'s block of {block}")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), ggml_type, start + offset, math.prod(dims) // block * size))
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("duplicate tensor names")
    return Header(fields, tensors)


def tensor_problems(tensors) -> list[str]:
    """What is wrong with readable tensor entries that llama.cpp or an export would trip over."""
    return [f"tensor {t.name!r} has a zero-sized dimension (shape {tuple(t.shape)})" for t in tensors if 0 in tuple(t.shape)]


@lru_cache(maxsize=None)
def gguf_py_dequantizes(ggml_type: GGMLQuantizationType) -> bool:
    """Whether gguf-py (gguf.quants.dequantize, what a GGUF source is read with) can turn this type
    into floats: asked of gguf-py itself on one block of zeros, so its own registry decides."""
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def refuse_types(path, tensors: Iterable[TensorInfo], supported: Callable[[GGMLQuantizationType], bool], why: str) -> None:
    """One line naming the first tensor whose type `supported` refuses, read from the header before
    any work; `why` says who cannot handle it and what to do."""
    for t in tensors:
        if not supported(t.type):
            raise UsageError(f"{path}: tensor {t.name!r} is {t.type.name}, {why}")


def check_dequantizable(path, tensors: Iterable[TensorInfo]) -> None:
    """A GGUF file used as a SOURCE: every tensor must be one gguf-py can read as floats."""
    refuse_types(path, tensors, gguf_py_dequantizes,
                 "which gguf-py cannot dequantize, so the file cannot be read as a source; convert it with llama.cpp "
                 "to a type it reads (f32, f16, bf16, q8_0, ...) or start from the Hugging Face checkpoint")
