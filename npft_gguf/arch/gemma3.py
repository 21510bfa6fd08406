"""gemma3: Gemma 3 text models (`Gemma3ForCausalLM`, model type gemma3_text).

What differs from llama, and how each is expressed for llama.cpp's gemma3 graph:
- RMSNorm multiplies by (1 + w): the stored w gets +1 on export, -1 reading a GGUF file.
- the embedding is scaled by sqrt(hidden_size): llama.cpp's graph does the same, nothing to write.
- local (sliding-window) and global layers: `attention.sliding_window` and the per-layer pattern as
  an array of bools; the two RoPE bases: `rope.freq_base` (global) and `rope.freq_base_swa` (local);
  linear RoPE scaling applies to the global layers only, as in transformers.
- the query scale 1/sqrt(query_pre_attn_scalar): llama.cpp fixes it from the model size (head_dim,
  or hidden/heads for the 62-layer 27B), so a config whose scalar differs is refused.
- q/k RMS norms per head, and norms before and after both the attention and the MLP.
- GELU (tanh) MLP; NeoX RoPE, as transformers stores it.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, GGUFWriter, Keys, RopeScalingType

from ..errors import UsageError
from . import register
from .base import LLAMA_HPARAMS, Family, HParam, head_dim, with_hparams


def _rope(config, kind: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    return dict(params.get(kind) or {})


def _global_theta(config) -> float:
    return float(_rope(config, "full_attention").get("rope_theta", 1_000_000.0))


def _local_theta(config) -> float:
    return float(_rope(config, "sliding_attention").get("rope_theta", 10_000.0))


def _pattern(config) -> list[bool]:
    return [t == "sliding_attention" for t in config.layer_types]


def llamacpp_query_scalar(config) -> float:
    """What llama.cpp's gemma3 graph divides queries by (squared): it knows the 27B by its 62 layers."""
    if config.num_hidden_layers == 62:
        return config.hidden_size / config.num_attention_heads
    return float(head_dim(config))


class Gemma3(Family):
    gguf_arch = MODEL_ARCH.GEMMA3
    hf_classes = ("Gemma3ForCausalLM",)
    hf_model_types = ("gemma3_text",)
    title = "Gemma 3 (the text model)"
    rope_types = ("default", "linear")
    norm_offset = 1.0
    # the hub's checkpoints store the text model as language_model.model.*; transformers 5 names it model.language_model.*
    wrappers = {"Gemma3ForConditionalGeneration": ("text_config", ("language_model.model.", "model.language_model."))}
    hparams = with_hparams(
        LLAMA_HPARAMS,
        HParam(Keys.Rope.FREQ_BASE, GGUFWriter.add_rope_freq_base, None, _global_theta),
        HParam(Keys.Rope.FREQ_BASE_SWA, GGUFWriter.add_rope_freq_base_swa, None, _local_theta),
        HParam(Keys.Attention.SLIDING_WINDOW, GGUFWriter.add_sliding_window, "sliding_window"),
        HParam(Keys.Attention.SLIDING_WINDOW_PATTERN, GGUFWriter.add_sliding_window_pattern, None, _pattern),
        HParam(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, GGUFWriter.add_final_logit_softcapping, "final_logit_softcapping"),
    )

    def check_config(self, config) -> None:
        full, local = _rope(config, "full_attention"), _rope(config, "sliding_attention")
        for kind, params, allowed in (("global", full, self.rope_types), ("local", local, ("default",))):
            rope = params.get("rope_type", "default")
            if rope not in allowed:
                raise UsageError(f"RoPE scaling {rope!r} on gemma3's {kind} layers is not supported (llama.cpp's gemma3 "
                                 f"takes {', '.join(allowed)}); nothing was loaded or written")
        kinds = set(config.layer_types)
        if not kinds <= {"sliding_attention", "full_attention"}:
            raise UsageError(f"gemma3 layer types {sorted(kinds)} are not ones llama.cpp's gemma3 has; nothing was loaded or written")
        if getattr(config, "attn_logit_softcapping", None):
            raise UsageError("this gemma3 model softcaps attention logits, which llama.cpp's gemma3 graph does not; "
                             "nothing was loaded or written")
        if getattr(config, "use_bidirectional_attention", False):
            raise UsageError("this gemma3 model uses bidirectional attention (an embedding model), which llama.cpp's "
                             "gemma3 causal graph does not; nothing was loaded or written")
        if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UsageError(f"gemma3 activation {config.hidden_activation!r}: llama.cpp's gemma3 uses tanh GELU; "
                             "nothing was loaded or written")
        want = llamacpp_query_scalar(config)
        if abs(float(config.query_pre_attn_scalar) - want) > 1e-6 * want:
            raise UsageError(f"gemma3 query_pre_attn_scalar {config.query_pre_attn_scalar} differs from the {want:g} "
                             "llama.cpp's gemma3 graph uses for this model size; nothing was loaded or written")

    def write_rope_scaling(self, writer: GGUFWriter, config) -> None:
        full = _rope(config, "full_attention")
        if full.get("rope_type") == "linear":  # llama.cpp applies it to the global layers only
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))

    def config_kwargs(self, meta) -> dict:
        kw = super().config_kwargs(meta)
        a = self.name
        full = {"rope_type": "default", "rope_theta": float(meta(Keys.Rope.FREQ_BASE.format(arch=a)) or 1_000_000.0)}
        if meta(Keys.Rope.SCALING_TYPE.format(arch=a)) == "linear":
            full.update(rope_type="linear", factor=float(meta(Keys.Rope.SCALING_FACTOR.format(arch=a))))
        local = {"rope_type": "default", "rope_theta": float(meta(Keys.Rope.FREQ_BASE_SWA.format(arch=a)) or 10_000.0)}
        kw["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        pattern = meta(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=a))
        n = int(kw.get("num_hidden_layers", 0))
        if isinstance(pattern, (list, tuple)):
            kw["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:  # an old file: one global layer in every `pattern` (6 by default)
            every = int(pattern or 6)
            kw["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        heads, hidden = int(kw.get("num_attention_heads", 1)), int(kw.get("hidden_size", 0))
        kw["query_pre_attn_scalar"] = hidden // heads if n == 62 else int(kw.get("head_dim") or hidden // heads)
        return kw

    def expected_shapes(self, c):
        h, d = c.hidden_size, head_dim(c)
        return {**super().expected_shapes(c), "blk.{i}.attn_q_norm.weight": (d,), "blk.{i}.attn_k_norm.weight": (d,),
                "blk.{i}.post_attention_norm.weight": (h,), "blk.{i}.post_ffw_norm.weight": (h,)}


register(Gemma3())
