"""Two ways to get next-token logits for a token window: llama.cpp on a GGUF file, torch on a model.

Both expose the same few things the protocol needs: the vocabulary, whether it adds BOS, the
training context, a tokenizer, and `logits(tokens, first)`: from a fresh cache, the logits of
positions first..len-1 only (llama.cpp computes no others).

torch is imported only where a torch model runs (it costs about a second of start-up).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import llamacpp
from ..errors import UsageError


@dataclass
class Backend:
    label: str
    n_vocab: int
    add_bos: bool
    bos_id: int | None
    n_ctx_train: int
    settings: dict = field(default_factory=dict)

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, tokens: list[int], first: int = 0) -> np.ndarray:
        """(len - first, n_vocab) float32 logits for positions first..len-1, from a fresh cache.

        The array may be the backend's own buffer, valid until its next call."""
        raise NotImplementedError

    def vocab_fingerprint(self, n: int = 256) -> tuple:
        """The token pieces of every (len/n)-th id, as the vocabulary stores them ('Ġthe', '▁the',
        '<0x0A>', '<|im_end|>'), so one vocabulary gives the same tuple in llama.cpp and in
        transformers. Decoded text would not: the two detokenizers differ on special tokens and on
        tokens that are part of a UTF-8 character."""
        return tuple(self.piece(i) for i in range(0, self.n_vocab, max(1, self.n_vocab // n)))

    def piece(self, token_id: int) -> str:
        raise NotImplementedError


def prefetch_torch() -> None:
    """Import torch on a background thread (the NLL needs it), overlapping llama.cpp's work in C.

    ctypes calls release the GIL, so tokenizing a long text hides most of torch's import time; a
    later `import torch` waits for this one to finish.
    """
    if "torch" in sys.modules:
        return

    def run():
        try:
            importlib.import_module("torch")
        except Exception:  # noqa: BLE001 - the main thread's own import reports it
            pass

    threading.Thread(target=run, name="import-torch", daemon=True).start()


def require_file(path: Path, hint: str = "give a file") -> Path:
    """A file a command reads, or one line saying it is missing or is a directory."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a file; {hint}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return path


GGUF_MAGIC = b"GGUF"


def is_gguf(path) -> bool:
    """A GGUF file by its magic bytes, whatever its suffix (llama.cpp users also write .bin), or by
    its .gguf suffix (so a damaged .gguf still reaches the GGUF reader and its one-line diagnosis)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_gguf(path: Path) -> Path:
    """A GGUF file llama.cpp will run, checked by reading what it holds (inspect: the header, no
    tensor data), so a truncated or corrupt file, or one with a tensor type llama.cpp cannot run,
    fails in one line before any text is loaded or any other file evaluated."""
    from ..inspect import inspect

    path = require_file(path, "give a GGUF file")
    inspect(path)
    llamacpp.check_runnable(path)
    return path


def require_gpu_offload(n_gpu_layers: int, option: str = "--n-gpu-layers") -> None:
    """Asking llama.cpp for GPU layers on a build without a GPU backend is refused, not ignored."""
    if n_gpu_layers and not llamacpp.gpu_offload_supported():
        raise UsageError(f"{option} asks for GPU offload, but this llama-cpp-python build has no GPU backend; "
                         f"reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" (see README) or give {option} 0")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False):
        path = require_file(path, "give a GGUF file")
        require_gpu_offload(n_gpu_layers)
        threads = threads or default_threads()
        # a truncated or corrupt file fails here with one line (llamacpp.load reads it with gguf-py then)
        self.llm = llamacpp.load(path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn)
        self.batch = llamacpp.Batch(n_ctx)
        prefetch_torch()
        m = self.llm._model
        lib = llamacpp._lib()
        vocab = lib.llama_model_get_vocab(m.model)
        super().__init__(
            label=str(path), n_vocab=self.llm.n_vocab(), add_bos=bool(lib.llama_vocab_get_add_bos(vocab)),
            bos_id=int(lib.llama_vocab_bos(vocab)), n_ctx_train=int(lib.llama_model_n_ctx_train(m.model)),
            settings={"backend": "llama.cpp", "threads": threads, "n_gpu_layers": n_gpu_layers,
                      "flash_attn": flash_attn, "gpu_offload": llamacpp.gpu_offload_supported()},
        )

    def tokenize(self, text):
        return llamacpp.tokenize(self.llm, text, add_bos=self.add_bos)

    def logits(self, tokens, first=0):
        return self.batch.decode(self.llm, tokens, first)

    def piece(self, token_id):
        lib = llamacpp._lib()
        return lib.llama_vocab_get_text(lib.llama_model_get_vocab(self.llm._model.model), token_id).decode("utf-8", "replace")


class TokenizerBackend(Backend):
    """A Hugging Face tokenizer and its model's config: the vocabulary half of TorchBackend, enough
    to cut a text into windows (and check that it fills them) before any model is loaded."""

    def __init__(self, tokenizer, config, label: str, settings: dict | None = None):
        self.tok = tokenizer
        ids = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        super().__init__(
            label=label, n_vocab=config.vocab_size, add_bos=bos is not None and ids[:1] == [bos], bos_id=bos,
            n_ctx_train=int(getattr(config, "max_position_embeddings", 0) or 0), settings=settings or {},
        )

    def tokenize(self, text):
        return self.tok(text, add_special_tokens=self.add_bos)["input_ids"]

    def piece(self, token_id):
        from ..tokenizer import pad_piece

        piece = self.tok.convert_ids_to_tokens(token_id)
        return pad_piece(token_id) if piece is None else piece


class TorchBackend(TokenizerBackend):
    """A float (or fake-quantized) model in torch, evaluated with the same protocol."""

    def __init__(self, model, tokenizer, label: str, device: str = "cpu", settings: dict | None = None):
        self.model, self.device = model.eval(), device
        super().__init__(tokenizer, model.config, label,
                         {"backend": "torch", "device": device, "dtype": str(next(model.parameters()).dtype), **(settings or {})})

    def logits(self, tokens, first=0):
        import torch

        with torch.no_grad():
            x = torch.tensor([tokens], device=self.device)
            return self.model(x).logits[0, first:].float().cpu().numpy()


def fake_quantize_(model, type_name: str) -> dict:
    """Replace every decoder linear weight by its RTN fake-quant on the named grid (in place)."""
    import torch

    from ..grids import get_grid

    from ..arch import of_model

    family = of_model(model)
    grid = get_grid(type_name)
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and family.layer_name(name) == name and grid.fits(mod.in_features):
                mod.weight.copy_(grid.fakequant(mod.weight).to(mod.weight.dtype))
                n += 1
    return {"fake_quant": grid.name, "fake_quant_layers": n}
