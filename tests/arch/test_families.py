"""Every family through every stage, against llama.cpp itself: the F32 export's logits in
llama.cpp equal transformers' on real text; Q8_0/Q4_0 --pure bytes equal llama_model_quantize's
on our F32 export; the GGUF file read back as a source is the same model; GPTQ walks the
family's own sequential order; `convert --recipe short` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from npft_gguf import llamacpp
from npft_gguf.arch import FAMILIES, for_config
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.arch.conftest import GGUF_ARCH
from tests.conftest import calib_text
from tests.test_cli import assert_fails, cli, out  # noqa: F401 - out is a fixture


@pytest.fixture(scope="module")
def f32(family_model, tmp_path_factory):
    kind, path = family_model
    dst = tmp_path_factory.mktemp(f"{kind}-f32") / "f32.gguf"
    export(open_source(str(path)), dst, ExportSettings("f32"), progress=False)
    return dst


def real_text(n_chars: int = 1200) -> str:
    return calib_text(200_000)[-n_chars:]


class _F16GeluTable(torch.nn.Module):
    """llama.cpp's CPU GELU (GGML_GELU_FP16): the tanh GELU looked up in a table of f16 inputs and
    outputs. Applied to the torch reference, so the parity check measures the export alone."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))


def f16_gelu_table(model):
    for layer in getattr(model, "model", model).layers:
        layer.mlp.act_fn = _F16GeluTable()


def test_f32_export_runs_in_llama_cpp_with_transformers_logits(family_model, f32):
    kind, path = family_model
    src = open_source(str(path))
    assert GGUFReader(f32).fields["general.architecture"].contents() == GGUF_ARCH[kind]
    tok = src.tokenizer()
    text = real_text()
    all_ids = tok(text)["input_ids"]
    ids = all_ids[:200]  # longer than llama3's and YaRN's original 64 positions and gemma3's window of 16
    llm = llamacpp.load(f32, n_ctx=256, kv_f32=True)  # llama.cpp's default f16 K/V cache rounds by ~1e-3
    assert llamacpp.tokenize(llm, text, add_bos=all_ids[:1] == [tok.bos_token_id]) == all_ids
    theirs = llamacpp.logits(llm, ids)
    model = src.load_model()
    if kind == "gemma3":
        f16_gelu_table(model)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(ours - theirs).max()
    assert diff < 2e-3 * max(1.0, np.abs(ours).max()), diff
    assert (ours.argmax(1) == theirs.argmax(1)).all()


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_pure_files_are_byte_identical_to_llama_model_quantize(family_model, f32, tmp_path, type_name):
    _, path = family_model
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(open_source(str(path)), ours, ExportSettings(type_name, pure=True), progress=False)
    llamacpp.quantize(f32, theirs, type_name, pure=True)
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)  # llama_model_quantize writes them in its own order
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


