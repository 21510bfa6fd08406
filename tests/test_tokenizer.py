"""llama.cpp must split and merge text exactly as the Hugging Face tokenizer does."""

import json

import pytest
from tokenizers import pre_tokenizers

from npft_gguf import llamacpp
from npft_gguf.errors import UsageError
from npft_gguf.sources import open_source
from npft_gguf.tokenizer import PRE_TOKENIZERS, pre_name
from npft_gguf.writer import ExportSettings, export

from .conftest import make_tiny_llama


def vocab(path):
    return llamacpp.load(path, n_ctx=64, vocab_only=True, logits_all=False)


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_bpe_pre_tokenizers_split_like_llama_cpp(pre, tmp_path, wiki_text):
    """Each table entry, trained into a real BPE, tokenizes 200 kB of WikiText-2 as llama.cpp does."""
    src = open_source(str(make_tiny_llama(tmp_path / "m", pre=pre)))
    out = tmp_path / "m.gguf"
    export(src, out, ExportSettings("f32"), progress=False)
    text = wiki_text[:200_000]
    assert llamacpp.tokenize(vocab(out), text) == src.tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_sentencepiece_tokenizes_like_llama_cpp(tiny_spm, tmp_path, wiki_text):
    """llama.cpp equals the SentencePiece library itself on 200 kB of WikiText-2, and the HF tokenizer
    too, except that HF's converted Llama tokenizer drops the dummy prefix before a text that
    starts with a space (SentencePiece and llama.cpp both keep it), so that case is compared stripped."""
    import sentencepiece as spm

    src = open_source(str(tiny_spm))
    out = tmp_path / "m.gguf"
    export(src, out, ExportSettings("f32"), progress=False)
    text = wiki_text[:200_000]
    llm = vocab(out)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm / "tokenizer.model"))
    assert llamacpp.tokenize(llm, text, add_bos=True) == [sp.bos_id()] + sp.encode(text)
    hf = src.tokenizer()(text.lstrip())["input_ids"]
    assert hf[0] == src.tokenizer().bos_token_id
    assert llamacpp.tokenize(llm, text.lstrip(), add_bos=True) == hf


@pytest.mark.slow
def test_smollm2_tokenizes_all_of_the_evaluation_text_like_llama_cpp(smollm2_slice, tmp_path, wiki_text):
    out = tmp_path / "smol.gguf"
    export(smollm2_slice, out, ExportSettings("q8_0"), progress=False)
    ours = smollm2_slice.tokenizer()(wiki_text, add_special_tokens=False)["input_ids"]
    theirs = llamacpp.tokenize(vocab(out), wiki_text)
    assert len(ours) > 200_000  # the whole text: wiki-heldout about 214k tokens, WikiText-2 test about 290k
    assert theirs == ours


def test_unknown_pre_tokenizer_is_refused():
    odd = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=True)])
    with pytest.raises(UsageError, match="pre-tokenizer"):
        pre_name(odd.__getstate__())


def test_pre_name_ignores_offset_trimming():
    state = json.loads(PRE_TOKENIZERS["smollm"]().__getstate__())
    state["pretokenizers"][1]["trim_offsets"] = False
    assert pre_name(state) == "smollm"
