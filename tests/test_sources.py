"""Sources read what gguf-py reads: the lean GGUF header against GGUFReader, row chunks against
whole tensors; broken sources fail when they are opened, in one line."""

import pytest
import torch
from gguf import GGUFReader
from gguf import GGUFValueType as V

from npft_gguf.gguf_header import read_header
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.broken import edit_tensor, model_copy, patch_gguf  # noqa: F401 - model_copy is a fixture
from tests.test_cli import assert_fails, cli, listing, out, run  # noqa: F401 - out is a fixture


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
