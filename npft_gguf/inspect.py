"""What a GGUF file holds, in one dictionary: architecture, sizes, types, tokenizer, provenance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from .errors import UsageError
from .gguf_header import tensor_problems
from .sources import read_gguf_header
from .tokenizer import gguf_tokenizer_problem


def inspect(path: Path) -> dict:
    """The summary; `problems` lists what llama.cpp or an export would trip over (a zero-sized
    tensor). Files that cannot be read at all (truncated, misaligned data) fail in one line."""
    path = Path(path)
    r = read_gguf_header(path)

    def meta(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.value

    counts, nbytes = Counter(), Counter()
    n_params = 0
    for t in r.tensors:
        counts[t.type.name] += 1
        nbytes[t.type.name] += int(t.n_bytes)
        n_params += int(np.prod(t.shape))
    data_bytes = sum(nbytes.values())
    ftype = meta("general.file_type")
    settings = npft_settings(path, meta("general.npft.settings"))
    tokens = meta("tokenizer.ggml.tokens")
    arch = meta("general.architecture")
    return {
        "path": str(path),
        "name": meta("general.name"),
        "architecture": arch,
        "file_type": LlamaFileType(ftype).name if ftype is not None and ftype in LlamaFileType._value2member_map_ else ftype,
        "n_layers": meta(f"{arch}.block_count"),
        "n_embd": meta(f"{arch}.embedding_length"),
        "context_length": meta(f"{arch}.context_length"),
        "n_tensors": len(r.tensors),
        "n_params": n_params,
        "file_size_bytes": path.stat().st_size,
        "bits_per_weight": round(8.0 * data_bytes / max(n_params, 1), 4),
        "types": {k: {"tensors": counts[k], "bytes": nbytes[k]} for k in sorted(counts)},
        "tokenizer": {
            "model": meta("tokenizer.ggml.model"),
            "pre": meta("tokenizer.ggml.pre"),
            "n_tokens": len(tokens) if isinstance(tokens, list) else 0,
            "add_bos": meta("tokenizer.ggml.add_bos_token"),
            "chat_template": meta("tokenizer.chat_template") is not None,
        },
        "provenance": {
            "tool": meta("general.npft.tool"),
            "method": meta("general.npft.method"),
            "source": meta("general.source.npft.spec"),
            "settings": settings,
        },
        "problems": tensor_problems(r.tensors) + [f"tokenizer: {p}" for p in [gguf_tokenizer_problem(r.fields)] if p],
    }


def npft_settings(path: Path, text) -> dict | None:
    """The export settings npft-gguf records in general.npft.settings (a JSON object), or a
    one-line error naming the file when that key holds something else."""
    if text is None:
        return None
    try:
        settings = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise UsageError(f"{path}: general.npft.settings is not JSON ({e}); the file's provenance is corrupt") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{path}: general.npft.settings holds {text!r}, not the JSON object npft-gguf writes; "
                         "the file's provenance is corrupt")
    return settings


def format_text(info: dict) -> str:
    lines = [
        f"{info['path']}",
        f"  name          {info['name']}",
        f"  architecture  {info['architecture']}  ({info['n_layers']} layers, width {info['n_embd']}, context {info['context_length']})",
        f"  file type     {info['file_type']}",
        f"  size          {info['file_size_bytes'] / 1e6:.1f} MB, {info['n_params'] / 1e6:.1f} M params, {info['bits_per_weight']:.2f} bits/weight",
        f"  tensors       {info['n_tensors']}: " + ", ".join(f"{k} x{v['tensors']}" for k, v in info["types"].items()),
        f"  tokenizer     {info['tokenizer']['model']}" + (f" (pre {info['tokenizer']['pre']})" if info["tokenizer"]["pre"] else "")
        + f", {info['tokenizer']['n_tokens']} tokens, add_bos {info['tokenizer']['add_bos']}",
    ]
    p = info["provenance"]
    if p["tool"]:
        lines.append(f"  made by       {p['tool']}, method {p['method']}, from {p['source']}")
        lines.append(f"  settings      {json.dumps(p['settings'], sort_keys=True)}")
    else:
        lines.append("  made by       (not npft-gguf)")
    lines += [f"  PROBLEM       {p}" for p in info.get("problems", [])]
    return "\n".join(lines)
