"""llama.cpp itself, through llama-cpp-python: its loader, tokenizer, kernels and quantizer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from functools import lru_cache
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


def quantize(src: Path, dst: Path, type_name: str, pure: bool = False, nthread: int = 0,
             imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's own `llama_model_quantize` from a float GGUF; `imatrix` maps GGUF tensor names
    to their per-column importance (float32), as llama-quantize --imatrix passes it."""
    lib = _lib()
    ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise NpftError(f"llama.cpp has no file type {type_name!r}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = nthread
    if imatrix:  # a name-terminated array of (name, data, size); the arrays live until the call returns
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in imatrix.items()}
        entries = (lib.llama_model_imatrix_data * (len(arrays) + 1))()
        for e, (name, a) in zip(entries, arrays.items()):
            e.name, e.data, e.size = name.encode(), a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lib.llama_model_imatrix_data))
    with _quiet():
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:  # llama.cpp says why only in its log; a full disk is the usual cause
        free = shutil.disk_usage(Path(dst).parent).free
        raise NpftError(f"llama_model_quantize failed on {src} (code {rc}; {free / 1e6:.0f} MB free beside {dst}); "
                        "set NPFT_GGUF_VERBOSE=1 to see llama.cpp's log")


@lru_cache(maxsize=1)
def _ggml_base():
    """libggml-base, which llama-cpp-python ships beside libllama: llama.cpp's own quantizers."""
    lib = _lib()
    found = sorted((Path(lib.__file__).parent / "lib").glob("*ggml-base.*"))  # .so, .dylib or .dll
    if not found:  # pragma: no cover - llama-cpp-python always ships it
        raise NpftError(f"llama-cpp-python ships no libggml-base in {Path(lib.__file__).parent / 'lib'}")
    base = ctypes.CDLL(str(found[0]))  # a CDLL call releases the GIL: row chunks quantize on every core
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_void_p]
    base.ggml_quantize_init.argtypes = [ctypes.c_int]
    base.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    base.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return base


def ggml_requires_imatrix(type_name: str) -> bool:
    """Whether llama.cpp refuses to quantize `type_name` without an importance matrix (IQ1/IQ2/IQ3_XXS)."""
    from gguf import GGMLQuantizationType

    return bool(_ggml_base().ggml_quantize_requires_imatrix(int(GGMLQuantizationType[type_name.upper()])))


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


QUANT_CHUNK = 1 << 16  # weights per ggml_quantize_chunk call in a thread pool (what llama-quantize's threads take, about)


