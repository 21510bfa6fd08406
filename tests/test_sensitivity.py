"""Fisher diagonal = sum of squared per-sample gradients; outliers = top p% per module."""

import torch

from npft_gguf.sensitivity import fisher_diagonal, outliers, summary, target_linears


def _model(tiny_bpe):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_bpe).float()


def test_fisher_is_sum_of_per_sample_squared_gradients(tiny_bpe):
    model = _model(tiny_bpe)
    lin = target_linears(model)
    assert len(lin) == 2 * 7 and "model.layers.0.self_attn.q_proj" in lin
    tokens = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(model, tokens, lin, progress=False)
    name = "model.layers.1.mlp.down_proj"
    expect = torch.zeros_like(lin[name].weight)
    for i in range(3):
        model.zero_grad()
        lin[name].weight.requires_grad_(True)
        model(input_ids=tokens[i:i + 1], labels=tokens[i:i + 1]).loss.backward()
        expect += lin[name].weight.grad ** 2
    torch.testing.assert_close(fisher[name], expect, rtol=1e-5, atol=1e-12)
    # the batch-mean gradient squared is a different (smaller) thing: per-sample matters
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert not torch.allclose(fisher[name], 3 * lin[name].weight.grad ** 2, rtol=1e-2)


def test_outliers_are_the_top_scores_per_module():
    f = {"a": torch.arange(200.0).reshape(10, 20), "b": torch.ones(4, 8)}
    found = outliers(f, pct=1.0)
    assert len(found["a"]) == 2 and len(found["b"]) == 1  # at least one per module
    got = sorted(zip(found["a"].rows.tolist(), found["a"].cols.tolist()))
    assert got == [(9, 18), (9, 19)]
    lin = {"a": torch.nn.Linear(20, 10, bias=False), "b": torch.nn.Linear(8, 4, bias=False)}
    rows = summary(lin, f, found)
    assert rows[0]["outliers"] == 2 and rows[0]["score_ratio"] > 1.0


def test_peft_wrapped_model_exposes_base_linears(tiny_bpe):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_bpe), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lin = target_linears(model)
    assert set(lin) == set(target_linears(_model(tiny_bpe)))
    assert all(type(m) is torch.nn.Linear for m in lin.values())


def test_fisher_from_module_hooks_equals_the_weight_gradients(tiny_bpe):
    """fisher_by_hooks (G^T X per sample, no weight .grad: what a sharded run uses) gives the scores
    the weights' own gradients give, on a plain model and under a LoRA adapter with B != 0."""
    from peft import LoraConfig, get_peft_model

    from npft_gguf.sensitivity import fisher_by_hooks

    model = _model(tiny_bpe)
    tokens = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    lin = target_linears(model)
    for n, f in fisher_by_hooks(model, tokens, lin, progress=False).items():
        torch.testing.assert_close(f, fisher_diagonal(model, tokens, {n: lin[n]}, progress=False)[n], rtol=1e-4, atol=1e-12)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    lin = target_linears(peft)
    by_grad, by_hooks = fisher_diagonal(peft, tokens, lin, progress=False), fisher_by_hooks(peft, tokens, lin, progress=False)
    assert by_grad.keys() == by_hooks.keys()
    for n in by_grad:
        torch.testing.assert_close(by_hooks[n], by_grad[n], rtol=1e-4, atol=1e-12, msg=n)
    assert not any(p.grad is not None for p in peft.parameters())
