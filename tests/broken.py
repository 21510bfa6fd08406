"""Broken copies of good models, for the tests that check each defect is refused in one line:
a Hugging Face directory with one tensor or config.json changed, a GGUF file with one tensor's
header entry patched in place."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest


@pytest.fixture
def model_copy(tiny_bpe, tmp_path) -> Path:
    """A copy of `tiny_bpe` to break."""
    return copy_model(tiny_bpe, tmp_path / "model")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> Path:
    cfg = model_dir / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}, indent=2))
    return model_dir


def edit_tensor(model_dir: Path, name: str, fn) -> Path:
    """model.safetensors with tensor `name` replaced by fn(tensor)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, f, metadata={"format": "pt"})
    return model_dir


def _tensor_entry(data: bytes, name: str) -> tuple[int, int]:
    """Where tensor `name`'s header entry starts (after its name) and its number of dimensions."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at, n_dims


def patch_gguf(src: Path, dst: Path, name: str, dims: tuple[int, ...] | None = None, offset_delta: int = 0) -> Path:
    """A copy of a GGUF file with tensor `name`'s dimensions (GGUF order: row length first) or
    data offset changed in its header, everything else byte for byte."""
    data = bytearray(src.read_bytes())
    at, n_dims = _tensor_entry(bytes(data), name)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    off_at = at + 4 + 8 * n_dims + 4
    (offset,) = struct.unpack_from("<Q", data, off_at)
    struct.pack_into("<Q", data, off_at, offset + offset_delta)
    dst.write_bytes(bytes(data))
    return dst


class Planted:
    """A pickle that writes `marker` when it is unpickled: what a crafted checkpoint or weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "unpickled")


def retype_gguf(src: Path, dst: Path, name: str, type_name: str) -> Path:
    """A copy of a float GGUF file (GGUFWriter: same metadata, same tensors) with tensor `name`
    stored as `type_name`: F64 holds its values in float64; any other type gets zero blocks of
    that type, enough for checks that read only the header."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

    from npft_gguf.gguf_header import read_header

    fields = read_header(src).fields
    w = GGUFWriter(dst, fields["general.architecture"].value)
    for key, f in fields.items():
        if key != "general.architecture":
            w.add_key_value(key, f.value, f.type, f.sub_type)
    qtype = GGMLQuantizationType[type_name.upper()]
    for t in GGUFReader(src).tensors:
        data = np.asarray(t.data)
        if t.name != name:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        elif qtype == GGMLQuantizationType.F64:
            w.add_tensor(t.name, data.astype(np.float64), raw_dtype=qtype)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            w.add_tensor(t.name, np.zeros((*data.shape[:-1], data.shape[-1] // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def rewrite_gguf_metadata(src: Path, dst: Path, drop=lambda key: False, **changes) -> Path:
    """A copy of a GGUF file with metadata keys dropped (`drop(key)` true) or changed (keyword
    `a__b=x` sets key `a.b` to x, typed as the value it replaces, or as x says where x is a
    gguf_header.Value, as a new key must be), its tensors byte for byte."""
    import numpy as np
    from gguf import GGUFWriter, quant_shape_to_byte_shape

    from npft_gguf.gguf_header import Value, read_header

    header = read_header(src)
    changes = {k.replace("__", "."): v for k, v in changes.items()}
    w = GGUFWriter(str(dst), header.fields["general.architecture"].value)
    for key, f in header.fields.items():
        if key in ("general.architecture", "general.alignment") or drop(key):
            continue
        new = changes.get(key, f.value)
        f = new if isinstance(new, Value) else f._replace(value=new)
        w.add_key_value(key, f.value, f.type, sub_type=f.sub_type)
    for key in changes.keys() - header.fields.keys():  # new keys: typed by their Value
        w.add_key_value(key, changes[key].value, changes[key].type, sub_type=changes[key].sub_type)
    with open(src, "rb") as fh:
        for t in header.tensors:
            fh.seek(t.data_offset)
            raw = np.frombuffer(fh.read(t.n_bytes), np.uint8)
            w.add_tensor(t.name, raw, raw_shape=quant_shape_to_byte_shape(t.shape, t.type), raw_dtype=t.type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