def test_gguf_source_round_trip_gives_the_same_model(family_model, f32, tmp_path):
    """Export, read the file back as a source (transforms undone): the same tensors, the same
    config, and a model with the same logits (llama3's rope_freqs included)."""
    _, path = family_model
    hf, gg = open_source(str(path)), open_source(str(f32))
    assert gg.arch is hf.arch
    assert gg.shapes() == hf.shapes()
    for name in hf.shapes():  # exact, but for gemma's norms: (w + 1) - 1 rounds in float32
        assert torch.allclose(gg.load(name).float(), hf.load(name).float(), rtol=0, atol=1e-6), name
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "tie_word_embeddings"):
        assert getattr(gg.config, key) == getattr(hf.config, key), key
    ids = torch.tensor([hf.tokenizer()(real_text(600))["input_ids"][:120]])
    with torch.no_grad():
        want = hf.load_model()(ids).logits
        got = gg.load_model()(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    again = tmp_path / "again.gguf"  # and the GGUF source exports the same file again
    export(gg, again, ExportSettings("f32"), progress=False)
    a = {t.name: np.asarray(t.data) for t in GGUFReader(f32).tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(again).tensors}
    assert list(a) == list(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_gptq_follows_the_familys_sequential_order(family_model):
    from npft_gguf.methods import GPTQSettings, gptq_model_

    _, path = family_model
    src = open_source(str(path))
    model = src.load_model()
    family = for_config(model.config)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    report = gptq_model_(model, calib, GPTQSettings(target="q4_0"), progress=False)
    want = [f"{family.layers}.{i}.{name}" for i in range(model.config.num_hidden_layers) for name in family.linears]
    assert list(report.linears) == want


def test_convert_short_recipe_end_to_end(family_model, tmp_path):
    kind, path = family_model
    (tmp_path / "calib.txt").write_text(calib_text(20_000))
    dst = tmp_path / "m.gguf"
    r = cli("convert", path, "-o", dst, "--bits", "4", "--recipe", "short", "--calib", tmp_path / "calib.txt",
            "--calib-samples", "4", "--calib-len", "32", "--fisher-samples", "2", "--trace-samples", "0", "--max-steps", "2",
            "--epochs", "1", "--eval-text", "none", "--guard-chunks", "0", "--threads", "2", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["tune"]["settings"]["targets"] == list(FAMILIES[GGUF_ARCH[kind]].lora_targets)
    assert GGUFReader(dst).fields["general.architecture"].contents() == GGUF_ARCH[kind]


def test_archs_lists_every_family():
    r = cli("archs", "--json")
    assert r.returncode == 0, r.stderr
    rows = {f["arch"]: f for f in json.loads(r.stdout)["families"]}
    assert set(rows) == set(FAMILIES) >= {"llama", "qwen2", "qwen3"}
    assert "llama3" in rows["llama"]["rope"] and "Qwen2ForCausalLM" in rows["qwen2"]["hf_classes"]


@pytest.mark.parametrize("patch, words", [
    ({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}, ["gpt_neox", "not supported", "archs"]),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, ["dynamic", "rope"]),
    ({"sliding_window": 16}, ["sliding-window"]),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16}, ["mistral", "sliding-window"]),  # v0.1
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 64, "beta_fast": 16.0}}, ["YaRN", "beta_fast=16.0"]),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 64, "attention_factor": 1.5}}, ["YaRN", "attention_factor"]),
])
def test_unsupported_family_or_feature_is_refused_by_name_before_work(tiny_bpe, tmp_path, out, patch, words):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_bpe, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(patch)
    (d / "config.json").write_text(json.dumps(cfg))
    assert_fails(cli("export", d, "-o", out / "x.gguf"), 2, *words)
    assert not list(out.iterdir())


def test_the_text_model_of_a_gemma3_multimodal_checkpoint(tmp_path):
    """Gemma3ForConditionalGeneration (vision tower and all): the source is its text model; the
    export runs in llama.cpp with the logits transformers' multimodal model gives for text."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tests.arch.conftest import BUILDERS, make_tiny

    text_dir = make_tiny("gemma3", tmp_path / "text")
    _, text_config = BUILDERS["gemma3"](0)
    text_config = type(text_config).from_pretrained(text_dir)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text_config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          architectures=["Gemma3ForConditionalGeneration"])
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    text_model = open_source(str(text_dir)).load_model()
    with torch.no_grad():  # the same text weights as the tiny text model
        model.model.language_model.load_state_dict(text_model.model.state_dict())
    mm = tmp_path / "mm"
    model.save_pretrained(mm)
    for f in text_dir.glob("tokenizer*"):
        (mm / f.name).write_bytes(f.read_bytes())
    src = open_source(str(mm))
    assert src.arch.name == "gemma3" and not any("vision" in n for n in src.shapes())
    dst = tmp_path / "mm.gguf"
    export(src, dst, ExportSettings("f32"), progress=False)
    ids = src.tokenizer()(real_text())["input_ids"][:120]
    llm = llamacpp.load(dst, n_ctx=256, kv_f32=True)
    theirs = llamacpp.logits(llm, ids)
    f16_gelu_table(model.model.language_model)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 2e-3 * max(1.0, np.abs(ours).max())
    assert (ours.argmax(1) == theirs.argmax(1)).all()
