"""Architectures as table entries: how Hugging Face names, shapes and config map onto GGUF.

Adding a family (qwen2, say) means adding an `Arch` here: its HF class names, its GGUF arch
name, the tensor-name table, which projections get the RoPE row permutation, and the config keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError

# HF tensor name (with {i} for the layer) -> GGUF tensor name
LLAMA_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def rope_theta(config) -> float:
    """transformers 5 keeps it in rope_parameters; older configs have rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# GGUF metadata key suffix (after "<arch>.") -> (HF config attribute or getter, GGUF value type)
LLAMA_HPARAMS = {
    "context_length": ("max_position_embeddings", "u32"),
    "embedding_length": ("hidden_size", "u32"),
    "block_count": ("num_hidden_layers", "u32"),
    "feed_forward_length": ("intermediate_size", "u32"),
    "attention.head_count": ("num_attention_heads", "u32"),
    "attention.head_count_kv": ("num_key_value_heads", "u32"),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", "f32"),
    "attention.key_length": (head_dim, "u32"),
    "attention.value_length": (head_dim, "u32"),
    "rope.dimension_count": (head_dim, "u32"),
    "rope.freq_base": (rope_theta, "f32"),
    "vocab_size": ("vocab_size", "u32"),
}


@dataclass(frozen=True)
class Arch:
    name: str  # GGUF general.architecture
    hf_classes: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    tensors: dict[str, str]
    hparams: dict[str, tuple]
    # HF projections stored rotate-half that ggml's interleaved RoPE wants permuted, with the
    # config attribute that gives their head count
    rope_permute: dict[str, str] = field(default_factory=dict)

    def metadata(self, config) -> dict[str, tuple[object, str]]:
        """'<arch>.<key>' -> (value, 'u32'|'f32') read off an HF config."""
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope not in ("default", None):
            raise UsageError(f"RoPE scaling {rope!r} is not supported yet; only plain RoPE models can be exported")
        out = {}
        for key, (src, kind) in self.hparams.items():
            value = src(config) if callable(src) else getattr(config, src)
            out[f"{self.name}.{key}"] = (value, kind)
        return out

    # --- names ---------------------------------------------------------------------------------
    def _patterns(self):
        for hf, gg in self.tensors.items():
            yield re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), gg

    def gguf_name(self, hf_name: str) -> str | None:
        for pat, gg in self._patterns():
            m = pat.match(hf_name)
            if m:
                return gg.replace("{i}", m.group(1)) if m.groups() else gg
        return None

    def hf_name(self, gguf_name: str) -> str | None:
        for hf, gg in self.tensors.items():
            m = re.match("^" + re.escape(gg).replace(r"\{i\}", r"(\d+)") + "$", gguf_name)
            if m:
                return hf.replace("{i}", m.group(1)) if m.groups() else hf
        return None

    # --- RoPE row order ------------------------------------------------------------------------
    def permutes(self, hf_name: str) -> bool:
        """Whether the tensor's rows are in a different order in GGUF than in HF (q/k projections)."""
        return any(f".{proj}." in hf_name for proj in self.rope_permute)

    def _heads(self, hf_name: str, config) -> int | None:
        for proj, attr in self.rope_permute.items():
            if f".{proj}." in hf_name:
                return getattr(config, attr, None) or config.num_attention_heads
        return None

    def to_gguf_layout(self, hf_name: str, w, config):
        """HF rotate-half rows -> ggml interleaved rows (for q/k projections only)."""
        n = self._heads(hf_name, config)
        if n is None:
            return w
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def to_hf_layout(self, hf_name: str, w, config):
        """The inverse of `to_gguf_layout`, for reading GGUF sources."""
        n = self._heads(hf_name, config)
        if n is None:
            return w
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


LLAMA = Arch(
    name="llama",
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM"),
    hf_model_types=("llama", "mistral"),
    tensors=LLAMA_TENSORS,
    hparams=LLAMA_HPARAMS,
    rope_permute={"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"},
)

ARCHES: dict[str, Arch] = {a.name: a for a in (LLAMA,)}


def supported() -> str:
    return ", ".join(sorted({t for a in ARCHES.values() for t in a.hf_model_types}))


def arch_for_config(config) -> Arch:
    """The table entry for an HF config, or a UsageError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    classes = tuple(getattr(config, "architectures", None) or ())
    for arch in ARCHES.values():
        if model_type in arch.hf_model_types or any(c in arch.hf_classes for c in classes):
            return arch
    what = model_type or (classes[0] if classes else "unknown")
    raise UsageError(f"architecture {what!r} is not supported yet; supported: {supported()}")


def arch_for_gguf(name: str) -> Arch:
    if name not in ARCHES:
        raise UsageError(f"GGUF architecture {name!r} is not supported yet; supported: {', '.join(ARCHES)}")
    return ARCHES[name]
