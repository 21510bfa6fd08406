"""The tuning loop on a tiny model: it learns, resumes exactly, stops cleanly on a bad loss."""

import pytest
import torch

from npft_gguf.errors import NpftError, UsageError
from npft_gguf.npft import NPFTSettings, tune
from npft_gguf.npft.train import CHECKPOINT
from tests.npft.conftest import tiny_model

FAST = dict(epochs=2, lr=2e-3, batch=2, outlier_pct=1.0, trace_samples=0, rank=4, alpha=8)


def _model(tiny_bpe):
    return tiny_model(tiny_bpe)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_falls_and_merge_changes_the_targets_only(tiny_bpe, tokens, tmp_path):
    model = _model(tiny_bpe)
    before = _state(model)
    r = tune(model, tokens, NPFTSettings(**{**FAST, "epochs": 3}), tmp_path, progress=False)
    assert len(r.history) == 3 * 4 and r.outliers_per_epoch and len(r.fisher_summary) == 14
    assert r.history[-1]["loss_clean"] < r.history[0]["loss_clean"]
    after = _state(r.model)
    assert set(after) == set(before)  # merged and unwrapped: plain transformers names again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")) for k in changed)
    assert not any("gate_proj" in k for k in changed)  # perturbed, but not a LoRA target


def test_resume_gives_the_same_weights(tiny_bpe, tokens, tmp_path):
    s = NPFTSettings(**FAST)
    whole = tune(_model(tiny_bpe), tokens, s, tmp_path / "whole", progress=False).model

    def stop_in_second_epoch(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(_model(tiny_bpe), tokens, s, tmp_path / "cut", progress=False, on_step=stop_in_second_epoch)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["epoch_done"] == 1
    resumed = tune(_model(tiny_bpe), tokens, s, tmp_path / "cut", resume=True, progress=False)
    assert resumed.resumed_at_epoch == 1 and len(resumed.history) == len([1 for _ in range(8)])
    a, b = _state(whole), _state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume must not silently change the recipe
    with pytest.raises(UsageError, match="different lr"):
        tune(_model(tiny_bpe), tokens, NPFTSettings(**{**FAST, "lr": 1e-3}), tmp_path / "cut", resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_bpe, tokens, tmp_path):
    model = _model(tiny_bpe)

    def poison(row):
        if row["epoch"] == 2:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(float("nan"))

    with pytest.raises(NpftError, match="loss became nan.*last good checkpoint"):
        tune(model, tokens, NPFTSettings(**FAST), tmp_path, progress=False, on_step=poison)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["epoch_done"] == 1
    assert all(torch.isfinite(v).all() for v in state["adapter"].values())


def test_noise_none_is_plain_lora_and_options_are_checked(tiny_bpe, tokens, tmp_path):
    r = tune(_model(tiny_bpe), tokens, NPFTSettings(**{**FAST, "noise": "none", "clean_weight": 0.0, "epochs": 1}), tmp_path, progress=False)
    assert all(h["noise_rms"] == 0.0 and h["loss_clean"] is None for h in r.history)
    for bad in ({"noise": "gaussian"}, {"noise_scope": "all"}, {"outlier_pct": 0}, {"resample": "batch"}):
        with pytest.raises(UsageError):
            NPFTSettings(**bad)
