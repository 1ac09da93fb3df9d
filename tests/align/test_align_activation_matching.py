"""Activation matching recovers a hidden transform from activations alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from modelcypher.align.activation_matching import match_activations
from modelcypher.align.equivalence import build_model
from modelcypher.align.transform import apply, fold_norms, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError


def batches(n=3, batch=6, seq=16, mask=False):
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]
    if mask:  # the second half of the first rows is padding: must be ignored
        masks = [torch.ones_like(b) for b in out]
        for m in masks:
            m[:2, seq // 2 :] = 0
        return [{"input_ids": b, "attention_mask": m} for b, m in zip(out, masks, strict=True)]
    return out


@pytest.mark.parametrize(
    "family, residual",
    [("llama", "permutation"), ("llama", "orthogonal"), ("qwen2", "orthogonal"),
     ("gpt2", "permutation"), ("gpt2", "orthogonal"), ("bert", "permutation")],
)
def test_recovers_hidden_transform(family, residual):
    config, sd_a = tiny_model(family, tie=family == "qwen2")
    hidden = random_alignment(spec_for(config, sd_a), kinds=("perm", "heads", "residual"), residual=residual, seed=3)
    sd_b, config_b = apply(sd_a, config, hidden)
    model_a, model_b = build_model(config, sd_a), build_model(config_b, sd_b)
    spec = spec_for(config_b, model_b.state_dict())
    found = match_activations(model_b, model_a, spec, batches(mask=family == "bert"), "cpu", residual=residual)
    aligned, _ = apply(sd_b, config_b, found)
    reference = fold_norms(sd_a, config)[0] if residual == "orthogonal" else sd_a
    for k in reference:
        torch.testing.assert_close(aligned[k], reference[k], atol=1e-5, rtol=0, msg=k)


def test_mlp_alignment_from_digits_beats_raw_average():
    from modelcypher.zoo.mlp import evaluate, load_digits_split, mlp_from_config, train_mlp

    data = load_digits_split()
    a, b = (train_mlp(seed, hidden=(48, 48, 48), epochs=8, data=data) for seed in (1, 2))
    spec = spec_for(a.config)
    found = match_activations(b, a, spec, data.x_train.split(256))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    aligned, _ = apply(sd_b, b.config, found)

    def midpoint_loss(sd):
        model = mlp_from_config(a.config)
        model.load_state_dict({k: (sd_a[k] + sd[k]) / 2 for k in sd_a})
        return evaluate(model, data.x_test, data.y_test)[0]

    assert midpoint_loss(aligned) < 0.6 * midpoint_loss(sd_b)


def test_no_tokens_is_a_user_error():
    config, sd = tiny_model("llama")
    model = build_model(config, sd)
    with pytest.raises(UserError, match="no tokens"):
        match_activations(model, model, spec_for(config, sd), [], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recovers_hidden_permutation_on_cuda():
    config, sd_a = tiny_model("llama")
    hidden = random_alignment(spec_for(config, sd_a), kinds=("perm", "heads", "residual"), residual="permutation")
    sd_b, config_b = apply(sd_a, config, hidden)
    model_a, model_b = build_model(config, sd_a), build_model(config_b, sd_b)
    found = match_activations(model_b, model_a, spec_for(config_b, sd_b), batches(), "cuda", residual="permutation")
    aligned, _ = apply(sd_b, config_b, found)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
