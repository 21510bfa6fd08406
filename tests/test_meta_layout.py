"""Meta's original checkpoint layout (params.json, consolidated.NN.pth, tokenizer.model) as a source.

The tiny SentencePiece llama is rewritten here into Meta's layout by hand (Meta names, q/k rows
back in the interleaved RoPE order, matrices cut into model-parallel parts along Meta's dimensions,
params.json), in one part and in two; its exports must equal those of the transformers checkpoint
it came from, byte for byte, tensor by tensor, with the same tokenizer.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from npft_gguf.errors import UsageError
from npft_gguf.meta_layout import context_length, ffn_hidden_size
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.test_cli import assert_fails, cli, listing, out, run  # noqa: F401 - out is a fixture

# transformers name -> Meta name, and the dimension Meta's model-parallel layers cut it along
TO_META = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
LAYER_TO_META = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half rows of each head (first halves, then second halves) back into
    Meta's interleaved pairs: row h*d + 2j + p of Meta's is row h*d + p*d/2 + j of transformers'."""
    d = w.shape[0] // heads
    meta = torch.empty_like(w)
    for h in range(heads):
        for j in range(d // 2):
            for p in range(2):
                meta[h * d + 2 * j + p] = w[h * d + p * d // 2 + j]
    return meta


def to_meta_layout(hf_dir: Path, dst: Path, parts: int) -> Path:
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    meta = {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            mname, dim = LAYER_TO_META[rest]
            mname = f"layers.{i}.{mname}"
        else:
            mname, dim = TO_META[name]
        if ".q_proj." in name:
            w = interleave(w, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            w = interleave(w, cfg["num_key_value_heads"])
        meta[mname] = (w, dim)
    dst.mkdir(parents=True)
    for k in range(parts):
        torch.save({n: (w if dim is None or parts == 1 else w.chunk(parts, dim)[k]).clone() for n, (w, dim) in meta.items()},
                   dst / f"consolidated.{k:02d}.pth")
    # Llama 2's params.json keys; 2*4*64/3 = 170, * 0.75 = 127, up to a multiple of 32: the tiny model's 128
    assert cfg["intermediate_size"] == 128 and cfg["rms_norm_eps"] == 1e-5
    (dst / "params.json").write_text(json.dumps({
        "dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg["num_key_value_heads"], "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5,
        "vocab_size": -1}))
    shutil.copy(hf_dir / "tokenizer.model", dst / "tokenizer.model")
    return dst


@pytest.fixture(scope="module", params=[1, 2], ids=["one-part", "two-parts"])
def meta_dir(request, tiny_spm, tmp_path_factory):
    return to_meta_layout(tiny_spm, tmp_path_factory.mktemp("meta") / "llama-meta", request.param)


def test_the_tiny_checkpoint_is_in_metas_layout(meta_dir):
    """The hand-made checkpoint is what the test says: q in interleaved pairs, parts cut as Meta cuts them."""
    names = sorted(p.name for p in meta_dir.iterdir())
    assert names[-2:] == ["params.json", "tokenizer.model"] and all(n.startswith("consolidated.") for n in names[:-2])
    w = torch.arange(8.0).reshape(8, 1)
    assert interleave(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    if len(names) == 4:
        a, b = (torch.load(meta_dir / f"consolidated.0{k}.pth", weights_only=True) for k in (0, 1))
        assert a["tok_embeddings.weight"].shape[1] == 32 and a["layers.0.attention.wq.weight"].shape[0] == 32
        assert a["layers.0.feed_forward.w2.weight"].shape == (64, 64) and torch.equal(a["norm.weight"], b["norm.weight"])


def exported(src: Path, path: Path, qtype: str) -> GGUFReader:
    if not path.exists():
        export(open_source(str(src)), path, ExportSettings(type=qtype), progress=False)
    return GGUFReader(path)


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory):
    """A folder for the transformers checkpoint's exports, made once for both layouts' tests."""
    return tmp_path_factory.mktemp("hf-exports")


NAMED = ("general.name", "general.source.npft.spec", "general.source.npft.kind", "llama.context_length")


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_meta_layout_exports_the_same_file(qtype, meta_dir, tiny_spm, tmp_path, hf_exports):
    """Every tensor byte for byte, every tokenizer and model field the same; only the names and
    the context length (Llama 2's 4096: params.json does not say it) differ."""
    ours, theirs = exported(meta_dir, tmp_path / "meta.gguf", qtype), exported(tiny_spm, hf_exports / f"{qtype}.gguf", qtype)
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    by_name = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        assert t.tensor_type == by_name[t.name].tensor_type, t.name
        assert bytes(t.data) == bytes(by_name[t.name].data), t.name
    fields = {k: f.contents() for k, f in ours.fields.items() if not k.startswith("GGUF.") and k not in NAMED}
    assert fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.") and k not in NAMED}
    assert any(k.startswith("tokenizer.ggml.tokens") for k in fields)
    assert ours.fields["general.source.npft.kind"].contents() == "meta"
    assert ours.fields["llama.context_length"].contents() == 4096


def test_meta_layout_source_matches_the_transformers_one(meta_dir, tiny_spm):
    """Config, shapes, tensors (whole and in row chunks), the tokenizer and the whole model."""
    ours, theirs = open_source(str(meta_dir)), open_source(str(tiny_spm))
    assert type(ours).__name__ == "MetaSource"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    assert ours.shapes() == theirs.shapes()
    for name in theirs.shapes():
        assert torch.equal(ours.load(name), theirs.load(name)), name
        if len(theirs.shapes()[name]) == 2:
            chunks = list(ours.row_chunks(name, 7))
            assert all(len(c) <= 7 for c in chunks) and torch.equal(torch.cat(chunks), theirs.load(name)), name
    text = "Hello world, 1234 tokens\n\n  é 😀 </s> end"
    ours_tok, theirs_tok = ours.tokenizer(), theirs.tokenizer()
    assert ours_tok(text)["input_ids"] == theirs_tok(text)["input_ids"]
    assert ours_tok.decode(theirs_tok(text)["input_ids"]) == theirs_tok.decode(theirs_tok(text)["input_ids"])
    assert ours.tokenizer_fields() == theirs.tokenizer_fields()
    ids = torch.tensor([theirs_tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(ours.load_model()(ids).logits, theirs.load_model()(ids).logits)


def test_meta_sizes_of_the_released_llamas():
    """params.json of Llama 2 7B, 13B and 70B give transformers' intermediate sizes; the context length by family."""
    assert ffn_hidden_size(4096, 256) == 11008
    assert ffn_hidden_size(5120, 256) == 13824
    assert ffn_hidden_size(8192, 4096, 1.3) == 28672
    assert context_length({"norm_eps": 1e-5}) == 4096 and context_length({"norm_eps": 1e-6}) == 2048
    assert context_length({"norm_eps": 1e-5, "rope_theta": 1000000}) == 16384
    assert context_length({"norm_eps": 1e-5, "max_seq_len": 8192}) == 8192


# --- broken checkpoints fail at open time, in one line ------------------------------------------


@pytest.fixture
def meta_copy(tiny_spm, tmp_path):
    return to_meta_layout(tiny_spm, tmp_path / "meta-copy", 2)


def test_a_pth_that_would_run_code_is_refused_unrun(meta_copy, out, tmp_path):
    """consolidated.NN.pth is a pickle: read with torch's weights-only unpickler, one that would run code fails, unrun."""
    from tests.broken import Planted

    marker = tmp_path / "PWNED"
    part = meta_copy / "consolidated.01.pth"
    good = torch.load(part, weights_only=True)
    torch.save({**good, "norm.weight": Planted(marker)}, part)
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "consolidated.01.pth")
    assert not marker.exists() and listing(out) == []


def test_broken_meta_checkpoints_are_one_line(meta_copy, out):
    (meta_copy / "consolidated.01.pth").rename(meta_copy / "consolidated.02.pth")
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "consolidated.01.pth", "incomplete")
    (meta_copy / "consolidated.02.pth").rename(meta_copy / "consolidated.01.pth")
    params = json.loads((meta_copy / "params.json").read_text())
    (meta_copy / "params.json").write_text(json.dumps({**params, "ffn_dim_multiplier": 1.0}))
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "params.json", "feed_forward.w2", "disagree")
    (meta_copy / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "dim"}))
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "params.json", "dim")
    (meta_copy / "params.json").write_text(json.dumps({**params, "multiple_of": 0}))
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "params.json", "Llama config")
    (meta_copy / "params.json").write_text(json.dumps(params))
    part = meta_copy / "consolidated.00.pth"
    good = torch.load(part, weights_only=True)
    bad = good["layers.1.feed_forward.w3.weight"].clone()
    bad[5, 3] = float("nan")
    torch.save({**good, "layers.1.feed_forward.w3.weight": bad}, part)
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "up_proj", "NaN", "row 5")
    torch.save(good, part)
    (meta_copy / "tokenizer.model").write_text("IHRpa3Rva2Vu 0\n")  # a tiktoken line, as Llama 3 ships
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "tokenizer.model", "SentencePiece")
    for f in meta_copy.glob("consolidated.*.pth"):
        f.unlink()
    assert_fails(run("export", meta_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "params.json", "consolidated.00.pth")
    assert listing(out) == []


def test_params_json_settings_reach_the_config(meta_copy):
    """rope_theta (Code Llama's 1e6, with its 16384 context) and an explicit vocab_size are read, not defaulted."""
    from npft_gguf.arch.base import rope_parameters

    params = json.loads((meta_copy / "params.json").read_text())
    (meta_copy / "params.json").write_text(json.dumps({**params, "rope_theta": 1000000.0, "vocab_size": 500}))
    src = open_source(str(meta_copy))
    assert rope_parameters(src.config)["rope_theta"] == 1e6 and src.config.max_position_embeddings == 16384
    assert src.config.vocab_size == 500 and src.config.num_key_value_heads == 2
    (meta_copy / "params.json").write_text(json.dumps({**params, "vocab_size": 512}))
    with pytest.raises(UsageError, match=r"tensor (output|tok_embeddings)\.weight .* vocab_size 512"):
        open_source(str(meta_copy))


# --- the hub ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_an_unreachable_hub_says_what_to_do(env, out, tmp_path):
    r = cli("export", "meta-llama/Llama-2-7b", "-o", out / "m.gguf", "--type", "q4_0",
            env={**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert_fails(r, 1, "meta-llama/Llama-2-7b", "network", "hf auth login", "https://huggingface.co/meta-llama/Llama-2-7b")
    assert listing(out) == []


@pytest.mark.parametrize("error", ["GatedRepoError", "RepositoryNotFoundError"])
def test_a_gated_repository_says_what_to_do(error, out, monkeypatch):
    from huggingface_hub import errors

    def refuse(repo_id, **kw):  # what the hub's client raises for a 401, built without its HTTP response object
        e = getattr(errors, error).__new__(getattr(errors, error))
        Exception.__init__(e, f"401 Client Error for {repo_id}")
        raise e

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    line = assert_fails(run("export", "meta-llama/Llama-2-7b", "-o", out / "m.gguf", "--type", "q4_0"), 1,
                        "meta-llama/Llama-2-7b", "licence", "hf auth login", "https://huggingface.co/meta-llama/Llama-2-7b")
    assert ("is gated" in line) == (error == "GatedRepoError")
    assert listing(out) == []


def test_the_hub_fetch_asks_for_metas_files_too(tmp_path, monkeypatch, meta_dir):
    """A hub repository in Meta's layout (meta-llama/Llama-2-7b) is fetched whole and read as one."""
    import fnmatch

    asked = []

    def download(repo_id, allow_patterns, **kw):
        asked.extend(allow_patterns)
        return str(meta_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    src = open_source("meta-llama/Llama-2-7b")
    assert src.kind == "meta" and src.spec == "meta-llama/Llama-2-7b"
    for f in ("params.json", "consolidated.00.pth", "consolidated.07.pth", "tokenizer.model"):
        assert any(fnmatch.fnmatch(f, p) for p in asked), f
    assert not any(fnmatch.fnmatch("original/consolidated.00.pth", p) for p in asked)
