"""qwen3: Qwen3 dense models (RMS norms on each head's queries and keys, an explicit head_dim that
need not be hidden_size / heads, and, unlike qwen2, no q/k/v biases). NeoX RoPE, as transformers
stores it."""

from __future__ import annotations

from gguf import MODEL_ARCH

from ..errors import UsageError
from . import register
from .base import Family, head_dim
from .qwen2 import Qwen2


class Qwen3(Qwen2):
    gguf_arch = MODEL_ARCH.QWEN3
    hf_classes = ("Qwen3ForCausalLM",)
    hf_model_types = ("qwen3",)
    title = "Qwen3 (dense)"

    def check_config(self, config) -> None:
        super().check_config(config)  # qwen2's: plain RoPE, no sliding window
        if getattr(config, "attention_bias", False):
            raise UsageError("this qwen3 model has attention biases, which llama.cpp's qwen3 architecture does not "
                             "read; nothing was loaded or written")

    def expected_shapes(self, c):
        d = head_dim(c)
        return {**Family.expected_shapes(self, c), "blk.{i}.attn_q_norm.weight": (d,), "blk.{i}.attn_k_norm.weight": (d,)}


register(Qwen3())
