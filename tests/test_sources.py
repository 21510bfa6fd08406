"""Sources read what gguf-py reads: the lean GGUF header against GGUFReader, row chunks against
whole tensors."""

import pytest
import torch
from gguf import GGUFReader
from gguf import GGUFValueType as V

from npft_gguf.gguf_header import read_header
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export


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


def test_gguf_config_without_transformers_writes_what_the_transformers_one_does(smollm2):
    """The demo states every hyperparameter, so its config is a plain namespace (no transformers
    import); export metadata, plan and q/k layout are the same with the full transformers config."""
    import copy
    from types import SimpleNamespace

    from npft_gguf.writer import metadata, plan

    full = copy.copy(smollm2)
    full.config = smollm2.hf_config()
    assert isinstance(smollm2.config, SimpleNamespace) and not isinstance(full.config, SimpleNamespace)
    settings = ExportSettings("q4_k")
    assert metadata(smollm2, settings, {}) == metadata(full, settings, {})
    assert plan(smollm2, settings) == plan(full, settings)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(smollm2.load(k), full.load(k))
