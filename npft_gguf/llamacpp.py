"""llama.cpp itself, through llama-cpp-python: its loader, tokenizer, kernels and quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np

from .errors import NpftError


def _lib():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise NpftError(f"llama-cpp-python is not installed ({e}); run `make test` or `make demo` to set up") from None
    return llama_cpp


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to fd 2 from C; keep the terminal clean unless NPFT_GGUF_VERBOSE is set."""
    if os.environ.get("NPFT_GGUF_VERBOSE"):
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize(src: Path, dst: Path, type_name: str, pure: bool = False, nthread: int = 0) -> None:
    """llama.cpp's own `llama_model_quantize` (no importance matrix) from a float GGUF."""
    lib = _lib()
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise NpftError(f"llama.cpp has no file type {type_name!r}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = nthread
    with _quiet():
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise NpftError(f"llama_model_quantize failed on {src} (code {rc})")


def load(path: Path, n_ctx: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
         logits_all: bool = True, flash_attn: bool = False, n_batch: int | None = None,
         vocab_only: bool = False):
    """A llama_cpp.Llama for the file; errors become one line."""
    lib = _lib()
    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_ubatch=n_batch or n_ctx,
              logits_all=logits_all, verbose=False, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
              vocab_only=vocab_only)
    if n_threads:
        kw["n_threads"] = n_threads
        kw["n_threads_batch"] = n_threads
    try:
        with _quiet():
            return lib.Llama(**kw)
    except Exception as e:  # noqa: BLE001 - llama-cpp-python raises ValueError/RuntimeError
        raise NpftError(f"llama.cpp could not load {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def tokenize(llm, text: str, add_bos: bool = False) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def logits(llm, tokens: list[int]) -> np.ndarray:
    """Per-position logits (n_tokens, n_vocab) from a fresh cache."""
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build has a GPU backend (CUDA, Metal, ...)."""
    return bool(_lib().llama_supports_gpu_offload())


def system_info() -> str:
    return _lib().llama_print_system_info().decode(errors="replace").strip()
