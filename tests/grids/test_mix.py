"""`export --type T [--imatrix F]` against llama.cpp's own `llama_model_quantize` of our F32 export
of the same model, tensor by tensor (type and bytes, read back with gguf.GGUFReader): the per-tensor
choice of grids/mix.py and the bytes of llamacpp.GgmlQuantizer together are llama-quantize's.

Two tiny random llamas: one whose rows are multiples of 256 (8 layers, so that llama.cpp's
use-more-bits layers and first-eighth rules pick some layers and not others; 4 query heads per KV
head, so that IQ4's attn_v rule applies), and the conftest's tiny ones, whose rows of 64 and 128
fit no K-quant (every fallback), one of them with the output tied to the token embedding."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from npft_gguf import llamacpp
from npft_gguf.choices import EXPORT_TYPES, FILE_TYPES, WRITTEN_TYPES
from npft_gguf.grids.mix import ModelShape, choose, more_bits
from npft_gguf.imatrix import Entry, Imatrix, read_imatrix, write_imatrix
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.conftest import make_tiny_llama

# the file types the issue names, mixes and pure types; q4_0 is also checked --pure
PARITY = ["q4_k_m", "q5_k_m", "q3_k_m", "q6_k", "iq4_xs", "q4_0", "iq4_nl"]


def tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def random_imatrix(source, path, seed=0):
    """An importance matrix for every linear of `source` (positive, heavy-tailed, as mean squared
    activations are), written in llama-imatrix's format; token_embd has no entry, as in llama-imatrix's."""
    from npft_gguf.imatrix import row_lengths

    rng = np.random.default_rng(seed)
    entries = {name: Entry((rng.lognormal(0, 1.5, (1, width)) * 7).astype(np.float32), np.array([7], np.float32))
               for name, width in row_lengths(source).items() if name not in ("token_embd.weight", "output.weight")}
    return write_imatrix(path, Imatrix(entries, ["random"], 1, 64))


@pytest.fixture(scope="module", params=["wide", "narrow", "tied"])
def model(request, tmp_path_factory):
    """(source, its F32 export, an imatrix file for it)."""
    if request.param == "wide":
        d = make_tiny_llama(tmp_path_factory.mktemp("wide"), hidden=256, ffn=512, layers=8, heads=4, kv_heads=1)
    else:
        d = request.getfixturevalue("tiny_bpe" if request.param == "narrow" else "tiny_tied")
    src = open_source(str(d))
    tmp = tmp_path_factory.mktemp(f"{request.param}-files")
    export(src, tmp / "f32.gguf", ExportSettings("f32"), progress=False)
    return src, tmp / "f32.gguf", random_imatrix(src, tmp / "im.gguf")


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name, pure", [(t, False) for t in PARITY] + [("q4_0", True)])
def test_export_is_llama_model_quantize_byte_for_byte(model, tmp_path, type_name, pure, with_imatrix):
    src, f32, im = model
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(src, ours, ExportSettings(type_name, pure=pure, imatrix=str(im) if with_imatrix else None), progress=False)
    weights = None
    if with_imatrix:
        m = read_imatrix(im)
        weights = {n: m.weights(n) for n in m.entries}
    llamacpp.quantize(f32, theirs, type_name, pure=pure, imatrix=weights)
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    wrong = [f"{n}: {a[n].tensor_type.name} vs {b[n].tensor_type.name}" for n in a if a[n].tensor_type != b[n].tensor_type]
    assert not wrong, wrong
    differ = [n for n in a if not np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
    assert not differ, differ


def test_the_wide_model_exercises_the_rules():
    """The 8-layer model's attn_v and ffn_down get different types in different layers under the
    _M mixes, and its IQ4 attn_v the Q5_K of GQA 4: the parity above is not of uniform files."""
    m = ModelShape(n_layer=8, n_gqa=4, tied=False)
    for ftype, tensor in (("q4_k_m", "ffn_down"), ("q5_k_m", "ffn_down"), ("q4_k_m", "attn_v"), ("q3_k_m", "attn_v")):
        kinds = {choose(ftype, f"blk.{i}.{tensor}.weight", (256, 512), m).type for i in range(8)}
        assert len(kinds) == 2, (ftype, tensor, kinds)
    assert [more_bits(i, 8) for i in range(8)] == [True, False, False, True, False, False, True, True]
    assert choose("iq4_nl", "blk.3.attn_v.weight", (64, 256), m).type == "q5_k"
    assert choose("q4_0", "blk.0.ffn_down.weight", (256, 512), m, imatrix=True).type == "q4_1"
    assert choose("q4_0", "blk.0.ffn_down.weight", (256, 512), m, pure=True, imatrix=True).type == "q4_0"
    assert choose("q4_k_m", "blk.0.attn_v.weight", (64, 96), m).type == "q8_0"  # q6_k falls back


def test_one_registry_for_the_types():
    """--type's choices and the writer's types come from choices.FILE_TYPES; every file type the
    writer writes has a GGUF file-type id and a per-tensor choice."""
    from npft_gguf.cli import export as export_command
    from npft_gguf.grids.mix import llama_ftype

    opt = next(p for p in export_command.params if p.name == "type_")
    assert tuple(opt.type.choices) == EXPORT_TYPES
    for name in WRITTEN_TYPES:
        llama_ftype(name)
        choose(name, "blk.0.attn_v.weight", (256, 256), ModelShape(8, 1, False))
    assert set(WRITTEN_TYPES) < set(EXPORT_TYPES) and not all(t.written for t in FILE_TYPES.values())
    ctx = export_command.make_context("export", ["smollm2-135m", "-o", "x.gguf"])  # the library's defaults are the command's
    assert (ExportSettings().type, ExportSettings().pure, ExportSettings().imatrix) == (
        ctx.params["type_"], ctx.params["pure"], ctx.params["imatrix"])


def test_ggml_quantizer_threads_give_the_bytes_of_one_call():
    """Row chunks quantized in a thread pool give the bytes of one ggml_quantize_chunk call on the
    whole matrix, with and without an imatrix entry."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 512)).astype(np.float32)
    qw = rng.lognormal(0, 1, 512).astype(np.float32)
    for t in ("q4_k", "iq4_xs", "q4_0"):
        whole = llamacpp.GgmlQuantizer(t, qw, threads=1)
        one = np.empty((300, 512 // whole.block * whole.block_bytes), np.uint8)
        whole._into(w, one)
        pooled = llamacpp.GgmlQuantizer(t, qw, threads=4)
        assert np.array_equal(pooled.pack_rows(np.split(w, [7, 150, 151]), w.shape), one), t
    with pytest.raises(ValueError, match="columns"):
        llamacpp.GgmlQuantizer("q4_0", qw[:256]).pack(w)
    with pytest.raises(ValueError, match="multiple of 256"):
        llamacpp.GgmlQuantizer("q4_k").pack(w[:, :96])


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_q4_k_m_tuning_rules_are_the_written_tensors(tmp_path, with_imatrix):
    """NPFT for the Q4_K_M mix: per linear of a model whose rows are multiples of 256, the rule the
    tuning noise quantizes with (imatrix.tuning_quantizers: Q4_K and Q6_K twins) dequantizes to
    the tensor the writer writes, super-block for super-block but for near-ties (grids/twins.py)."""
    import torch

    from npft_gguf.imatrix import tuning_quantizers
    from npft_gguf.sensitivity import target_linears

    d = make_tiny_llama(tmp_path / "m", hidden=256, ffn=512, layers=8, heads=4, kv_heads=1)
    src = open_source(str(d))
    im = str(random_imatrix(src, tmp_path / "im.gguf")) if with_imatrix else None
    model = src.load_model(dtype=torch.float32)
    linears = target_linears(model)
    quantize = tuning_quantizers(im, "q4_k_m", linears, src.arch, model.config)
    assert set(quantize) == set(linears)
    out = tmp_path / "q4_k_m.gguf"
    export(src, out, ExportSettings("q4_k_m", imatrix=im), progress=False)
    kinds = {t.name: t.tensor_type.name.lower() for t in GGUFReader(out).tensors}
    written = dict(open_source(str(out)).load_model(dtype=torch.float32).named_parameters())
    assert {kinds[src.arch.gguf_name(n + ".weight")] for n in linears} == {"q4_k", "q6_k"}
    for name, lin in linears.items():
        same = (quantize[name](lin.weight).reshape(-1, 256) == written[name + ".weight"].reshape(-1, 256)).all(1)
        assert float(same.float().mean()) >= 0.9, (name, kinds[src.arch.gguf_name(name + ".weight")], float(same.float().mean()))


@pytest.mark.parametrize("type_name", ["q4_0", "iq4_nl", "q4_k"])
def test_a_search_rule_on_the_cpu_is_llama_cpp_s_own_quantizer(type_name, monkeypatch):
    """The tuning noise of a searched type (grids/mix.SearchRule): on the CPU, llama.cpp's quantizer
    itself (exact, and cheaper there than the torch twin: evals/TWINS.md); the twin where asked."""
    import torch

    from npft_gguf.grids.mix import SearchRule, tuning_rule
    from npft_gguf.grids.twins import TwinRules
    from npft_gguf.llamacpp import GgmlQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * torch.rand(1, 512, generator=g)
    qw = torch.rand(512, generator=g).numpy() + 0.01
    rule = tuning_rule(type_name, qw, plain="f32")
    assert isinstance(rule.__self__, SearchRule)
    assert torch.equal(rule(w), GgmlQuantizer(type_name, qw).fakequant(w))
    monkeypatch.setattr(SearchRule, "on_cpu", "twin")
    assert torch.equal(rule(w), TwinRules(type_name, qw).fakequant(w))
