"""Sources read what gguf-py reads: the lean GGUF header against GGUFReader, row chunks against
whole tensors; broken sources fail when they are opened, in one line."""

import pytest
import torch
from gguf import GGUFReader
from gguf import GGUFValueType as V

from npft_gguf.gguf_header import read_header
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.broken import edit_config, edit_tensor, model_copy, patch_gguf, rewrite_gguf_metadata  # noqa: F401 - model_copy is a fixture
from tests.test_cli import assert_fails, cli, listing, no_work, out, run  # noqa: F401 - no_work and out are fixtures


def test_gguf_header_equals_gguf_reader(smollm2):
    """Every key, value (and its Python type), value type and tensor location of the demo file."""
    reader, header = GGUFReader(smollm2.path), read_header(smollm2.path)
    assert list(header.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, f in header.fields.items():
        theirs = reader.fields[key]
        assert f.value == theirs.contents() and type(f.value) is type(theirs.contents()), key
        if isinstance(f.value, list):
            assert {type(v) for v in f.value} == {type(v) for v in theirs.contents()}, key
        assert (f.type, f.sub_type) == (theirs.types[0], theirs.types[1] if f.type == V.ARRAY else None), key
    assert [(t.name, t.type, t.shape, t.data_offset, t.n_bytes) for t in header.tensors] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes) for t in reader.tensors]


@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-q8") / "tiny-q8_0.gguf"
    export(open_source(str(tiny_bpe)), path, ExportSettings(type="q8_0", pure=True), progress=False)
    return path


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_row_chunks_equal_the_whole_tensor(kind, tiny_bpe, tiny_q8_gguf):
    """In chunks of 7 rows (a short last one), q/k projections (reordered rows) included."""
    src = open_source(str(tiny_bpe if kind == "hf" else tiny_q8_gguf))
    for name, shape in src.shapes().items():
        if len(shape) == 2:
            chunks = list(src.row_chunks(name, 7))
            assert [len(c) for c in chunks[:-1]] == [7] * (len(chunks) - 1), name
            assert torch.equal(torch.cat(chunks), src.load(name)), name


# --- broken sources fail at open time, in one line, before any work ------------------------------


def test_truncated_safetensors_is_one_line(model_copy, out):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "model.safetensors", "truncated")
    assert listing(out) == []


def test_a_pytorch_bin_that_would_run_code_is_refused_unrun(model_copy, out, tmp_path):
    """Issue 27 #4: pytorch_model*.bin is a pickle. It is read with torch's weights-only unpickler
    (tensors and plain containers only), so one that would run code fails in one line, unrun."""
    import pickle

    from tests.broken import Planted

    marker = tmp_path / "PWNED"
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Planted(marker)}))
    assert_fails(run("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "pytorch_model.bin")
    assert not marker.exists() and listing(out) == []
    torch.save({"model.embed_tokens.weight": Planted(marker)}, model_copy / "pytorch_model.bin")  # torch's own zip form
    assert_fails(run("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0"), 2, "pytorch_model.bin")
    assert not marker.exists() and listing(out) == []


def test_model_without_tokenizer_files_fails_at_open_time(model_copy, out):
    from npft_gguf.errors import UsageError

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match="no tokenizer files"):
        open_source(str(model_copy))  # before any tensor is read or any output is opened
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "tokenizer.json", "tokenizer.model")
    assert listing(out) == []


def test_zero_sized_tensor_in_a_hf_source_is_one_line(model_copy, out):
    edit_tensor(model_copy, "model.layers.0.mlp.up_proj.weight", lambda t: t[:0])
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "model.layers.0.mlp.up_proj.weight", "zero-sized", "(0, 64)")
    assert listing(out) == []


@pytest.fixture
def zero_sized_gguf(tiny_q8_gguf, tmp_path):
    """blk.0.ffn_down.weight's rows (its second GGUF dimension) set to 0 in the header."""
    return patch_gguf(tiny_q8_gguf, tmp_path / "zero.gguf", "blk.0.ffn_down.weight", dims=(128, 0))


def test_zero_sized_tensor_in_a_gguf_source_is_one_line(zero_sized_gguf, out):
    r = cli("export", zero_sized_gguf, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "zero.gguf", "model.layers.0.mlp.down_proj.weight", "zero-sized")
    assert listing(out) == []


