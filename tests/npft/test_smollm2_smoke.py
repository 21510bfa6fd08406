"""A real-model smoke run: NPFT on the real SmolLM2-135M (all 30 layers) for two steps on the real
calibration text, then the tuned model's Q4_0 GGUF runs in llama.cpp. Seconds to a minute."""

import numpy as np
import torch

from npft_gguf.calib import CalibSettings, load_calibration
from npft_gguf.npft import NPFTSettings, tune


def test_two_steps_on_smollm2_then_llama_cpp(smollm2, tmp_path):
    from npft_gguf import llamacpp
    from npft_gguf.sources import ModelSource
    from npft_gguf.writer import ExportSettings, export

    model = smollm2.load_model()
    tokens = load_calibration(CalibSettings(calib="wiki", samples=4, length=48, seed=0), smollm2.tokenizer())
    s = NPFTSettings(epochs=1, batch=2, max_steps_per_epoch=2, fisher_samples=2, trace_samples=0, lr=1e-4)
    r = tune(model, tokens, s, tmp_path / "run", progress=False)
    assert len(r.history) == 2 and all(np.isfinite(h["loss_noisy"]) and np.isfinite(h["loss_clean"]) for h in r.history)
    n_linear = sum(row["n"] for row in r.fisher_summary)
    assert len(r.fisher_summary) == 30 * 7
    assert r.outliers_per_epoch[0] == sum(max(1, round(row["n"] * 0.05 / 100)) for row in r.fisher_summary)
    assert 0 < r.outliers_per_epoch[0] < n_linear * 0.001
    assert r.trace_before is None  # the trace is checked exactly on a tiny model, and measured in evals/
    # the merged model differs from the source only slightly, and its Q4_0 file runs in llama.cpp
    q = r.model.state_dict()["model.layers.3.self_attn.q_proj.weight"]
    q0 = smollm2.load("model.layers.3.self_attn.q_proj.weight")
    assert 0 < float((q - q0).abs().max()) < 0.05
    out = tmp_path / "tuned-q4_0.gguf"
    export(ModelSource(smollm2, r.model, "npft"), out, ExportSettings(type="q4_0"), progress=False)
    llm = llamacpp.load(out, n_ctx=64, n_threads=2)
    same = []
    for row in tokens[:, :32]:  # all four segments: one 32-token window alone ranges 0.45-0.8
        logits = llamacpp.logits(llm, row.tolist())
        assert logits.shape[1] == 49152 and np.isfinite(logits).all()
        with torch.no_grad():
            ref = r.model(row[None]).logits[0].numpy()
        same.append((logits.argmax(-1) == ref.argmax(-1)).mean())
    # Q4_0 of the tuned model still tracks it: SmolLM2's Q4_0 keeps about 0.6-0.7 of the float
    # model's top-1 choices (a mis-ordered or mis-scaled tensor leaves almost none)
    assert np.mean(same) > 0.5
