"""The exporter against llama.cpp itself: its quantizer's bytes, its loader, its logits."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from npft_gguf import llamacpp
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.broken import edit_config, edit_tensor, model_copy, patch_gguf  # noqa: F401 - model_copy is a fixture
from tests.test_cli import ROOT, _env, assert_fails, cli, listing, out  # noqa: F401 - out is a fixture

BYTE_EXACT = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]  # iq4_nl: llama.cpp's scale search


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


@pytest.mark.parametrize("type_name, pure", [("q4_0", False), ("q6_k", True)], ids=["q4_0-mix", "q6_k-pure"])
def test_q6_k_bytes_equal_llama_model_quantize(tmp_path, monkeypatch, type_name, pure):
    """Rows of 256: Q6_K fits, as in llama.cpp's Q4_0 mix for an untied output matrix (Qwen2.5's)
    and in a pure Q6_K file; llama.cpp searches each 16-weight scale, and so do we."""
    import tests.arch.conftest as families

    monkeypatch.setattr(families, "SIZES", {**families.SIZES, "hidden_size": 256, "intermediate_size": 512})
    src = open_source(str(families.make_tiny("qwen3", tmp_path / "m")))  # qwen3's tiny model has an untied output
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(src, f32, ExportSettings("f32"), progress=False)
    export(src, ours, ExportSettings(type_name, pure=pure), progress=False)
    llamacpp.quantize(f32, theirs, type_name, pure=pure)
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b) and a["output.weight"].tensor_type.name == "Q6_K"
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


def test_fallbacks_are_one_warning_per_reason(tiny_bpe, tmp_path, capsys):
    """Rows of 64 cannot hold Q4_K's 256-weight super-blocks: every layer's linears fall back,
    said once per reason rather than once per tensor."""
    export(open_source(str(tiny_bpe)), tmp_path / "k.gguf", ExportSettings("q4_k"), progress=False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert lines and len(lines) == len(set(ln.split(": ", 2)[2] for ln in lines)), lines
    assert any(" tensors (" in ln for ln in lines), lines


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


# --- what would make a broken file is refused in one line, and nothing is written ----------------
# (each case runs the real console script; the header checks come before any tensor is written)


@pytest.fixture(scope="module")
def tiny_f32(tiny_bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-f32") / "tiny-f32.gguf"
    export(open_source(str(tiny_bpe)), path, ExportSettings("f32"), progress=False)
    return path


def test_export_refuses_a_config_the_weights_disagree_with(model_copy, out):
    edit_config(model_copy, intermediate_size=96)  # the mlp tensors are 128 wide
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "mlp.", "128", "intermediate_size 96", "disagree")
    assert listing(out) == []


def test_export_refuses_a_tensor_of_the_wrong_shape(model_copy, out):
    name = "model.layers.1.self_attn.k_proj.weight"  # 2 kv heads x 16 = 32 rows; 16 here
    edit_tensor(model_copy, name, lambda t: t[:16])
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, name, "(16, 64)", "(32, 64)", "num_key_value_heads 2")
    assert listing(out) == []


def test_export_refuses_a_missing_layer_tensor(model_copy, out):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q4_0")
    assert_fails(r, 2, "model.layers.1.mlp.down_proj.weight", "missing")
    assert listing(out) == []


@pytest.mark.parametrize("quantizer", ["rtn", "llama.cpp"])
def test_export_refuses_integer_weights(model_copy, out, quantizer):
    name = "model.layers.0.self_attn.v_proj.weight"
    edit_tensor(model_copy, name, lambda t: (t * 100).to(torch.int8))
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q4_0", "--quantizer", quantizer)
    assert_fails(r, 2, name, "I8", "not as floats")
    assert listing(out) == []


@pytest.mark.parametrize("name,value,row", [
    ("model.layers.1.mlp.up_proj.weight", float("nan"), 5),      # streamed in row chunks
    ("model.layers.0.self_attn.q_proj.weight", float("inf"), 3),  # loaded whole (RoPE row order)
    ("model.norm.weight", float("-inf"), None),                   # 1-D
], ids=["nan-chunked", "inf-whole", "inf-1d"])
def test_export_refuses_non_finite_weights_and_removes_the_partial_file(model_copy, out, name, value, row):
    def poison(t):
        t = t.clone()
        t[(row, 7) if row is not None else 7] = value
        return t

    edit_tensor(model_copy, name, poison)
    r = cli("export", model_copy, "-o", out / "m.gguf", "--type", "q4_0")
    line = assert_fails(r, 2, name, "NaN or infinite", "nothing was written")
    assert (f"row {row}" in line) if row is not None else "row" not in line
    assert listing(out) == []


def test_llamacpp_export_refuses_non_finite_weights(model_copy, out):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tensor(model_copy, name, lambda t: t.index_fill(0, torch.tensor([2]), float("nan")))
    r = cli("export", model_copy, "-o", out / "m.gguf", "--quantizer", "llama.cpp", "--type", "q4_k_m")
    assert_fails(r, 2, name, "NaN", "row 2")
    assert listing(out) == []  # neither the .part nor the f32 intermediate


def test_export_refuses_a_gguf_source_with_misaligned_tensor_data(tiny_f32, tmp_path, out):
    """A data offset off the file's alignment: llama.cpp refuses such a file; read as it is, the
    tensor's bytes are shifted and dequantize to garbage (NaNs)."""
    bad = patch_gguf(tiny_f32, tmp_path / "misaligned.gguf", "blk.0.ffn_up.weight", offset_delta=4)
    r = cli("export", bad, "-o", out / "m.gguf", "--type", "q8_0")
    assert_fails(r, 2, "misaligned.gguf", "blk.0.ffn_up.weight", "alignment")
    assert listing(out) == []


FULL_DISK = """
import errno, os, sys
import gguf
real, calls = gguf.GGUFWriter.write_tensor_data, []
def write_tensor_data(self, *a, **k):
    calls.append(1)
    if len(calls) == 3:  # the device fills up at the third tensor
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, *a, **k)
gguf.GGUFWriter.write_tensor_data = write_tensor_data
from npft_gguf.cli import main
sys.argv[0] = "npft-gguf"
main()
"""


@pytest.mark.parametrize("quantizer", ["rtn", "llama.cpp"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_bpe, out, quantizer):
    args = ["export", str(tiny_bpe), "-o", str(out / "m.gguf"), "--type", "q4_0", "--quantizer", quantizer]
    r = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert_fails(r, 1, "no space left", "m.gguf", "nothing was written")
    assert listing(out) == []
