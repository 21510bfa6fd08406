"""The importance matrix: collection in torch, llama-imatrix's file format, and `export --imatrix`
byte for byte against llama.cpp's own quantizer given the same imatrix."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from npft_gguf.errors import UsageError
from npft_gguf.grids import get_grid
from npft_gguf.imatrix import Entry, Imatrix, collect, read_imatrix, text_windows, write_imatrix
from npft_gguf.sources import open_source
from tests.conftest import calib_text, make_tiny_llama
from tests.test_cli import assert_fails, cli, listing, no_work, run  # noqa: F401 - no_work is a fixture


# --- the file --------------------------------------------------------------------------------------

def test_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix({"blk.0.attn_q.weight": Entry(rng.random((1, 64), np.float32), np.array([512], np.float32)),
                  "blk.0.ffn_down.weight": Entry(np.zeros((1, 128), np.float32), np.array([0], np.float32))},
                 ["wiki.txt"], 3, 512)
    path = write_imatrix(tmp_path / "im.gguf", im)
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["wiki.txt"], 3, 512)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums) and np.array_equal(back.entries[name].counts, e.counts)
    assert np.array_equal(back.weights("blk.0.attn_q.weight"), im.entries["blk.0.attn_q.weight"].sums[0] / np.float32(512))
    assert np.all(back.weights("blk.0.ffn_down.weight") == 1.0)  # nothing counted: llama-quantize uses 1
    assert back.weights("blk.1.attn_q.weight") is None


def test_file_layout_is_llama_imatrix_s(tmp_path):
    """What llama.cpp's loader (common/imatrix-loader.cpp) looks for: F32 `<name>.in_sum2` of
    ne [n_cols, n_mat], `<name>.counts` of ne [1, n_mat], the three imatrix.* keys, no architecture."""
    im = Imatrix({"blk.1.ffn_up.weight": Entry(np.ones((1, 32), np.float32), np.array([64], np.float32))}, ["t"], 1, 64)
    r = GGUFReader(write_imatrix(tmp_path / "im.gguf", im))
    assert [(t.name, t.shape.tolist(), t.tensor_type.name) for t in r.tensors] == [
        ("blk.1.ffn_up.weight.in_sum2", [32, 1], "F32"), ("blk.1.ffn_up.weight.counts", [1, 1], "F32")]
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"


def test_legacy_dat_file_is_read(tmp_path):
    """llama-imatrix --output-format dat: sums already divided by the count and times ncall."""
    vals = np.arange(1, 33, dtype=np.float32)
    name = b"blk.0.attn_k.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 32) + vals.tobytes()
    blob += struct.pack("<i", 4) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(blob)
    im = read_imatrix(tmp_path / "im.dat")
    assert im.legacy and im.chunk_count == 4 and im.datasets == ["wiki"]
    assert np.array_equal(im.weights("blk.0.attn_k.weight"), vals / np.float32(4))


def test_unreadable_files_are_one_line_usage_errors(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 7)
    with pytest.raises(UsageError, match="not a readable imatrix"):
        read_imatrix(tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="no such file"):
        read_imatrix(tmp_path / "missing.gguf")


def raw_imatrix(path, tensors: dict[str, np.ndarray]) -> Path:
    """An imatrix GGUF file holding exactly `tensors` (numpy order), whatever their shapes."""
    from gguf import GGUFWriter

    from npft_gguf.imatrix import KV_CHUNK_COUNT, KV_CHUNK_SIZE, KV_DATASETS

    w = GGUFWriter(path, "")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array(KV_DATASETS, ["t"])
    w.add_uint32(KV_CHUNK_COUNT, 1)
    w.add_uint32(KV_CHUNK_SIZE, 64)
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _damage(sums=None, counts=None):
    """Two entries, the second (by name) damaged: its sums[0, 5] and/or counts replaced."""
    bad = Entry(np.ones((1, 32), np.float32), np.array([64], np.float32))
    if sums is not None:
        bad.sums[0, 5] = sums
    if counts is not None:
        bad.counts[:] = counts
    return {"blk.0.attn_k.weight": Entry(np.ones((1, 32), np.float32), np.array([64], np.float32)),
            "blk.0.attn_q.weight": bad}


@pytest.mark.parametrize("entries, words", [
    (_damage(sums=np.nan), ["sum nan at column 5"]),
    (_damage(sums=np.inf), ["sum inf at column 5"]),
    (_damage(sums=-1.0), ["sum -1.0 at column 5"]),
    (_damage(counts=np.nan), ["count nan"]),
    (_damage(counts=np.inf), ["count inf"]),
    (_damage(counts=-3), ["count -3.0"]),
    (_damage(counts=0), ["counts 0 tokens", "non-zero sums"]),  # llama.cpp would silently use 1s
])
def test_imatrix_values_are_checked_when_read(tmp_path, entries, words):
    """NaN, inf or negative sums or counts made export --imatrix write NaN weights with exit 0."""
    path = write_imatrix(tmp_path / "bad.gguf", Imatrix(entries, ["t"], 1, 64))
    with pytest.raises(UsageError) as e:
        read_imatrix(path)
    assert str(path) in str(e.value) and "blk.0.attn_q.weight" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_imatrix_shapes_are_checked_when_read(tmp_path):
    zero = {"blk.0.attn_q.weight": Entry(np.zeros((1, 32), np.float32), np.array([0], np.float32))}
    with pytest.raises(UsageError, match="counts no tokens in any entry"):
        read_imatrix(write_imatrix(tmp_path / "zero.gguf", Imatrix(zero, ["t"], 1, 64)))
    sums = np.ones((1, 32), np.float32)
    with pytest.raises(UsageError, match=r"counts are one per matrix"):  # was read as 4 matrices of 8 columns
        read_imatrix(raw_imatrix(tmp_path / "wide.gguf", {"a.weight.in_sum2": sums, "a.weight.counts": np.full((1, 4), 64)}))
    with pytest.raises(UsageError, match="sums for 2 matrices and counts for 1"):
        read_imatrix(raw_imatrix(tmp_path / "mats.gguf", {"a.weight.in_sum2": np.ones((2, 16)), "a.weight.counts": [[64]]}))
    name = b"blk.0.attn_k.weight"  # a legacy entry of -1 values: numpy read the rest of the file as its values
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, -1) + np.ones(8, np.float32).tobytes()
    (tmp_path / "im.dat").write_bytes(blob)
    with pytest.raises(UsageError, match="attn_k.weight holds -1 values"):
        read_imatrix(tmp_path / "im.dat")


# --- collection ------------------------------------------------------------------------------------

def direct_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every decoder linear, by writing the llama forward out by hand (no hooks)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    m, cfg = model.model, model.config
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos, sin = m.rotary_emb(h, pos)
    n, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // n
    T = ids.shape[1]
    out = {}
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(1, T, n, hd).transpose(1, 2)
        k = a.k_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        v = a.v_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, n // nkv), repeat_kv(v, n // nkv)
        att = (q @ k.transpose(-1, -2)) / hd ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(1, T, n * hd)
        h = h + a.o_proj(o)
        x2 = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        d = mlp.act_fn(mlp.gate_proj(x2)) * mlp.up_proj(x2)
        h = h + mlp.down_proj(d)
        for proj, inp in (("attn_q", x), ("attn_k", x), ("attn_v", x), ("attn_output", o),
                          ("ffn_gate", x2), ("ffn_up", x2), ("ffn_down", d)):
            out[f"blk.{i}.{proj}.weight"] = inp.reshape(T, -1).double()
    assert torch.allclose(model.lm_head(m.norm(h)), model(ids).logits, atol=1e-4)  # the hand-written forward is the model's
    return out


def test_collection_equals_a_direct_computation(tiny_bpe):
    src = open_source(str(tiny_bpe))
    model = src.load_model()
    wins = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    im = collect(model, src.arch, wins, ["random"], batch=2, progress=False)
    assert (im.chunk_count, im.chunk_size, len(im)) == (3, 40, 7 * model.config.num_hidden_layers)
    want = {}
    with torch.no_grad():
        for w in wins:
            for name, x in direct_inputs(model, w[None]).items():
                want[name] = want.get(name, 0) + (x * x).sum(0)
    for name, e in im.entries.items():
        assert e.counts.tolist() == [3 * 40]
        np.testing.assert_allclose(e.sums[0], want[name].numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


def test_text_windows_are_llama_imatrix_s(tiny_spm):
    """Consecutive windows of ctx tokens, the last partial one dropped, BOS first in each when the
    vocabulary adds BOS (the SentencePiece tokenizer here does)."""
    src = open_source(str(tiny_spm))
    tok = src.tokenizer()
    text = calib_text(20_000)
    ids = tok(text)["input_ids"]
    wins = text_windows(src, text, ctx=64, chunks=None)
    assert len(wins) == len(ids) // 64
    assert all(w[0] == tok.bos_token_id for w in wins)
    assert wins[1][1:] == ids[65:128]
    assert len(text_windows(src, text, ctx=64, chunks=3)) == 3


# --- the command and export --imatrix ------------------------------------------------------------

@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory):
    """8 layers (so llama.cpp's first-eighth ffn_down rule applies to layer 0) of rows of 256 (so the
    output matrix is Q6_K), untied (so token_embd is quantized without an imatrix entry)."""
    return make_tiny_llama(tmp_path_factory.mktemp("deep-tiny"), hidden=256, layers=8, heads=4, kv_heads=2, ffn=256)


@pytest.fixture(scope="module")
def deep_imatrix(deep_tiny, tmp_path_factory):
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(calib_text(30_000), encoding="utf-8")
    out = tmp_path_factory.mktemp("im") / "im.gguf"
    r = cli("imatrix", deep_tiny, "--calib", text, "--ctx", "64", "--chunks", "4", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert '"chunk_count": 4' in r.stdout
    return out


def test_imatrix_command_writes_every_linear(deep_imatrix):
    im = read_imatrix(deep_imatrix)
    assert len(im) == 7 * 8 and im.chunk_size == 64 and im.chunk_count == 4
    assert all(e.counts.tolist() == [256] for e in im.entries.values())


def test_imatrix_command_refuses_bad_input(deep_tiny, deep_imatrix, tmp_path):
    assert_fails(cli("imatrix", deep_tiny, "--calib", "wiki", "-o", deep_imatrix), 2, "exists")
    assert_fails(cli("imatrix", deep_tiny, "--calib", "self", "-o", tmp_path / "im.gguf"), 2, "--calib self")
    assert not (tmp_path / "im.gguf").exists()


@pytest.mark.parametrize("type_name", ["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_export_with_imatrix_equals_llama_cpp_byte_for_byte(deep_tiny, deep_imatrix, tmp_path, type_name):
    from npft_gguf.methods.llamacpp_quant import export_llamacpp
    from npft_gguf.writer import ExportSettings, export

    src = open_source(str(deep_tiny))
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    rep = export(src, ours, ExportSettings(type_name, imatrix=str(deep_imatrix)), progress=False)
    export_llamacpp(src, theirs, type_name, imatrix=deep_imatrix, progress=False)
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    types = {n: t.tensor_type.name.lower() for n, t in a.items()}
    assert types == {n: t.tensor_type.name.lower() for n, t in b.items()}
    assert types["output.weight"] == "q6_k"
    if type_name in ("q4_0", "q5_0"):  # llama.cpp's mix with an imatrix: the first eighth of ffn_down one step up
        assert types["blk.0.ffn_down.weight"] == type_name[:2] + "_1" and types["blk.1.ffn_down.weight"] == type_name
    differ = [n for n in a if not np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
    assert differ == []
    assert rep.types[type_name] >= 50


def test_export_imatrix_option(deep_tiny, deep_imatrix, tmp_path):
    out = tmp_path / "m.gguf"
    r = cli("export", deep_tiny, "-o", out, "--type", "q4_0", "--imatrix", deep_imatrix)
    assert r.returncode == 0, r.stderr
    fields = GGUFReader(out).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 56
    assert fields["quantize.imatrix.chunks_count"].contents() == 4


def test_export_refuses_an_imatrix_it_cannot_use(tiny_bpe, deep_imatrix, tmp_path):
    """Every type takes an imatrix now (llama.cpp's quantizer writes it: tests/grids/test_mix.py);
    one made for another model, or none at the path, is refused before anything is written."""
    from npft_gguf.writer import ExportSettings, export

    with pytest.raises(UsageError, match="another model"):  # rows of 64, entries of 256
        export(open_source(str(tiny_bpe)), tmp_path / "m.gguf", ExportSettings("q4_0", imatrix=str(deep_imatrix)))
    with pytest.raises(UsageError, match="no such file"):
        export(open_source(str(tiny_bpe)), tmp_path / "m.gguf", ExportSettings("q4_0", imatrix=str(tmp_path / "no.gguf")))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def nan_imatrix(deep_imatrix, tmp_path_factory):
    """deep_imatrix with one NaN in one entry's sums: (the file, that entry's name)."""
    im = read_imatrix(deep_imatrix)
    name = sorted(im.entries)[3]
    im.entries[name].sums[0, 7] = np.nan
    return write_imatrix(tmp_path_factory.mktemp("nan") / "nan.imatrix.gguf", im), name


@pytest.mark.parametrize("quantizer", ["rtn", "llama.cpp"])
def test_export_refuses_a_nan_imatrix(deep_tiny, nan_imatrix, tmp_path, quantizer):
    """It wrote a Q4_0 file of NaN weights with exit 0 (llama-quantize refuses the imatrix)."""
    path, name = nan_imatrix
    r = run("export", deep_tiny, "-o", tmp_path / "m.gguf", "--type", "q4_0", "--quantizer", quantizer, "--imatrix", path)
    assert_fails(r, 2, str(path), name, "sum nan at column 7")
    assert listing(tmp_path) == []


def test_llama_cpp_quantizer_checks_the_imatrix_against_the_model(tiny_bpe, deep_imatrix, tmp_path):
    """export --quantizer llama.cpp --imatrix wrote the f32 file, then llama_model_quantize failed
    (exit 1, "a full disk is the usual cause"); now refused from the headers as export's rtn path does."""
    r = run("export", tiny_bpe, "-o", tmp_path / "m.gguf", "--quantizer", "llama.cpp", "--type", "q4_k_m", "--imatrix", deep_imatrix)
    assert_fails(r, 2, str(deep_imatrix), "256 columns", "another model")
    assert listing(tmp_path) == []


