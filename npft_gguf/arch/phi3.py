"""phi3: Phi-3 and Phi-3.5 mini (and Phi-4-mini, which shares the class).

What differs from llama: the q/k/v projections are one fused `qkv_proj` (GGUF attn_qkv) and gate
and up one `gate_up_proj` (GGUF ffn_up, twice the feed-forward length), both written as they are,
since llama.cpp's phi3 graph reads them fused; NeoX RoPE, possibly on part of each head
(`partial_rotary_factor`); Phi-3.5's `longrope` scaling becomes llama.cpp's two per-frequency
factor tensors (rope_factors_short/long), its original context length and its attention factor,
the latter taken from transformers' own RoPE initialisation. llama.cpp chooses the long factors
when the context it is given exceeds the original one; transformers when the sequence does.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter, Keys

from . import register
from .base import LLAMA_HPARAMS, Family, HParam, head_dim, n_kv_heads, rope_parameters, with_hparams


def _rotary_dims(config) -> int:
    return int(head_dim(config) * float(rope_parameters(config).get("partial_rotary_factor", 1.0)))


class Phi3(Family):
    gguf_arch = MODEL_ARCH.PHI3
    hf_classes = ("Phi3ForCausalLM",)
    hf_model_types = ("phi3",)
    title = "Phi-3, Phi-3.5 mini, Phi-4-mini"
    rope_types = ("default", "longrope")
    hparams = with_hparams(LLAMA_HPARAMS, HParam(Keys.Rope.DIMENSION_COUNT, GGUFWriter.add_rope_dimension_count, None, _rotary_dims))
    steps = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # gate is fused with up here

    def check_config(self, config) -> None:
        super().check_config(config)
        self.refuse_sliding_window(config, "which llama.cpp's phi3 graph has disabled")

    def write_rope_scaling(self, writer: GGUFWriter, config) -> None:
        rope = rope_parameters(config)
        if rope["rope_type"] != "longrope":
            return
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
        writer.add_rope_scaling_attn_factors(float(attention_factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.original_max_position_embeddings))

    def extra_tensors(self, config) -> dict[str, np.ndarray]:
        rope = rope_parameters(config)
        if rope["rope_type"] != "longrope":
            return {}
        return {f"rope_factors_{k}.weight": np.asarray(rope[f"{k}_factor"], np.float32) for k in ("long", "short")}

    def passthrough(self, gguf_name: str) -> bool:
        return gguf_name in ("rope_factors_long.weight", "rope_factors_short.weight")

    def config_kwargs(self, meta) -> dict:
        kw = super().config_kwargs(meta)
        a = self.name
        dims = meta(Keys.Rope.DIMENSION_COUNT.format(arch=a))
        if dims and kw.get("head_dim") and dims != kw["head_dim"]:
            kw["rope_parameters"]["partial_rotary_factor"] = dims / kw["head_dim"]
        orig = meta(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a))
        if orig:
            kw["original_max_position_embeddings"] = int(orig)
        factor = meta(Keys.Rope.SCALING_ATTN_FACTOR.format(arch=a))
        if factor is not None:
            kw["rope_parameters"]["attention_factor"] = float(factor)
        return kw

    def config_from_extras(self, kw: dict, extras) -> dict:
        if "rope_factors_long.weight" in extras:
            kw["rope_parameters"].update(rope_type="longrope", long_factor=extras["rope_factors_long.weight"].tolist(),
                                         short_factor=extras["rope_factors_short.weight"].tolist(),
                                         original_max_position_embeddings=kw.get("original_max_position_embeddings"))
        return kw

    def expected_shapes(self, c):
        h, ff = c.hidden_size, c.intermediate_size
        q, kv = c.num_attention_heads * head_dim(c), n_kv_heads(c) * head_dim(c)
        shapes = {k: v for k, v in super().expected_shapes(c).items()
                  if not k.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight"))}
        return {**shapes, "blk.{i}.attn_qkv.weight": (q + 2 * kv, h), "blk.{i}.ffn_up.weight": (2 * ff, h)}


register(Phi3())
