"""Tiny random models of each family, built from `transformers` configs with that family's real
quirks, each with a BPE tokenizer trained on real text with the family's pre-tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import train_bpe, train_sentencepiece

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6)


def _llama3(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM, LlamaConfig(vocab_size=vocab, rope_parameters=rope, tie_word_embeddings=True, **SIZES)


def _llama_linear(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    return LlamaForCausalLM, LlamaConfig(vocab_size=vocab, rope_parameters=rope, **SIZES)


def _mistral(vocab):
    from transformers import MistralConfig, MistralForCausalLM

    # Mistral 7B v0.3 / Nemo: no sliding window (v0.1's is refused), an explicit head_dim that is not
    # hidden_size / heads (Nemo: 128 with hidden 5120 and 32 heads), untied output, SentencePiece vocabulary
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return MistralForCausalLM, MistralConfig(vocab_size=vocab, rope_parameters=rope, head_dim=32, sliding_window=None,
                                             tie_word_embeddings=False, **SIZES)


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab, rope_parameters=rope, tie_word_embeddings=True, **SIZES)


def _qwen2_yarn(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2.5's long-context setting (factor 4 over the pre-training context), here over 64 positions
    rope = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    return Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab, rope_parameters=rope, tie_word_embeddings=False, **SIZES)


def _qwen3(vocab):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    # head_dim 32 is not hidden_size / heads (16): the explicit head_dim must be what is written
    return Qwen3ForCausalLM, Qwen3Config(vocab_size=vocab, rope_parameters=rope, head_dim=32, tie_word_embeddings=False,
                                         **SIZES)


def _gemma3(vocab):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    # local and global layers, a window (16) far shorter than the test's context, head_dim 32 (not
    # hidden/heads), and the query scalar llama.cpp's gemma3 uses for that head_dim
    return Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=vocab, rope_parameters=rope, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        **{**SIZES, "num_hidden_layers": 4})


def _phi3(vocab):
    from transformers import Phi3Config, Phi3ForCausalLM

    d = 16  # head_dim; longrope has one factor per rotated pair
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(d // 2)], "long_factor": [1.5 + 0.5 * i for i in range(d // 2)]}
    return Phi3ForCausalLM, Phi3Config(vocab_size=vocab, rope_parameters=rope, original_max_position_embeddings=64,
                                       sliding_window=None, pad_token_id=None, **SIZES)


BUILDERS = {"llama3": _llama3, "llama-linear": _llama_linear, "mistral": _mistral, "qwen2": _qwen2, "qwen2-yarn": _qwen2_yarn, "qwen3": _qwen3, "gemma3": _gemma3, "phi3": _phi3}
PRE = {"llama3": "llama-bpe", "llama-linear": "gpt-2", "mistral": "spm", "qwen2": "qwen2", "qwen2-yarn": "qwen2", "qwen3": "qwen2", "gemma3": "spm", "phi3": "spm"}  # Phi-3 has Llama 2's SentencePiece vocabulary  # tokenizer.ggml.pre
GGUF_ARCH = {"llama3": "llama", "llama-linear": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen2-yarn": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}


def make_tiny(kind: str, out_dir: Path, seed: int = 0) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if PRE[kind] == "spm":
        tok = train_sentencepiece(out_dir)
        tok.save_pretrained(out_dir)  # tokenizer.json too, as real checkpoints have: the family's
        # config must not change how the HF side splits text (transformers picks a class by model type)
    else:
        tok = train_bpe(out_dir, PRE[kind])
    cls, config = BUILDERS[kind](len(tok))
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # larger than the default init, so logits differ visibly between tokens
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)   # qwen2's q/k/v biases: not the zeros they start as
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # norms (qwen3's q/k norms too) that matter
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session", params=list(BUILDERS))
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    # not named "phi3": llama.cpp's vocab loader keys Phi-3 token rules on general.name and then
    # requires Phi-3's own special tokens (<|endoftext|>), which the tiny vocabulary lacks
    return request.param, make_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param.replace('phi3', 'p-3')}"))
