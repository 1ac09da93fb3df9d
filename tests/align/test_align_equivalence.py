"""check_equivalent refuses a model that computes something else."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_mlp, tiny_model

from modelcypher.align.equivalence import NotEquivalentError, apply_verified, check_equivalent
from modelcypher.align.transform import Alignment, apply, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_broken_alignment_fails_loudly(family):
    config, sd = tiny_model(family)
    spec = spec_for(config, sd)
    good = random_alignment(spec, kinds=("perm",), seed=0)
    sd2, config2 = apply(sd, config, good)
    broken = dict(sd2)
    mlp = next(g for g in spec.groups if g.kind == "perm")
    reader = next(s for s in mlp.slots if s.role == "in")  # the down projection keeps the old order
    broken[reader.tensor] = sd[reader.tensor]
    with pytest.raises(NotEquivalentError, match="not equivalent"):
        check_equivalent(config, sd, broken, config2)


def test_orthogonal_residual_without_folding_fails():
    config, sd = tiny_model("llama")
    spec = spec_for(config, sd)
    alignment = random_alignment(spec, kinds=("residual",), seed=1)
    q = alignment.transforms["residual"]
    rotated = {k: v.clone() for k, v in sd.items()}
    rotated["model.embed_tokens.weight"] = (sd["model.embed_tokens.weight"].double() @ q).float()
    for k in rotated:
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            rotated[k] = (sd[k].double() @ q).float()
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            rotated[k] = (q.T @ sd[k].double()).float()
    rotated["lm_head.weight"] = (sd["lm_head.weight"].double() @ q).float()
    with pytest.raises(NotEquivalentError):  # the RMSNorm gains were not folded first
        check_equivalent(config, sd, rotated)


def test_mlp_broken_permutation_fails():
    config, sd = tiny_mlp()
    sd2, _ = apply(sd, config, Alignment({"hidden.0": torch.randperm(12)}))
    sd2["layers.1.weight"] = sd["layers.1.weight"]
    with pytest.raises(NotEquivalentError):
        check_equivalent(config, sd, sd2)


def test_equivalent_returns_the_gap():
    config, sd = tiny_model("gpt2")
    assert check_equivalent(config, sd, sd) == 0.0


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="supported"):
        check_equivalent({"model_type": "t5"}, {}, {})


def test_apply_verified_returns_checked_checkpoint():
    config, sd = tiny_model("qwen2", tie=True)
    sd2, config2 = apply_verified(sd, config, random_alignment(spec_for(config, sd), seed=2), atol=1e-5, rtol=1e-5)
    assert config2["tie_word_embeddings"] is False and "lm_head.weight" in sd2
