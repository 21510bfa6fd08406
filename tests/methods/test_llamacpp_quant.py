"""`npft-gguf export --quantizer llama.cpp`: llama.cpp's own quantizer from our F32 export."""

import numpy as np
from gguf import GGUFReader

from npft_gguf.methods.llamacpp_quant import export_llamacpp
from npft_gguf.sources import open_source
from npft_gguf.writer import ExportSettings, export
from tests.test_cli import assert_fails, cli, listing, out  # noqa: F401 - out is a fixture


def test_llamacpp_quantizer_writes_a_k_quant_mix(tiny_bpe, tmp_path):
    out = tmp_path / "m.gguf"
    r = cli("export", tiny_bpe, "-o", out, "--quantizer", "llama.cpp", "--type", "q4_k_m", "--json")
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path) == ["m.gguf"]  # the f32 intermediate and the .part are gone
    types = {t.tensor_type.name.lower() for t in GGUFReader(out).tensors}
    # rows of 64 fit no K-quant super-block: llama.cpp falls back (q5_0/q8_0 ...) by its own rules
    assert "f32" in types and len(types) >= 2
    assert '"type": "q4_k_m"' in r.stdout


def test_llamacpp_q4_0_pure_equals_our_rtn_byte_for_byte(tiny_bpe, tmp_path):
    src = open_source(str(tiny_bpe))
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(src, ours, ExportSettings("q4_0", pure=True), progress=False)
    report = export_llamacpp(src, theirs, "q4_0", pure=True, progress=False)
    assert report.types == {"q4_0": 16, "f32": 5}  # 14 linears, embedding, output
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


def test_llamacpp_mix_without_the_llamacpp_quantizer_is_a_usage_error(tiny_bpe, out):
    """The IQ3 mixes have no per-tensor table here (grids/mix.py): only llama.cpp's quantizer writes them."""
    r = cli("export", tiny_bpe, "-o", out / "m.gguf", "--type", "iq3_m")
    assert_fails(r, 2, "--quantizer llama.cpp")
    assert listing(out) == []
