"""The tuning loop on a tiny model: it learns, resumes exactly, stops cleanly on a bad loss."""

import pytest
import torch

from npft_gguf.errors import NpftError, UsageError
from npft_gguf.npft import NPFTSettings, tune
from npft_gguf.npft.train import CHECKPOINT, PICKLED_CHECKPOINT, checkpoint_record
from tests.broken import Planted
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
    assert checkpoint_record(tmp_path / "cut")["epoch_done"] == 1
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
    from safetensors.torch import load_file

    assert checkpoint_record(tmp_path)["epoch_done"] == 1
    adapter = [v for k, v in load_file(tmp_path / CHECKPOINT).items() if k.startswith("adapter:")]
    assert adapter and all(torch.isfinite(v).all() for v in adapter)


def test_noise_none_is_plain_lora_and_options_are_checked(tiny_bpe, tokens, tmp_path):
    r = tune(_model(tiny_bpe), tokens, NPFTSettings(**{**FAST, "noise": "none", "clean_weight": 0.0, "epochs": 1}), tmp_path, progress=False)
    assert all(h["noise_rms"] == 0.0 and h["loss_clean"] is None for h in r.history)
    for bad in ({"noise": "gaussian"}, {"noise_scope": "all"}, {"outlier_pct": 0}, {"resample": "batch"}):
        with pytest.raises(UsageError):
            NPFTSettings(**bad)


@pytest.mark.parametrize("name", [PICKLED_CHECKPOINT, CHECKPOINT])
def test_a_pickled_checkpoint_is_refused_unread(tiny_bpe, tokens, tmp_path, name):
    """Issue 27 #4: --resume unpickled checkpoint.pt, so a crafted one ran code. A pickle where a
    checkpoint is expected is refused, and its code never runs."""
    import pickle

    marker = tmp_path / "PWNED"
    (tmp_path / "run").mkdir()
    crafted = {"epoch_done": 1, "payload": Planted(marker)}
    if name == PICKLED_CHECKPOINT:  # as older versions wrote it
        torch.save(crafted, tmp_path / "run" / name)
    else:
        (tmp_path / "run" / name).write_bytes(pickle.dumps(crafted))
    with pytest.raises(UsageError, match="older npft-gguf" if name == PICKLED_CHECKPOINT else "not a readable checkpoint"):
        tune(_model(tiny_bpe), tokens, NPFTSettings(**FAST), tmp_path / "run", resume=True, progress=False)
    assert not marker.exists()


def test_a_resume_needs_the_same_source(tiny_bpe, tokens, tmp_path):
    """Issue 27 #3: a checkpoint tuned from another model of the same shapes was resumed. The
    source's fingerprint is kept in the checkpoint and a resume from another is refused."""
    a, b = {"spec": "model-a", "fingerprint": "aaaa"}, {"spec": "model-b", "fingerprint": "bbbb"}
    s = NPFTSettings(**{**FAST, "epochs": 1})
    tune(_model(tiny_bpe), tokens, s, tmp_path, progress=False, source=a)
    assert checkpoint_record(tmp_path)["source"] == a
    with pytest.raises(UsageError, match="tuned from model-a .fingerprint aaaa., not from model-b .fingerprint bbbb."):
        tune(_model(tiny_bpe), tokens, s, tmp_path, resume=True, progress=False, source=b)
    assert tune(_model(tiny_bpe), tokens, s, tmp_path, resume=True, progress=False, source=a).resumed_at_epoch == 1
