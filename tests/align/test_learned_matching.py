"""Learned matching: every iterate is an exact symmetry, and it lowers the midpoint loss it descends."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from modelcypher.align import apply_verified, fold_norms, match_weights
from modelcypher.align.learned_matching import match_learned
from modelcypher.align.transform import rope_commuting
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError
from modelcypher.hf import causal_lm as lm_states
from modelcypher.measure.barrier import interpolate, lm_loss_fn


def training_batches(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (1600,), generator=torch.Generator().manual_seed(seed))
    return ids, list(ids.view(-1, 25).split(8))


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", False)])
def test_learned_matching_is_exact_and_lowers_the_midpoint_loss(family, tie):
    config, sd_a = tiny_model(family, tie=tie, seed=0)
    _, sd_b = tiny_model(family, tie=tie, seed=1)
    spec = spec_for(config, sd_a.keys())
    start = match_weights(sd_b, sd_a, spec, residual="orthogonal", vo=True, qk=True)
    ids, batches = training_batches()
    found, losses = match_learned(sd_b, sd_a, config, start, batches, steps=40, lr=1e-2)
    assert len(losses) == 40

    q = found.transforms[spec.residual.name]
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-9, rtol=0)
    if spec.norm == "layernorm":  # pre-norm LayerNorm: the all-ones direction stays fixed
        torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0], dtype=q.dtype), atol=1e-9, rtol=0)
    for g in spec.groups:
        if g.kind in ("perm", "heads"):  # the permutations are weight matching's
            assert torch.equal(found.transforms[g.name], start.transforms[g.name])
    assert not torch.allclose(q, start.transforms[spec.residual.name].double())
    for g in spec.groups:
        if g.kind == "qk":  # learned too; under RoPE still a rotation of each rotary pair
            assert not torch.allclose(found.transforms[g.name], start.transforms[g.name].double())
            assert rope_commuting(found.transforms[g.name]) or not g.heads.rope

    # The aligned B computes B's function (apply_verified raises otherwise), and its midpoint with A is
    # better on the training text than weight matching's.
    a_folded, config_a = fold_norms(sd_a, config)
    model, full_a = lm_states(config_a, a_folded)
    loss = lm_loss_fn(model, ids, torch.device("cpu"))
    mid = {}
    for name, alignment in (("weight", start), ("learned", found)):
        b, config_b = apply_verified(sd_b, config, alignment)
        mid[name] = loss(interpolate(full_a, lm_states(config_b, b)[1], 0.5))
    assert mid["learned"] < mid["weight"] - 0.01


def test_learned_matching_needs_an_orthogonal_start_and_text():
    config, sd_a = tiny_model("llama", seed=0)
    _, sd_b = tiny_model("llama", seed=1)
    spec = spec_for(config, sd_a.keys())
    perm_only = match_weights(sd_b, sd_a, spec, residual="permutation")
    with pytest.raises(UserError, match="orthogonal residual"):
        match_learned(sd_b, sd_a, config, perm_only, training_batches()[1], steps=1)
    start = match_weights(sd_b, sd_a, spec, residual="orthogonal")
    with pytest.raises(UserError, match="needs training text"):
        match_learned(sd_b, sd_a, config, start, [], steps=1)
