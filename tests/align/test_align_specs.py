"""The symmetry specs describe the real checkpoints: every slot names a tensor with the right extent."""

from __future__ import annotations

import pytest
from tiny_models import tiny_mlp, tiny_model

from modelcypher.align.equivalence import check_equivalent
from modelcypher.align.transform import apply, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert", "mlp"])
def test_every_slot_fits_its_tensor(family):
    config, sd = tiny_mlp() if family == "mlp" else tiny_model(family)
    spec = spec_for(config, sd)
    for g in spec.groups:
        for s in g.slots:
            assert s.tensor in sd, s.tensor
            extent = (s.stop or sd[s.tensor].shape[s.axis]) - s.start
            if g.kind in ("heads", "vo", "qk"):
                n = g.heads.n_heads if s.space == "query" else g.heads.n_kv_heads
                assert extent == n * g.heads.head_dim, (g.name, s)
            else:
                assert extent == g.size, (g.name, s)
    for f in spec.folds:
        assert f.weight in sd and all(r.tensor in sd for r in f.readers)


def test_gqa_spec_keeps_kv_structure():
    config, sd = tiny_model("llama")
    heads = spec_for(config, sd).group("layers.0.heads").heads
    assert (heads.n_heads, heads.n_kv_heads, heads.group_size) == (4, 2, 2)


def test_prefix_is_detected_from_checkpoint_names():
    config, sd = tiny_model("gpt2", tie=True)
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}  # as the original gpt2 stores them
    spec = spec_for(config, bare)
    assert all(not s.tensor.startswith("transformer.") for g in spec.groups for s in g.slots)
    aligned, config2 = apply(bare, config, random_alignment(spec, seed=1))
    check_equivalent(config, bare, aligned, config2, atol=1e-5, rtol=1e-5)


def test_unknown_family_lists_supported_ones():
    with pytest.raises(UserError, match="llama.*gpt2.*bert"):
        spec_for({"model_type": "t5"})
