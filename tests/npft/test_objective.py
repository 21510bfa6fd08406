"""Tuning objectives: the chunked KL equals the plain one (value and gradient), the teacher is the
untuned model, and a KL-tuned model ends closer to the float model under the noise it was tuned for."""

import pytest
import torch
import torch.nn.functional as F

from npft_gguf.errors import UsageError
from npft_gguf.npft import NPFTSettings, tune
from npft_gguf.npft.objective import OBJECTIVES, get_objective, head_loss, kl_from_hidden, loss, teacher_hidden
from tests.npft.conftest import tiny_model

FAST = dict(epochs=2, lr=2e-3, batch=2, outlier_pct=1.0, trace_samples=0, rank=4, alpha=8)


def _model(tiny_bpe):
    return tiny_model(tiny_bpe)


def _peft(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _plain_kl(lm, hs, ht):
    head = lm.get_output_embeddings()
    log_q = F.log_softmax(head(hs).float(), -1)
    log_p = F.log_softmax(head(ht).float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 2 * 400 * 5, 2**30])  # one position, 5 positions, all at once
def test_chunked_kl_equals_the_plain_kl_and_its_gradient(tiny_bpe, tokens, chunk_bytes):
    lm = _model(tiny_bpe).requires_grad_(False)  # frozen, as under peft
    x = tokens[:2]
    with torch.no_grad():
        ht = lm.get_decoder()(input_ids=x).last_hidden_state
    torch.manual_seed(1)
    hs = (ht + 0.3 * torch.randn_like(ht)).requires_grad_(True)
    ref = _plain_kl(lm, hs, ht)
    (g_ref,) = torch.autograd.grad(ref, hs)
    got = kl_from_hidden(lm, hs, ht, chunk_bytes=chunk_bytes)
    (g_got,) = torch.autograd.grad(got, hs)
    assert ref.item() > 0.01
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
    # the same with the next-token CE added (ce+kl), against autograd through plain logits
    logits = lm.get_output_embeddings()(hs).float()
    ref_ce = _plain_kl(lm, hs, ht) + F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    (g_ref_ce,) = torch.autograd.grad(ref_ce, hs)
    got_ce = head_loss(lm, hs, ht, x, chunk_bytes=chunk_bytes)
    (g_got_ce,) = torch.autograd.grad(got_ce, hs)
    torch.testing.assert_close(got_ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got_ce, g_ref_ce, rtol=1e-4, atol=1e-7)


def test_teacher_is_the_untuned_model_and_kl_starts_at_zero(tiny_bpe, tokens):
    base = _model(tiny_bpe)
    x = tokens[:2]
    with torch.no_grad():
        want = base.get_decoder()(input_ids=x).last_hidden_state
    model = _peft(base)
    with torch.no_grad():  # move the adapter away from zero, so the student differs from the teacher
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    t = teacher_hidden(model, x)
    torch.testing.assert_close(t, want)
    kl = get_objective("kl")
    assert loss(kl, model, x, t).item() > 1e-3  # the adapter moved the student
    with model.disable_adapter():
        assert abs(loss(kl, model, x, t).item()) < 1e-6


def test_kl_without_noise_has_no_gradient_so_the_settings_refuse_it(tiny_bpe, tokens):
    """A fresh adapter (B = 0) leaves the student equal to its teacher: the KL is zero and so is every
    adapter gradient, so tuning kl with no noise would return the untuned model; the settings say so."""
    model = _peft(_model(tiny_bpe))
    x = tokens[:2]
    t = teacher_hidden(model, x)
    kl = loss(get_objective("kl"), model, x, t)
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and abs(kl.item()) < 1e-6 and all(g is None or not g.any() for g in grads)
    ce = loss(get_objective("ce"), model, x, t)  # the next-token loss does move it
    ce.backward()
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if "lora_B" in n)
    with pytest.raises(UsageError, match="trains nothing"):
        NPFTSettings(objective="kl", noise="none")
    NPFTSettings(objective="ce+kl", noise="none")


def test_ce_objective_is_the_models_own_loss_and_ce_plus_kl_adds_them(tiny_bpe, tokens):
    model = _peft(_model(tiny_bpe)).eval()
    x = tokens[:2]
    t = teacher_hidden(model, x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        ce = loss(get_objective("ce"), model, x, None)
        kl = loss(get_objective("kl"), model, x, t)
        both = loss(get_objective("ce+kl"), model, x, t)
    torch.testing.assert_close(ce, model(input_ids=x, labels=x).loss)
    torch.testing.assert_close(both, ce + kl, rtol=1e-5, atol=1e-6)


def test_kl_tuning_brings_the_quantized_model_closer_to_the_float_model(tiny_bpe, tokens, tmp_path):
    """Tuned with rtn noise for q4_0 (the tiny model's rows are 64 and 128 wide), the KL objective
    must leave the fake-quantized merged model nearer the float model than it started."""
    from npft_gguf.grids import get_grid
    from npft_gguf.sensitivity import target_linears

    def quantized_kl(m):
        q = _model(tiny_bpe)
        q.load_state_dict(m.state_dict())
        with torch.no_grad():
            for lin in target_linears(q).values():
                lin.weight.copy_(get_grid("q4_0").fakequant(lin.weight.float()))
            ref = _model(tiny_bpe)
            lp = F.log_softmax(ref(input_ids=tokens).logits.float(), -1)
            lq = F.log_softmax(q(input_ids=tokens).logits.float(), -1)
            return float((lp.exp() * (lp - lq)).sum(-1).mean())

    before = quantized_kl(_model(tiny_bpe))
    s = NPFTSettings(**{**FAST, "epochs": 4, "noise": "rtn", "objective": "kl"})
    r = tune(_model(tiny_bpe), tokens, s, tmp_path, progress=False)
    assert r.settings["objective"] == "kl" and "KL" in r.losses["tuning"] and "cross-entropy" in r.losses["fisher"]
    assert r.history[-1]["loss_noisy"] < r.history[0]["loss_noisy"]
    assert quantized_kl(r.model) < 0.9 * before


def test_the_fused_head_loss_refuses_a_trainable_head(tiny_bpe, tokens):
    lm = _model(tiny_bpe)
    h = torch.zeros(1, 4, lm.config.hidden_size)
    with pytest.raises(NotImplementedError, match="frozen vocabulary head"):
        kl_from_hidden(lm, h, h)


def test_objectives_are_checked():
    assert set(OBJECTIVES) == {"ce", "kl", "ce+kl"}
    with pytest.raises(UsageError, match="--objective"):
        get_objective("mse")
    with pytest.raises(UsageError, match="--objective"):
        NPFTSettings(objective="mse")
