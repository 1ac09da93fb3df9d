"""Universe matching: N models onto one shared universe, cycle-consistent by construction."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import logits, permuted_copy, save_dir, state, zoo_gpt2
from tiny_models import VOCAB, tiny_model

from cli_util import run_cli, write_config
from modelcypher.align import apply_verified
from modelcypher.align.learned_matching import refine_universe
from modelcypher.align.pipeline import align_checkpoint, align_universe
from modelcypher.align.transform import apply, compose, fold_norms, invert, random_alignment
from modelcypher.align.universe import aligned_mean, match_universe
from modelcypher.api import merge
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError
from modelcypher.hf import causal_lm
from modelcypher.measure.barrier import lm_loss_fn


def same(x: dict, y: dict, atol: float = 0.0) -> None:
    assert x.keys() == y.keys()
    for k in x:
        if atol == 0.0:
            assert torch.equal(x[k], y[k]), k
        else:
            torch.testing.assert_close(x[k].double(), y[k].double(), atol=atol, rtol=0, msg=k)


def planted(family: str, residual: str, tie: bool = True, n: int = 3):
    """One model and ``n`` copies of it under hidden symmetries (the first too)."""
    config, sd = tiny_model(family, tie=tie)
    spec = spec_for(config, sd)
    hidden = [random_alignment(spec, kinds=("perm", "heads", "residual"), residual=residual, seed=10 + k)
              for k in range(n)]
    copies = [apply(sd, config, h)[0] for h in hidden]
    return config, sd, spec, hidden, copies


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_planted_permutations_are_recovered_exactly_and_pairwise_maps_are_the_planted_ones(family):
    config, sd, spec, hidden, copies = planted(family, "permutation")
    found = match_universe(copies, spec, residual="permutation")
    aligned = [apply(c, config, a)[0] for c, a in zip(copies, found.alignments, strict=True)]
    for x in aligned[1:]:
        same(aligned[0], x)  # one universe: every copy lands on the same numbers, moved and never changed
    assert found.movement[-1] <= 1e-6  # the mean of equal float32 numbers, up to rounding
    # B -> universe -> C is C's hidden map after undoing B's, exactly, for every pair
    for j in range(3):
        for k in range(3):
            pair = compose(spec, found.alignments[j], invert(spec, found.alignments[k]))
            truth = compose(spec, invert(spec, hidden[j]), hidden[k])
            for g in spec.groups:
                if g.name in truth.transforms:
                    assert torch.equal(pair.transforms[g.name], truth.transforms[g.name]), (j, k, g.name)
            same(apply(copies[j], config, pair)[0], copies[k])


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_planted_rotations_land_every_copy_on_one_universe(family):
    config, sd, spec, hidden, copies = planted(family, "orthogonal")
    found = match_universe(copies, spec)
    aligned = [apply(c, config, a)[0] for c, a in zip(copies, found.alignments, strict=True)]
    for x in aligned[1:]:
        same(aligned[0], x, atol=1e-5)
    assert found.residual == "orthogonal" and found.movement[-1] <= 1e-4
    # the universe is the original model, up to one shared symmetry: folded, the copies' mean computes it
    mean = aligned_mean([fold_norms(c, config)[0] for c in copies], spec, found.alignments)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    want = causal_lm(config, sd)[0](ids).logits
    got = causal_lm(fold_norms(copies[0], config)[1], mean)[0](ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compose_and_invert_follow_the_group_laws_with_every_kind_of_transform():
    config, sd = tiny_model("llama", tie=False)
    spec = spec_for(config, sd)
    s = random_alignment(spec, vo="invertible", qk="invertible", seed=1)
    t = random_alignment(spec, vo="invertible", qk="invertible", seed=2)
    twice, cfg = apply(*apply(sd, config, s), t)
    once, _ = apply(sd, config, compose(spec, s, t))
    same(twice, once, atol=1e-5)  # float32 weights, rounded after each apply
    back, _ = apply(*apply(sd, config, s), invert(spec, s))
    same(back, fold_norms(sd, config)[0], atol=1e-5)


def test_independent_models_converge_and_their_maps_close_every_cycle():
    config, _ = tiny_model("gpt2", tie=True)
    spec = spec_for(config, tiny_model("gpt2", tie=True)[1])
    models = [tiny_model("gpt2", tie=True, seed=s)[1] for s in range(3)]
    found = match_universe(models, spec, max_rounds=30, tol=1e-6)
    m = found.movement
    assert m[-1] <= 1e-6 < m[0]  # the universe stops moving: the measure the rounds stop on
    t = found.alignments
    pair = lambda j, k: compose(spec, t[j], invert(spec, t[k]))  # noqa: E731
    cycle = compose(spec, compose(spec, pair(0, 1), pair(1, 2)), pair(2, 0))
    same(apply(models[0], config, cycle)[0], fold_norms(models[0], config)[0], atol=1e-5)


def test_learned_refinement_moves_every_model_exactly_and_lowers_the_mixture_loss():
    config, _ = tiny_model("gpt2", tie=True)
    models = [tiny_model("gpt2", tie=True, seed=s)[1] for s in range(3)]
    spec = spec_for(config, models[0])
    start = match_universe(models, spec, vo=True, qk=True, max_rounds=3)
    ids = torch.randint(0, VOCAB, (1600,), generator=torch.Generator().manual_seed(0))
    found, losses = refine_universe(models, config, start.alignments, list(ids.view(-1, 25).split(8)), steps=40,
                                    lr=1e-2, alpha=1.0)
    assert len(found) == 3 and len(losses) == 40
    for before, after, sd in zip(start.alignments, found, models, strict=True):
        q = after.transforms["residual"]
        torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0], dtype=q.dtype), atol=1e-9, rtol=0)
        assert not torch.allclose(q, before.transforms["residual"].double())
        for g in spec.groups:
            if g.kind in ("perm", "heads"):
                assert torch.equal(after.transforms[g.name], before.transforms[g.name])
        apply_verified(sd, config, after)  # still computes its model's function
    folded = [fold_norms(sd, config)[0] for sd in models]
    cfg = fold_norms(models[0], config)[1]
    loss = lm_loss_fn(causal_lm(cfg, folded[0])[0], ids, torch.device("cpu"))
    mean_before = loss(causal_lm(cfg, aligned_mean(folded, spec, start.alignments))[1])
    mean_after = loss(causal_lm(cfg, aligned_mean(folded, spec, found))[1])
    assert mean_after < mean_before


def test_cli_writes_every_model_aligned_onto_the_universe(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b", seed=3)
    c = permuted_copy(a, tmp_path / "c", seed=4)
    r = run_cli("align", a, b, c, "--universe", "--residual", "permutation", "-o", tmp_path / "u")
    assert r.returncode == 0, r.stderr
    assert "onto their universe" in r.stdout
    outs = [tmp_path / "u" / f"{i:02d}-{m.name}" for i, m in enumerate((a, b, c))]
    for src, out in zip((a, b, c), outs, strict=True):
        torch.testing.assert_close(logits(out), logits(src), atol=1e-4, rtol=1e-4)
    same(state(outs[0]), state(outs[1]))
    same(state(outs[0]), state(outs[2]))


def test_learned_universe_on_sampled_text(tmp_path):
    paths = [zoo_gpt2(tmp_path / f"m{s}", seed=s) for s in range(3)]
    report = align_universe(paths, tmp_path / "u", method="learned", steps=3, probe_tokens=256, rounds=2)
    assert report["probes"] == "text sampled from the 3 models" and len(report["mixture_loss"]) == 2
    assert report["rounds"] <= 2 and len(report["outputs"]) == 3
    for src, out in zip(paths, report["outputs"], strict=True):
        torch.testing.assert_close(logits(out), logits(src), atol=1e-4, rtol=1e-4)


def test_merge_config_aligns_all_models_onto_their_universe(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal", seed=3)
    c = permuted_copy(a, tmp_path / "c", residual="orthogonal", seed=4)
    cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b, c)],
           "dtype": "float32", "align": {"method": "weight", "universe": True}}
    merge(write_config(tmp_path / "m.yaml", cfg), tmp_path / "merged", device="cpu")
    # three copies of one model: on their universe they coincide, so their average computes that model
    torch.testing.assert_close(logits(tmp_path / "merged"), logits(a), atol=1e-3, rtol=1e-3)
    assert not (tmp_path / "merged" / ".aligned").exists()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    config, sd = tiny_model("llama")
    llama = save_dir(tmp_path / "llama", config, sd)
    for args, says in (((a, "--universe"), "at least two models"),
                       ((a, llama, "--universe"), "differ in family"),
                       ((a, a, "--universe", "--to", a), "drop --to"),
                       ((a, llama), "--universe"),
                       ((a, a, "--universe", "--method", "activation"), "weight or learned")):
        r = run_cli("align", *args, "-o", tmp_path / "out")
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("modelcypher: error:") and says in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="align_universe"):
        align_checkpoint(a, a, tmp_path / "out", universe=True)


def test_learned_refinement_from_a_given_weight_universe_is_the_refinement_match_to_universe_does(tmp_path):
    from modelcypher.align.pipeline import match_to_universe, spec_of
    from modelcypher.checkpoint import Checkpoint
    from modelcypher.options import AlignOptions

    cks = [Checkpoint(zoo_gpt2(tmp_path / f"m{s}", seed=s)) for s in range(3)]
    spec, dev = spec_of(cks[0]), torch.device("cpu")
    learned = AlignOptions(method="learned", steps=2, probe_tokens=256, rounds=2)
    whole, facts = match_to_universe(cks, spec, learned, dev)
    weight = learned.model_copy(update={"method": "weight", "vo": True, "qk": True, "residual": "orthogonal"})
    start = match_to_universe(cks, spec, weight, dev)
    refined, more = match_to_universe(cks, spec, learned, dev, start=start)
    assert more["mixture_loss"] == facts["mixture_loss"] and more["movement"] == facts["movement"]
    for x, y in zip(whole, refined, strict=True):
        same(x.transforms, y.transforms)
    with pytest.raises(UserError, match="learned matching only"):
        match_to_universe(cks, spec, weight, dev, start=start)
