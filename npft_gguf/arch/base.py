"""What the pipeline knows about one model family, on the GGUF side and on the torch side.

A `Family` is the single place that knows a family's quirks. The GGUF side comes from gguf-py's
own tables: the arch (`gguf.MODEL_ARCH`), tensor names (`gguf.get_tensor_name_map`), metadata
keys (`gguf.Keys`) written through GGUFWriter's typed `add_*` calls. The torch side states what
NPFT, GPTQ and sensitivity need: where the decoder layers are, the linears in the order a layer
computes them, the default LoRA targets and the perturbed set.

The base class is the llama-shaped decoder that most families share (RMSNorm, SwiGLU MLP,
grouped-query attention with RoPE); a family module overrides what differs and registers itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, Keys, RopeScalingType, get_tensor_name_map

from ..errors import UsageError

BLOCK = re.compile(r"^(.*?\.)(\d+)(\..*)$")  # the first integer component of an HF name is its layer
GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def rope_parameters(config) -> dict:
    """transformers 5 keeps RoPE settings in rope_parameters; older configs in rope_theta/rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def yarn_original_context(config) -> int:
    """The pre-training context YaRN scales from (transformers falls back to max_position_embeddings)."""
    return int(rope_parameters(config).get("original_max_position_embeddings") or config.max_position_embeddings)


# YaRN settings llama.cpp's GGUF form carries as its defaults only: factor and the original context
# are keys; the rest must be what both llama.cpp and transformers assume when they are absent
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}


def check_yarn(config) -> None:
    rope = rope_parameters(config)
    if not rope.get("factor"):
        raise UsageError("this model's YaRN RoPE scaling has no factor; nothing was loaded or written")
    odd = [f"{k}={rope[k]!r}" for k, v in YARN_DEFAULTS.items() if rope.get(k) is not None and rope[k] != v]
    odd += [f"{k}={rope[k]!r}" for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None]
    if odd:
        raise UsageError(f"this model's YaRN RoPE scaling sets {', '.join(odd)}, which npft-gguf does not write for "
                         "llama.cpp yet (it writes YaRN's factor and original context with the default ramp and "
                         "attention factor); nothing was loaded or written")


def rope_theta(config) -> float:
    return float(rope_parameters(config)["rope_theta"])


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its GGUF key (a `gguf.Keys` template), the typed GGUFWriter call that
    writes it, and the HF config attribute it comes from and, reading a GGUF file, goes back to
    (`get` derives the value where it is not a plain attribute; `attr` None: written, not read back)."""

    key: str
    add: Callable
    attr: str | None
    get: Callable | None = None

    def value(self, config):
        return self.get(config) if self.get else getattr(config, self.attr, None)


LLAMA_HPARAMS = (
    HParam(Keys.LLM.CONTEXT_LENGTH, GGUFWriter.add_context_length, "max_position_embeddings"),
    HParam(Keys.LLM.EMBEDDING_LENGTH, GGUFWriter.add_embedding_length, "hidden_size"),
    HParam(Keys.LLM.BLOCK_COUNT, GGUFWriter.add_block_count, "num_hidden_layers"),
    HParam(Keys.LLM.FEED_FORWARD_LENGTH, GGUFWriter.add_feed_forward_length, "intermediate_size"),
    HParam(Keys.Attention.HEAD_COUNT, GGUFWriter.add_head_count, "num_attention_heads"),
    HParam(Keys.Attention.HEAD_COUNT_KV, GGUFWriter.add_head_count_kv, "num_key_value_heads", n_kv_heads),
    HParam(Keys.Attention.LAYERNORM_RMS_EPS, GGUFWriter.add_layer_norm_rms_eps, "rms_norm_eps"),
    HParam(Keys.Attention.KEY_LENGTH, GGUFWriter.add_key_length, "head_dim", head_dim),
    HParam(Keys.Attention.VALUE_LENGTH, GGUFWriter.add_value_length, None, head_dim),
    HParam(Keys.Rope.DIMENSION_COUNT, GGUFWriter.add_rope_dimension_count, None, head_dim),
    HParam(Keys.Rope.FREQ_BASE, GGUFWriter.add_rope_freq_base, None, rope_theta),
    HParam(Keys.LLM.VOCAB_SIZE, GGUFWriter.add_vocab_size, "vocab_size"),
)

# --- values a model's shape and RoPE are computed from: checked where a source is read ------------
# Each a positive integer (True) or a positive finite number (False), by GGUF key and by HF config
# attribute; a zero head count or a string layer count would otherwise fail deep inside transformers
# or llama.cpp (ZeroDivisionError, TypeError) with no word of which file or value is at fault.
GGUF_VALUES = {Keys.LLM.CONTEXT_LENGTH: True, Keys.LLM.EMBEDDING_LENGTH: True, Keys.LLM.BLOCK_COUNT: True,
               Keys.LLM.FEED_FORWARD_LENGTH: True, Keys.Attention.HEAD_COUNT: True, Keys.Attention.HEAD_COUNT_KV: True,
               Keys.Attention.KEY_LENGTH: True, Keys.Attention.VALUE_LENGTH: True, Keys.LLM.VOCAB_SIZE: True,
               Keys.Rope.DIMENSION_COUNT: True, Keys.Rope.SCALING_ORIG_CTX_LEN: True,
               Keys.Attention.LAYERNORM_RMS_EPS: False, Keys.Rope.FREQ_BASE: False, Keys.Rope.FREQ_BASE_SWA: False,
               Keys.Rope.SCALING_FACTOR: False, Keys.Rope.SCALING_ATTN_FACTOR: False}
# the keys llama.cpp's loader requires of every family here
GGUF_REQUIRED = (Keys.LLM.CONTEXT_LENGTH, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.BLOCK_COUNT, Keys.LLM.FEED_FORWARD_LENGTH,
                 Keys.Attention.HEAD_COUNT, Keys.Attention.LAYERNORM_RMS_EPS)
# the same, by the config attribute each GGUF key is read back to (config.json's names)
HF_VALUES = {h.attr: GGUF_VALUES[h.key] for h in LLAMA_HPARAMS if h.attr} | {"rope_theta": False}


def value_problem(name: str, value, integer: bool) -> str | None:
    """Why `value` cannot be the count or size `name` (None: it can)."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return None if ok else f"{name} is {value!r}, not a positive {'integer' if integer else 'number'}"