def test_imatrix_text_too_short_fails_before_the_model_loads(deep_tiny, tmp_path, monkeypatch):
    from npft_gguf.sources import HFDirSource

    def load_model(*_a, **_k):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(HFDirSource, "load_model", load_model)
    (tmp_path / "short.txt").write_text(calib_text(500), encoding="utf-8")  # about 270 tokens
    r = run("imatrix", deep_tiny, "--calib", tmp_path / "short.txt", "--ctx", "256", "-o", tmp_path / "im.gguf")
    assert_fails(r, 2, "tokens", "at least 2 x ctx = 512")
    assert listing(tmp_path) == ["short.txt"]


# --- convert --method npft+imatrix -------------------------------------------------------------------

def test_convert_npft_then_imatrix(tiny_bpe, tmp_path):
    import json

    from tests.test_convert import TINY

    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    out = tmp_path / "tiny-npft-im.gguf"
    r = cli("convert", tiny_bpe, "-o", out, "--method", "npft+imatrix", "--type", "q4_0", "--calib", tmp_path / "calib.txt",
            *TINY, "--eval-text", "none", "--guard-chunks", "0", "--tune-imatrix", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["imatrix"]["computed_on"] == "the float (untuned) model" and rec["imatrix"]["tokens"] == "6 x 32"
    assert rec["imatrix"]["weights"] == "NPFT-tuned and merged"
    run_dir = out.with_name(out.stem + ".npft-run")
    im = read_imatrix(run_dir / "imatrix.gguf")
    assert im.chunk_count == 6 and im.chunk_size == 32 and all(e.counts[0] == 6 * 32 for e in im.entries.values())
    assert GGUFReader(out).fields["quantize.imatrix.entries_count"].contents() == 14
    report = (run_dir / "report.md").read_text()
    assert "NPFT-tuned and merged weights" in report and "computed on the float (untuned) model" in report
    assert "the rtn noise was the error of this imatrix's quantization" in report  # the tuning met the file's rules
    assert rec["tune"]["settings"]["imatrix"] == str(run_dir / "imatrix.gguf")
    # q8_0 has no importance-weighted rule in llama.cpp (the K mixes now have: issue 30)
    assert_fails(cli("convert", tiny_bpe, "-o", tmp_path / "k.gguf", "--method", "imatrix", "--type", "q8_0",
                     "--calib", tmp_path / "calib.txt"), 2, "--method imatrix")


def test_npft_imatrix_is_compared_beside_llama_cpp_s_imatrix_quantization(deep_tiny, deep_imatrix, tmp_path, monkeypatch):
    """The closing comparison of npft+imatrix adds the untuned model quantized with the same imatrix."""
    import npft_gguf.validate.compare as compare_mod
    from npft_gguf.convert import ConvertSettings, evaluate_beside_baselines

    seen = {}
    monkeypatch.setattr(compare_mod, "compare", lambda files, ref, *a, **k: seen.update(files=files, ref=ref) or {"rows": []})
    monkeypatch.setattr(compare_mod, "markdown", lambda report: "")
    src = open_source(str(deep_tiny))
    out = tmp_path / "out.gguf"
    out.write_bytes(b"")
    settings = ConvertSettings(type="q4_0", method="npft+imatrix")
    evaluate_beside_baselines(src, out, "q4_0", settings, tmp_path, ("t", "text"), False, lambda m: None, imatrix=str(deep_imatrix))
    assert [p.name for p in seen["files"]] == ["rtn-q4_0.gguf", "imatrix-q4_0.gguf", "out.gguf", "peer-iq4_nl-imatrix.gguf",
                                               "peer-q4_k_m-imatrix.gguf"]  # and the same-size files llama.cpp makes with it
    assert GGUFReader(tmp_path / "peer-q4_k_m-imatrix.gguf").fields["general.file_type"].contents() == 15  # Q4_K_M
    assert GGUFReader(tmp_path / "imatrix-q4_0.gguf").fields["quantize.imatrix.file"].contents() == str(deep_imatrix)


# --- the rtn noise when the file is written with an imatrix -------------------------------------------

@pytest.mark.parametrize("type_name, with_imatrix", [("q4_0", True), ("iq4_nl", True), ("iq4_nl", False)])
def test_tuning_quantizers_are_the_written_file(deep_tiny, deep_imatrix, tmp_path, type_name, with_imatrix):
    """NPFT's rtn noise is W's error in the file export writes: for every linear (layer 0's ffn_down
    Q4_1 in the Q4_0 mix with an imatrix), quantize-dequantize equals that file read back, block for
    block, but for the near-ties the torch twins may break the other way (grids/twins.py)."""
    from npft_gguf.imatrix import tuning_quantizers
    from npft_gguf.sensitivity import target_linears
    from npft_gguf.writer import ExportSettings, export

    imatrix = str(deep_imatrix) if with_imatrix else None
    src = open_source(str(deep_tiny))
    model = src.load_model(dtype=torch.float32)
    linears = target_linears(model)
    quantize = tuning_quantizers(imatrix, type_name, linears, src.arch, model.config)
    assert set(quantize) == set(linears)
    out = tmp_path / "im.gguf"
    export(src, out, ExportSettings(type_name, imatrix=imatrix), progress=False)
    written = dict(open_source(str(out)).load_model(dtype=torch.float32).named_parameters())
    for name, lin in linears.items():
        same = (quantize[name](lin.weight).reshape(-1, 32) == written[name + ".weight"].reshape(-1, 32)).all(1)
        assert float(same.float().mean()) >= 0.98, (name, float(same.float().mean()))
    w = linears["model.layers.1.mlp.down_proj"].weight
    assert not torch.equal(quantize["model.layers.1.mlp.down_proj"](w), get_grid(type_name).fakequant(w))  # not plain RTN


def test_convert_tunes_against_the_imatrix_rules_it_writes_with(tiny_bpe, tmp_path):
    from npft_gguf.calib import CalibSettings
    from npft_gguf.convert import ConvertSettings, plan_convert
    from npft_gguf.npft import NPFTSettings

    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    calib = CalibSettings(calib=str(tmp_path / "calib.txt"), samples=4, length=32)
    out = tmp_path / "x.gguf"
    im = str(tmp_path / "x.npft-run" / "imatrix.gguf")
    for method, tune_imatrix, expect in (("auto", True, im), ("auto", None, im), ("auto", False, None), ("npft", None, None)):
        plan = plan_convert(str(tiny_bpe), out, ConvertSettings(bits=4, method=method, eval_text="none", ctx=64, tune_imatrix=tune_imatrix),
                            calib, NPFTSettings(noise="rtn", resample="step"))
        assert plan.npft.imatrix == expect, (method, tune_imatrix)
    for method, noise in (("npft", "rtn"), ("npft+imatrix", "grid")):
        with pytest.raises(UsageError, match="--tune-imatrix"):
            plan_convert(str(tiny_bpe), out, ConvertSettings(bits=4, method=method, eval_text="none", tune_imatrix=True),
                         calib, NPFTSettings(noise=noise, resample="step"))


def test_finetune_imatrix_of_another_model_is_refused_before_loading(tiny_bpe, deep_imatrix, tmp_path, no_work):
    """The entries' widths are checked against the headers (rows of 64 here, entries of 256), not
    after loading, and the refused run leaves no output or run folder behind."""
    from tests.test_convert import TINY

    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    out = tmp_path / "t"
    r = run("finetune", tiny_bpe, "-o", out, "--calib", tmp_path / "calib.txt", *TINY, "--imatrix", deep_imatrix)
    assert_fails(r, 2, str(deep_imatrix), "columns", "another model")
    assert not out.exists()


def test_finetune_imatrix_is_checked_before_any_work(deep_tiny, deep_imatrix, tmp_path):
    from tests.test_convert import TINY

    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    args = ["finetune", deep_tiny, "-o", tmp_path / "t", "--calib", tmp_path / "calib.txt", *TINY]
    assert_fails(cli(*args, "--imatrix", tmp_path / "none.gguf"), 2, "no such file")
    assert_fails(cli(*args, "--imatrix", deep_imatrix, "--grid", "q8_0"), 2, "importance-weighted", "q8_0")
    assert_fails(cli(*args, "--imatrix", deep_imatrix, "--noise", "grid"), 2, "--imatrix", "--noise rtn")
    assert not (tmp_path / "t").exists()


def test_finetune_refuses_a_nan_imatrix(deep_tiny, nan_imatrix, tmp_path):
    from tests.test_convert import TINY

    path, name = nan_imatrix
    (tmp_path / "calib.txt").write_text(calib_text(40_000))
    r = run("finetune", deep_tiny, "-o", tmp_path / "t", "--calib", tmp_path / "calib.txt", *TINY, "--imatrix", path)
    assert_fails(r, 2, str(path), name, "nan")
    assert not (tmp_path / "t").exists()
