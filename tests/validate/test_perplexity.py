"""The perplexity/KLD protocol against an independent reference, and its refusals."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from npft_gguf.errors import UsageError
from npft_gguf.sources import open_source
from npft_gguf.validate.models import Backend, LlamaCppBackend, TorchBackend
from npft_gguf.validate.perplexity import EvalSettings, evaluate
from npft_gguf.writer import ExportSettings, export

CTX = 64


def reference_ppl(model, ids: list[int], ctx: int, bos: int | None) -> float:
    """llama-perplexity's protocol, written out plainly: windows, BOS first, second half scored."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        w = torch.tensor(ids[start:start + ctx])
        if bos is not None:
            w[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
        for j in range(ctx // 2, ctx - 1):
            nll -= float(logp[j, w[j + 1]])
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module", params=["tiny_bpe", "tiny_spm"])
def tiny(request, tmp_path_factory):
    src = open_source(str(request.getfixturevalue(request.param)))
    d = tmp_path_factory.mktemp("pp")
    for t in ("f32", "q8_0"):
        export(src, d / f"{t}.gguf", ExportSettings(t, pure=True), progress=False)
    return src, d


def test_llama_cpp_and_torch_match_an_independent_reference(tiny, wiki_text):
    src, d = tiny
    text = wiki_text[:40_000]
    model, tok = src.load_model(), src.tokenizer()
    torch_backend = TorchBackend(model, tok, "torch")
    ids = torch_backend.tokenize(text)
    expected = reference_ppl(model, ids, CTX, torch_backend.bos_id if torch_backend.add_bos else None)
    got_torch = evaluate(torch_backend, text, "wiki", EvalSettings(CTX), progress=False)
    got_cpp = evaluate(LlamaCppBackend(d / "f32.gguf", CTX), text, "wiki", EvalSettings(CTX), progress=False)
    assert got_torch.chunks == got_cpp.chunks == len(ids) // CTX
    assert got_torch.scored == got_torch.chunks * (CTX // 2 - 1)
    assert got_torch.ppl == pytest.approx(expected, rel=1e-6)
    # the protocol is checked to 1e-6 on torch above; llama.cpp keeps its KV cache in f16, which moves
    # these random tiny models' PPL by 0.05-0.2 % depending on the text their tokenizer was trained on
    assert got_cpp.ppl == pytest.approx(expected, rel=3e-3)
    assert 0 < got_cpp.ppl_se < got_cpp.ppl


def test_kld_of_a_model_against_itself_is_zero(tiny, wiki_text):
    _, d = tiny
    b = LlamaCppBackend(d / "f32.gguf", CTX)
    r = evaluate(b, wiki_text[:20_000], "wiki", EvalSettings(CTX), ref=b, progress=False)
    assert abs(r.kld["mean"]) < 1e-6 and abs(r.kld["max"]) < 1e-6
    assert r.kld["same_top1_pct"] == 100.0 and r.ppl_ref == r.ppl


def test_kld_of_q8_0_against_f32_is_small_and_positive(tiny, wiki_text):
    _, d = tiny
    r = evaluate(LlamaCppBackend(d / "q8_0.gguf", CTX), wiki_text[:20_000], "wiki", EvalSettings(CTX),
                 ref=LlamaCppBackend(d / "f32.gguf", CTX), progress=False)
    assert 0 < r.kld["mean"] < 0.01
    assert r.kld["same_top1_pct"] > 90
    assert r.kld["max"] >= r.kld["p99"] >= r.kld["median"] >= 0


def test_chunks_limits_the_windows(tiny, wiki_text):
    _, d = tiny
    r = evaluate(LlamaCppBackend(d / "f32.gguf", CTX), wiki_text[:20_000], "wiki", EvalSettings(CTX, chunks=3), progress=False)
    assert r.chunks == 3 and r.scored == 3 * (CTX // 2 - 1)


def test_text_shorter_than_two_contexts_is_refused(tiny):
    _, d = tiny
    with pytest.raises(UsageError, match="at least 2 x ctx"):
        evaluate(LlamaCppBackend(d / "f32.gguf", CTX), "only a few words here", "short", EvalSettings(CTX), progress=False)


def test_ctx_above_the_models_context_is_refused(tiny, wiki_text):
    _, d = tiny  # the tiny models are trained for 256 positions
    with pytest.raises(UsageError, match="training context"):
        evaluate(LlamaCppBackend(d / "f32.gguf", 512), wiki_text[:50_000], "wiki", EvalSettings(512), progress=False)


def test_reference_with_another_vocabulary_is_refused(tiny_bpe, tiny_spm, tmp_path, wiki_text):
    paths = []
    for name, src_dir in (("a", tiny_bpe), ("b", tiny_spm)):
        paths.append(tmp_path / f"{name}.gguf")
        export(open_source(str(src_dir)), paths[-1], ExportSettings("f32"), progress=False)
    with pytest.raises(UsageError, match="different vocabulary"):
        evaluate(LlamaCppBackend(paths[0], CTX), wiki_text[:20_000], "wiki", EvalSettings(CTX),
                 ref=LlamaCppBackend(paths[1], CTX), progress=False)


@pytest.mark.parametrize("args", [["eval", "/nonexistent.gguf"], ["eval", "/nonexistent.gguf", "--text", "/nonexistent.txt"],
                                  ["bench", "/nonexistent.gguf"]])
def test_missing_files_give_one_line(args):
    done = subprocess.run([sys.executable, "-m", "npft_gguf.cli", *args], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such file" in lines[0]
    assert "Traceback" not in done.stderr


def test_scored_logits_are_the_full_windows_rows(tiny, wiki_text):
    """llama.cpp asked for positions first.. only gives the same rows as asking for all of them."""
    from npft_gguf import llamacpp

    _, d = tiny
    b = LlamaCppBackend(d / "f32.gguf", CTX)
    ids = b.tokenize(wiki_text[:5_000])[:CTX]
    full = llamacpp.logits(b.llm, ids)
    assert full.shape == (CTX, b.n_vocab)
    part = b.logits(ids, CTX // 2)
    assert part.shape == (CTX - CTX // 2, b.n_vocab)
    np.testing.assert_allclose(part, full[CTX // 2:], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.logits(ids[:CTX - 5], 3), full[3:CTX - 5], rtol=0, atol=1e-4)  # fresh cache each call


def test_one_call_tokenizer_matches_llama_cpp_python(tiny, wiki_text):
    from npft_gguf import llamacpp

    _, d = tiny
    b = LlamaCppBackend(d / "f32.gguf", CTX)
    for text in (wiki_text[:30_000], " x", "", "\u00e9\u4e2d \U0001f600"):
        assert llamacpp.tokenize(b.llm, text, add_bos=b.add_bos) == b.llm.tokenize(text.encode(), add_bos=b.add_bos)


def test_float32_nll_matches_float64_log_softmax():
    from npft_gguf.validate.perplexity import log_softmax, nll

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 49_152)) * 4 + 10).astype(np.float32)
    targets = rng.integers(0, x.shape[1], 64)
    ref = -log_softmax(x)[torch.arange(64), torch.from_numpy(targets)]
    assert float((nll(x, targets).double() - ref).abs().max()) < 1e-5


class InterruptedAtThirdWindow(Backend):
    """Random logits, and Ctrl-C (or SIGTERM) while the third window runs."""

    def __init__(self):
        super().__init__(label="interrupted", n_vocab=16, add_bos=False, bos_id=None, n_ctx_train=0)
        self.calls = 0

    def tokenize(self, text):
        return [ord(c) % 16 for c in text]

    def logits(self, tokens, first=0):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return np.random.default_rng(self.calls).standard_normal((len(tokens) - first, 16)).astype(np.float32)


def test_an_interrupted_evaluation_never_returns_as_complete():
    """evaluate returned two windows' figures as the result after Ctrl-C; compare and convert then
    wrote them into a report beside rows that covered every window."""
    text = "some words, " * (8 * CTX // 12 + 1)
    with pytest.raises(KeyboardInterrupt):
        evaluate(InterruptedAtThirdWindow(), text, "t", EvalSettings(CTX), progress=False)
    r = evaluate(InterruptedAtThirdWindow(), text, "t", EvalSettings(CTX), progress=False, partial=True)
    assert r.interrupted and r.chunks == 2 and r.scored == 2 * (CTX // 2 - 1)
