"""llama: Llama 2, Llama 3.x (with its `llama3` RoPE scaling), Mistral, SmolLM2.

llama.cpp's llama graph uses interleaved (non-NeoX) RoPE, so the q/k projections, stored
rotate-half by transformers, have their rows permuted within each head on export. Llama 3.1's
`llama3` RoPE scaling is not a metadata key in llama.cpp but a tensor, `rope_freqs.weight`: per
frequency, the factor its base frequency is divided by; it is computed here from transformers'
own RoPE initialisation for the config, so it matches whatever the HF model computes.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import register
from .base import Family, default_inv_freq, rope_parameters


class Llama(Family):
    hf_classes = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_types = ("llama", "mistral")
    title = "Llama 2, Llama 3.x, Mistral, SmolLM2"
    rope_types = ("default", "linear", "llama3", "yarn")
    rope_permute = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}

    def check_config(self, config) -> None:
        super().check_config(config)
        self.refuse_sliding_window(config, "which llama.cpp's llama architecture does not have")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise UsageError("this llama model has linear biases (attention_bias or mlp_bias), which llama.cpp's "
                             "llama architecture does not read; nothing was loaded or written")

    def extra_tensors(self, config) -> dict[str, np.ndarray]:
        if rope_parameters(config)["rope_type"] != "llama3":
            return {}
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        return {"rope_freqs.weight": (default_inv_freq(config) / scaled.float()).numpy().astype(np.float32)}

    def apply_extra_tensors(self, model, extras) -> None:
        freqs = extras.get("rope_freqs.weight")
        if freqs is None:
            return
        import torch

        rotary = self.front_modules(model)[-1]
        inv = default_inv_freq(model.config) / torch.as_tensor(np.asarray(freqs, np.float32))
        rotary.inv_freq = inv.to(rotary.inv_freq.device)
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = rotary.inv_freq


register(Llama())