def test_inspect_flags_a_zero_sized_tensor(zero_sized_gguf, tiny_q8_gguf):
    import json

    r = cli("inspect", zero_sized_gguf, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["problems"] == ["tensor 'blk.0.ffn_down.weight' has a zero-sized dimension (shape (0, 128))"]
    text = cli("inspect", zero_sized_gguf)
    assert "PROBLEM" in text.stdout and "blk.0.ffn_down.weight" in text.stdout
    assert json.loads(cli("inspect", tiny_q8_gguf, "--json").stdout)["problems"] == []


# --- bad metadata, config values and tokenizers: one line naming the file and the value, exit 2 ----
def test_gguf_source_without_tokenizer_is_refused_from_its_header(tiny_q8_gguf, tmp_path, out, no_work):
    """Exported (exit 0) into a file llama.cpp cannot load."""
    cases = {
        "no tokenizer": (lambda k: k.startswith("tokenizer."), ["tokenizer.ggml.model is missing"]),
        "no tokens": (lambda k: k == "tokenizer.ggml.tokens", ["tokenizer.ggml.tokens"]),
        "no merges": (lambda k: k == "tokenizer.ggml.merges", ["tokenizer.ggml.merges"]),
    }
    for name, (drop, words) in cases.items():
        bad = rewrite_gguf_metadata(tiny_q8_gguf, tmp_path / f"{name.replace(' ', '-')}.gguf", drop=drop)
        assert_fails(run("export", bad, "-o", out / "m.gguf"), 2, bad.name, *words)
        assert gguf_problems(bad) == [f"tokenizer: {error_of(bad)}"]  # inspect shows it, as it is
    assert listing(out) == []


def gguf_problems(path):
    import json

    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["problems"]


def error_of(path):
    """The reason GGUFSource gives for refusing `path`."""
    from npft_gguf.errors import UsageError

    with pytest.raises(UsageError) as e:
        open_source(str(path))
    return str(e.value).split(": ", 1)[1].split(";")[0]


def test_broken_hf_tokenizer_and_config_values_are_one_line(model_copy, tmp_path, out, no_work):
    """A truncated tokenizer.json (JSONDecodeError), an empty vocabulary, a zero head count
    (ZeroDivisionError) ended as internal errors, exit 1, without naming the file."""
    import json
    import shutil

    tok = json.loads((model_copy / "tokenizer.json").read_text())
    cases = []

    def case(name, words, tokenizer=None, **config):
        d = shutil.copytree(model_copy, tmp_path / name)
        if tokenizer is not None:
            (d / "tokenizer.json").write_text(tokenizer)
        edit_config(d, **config)
        cases.append((d, words))

    case("truncated-tokenizer", ["tokenizer files cannot be read"], tokenizer=json.dumps(tok)[:3000])
    case("empty-vocabulary", ["empty vocabulary"], tokenizer=json.dumps({**tok, "model": {**tok["model"], "vocab": {}, "merges": []}}))
    case("zero-heads", ["config.json", "num_attention_heads is 0"], num_attention_heads=0)
    case("string-layers", ["config.json", "num_hidden_layers is '2'"], num_hidden_layers="2")
    case("negative-width", ["config.json", "hidden_size is -64"], hidden_size=-64)
    case("bad-theta", ["config.json", "rope_theta is 0"], rope_theta=0)
    case("kv-heads", ["config.json", "num_attention_heads 4 is not a multiple of num_key_value_heads 3"], num_key_value_heads=3)
    for d, words in cases:
        assert_fails(run("export", d, "-o", out / "m.gguf"), 2, d.name, *words)
    (tmp_path / "truncated.json").write_text('{"hidden_size": 6')
    shutil.copy(tmp_path / "truncated.json", model_copy / "config.json")
    assert_fails(run("export", model_copy, "-o", out / "m.gguf"), 2, "config.json", "not valid JSON")
    assert listing(out) == []


def test_broken_gguf_hyperparameters_are_one_line(tiny_q8_gguf, tmp_path, out, no_work):
    from gguf import GGUFValueType as V

    from npft_gguf.gguf_header import Value

    cases = [
        (dict(llama__attention__head_count=0), ["llama.attention.head_count is 0"]),
        (dict(llama__attention__head_count_kv=3), ["llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"]),
        (dict(llama__block_count=Value("2", V.STRING)), ["llama.block_count is '2'"]),
        (dict(llama__rope__freq_base=float("nan")), ["llama.rope.freq_base is nan"]),
        (dict(llama__context_length=0), ["llama.context_length is 0"]),
        (dict(tokenizer__ggml__bos_token_id=Value("1", V.STRING)), ["tokenizer.ggml.bos_token_id is '1'"]),
        (dict(llama__rope__scaling__type=Value("linear", V.STRING)), ["llama.rope.scaling.factor is missing"]),
    ]
    for i, (changes, words) in enumerate(cases):
        bad = rewrite_gguf_metadata(tiny_q8_gguf, tmp_path / f"bad{i}.gguf", **changes)
        assert_fails(run("export", bad, "-o", out / "m.gguf"), 2, bad.name, *words)
    bad = rewrite_gguf_metadata(tiny_q8_gguf, tmp_path / "no-layers.gguf", drop=lambda k: k == "llama.block_count")
    assert_fails(run("export", bad, "-o", out / "m.gguf"), 2, bad.name, "llama.block_count is missing")
    assert listing(out) == []


def test_gguf_with_npft_settings_that_are_not_json_is_one_line(tiny_q8_gguf, tmp_path):
    for i, settings in enumerate(["{not json", "[1, 2]"]):
        bad = rewrite_gguf_metadata(tiny_q8_gguf, tmp_path / f"settings{i}.gguf", general__npft__settings=settings)
        assert_fails(run("inspect", bad), 2, bad.name, "general.npft.settings")