class GgmlQuantizer:
    """llama.cpp's own quantizer (ggml_quantize_chunk, what llama-quantize runs per tensor) for one
    tensor type and importance-matrix entry `qw` (its columns' weights; None: without one), run
    on row chunks in a thread pool of `threads` (default: every core). Blocks never cross rows,
    so any row split gives llama-quantize's bytes."""

    def __init__(self, type_name: str, qw=None, threads: int | None = None):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.type = GGMLQuantizationType[type_name.upper()]
        self.block, self.block_bytes = GGML_QUANT_SIZES[self.type]
        self.qw = None if qw is None else np.ascontiguousarray(qw, np.float32).reshape(-1)
        self.threads = threads or cores()
        if self.qw is None and ggml_requires_imatrix(type_name):
            raise NpftError(f"llama.cpp quantizes {type_name} only with an importance matrix (pass --imatrix)")
        _ggml_base().ggml_quantize_init(int(self.type))  # its tables, once, before any thread uses them

    def _check(self, shape) -> None:
        if len(shape) != 2 or shape[1] % self.block:
            raise ValueError(f"{self.type.name.lower()} needs a 2-D weight whose rows are a multiple of {self.block}, "
                             f"got {tuple(shape)}")
        if self.qw is not None and self.qw.size != shape[1]:
            raise ValueError(f"the imatrix entry has {self.qw.size} columns, the weight {shape[1]}")

    def chunk_rows(self, ncols: int) -> int:
        return max(1, QUANT_CHUNK // ncols)

    def _into(self, w: np.ndarray, out: np.ndarray) -> None:
        imat = None if self.qw is None else self.qw.ctypes.data
        _ggml_base().ggml_quantize_chunk(int(self.type), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], imat)

    def pack_rows(self, chunks, shape: tuple[int, int]) -> np.ndarray:
        """GGUF bytes, uint8 (rows, row_bytes), of a 2-D weight of `shape` given as consecutive row
        chunks (numpy or torch), each quantized in the pool as it arrives: a source streams its
        weight while the cores quantize, and at most twice `threads` chunks are held at once."""
        from concurrent.futures import ThreadPoolExecutor, wait

        self._check(shape)
        out = np.empty((shape[0], shape[1] // self.block * self.block_bytes), np.uint8)
        r, pending = 0, []
        with ThreadPoolExecutor(self.threads) as pool:
            for chunk in chunks:
                w = np.ascontiguousarray(chunk.detach().float().cpu().numpy() if hasattr(chunk, "detach") else chunk,
                                         np.float32)  # a torch chunk of any dtype (bf16 has no numpy twin)
                if w.ndim != 2 or w.shape[1] != shape[1] or r + w.shape[0] > shape[0]:
                    raise ValueError(f"a row chunk of shape {w.shape} does not continue a weight of {shape} at row {r}")
                for i in range(0, w.shape[0], self.chunk_rows(shape[1])):  # a big chunk, split for the cores
                    part = w[i:i + self.chunk_rows(shape[1])]
                    pending.append(pool.submit(self._into, part, out[r + i:r + i + part.shape[0]]))
                r += w.shape[0]
                if len(pending) > 2 * self.threads:
                    done, rest = wait(pending, return_when="FIRST_COMPLETED")
                    for f in done:
                        f.result()
                    pending = list(rest)
            for f in pending:
                f.result()
        if r != shape[0]:
            raise ValueError(f"row chunks hold {r} rows of a weight of {shape[0]}")
        return out

    def pack(self, w) -> np.ndarray:
        """GGUF bytes, uint8 (rows, row_bytes), of a whole 2-D weight (numpy or torch)."""
        return self.pack_rows([w], tuple(w.shape))

    def fakequant(self, w):
        """What llama.cpp's quantizer makes of the torch 2-D weight `w`, dequantized (gguf-py's
        dequantizer): float32 of w's shape on w's device, computed on the CPU."""
        import torch
        from gguf.quants import dequantize

        raw = self.pack(w.detach().float().cpu())
        return torch.from_numpy(dequantize(raw, self.type).reshape(tuple(w.shape))).to(w.device)


def ggml_quantize(type_name: str, w, qw=None, threads: int | None = None):
    """The GGUF bytes, uint8 (rows, row_bytes), llama.cpp's own quantizer (ggml_quantize_chunk, what
    llama-quantize runs per tensor) makes of the float32 matrix `w` as `type_name`, with importance
    matrix entry `qw` (its columns' weights) or without one."""
    return GgmlQuantizer(type_name, qw, threads).pack(np.asarray(w, np.float32))


class _CpuTypeTraits(ctypes.Structure):
    """ggml-cpu.h's `struct ggml_type_traits_cpu`, as ggml_get_type_traits_cpu returns it."""
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


@lru_cache(maxsize=1)
def matmul_types() -> frozenset | None:
    """The GGUF tensor types the linked ggml's CPU backend can multiply with (its CPU type traits
    have a dot product), asked of that ggml itself; None where the build does not export them
    (a backend-per-CPU-variant build), and then nothing is refused."""
    from gguf import GGMLQuantizationType

    lib = _lib()
    found = sorted((Path(lib.__file__).parent / "lib").glob("*ggml-cpu.*"))  # .so, .dylib or .dll
    try:
        traits = ctypes.CDLL(str(found[0])).ggml_get_type_traits_cpu
    except (IndexError, OSError, AttributeError):
        return None
    traits.restype, traits.argtypes = ctypes.POINTER(_CpuTypeTraits), [ctypes.c_int]
    return frozenset(t for t in GGMLQuantizationType if t < lib.GGML_TYPE_COUNT and traits(int(t)).contents.vec_dot)


def check_runnable(path: Path) -> None:
    """Refuse, from the header, a file holding a tensor type llama.cpp cannot compute with (F64,
    Q8_1, Q8_K, integers): llama.cpp loads such a file and then aborts the whole process."""
    path = Path(path)
    if matmul_types() is not None and path.is_file():  # a missing file is the loader's to report
        st = path.stat()
        _check_runnable(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _check_runnable(path: Path, _mtime_ns: int, _size: int) -> None:
    """check_runnable once per file version (eval checks its files up front, then loads them)."""
    from .gguf_header import refuse_types
    from .sources import read_gguf_header

    refuse_types(path, read_gguf_header(path).tensors, matmul_types().__contains__,
                 "which llama.cpp cannot compute with (it would abort); export its source model again to a type "
                 "llama.cpp runs (npft-gguf export SOURCE --type f32, f16, q8_0, q4_0, ...)")


def load(path: Path, n_ctx: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
         logits_all: bool = False, flash_attn: bool = False, n_batch: int | None = None,
         vocab_only: bool = False, kv_f32: bool = False):
    """A llama_cpp.Llama for the file; errors become one line.

    Its tensor types are checked from the header first (check_runnable); then llama.cpp loads, and
    a file it cannot load is read by our header reader to say whether it is truncated, misaligned
    or corrupt. `logits_all` only matters to llama-cpp-python's own `eval`/`scores`; `logits()`
    below asks for what it needs.
    """
    lib = _lib()
    if not vocab_only:  # tokenizer-only loads compute nothing
        check_runnable(path)
    kw = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_ubatch=n_batch or n_ctx,
              logits_all=logits_all, verbose=False, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
              vocab_only=vocab_only)
    if kv_f32:  # the K/V cache in float32, not llama.cpp's default f16: exact parity checks need it
        kw["type_k"] = kw["type_v"] = lib.GGML_TYPE_F32
    if n_threads:
        kw["n_threads"] = n_threads
        kw["n_threads_batch"] = n_threads
    try:
        with _quiet():
            return lib.Llama(**kw)
    except Exception as e:  # noqa: BLE001 - llama-cpp-python raises ValueError/RuntimeError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    from .sources import read_gguf_header

    read_gguf_header(Path(path))  # raises the one-line "truncated or corrupt" error when that is the cause
    raise NpftError(f"llama.cpp could not load {path} ({why})")


def tokenize(llm, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's tokenization of `text` in one `llama_tokenize` call (no special-token parsing)."""
    lib = _lib()
    vocab = lib.llama_model_get_vocab(llm.model)
    data = text.encode("utf-8")
    cap = len(data) + 2  # a token holds at least one byte; room for BOS and a space prefix
    for _ in range(2):
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_bos, False)
        if n >= 0:
            return buf[:n]
        cap = -n  # it says how many it needs
    raise NpftError(f"llama.cpp could not tokenize the text ({len(data)} bytes)")


class Batch:
    """One reusable `llama_batch` over numpy arrays: a single sequence at positions 0..n-1."""

    def __init__(self, capacity: int):
        lib = _lib()
        i32 = ctypes.POINTER(ctypes.c_int32)
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.arange(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq0 = np.zeros(1, np.int32)
        self.seq_ids = (i32 * capacity)(*([self.seq0.ctypes.data_as(i32)] * capacity))
        self.want = np.zeros(capacity, np.int8)
        self.batch = lib.llama_batch(
            n_tokens=0, token=self.token.ctypes.data_as(i32), embd=None, pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32), seq_id=ctypes.cast(self.seq_ids, ctypes.POINTER(i32)),
            logits=self.want.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))

    def decode(self, llm, tokens, first: int = 0) -> np.ndarray:
        """Logits (len - first, n_vocab) for positions first..len-1 of `tokens`, from an empty cache.

        Only those positions are computed; the array is llama.cpp's own output buffer, valid
        until the next decode on this context (copy it to keep it).
        """
        lib = _lib()
        n = len(tokens)
        if not 0 <= first < n <= self.capacity:
            raise NpftError(f"cannot decode {n} tokens from position {first} in a batch of {self.capacity}")
        self.token[:n] = tokens
        self.want[:first] = 0
        self.want[first:n] = 1
        self.batch.n_tokens = n
        ctx = llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        rc = lib.llama_decode(ctx, self.batch)
        if rc != 0:
            raise NpftError(f"llama_decode failed (code {rc}) on a window of {n} tokens")
        return np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n - first, llm.n_vocab()))


def logits(llm, tokens: list[int], first: int = 0) -> np.ndarray:
    """Per-position logits (len - first, n_vocab) for positions first..len-1, from a fresh cache (a copy)."""
    return Batch(len(tokens)).decode(llm, tokens, first).copy()


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build has a GPU backend (CUDA, Metal, ...)."""
    return bool(_lib().llama_supports_gpu_offload())


def system_info() -> str:
    return _lib().llama_print_system_info().decode(errors="replace").strip()
