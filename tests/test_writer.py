"""The exporter against llama.cpp itself: its quantizer's bytes, its loader, its logits."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from npft_gguf import llamacpp
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export

BYTE_EXACT = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def slice_f32(smollm2_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("slice") / "f32.gguf"
    export(smollm2_slice, out, ExportSettings("f32"), progress=False)
    return out


@pytest.mark.parametrize("pure", [True, False], ids=["pure", "mixed"])
@pytest.mark.parametrize("type_name", BYTE_EXACT)
def test_bytes_equal_llama_model_quantize(smollm2_slice, slice_f32, tmp_path, type_name, pure):
    """Real SmolLM2 weights (first 2 blocks): every tensor's type and bytes equal llama.cpp's."""
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    report = export(smollm2_slice, ours, ExportSettings(type_name, pure=pure), progress=False)
    llamacpp.quantize(slice_f32, theirs, type_name, pure=pure)
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
    # the tied embedding is the output matrix: q8_0 unless --pure (576 is not a multiple of 256)
    assert a["token_embd.weight"].tensor_type.name.lower() == (type_name if pure else "q8_0")
    assert report.types["f32"] == 1 + 2 * 2  # output_norm + two norms per block


def test_export_is_streaming_and_atomic(smollm2_slice, tmp_path):
    out = tmp_path / "a.gguf"
    export(smollm2_slice, out, ExportSettings("q4_0"), progress=False)
    assert out.is_file() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("fixture", ["tiny_bpe", "tiny_spm", "tiny_tied"])
def test_tiny_models_run_in_llama_cpp_with_matching_logits(fixture, request, tmp_path):
    """Export -> llama.cpp load -> logits equal transformers' within float noise; same tokens."""
    src = open_source(str(request.getfixturevalue(fixture)))
    out = tmp_path / "m.gguf"
    export(src, out, ExportSettings("f32"), progress=False)
    tok = src.tokenizer()
    text = "The quick brown fox jumps over the lazy dog in 1987, didn't it? Yes: 42 times."
    llm = llamacpp.load(out, n_ctx=128)
    ids = llamacpp.tokenize(llm, text, add_bos=tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id])
    assert ids == tok(text)["input_ids"]
    theirs = llamacpp.logits(llm, ids)
    model = src.load_model()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 2e-3 * max(1.0, np.abs(ours).max())
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_q4_0_export_of_tiny_model_matches_fakequant_in_torch(tiny_bpe, tmp_path):
    """llama.cpp on our Q4_0 file computes the same function as torch with fake-quantized weights."""
    from npft_gguf.grids import GRIDS

    src = open_source(str(tiny_bpe))
    out = tmp_path / "q.gguf"
    export(src, out, ExportSettings("q4_0", pure=True), progress=False)
    model = src.load_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(GRIDS["q4_0"].fakequant(p))
    ids = src.tokenizer()("Round to nearest, then check it in llama.cpp.")["input_ids"]
    llm = llamacpp.load(out, n_ctx=64)
    theirs = llamacpp.logits(llm, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp multiplies q4_0 weights by q8_0-quantized activations, so agreement is close, not exact
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(ours).max()
    assert (ours.argmax(1) == theirs.argmax(1)).mean() > 0.9
