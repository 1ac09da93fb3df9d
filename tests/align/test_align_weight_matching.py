"""Weight matching recovers a hidden symmetry transform, and its objective never decreases."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_mlp, tiny_model

from modelcypher.align import weight_matching
from modelcypher.align.transform import (
    apply,
    fold_norms,
    group_ops,
    random_alignment,
    slots_by_tensor,
    transform_tensor,
)
from modelcypher.align.weight_matching import Matcher, inner, match_weights, prepare, unit_rows
from modelcypher.arch.families import spec_for
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
    hidden = random_alignment(spec, kinds=("perm", "heads", "vo", "residual"), seed=5)  # V-O orthogonal
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec, vo=True, seed=2)
    aligned, _ = apply(sd_b, config_b, found)
    reference = fold_norms(sd_a, config)[0] if spec.residual_orthogonal_ok else sd_a
    assert_same_weights(reference, aligned, atol=1e-3)
    assert non_decreasing(found.history)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_recovers_qk_and_vo_bases_with_head_permutations(family):
    config, sd_a = tiny_model(family)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, seed=8)  # every kind; Q-K a rotation per rotary pair under RoPE
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec, vo=True, qk=True, seed=2)
    assert any(g.kind == "qk" and g.name in found.transforms for g in spec.groups)
    aligned, _ = apply(sd_b, config_b, found)
    reference = fold_norms(sd_a, config)[0] if spec.residual_orthogonal_ok else sd_a
    assert_same_weights(reference, aligned, atol=1e-3)
    assert non_decreasing(found.history)


def test_qk_bases_raise_the_objective_between_independent_models():
    config, sd_a = tiny_model("gpt2", seed=0)
    _, sd_b = tiny_model("gpt2", seed=1)
    spec = spec_for(config, sd_a)
    vo = match_weights(sd_b, sd_a, spec, vo=True, seed=3)
    both = match_weights(sd_b, sd_a, spec, vo=True, qk=True, seed=3)
    assert both.history[-1] > vo.history[-1]
    assert non_decreasing(both.history)


def test_restarts_keep_the_best_descent_and_the_residual_starts_from_its_anchors():
    from modelcypher.align.weight_matching import anchors

    config, sd_a = tiny_model("gpt2", seed=0)
    _, sd_b = tiny_model("gpt2", seed=1)
    spec = spec_for(config, sd_a)
    assert {p[0] for p in anchors(spec)} >= {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    runs = [match_weights(sd_b, sd_a, spec, vo=True, qk=True, seed=s, max_sweeps=3) for s in (5, 6, 7)]
    best = match_weights(sd_b, sd_a, spec, vo=True, qk=True, seed=5, restarts=3, max_sweeps=3)
    assert best.history == max(runs, key=lambda r: r.history[-1]).history
    with pytest.raises(UserError, match="restarts"):
        match_weights(sd_b, sd_a, spec, restarts=0)


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


# ----------------------------------------------------------------------------- the scale path


def test_chunked_inner_product_equals_the_float64_sum():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 53, generator=g), torch.randn(37, 53, generator=g)
    exact = float((x.double() * y.double()).sum())
    for chunk in (1, 100, 37 * 53, 10**6):
        assert inner(x, y, chunk) == pytest.approx(exact, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float32_similarity_equals_a_float64_reference(family):
    config, sd_a = tiny_model(family, seed=0)
    _, sd_b = tiny_model(family, seed=1)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, kinds=("perm", "heads", "residual"), seed=6)
    a, b = prepare(sd_a, spec, "orthogonal"), prepare(sd_b, spec, "orthogonal")
    matcher = Matcher(a, b, spec, hidden.transforms)
    i = next(k for k, g in enumerate(spec.groups) if g.kind == "perm")
    others = group_ops(spec, {n: t for n, t in hidden.transforms.items() if n != spec.groups[i].name})
    by_tensor = slots_by_tensor(spec)
    m = torch.zeros(spec.groups[i].size, spec.groups[i].size, dtype=torch.float64)
    for slot in spec.groups[i].slots:  # B's other axes transformed in float64, then one float64 GEMM
        wb = transform_tensor(b[slot.tensor].double(), by_tensor[slot.tensor], others)
        m += unit_rows(a[slot.tensor].double(), slot) @ unit_rows(wb, slot).T
    got = matcher.similarity(i)["unit"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), m, rtol=1e-5, atol=1e-5 * float(m.abs().max()))


def test_bfloat16_models_recover_planted_permutations_bit_for_bit():
    config, sd_a = tiny_model("llama")
    sd_a = {k: v.bfloat16() for k, v in sd_a.items()}
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, kinds=("perm", "heads", "residual"), residual="permutation", seed=7)
    sd_b, config_b = apply(sd_a, config, hidden)
    found = match_weights(sd_b, sd_a, spec, residual="permutation", seed=0)
    aligned, _ = apply(sd_b, config_b, found)
    assert_same_weights(sd_a, aligned)


def test_history_is_the_objective_recomputed_from_scratch():
    config, sd_a = tiny_model("llama", seed=0)
    _, sd_b = tiny_model("llama", seed=1)
    spec = spec_for(config, sd_a)
    found = match_weights(sd_b, sd_a, spec, vo=True, max_sweeps=3, seed=4)
    a, b = prepare(sd_a, spec, "orthogonal"), prepare(sd_b, spec, "orthogonal")
    fresh = Matcher(a, b, spec, found.transforms).objective()
    assert found.history[-1] == pytest.approx(fresh, rel=1e-6)


def test_row_blocks_give_the_whole_tensors_similarity_and_objective(monkeypatch):
    config, sd_a = tiny_model("llama", seed=0)
    _, sd_b = tiny_model("llama", seed=1)
    spec = spec_for(config, sd_a)
    hidden = random_alignment(spec, kinds=("perm", "heads", "residual"), seed=8)
    a, b = prepare(sd_a, spec, "orthogonal"), prepare(sd_b, spec, "orthogonal")
    i = next(k for k, g in enumerate(spec.groups) if g.kind == "residual")

    def measure():
        matcher = Matcher(a, b, spec, hidden.transforms)
        return matcher.similarity(i, skip_diag=True)["unit"], matcher.objective()

    whole = measure()
    monkeypatch.setattr(weight_matching, "CHUNK", 3 * config["hidden_size"])  # 3 rows of the head a block
    assert Matcher(a, b, spec, {}).blocks("lm_head.weight", a["lm_head.weight"])[1] == slice(3, 6)
    blocked = measure()
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-5, atol=1e-5)
    assert blocked[1] == pytest.approx(whole[1], rel=1e-6)
