"""Weight matching recovers a hidden symmetry transform, and its objective never decreases."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_mlp, tiny_model

from modelcypher.align.transform import apply, fold_norms, random_alignment
from modelcypher.align.weight_matching import match_weights
from modelcypher.arch.symmetry import spec_for
from modelcypher.errors import UserError

FAMILIES = ["llama", "qwen2", "gpt2", "bert", "mlp"]


def make(family: str, tie: bool = False):
    return tiny_mlp() if family == "mlp" else tiny_model(family, tie=tie)


def assert_same_weights(sd_a, sd_b, atol=0.0):
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], atol=atol, rtol=0, msg=k)


def non_decreasing(history):
    return all(b >= a - 1e-9 * abs(a) for a, b in zip(history, history[1:], strict=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_recovers_hidden_permutations_exactly(family):
    config, sd_a = make(family, tie=True)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, kinds=("perm", "heads", "residual"), residual="permutation", seed=3)
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec_for(config_b, sd_b), residual="permutation", seed=0)
    aligned, _ = apply(sd_b, config_b, found)
    assert_same_weights(sd_a, aligned)  # exact: permutations move numbers, never change them
    assert non_decreasing(found.history) and len(found.history) >= 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("tie", [False, True])
def test_recovers_orthogonal_residual_up_to_tolerance(family, tie):
    config, sd_a = tiny_model(family, tie=tie)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, kinds=("perm", "heads", "residual"), seed=4)
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec_for(config_b, sd_b), residual="orthogonal", seed=1)
    aligned, _ = apply(sd_b, config_b, found)
    folded_a, _ = fold_norms(sd_a, config)  # the orthogonal residual is written with norms folded
    assert_same_weights(folded_a, aligned, atol=1e-5)
    assert non_decreasing(found.history)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_recovers_vo_bases_with_head_permutations(family):
    config, sd_a = tiny_model(family)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, seed=5)  # every kind, V-O orthogonal
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec, vo=True, seed=2)
    aligned, _ = apply(sd_b, config_b, found)
    reference = fold_norms(sd_a, config)[0] if spec.residual_orthogonal_ok else sd_a
    assert_same_weights(reference, aligned, atol=1e-3)
    assert non_decreasing(found.history)


def test_objective_is_non_decreasing_between_independent_models():
    config, sd_a = tiny_model("llama", seed=0)
    _, sd_b = tiny_model("llama", seed=1)
    spec = spec_for(config, sd_a)
    found = match_weights(sd_b, sd_a, spec, vo=True, max_sweeps=5, seed=3)
    assert non_decreasing(found.history)
    assert found.history[-1] > found.history[0]
    assert len(found.history) <= 1 + 2 * 5


def test_residual_none_leaves_the_residual_alone():
    config, sd_a = tiny_model("gpt2")
    found = match_weights(sd_a, sd_a, spec_for(config, sd_a), residual="none")
    assert "residual" not in found.transforms
    assert all(torch.equal(t, torch.arange(len(t))) for t in found.transforms.values())


def test_post_norm_refuses_orthogonal_residual():
    config, sd = tiny_model("bert")
    with pytest.raises(UserError, match="post-norm"):
        match_weights(sd, sd, spec_for(config, sd), residual="orthogonal")


def test_shape_mismatch_is_a_user_error():
    config, sd_a = tiny_mlp(sizes=(64, 12, 10, 8, 10))
    _, sd_b = tiny_mlp(sizes=(64, 12, 11, 8, 10))
    with pytest.raises(UserError, match="differ in shape"):
        match_weights(sd_b, sd_a, spec_for(config))