def _heads_problem(heads_name: str, heads, kv_name: str, kv) -> str | None:
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        return f"{heads_name} {heads} is not a multiple of {kv_name} {kv}"
    return None


def config_problem(config: dict) -> str | None:
    """What is wrong with config.json's counts and sizes (a multimodal checkpoint's text_config's
    too), read as plain JSON before transformers builds (and divides by) them; None: nothing."""
    for values in (config, config.get("text_config")):
        if not isinstance(values, dict):
            continue
        for name, integer in HF_VALUES.items():
            if values.get(name) is not None and (why := value_problem(name, values[name], integer)):
                return why
        why = _heads_problem("num_attention_heads", values.get("num_attention_heads"), "num_key_value_heads",
                             values.get("num_key_value_heads"))
        if why:
            return why
    return None


def with_hparams(base: tuple[HParam, ...], *new: HParam) -> tuple[HParam, ...]:
    """`base` with `new` added, each replacing the entry of `base` with the same key."""
    keys = {h.key for h in new}
    return tuple(h for h in base if h.key not in keys) + new


# (linears sharing one input), in the order a decoder layer computes them: GPTQ's sequential order
LLAMA_STEPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class Family:
    """A llama-shaped decoder; subclasses change what their family does differently."""

    gguf_arch: MODEL_ARCH = MODEL_ARCH.LLAMA
    hf_classes: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    title = ""                               # for `npft-gguf archs`: the models it covers
    hparams: tuple[HParam, ...] = LLAMA_HPARAMS
    rope_types: tuple[str, ...] = ("default",)  # HF rope types this family can write for llama.cpp
    # torch side
    layers = "model.layers"                  # the decoder's ModuleList, dotted from the CausalLM
    front = ("model.embed_tokens", "model.rotary_emb")  # what runs before the first layer
    steps = LLAMA_STEPS
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # gate excluded, as NPFT's code
    # q/k projections stored rotate-half that ggml's interleaved (non-NeoX) RoPE wants permuted,
    # with the config attribute that gives their head count; empty for NeoX-RoPE families
    rope_permute: dict[str, str] = {}
    norm_offset = 0.0                        # added to norm weights on export (Gemma stores w - 1)
    # multimodal checkpoints whose text model this family serves: outer HF class or model type ->
    # (its text sub-config attribute, the text model's weight prefixes there)
    wrappers: dict[str, tuple[str, tuple[str, ...]]] = {}

    # --- identity --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """general.architecture"""
        return MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every decoder linear, relative to its layer ('self_attn.q_proj')."""
        return tuple(n for group in self.steps for n in group)

    @property
    def perturbed(self) -> tuple[str, ...]:
        """The modules NPFT perturbs (every decoder linear, as the paper's code)."""
        return tuple(n.rsplit(".", 1)[-1] for n in self.linears)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- checks before any work ------------------------------------------------------------------
    def check_config(self, config) -> None:
        """Refuse, by name, what this family's GGUF form cannot express."""
        rope = rope_parameters(config)["rope_type"]
        if rope not in self.rope_types:
            raise UsageError(f"RoPE scaling {rope!r} is not supported for {self.name} (llama.cpp's {self.name} takes "
                             f"{', '.join(self.rope_types)}); nothing was loaded or written")
        if rope == "yarn":
            check_yarn(config)

    @staticmethod
    def refuse_sliding_window(config, why: str) -> None:
        """A `sliding_window` shorter than the context is attention llama.cpp's graph would not
        compute (`why` says how it lacks it)."""
        window = getattr(config, "sliding_window", None)
        if window and window < getattr(config, "max_position_embeddings", 0):
            raise UsageError(f"this {config.model_type} model uses sliding-window attention ({window} of "
                             f"{config.max_position_embeddings} positions), {why}; nothing was loaded or written")

    # --- names -----------------------------------------------------------------------------------
    @staticmethod
    @lru_cache(maxsize=None)
    def _name_map(arch: MODEL_ARCH):
        return get_tensor_name_map(arch, 1)  # layer 0 only: other layers are renumbered around it

    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF tensor name of an HF parameter name, through gguf-py's TensorNameMap."""
        m = BLOCK.match(hf_name)
        lookup = f"{m[1]}0{m[3]}" if m else hf_name
        name = self._name_map(self.gguf_arch).get_name(lookup, try_suffixes=(".weight", ".bias"))
        if name is None:
            return None
        if m:
            b = GGUF_BLOCK.match(name)
            return f"blk.{m[2]}.{b[2]}" if b else None
        return None if GGUF_BLOCK.match(name) else name

    def hf_names(self, config) -> dict[str, str]:
        """GGUF name -> HF name for every parameter of the model `config` describes (built on the
        meta device: no memory, no weights), so reading a GGUF file needs no hand-written table."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        out = {}
        for hf in model.state_dict():
            gg = self.gguf_name(hf)
            if gg is not None:
                out.setdefault(gg, hf)
        return out

    # --- hyperparameters -------------------------------------------------------------------------
    def write_hparams(self, writer: GGUFWriter, config) -> None:
        """The family's `<arch>.*` keys, through GGUFWriter's typed calls."""
        for h in self.hparams:
            value = h.value(config)
            if value is not None:
                h.add(writer, value)
        self.write_rope_scaling(writer, config)

    def write_rope_scaling(self, writer: GGUFWriter, config) -> None:
        rope = rope_parameters(config)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif rope["rope_type"] == "yarn":  # static YaRN, as llama.cpp applies it at every length
            writer.add_rope_scaling_type(RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(yarn_original_context(config))

    def metadata_problem(self, meta: Callable[[str], object]) -> str | None:
        """What is wrong with a GGUF file's `<arch>.*` counts and sizes (a key llama.cpp requires
        missing, a zero, a string, a RoPE scaling without its factor); None: nothing. Checked
        before `config_kwargs` reads them."""
        key = lambda k: k.format(arch=self.name)  # noqa: E731
        missing = [key(k) for k in GGUF_REQUIRED if meta(key(k)) is None]
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (llama.cpp needs it)"
        for k, integer in GGUF_VALUES.items():
            if meta(key(k)) is not None and (why := value_problem(key(k), meta(key(k)), integer)):
                return why
        scaling = meta(key(Keys.Rope.SCALING_TYPE))
        needed = {"linear": (Keys.Rope.SCALING_FACTOR,), "yarn": (Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ORIG_CTX_LEN)}
        for k in needed.get(scaling, ()):
            if meta(key(k)) is None:
                return f"{key(Keys.Rope.SCALING_TYPE)} is {scaling!r} but {key(k)} is missing"
        return _heads_problem(key(Keys.Attention.HEAD_COUNT), meta(key(Keys.Attention.HEAD_COUNT)),
                              key(Keys.Attention.HEAD_COUNT_KV), meta(key(Keys.Attention.HEAD_COUNT_KV)))

    def config_kwargs(self, meta: Callable[[str], object]) -> dict:
        """HF config keyword arguments from a GGUF file's metadata (`meta(key)`, None when absent;
        `metadata_problem` has checked the values)."""
        kw = {"model_type": self.hf_model_types[0], "architectures": [self.hf_classes[0]]}
        for h in self.hparams:
            value = meta(h.key.format(arch=self.name))
            if h.attr and value is not None:
                kw[h.attr] = value
        base = meta(Keys.Rope.FREQ_BASE.format(arch=self.name))
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(base if base is not None else 10000.0)}
        scaling = meta(Keys.Rope.SCALING_TYPE.format(arch=self.name))
        if scaling in ("linear", "yarn"):
            kw["rope_parameters"].update(rope_type=scaling, factor=float(meta(Keys.Rope.SCALING_FACTOR.format(arch=self.name))))
        if scaling == "yarn":
            kw["rope_parameters"]["original_max_position_embeddings"] = int(meta(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=self.name)))
        return kw

    def config_from_extras(self, kw: dict, extras: dict[str, np.ndarray]) -> dict:
        """The config keyword arguments completed from a GGUF file's extra tensors (phi3's longrope factors)."""
        return kw

    # --- tensors that exist only on one side -----------------------------------------------------
    def extra_tensors(self, config) -> dict[str, np.ndarray]:
        """GGUF tensors computed from the config, with no HF parameter (llama3's rope_freqs)."""
        return {}

    def passthrough(self, gguf_name: str) -> bool:
        """GGUF tensors with no HF parameter that a GGUF source carries over as they are."""
        return gguf_name in ("rope_freqs.weight",)

    def apply_extra_tensors(self, model, extras: dict[str, np.ndarray]) -> None:
        """Give a model built from a GGUF file what its extra tensors say (llama3's rope_freqs)."""

    # --- per-tensor transforms, both directions --------------------------------------------------
    def permutes(self, hf_name: str) -> bool:
        """Whether the tensor's rows are in another order in GGUF than in HF (so it cannot stream)."""
        return any(f".{proj}." in hf_name for proj in self.rope_permute)

    def _heads(self, hf_name: str, config) -> int | None:
        for proj, attr in self.rope_permute.items():
            if f".{proj}." in hf_name:
                return getattr(config, attr, None) or config.num_attention_heads
        return None

    def _is_norm(self, hf_name: str) -> bool:
        return self.norm_offset != 0.0 and (self.gguf_name(hf_name) or "").endswith("norm.weight")

    def to_gguf_layout(self, hf_name: str, w, config):
        """HF tensor -> GGUF tensor (rotate-half rows -> interleaved, norm offset)."""
        n = self._heads(hf_name, config)
        if n is not None:
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        if self._is_norm(hf_name):
            w = w.float() + self.norm_offset
        return w

    def to_hf_layout(self, hf_name: str, w, config):
        """The inverse of `to_gguf_layout`, for reading GGUF sources."""
        n = self._heads(hf_name, config)
        if n is not None:
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        if self._is_norm(hf_name):
            w = w - self.norm_offset
        return w

    # --- what llama.cpp's loader will check ------------------------------------------------------
    def expected_shapes(self, c) -> dict[str, tuple[int, ...]]:
        """GGUF name (layer as {i}) -> the shape the config makes it (HF order: rows, cols)."""
        h, ff, v = c.hidden_size, c.intermediate_size, c.vocab_size
        q, kv = c.num_attention_heads * head_dim(c), n_kv_heads(c) * head_dim(c)
        return {"token_embd.weight": (v, h), "output.weight": (v, h), "output_norm.weight": (h,),
                "blk.{i}.attn_norm.weight": (h,), "blk.{i}.ffn_norm.weight": (h,), "blk.{i}.attn_q.weight": (q, h),
                "blk.{i}.attn_k.weight": (kv, h), "blk.{i}.attn_v.weight": (kv, h), "blk.{i}.attn_output.weight": (h, q),
                "blk.{i}.ffn_gate.weight": (ff, h), "blk.{i}.ffn_up.weight": (ff, h), "blk.{i}.ffn_down.weight": (h, ff)}

    optional = frozenset({"output.weight"})  # llama.cpp uses the embedding when the output matrix is absent

    # --- torch side ------------------------------------------------------------------------------
    def causal_lm(self, model):
        """The transformers CausalLM inside a peft wrapper (or the model itself)."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def decoder_layers(self, model):
        try:
            return self.causal_lm(model).get_submodule(self.layers)
        except AttributeError:
            raise TypeError(f"{type(model).__name__} has no .{self.layers}: not a {self.name} causal LM") from None

    def front_modules(self, model) -> list:
        """The modules of `front` this model has (a family may lack one, e.g. a rotary module)."""
        m = self.causal_lm(model)
        out = []
        for path in self.front:
            try:
                out.append(m.get_submodule(path))
            except AttributeError:
                pass
        return out

    def layer_name(self, module_name: str) -> str | None:
        """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj';
        None for modules outside the decoder layers."""
        key = self.layers + "."
        i = module_name.find(key)
        return module_name[i:] if i >= 0 and (i == 0 or module_name[i - 1] == ".") else None

    def describe(self) -> dict:
        return {"arch": self.name, "hf_classes": list(self.hf_classes) + list(self.wrappers), "model_types": list(self.hf_model_types),
                "models": self.title, "rope": list(self.rope_types), "lora_targets": list(self.lora_targets)}


def default_inv_freq(config) -> "torch.Tensor":
    """Plain RoPE frequencies, 1 / theta^(2i/d), float32."""
    import torch

    d = int(getattr(config, "partial_rotary_factor", 1.0) * head_dim(config))
    return 1.0 / (rope_theta(config) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
