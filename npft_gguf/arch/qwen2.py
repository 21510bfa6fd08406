"""qwen2: Qwen2 and Qwen2.5 (q/k/v projections with biases; output tied in the small models).

llama.cpp's qwen2 graph uses NeoX RoPE, the layout transformers stores: no row permutation.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from ..errors import UsageError
from . import register
from .base import Family, head_dim, n_kv_heads


class Qwen2(Family):
    gguf_arch = MODEL_ARCH.QWEN2
    hf_classes = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    title = "Qwen2, Qwen2.5 (incl. Coder, Math)"
    rope_types = ("default", "yarn")

    def check_config(self, config) -> None:
        super().check_config(config)
        if getattr(config, "use_sliding_window", False):
            raise UsageError(f"this {config.model_type} model enables sliding-window attention (use_sliding_window), which "
                             f"llama.cpp's {self.name} architecture does not have; nothing was loaded or written")

    def expected_shapes(self, c):
        q, kv = c.num_attention_heads * head_dim(c), n_kv_heads(c) * head_dim(c)
        return {**super().expected_shapes(c), "blk.{i}.attn_q.bias": (q,), "blk.{i}.attn_k.bias": (kv,), "blk.{i}.attn_v.bias": (kv,)}


register(Qwen2())
