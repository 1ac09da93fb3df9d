"""A config written for mergekit means what mergekit does: each sparsifying method and ``model_stock`` against
a hand-computed case and against mergekit 0.1.5's own tensor code (its ``merge_group`` on hand-made
tensors). Magnitudes are distinct in every random case: mergekit breaks equal magnitudes by an unstable sort,
which is no defect of either."""

import math

import pytest
import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get as mergekit_method

from modelcypher.merging.registry import get_method


def _mergekit(name, xs, base, **params):
    """mergekit's result for ``name`` on float32 tensors: its per-model parameters keyed by input id."""
    group = TensorGroup.from_tensors([base, *xs], base_index=0)
    spec = {p.name: p for p in mergekit_method(name).spec.parameters}
    given = {}
    for key, p in spec.items():
        value = params.get(key, p.default)
        if p.scope.name == "NON_BASE":
            value = {i + 1: (value[i] if isinstance(value, list) else value) for i in range(len(xs))}
        given[key] = value
    return mergekit_method(name).merge_group(group, **given)


def _distinct(g, shape, scale=1.0):
    """A tensor whose magnitudes are all distinct (a random permutation of spaced values, random signs)."""
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).to(torch.float32) + 1.0) * scale / n
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1
    return (mags * signs).reshape(shape)


def _case(seed, shape=(7, 9), models=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + _distinct(g, shape) for _ in range(models)], base


# ---- TIES: int(density n) entries, at least one


def test_ties_keeps_int_density_n(merge):
    # n = 10, density 0.29: int(2.9) = 2 entries kept (the two largest), where rounding would keep 3
    tau = torch.tensor([1.0, -9.0, 5.0, 3.0, -10.0, 2.0, 8.0, -4.0, 6.0, 7.0])
    out = merge("ties", [tau], torch.zeros(10), density=[0.29])
    assert torch.equal(out, torch.tensor([0.0, -9.0, 0, 0, -10.0, 0, 0, 0, 0, 0]))
    # a positive density keeps at least one entry
    out = merge("ties", [tau], torch.zeros(10), density=[0.01])
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 0, -10.0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.29, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_equals_mergekit(merge, density, normalize):
    xs, base = _case(1)
    params = {"weight": [1.0, 0.5, 2.0], "density": [density, density / 2, density], "normalize": normalize,
              "lambda": 0.75}
    ours = merge("ties", xs, base, weight=params["weight"], density=params["density"], normalize=normalize,
                 lambda_=0.75)
    torch.testing.assert_close(ours, _mergekit("ties", xs, base, **params), rtol=1e-6, atol=1e-6)


# ---- Breadcrumbs: density 1 prunes nothing; the outlier cut gives way to keep int(density n)


def test_breadcrumbs_default_density_prunes_nothing(merge):
    tau = torch.arange(1, 101, dtype=torch.float32)
    assert torch.equal(merge("breadcrumbs", [tau], torch.zeros(100)), tau)


def test_breadcrumbs_outlier_cut_gives_way_to_density(merge):
    # n = 10, density 0.95 -> keep int(9.5) = 9; gamma 0.1 would drop the top 1 and the bottom 0: the
    # band is ranks [1, 10): the largest (-10) goes. With density 0.96 and gamma 0.2: keep 9, drop top
    # min(2, 10 - 9) = 1: the same band.
    tau = torch.tensor([1.0, -9.0, 5.0, 3.0, -10.0, 2.0, 8.0, -4.0, 6.0, 7.0])
    want = tau.clone()
    want[4] = 0.0
    assert torch.equal(merge("breadcrumbs", [tau], torch.zeros(10), density=[0.95], gamma=[0.1]), want)
    assert torch.equal(merge("breadcrumbs", [tau], torch.zeros(10), density=[0.96], gamma=[0.2]), want)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(1.0, 0.01), (0.9, 0.01), (0.5, 0.1), (0.95, 0.1), (0.3, 0.0)])
def test_breadcrumbs_equals_mergekit(merge, method, density, gamma):
    xs, base = _case(2)
    ours = merge(method, xs, base, density=[density] * 3, gamma=[gamma] * 3, weight=[1.0, 0.5, 2.0])
    theirs = _mergekit(method, xs, base, density=density, gamma=gamma, weight=[1.0, 0.5, 2.0])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ---- DARE family: dare_ties' normalize, rescale, int8_mask


def test_dare_ties_default_normalize_is_false():
    assert get_method("dare_ties").global_params["normalize"] is False


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_at_density_one_equals_mergekit(merge, gen, method):
    # density 1 draws no coins in either tool: the whole comparison is deterministic
    xs, base = _case(3)
    ours = merge(method, xs, base, rng=gen(0), weight=[1.0, 0.5, 2.0])
    torch.testing.assert_close(ours, _mergekit(method, xs, base, weight=[1.0, 0.5, 2.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_rescale_false_keeps_survivors_unscaled(merge, gen, method):
    # one model, weight 1: every entry of the result is tau or 0 without rescale, tau / p with it
    tau = torch.arange(1.0, 401.0).reshape(20, 20)
    extra = {"epsilon": [0.1]} if method.startswith("della") else {}
    plain = merge(method, [tau], torch.zeros_like(tau), rng=gen(4), density=[0.5], rescale=False, **extra)
    assert torch.all((plain == 0) | (plain == tau)) and 0 < int((plain == tau).sum()) < tau.numel()
    scaled = merge(method, [tau], torch.zeros_like(tau), rng=gen(4), density=[0.5], rescale=True, **extra)
    assert torch.equal(scaled != 0, plain != 0)  # the same coins
    if method.startswith("dare"):
        assert torch.equal(scaled, 2.0 * plain)
    else:
        assert torch.all(scaled.abs() >= plain.abs())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
                                    "breadcrumbs_ties", "task_arithmetic"])
def test_int8_mask_is_accepted_and_changes_nothing(merge, gen, method):
    # mergekit stores its sign mask in int8 to save memory; the mask's values, and so the result, are the same
    xs, base = _case(5, models=2)
    rng = {"rng": gen(6)} if get_method(method).random else {}
    plain = merge(method, xs, base, **rng)
    rng = {"rng": gen(6)} if get_method(method).random else {}
    assert torch.equal(merge(method, xs, base, int8_mask=True, **rng), plain)


# ---- Model Stock: a negative mean cosine extrapolates; filter_wise; weight accepted and unused


def test_model_stock_negative_cosine_extrapolates(merge):
    # tau1 = [1, 0], tau2 = [-1, 0.5]: cos = -1 / sqrt(1.25); t = 2 cos / (1 + cos) < 0, and
    # result = t * mean + (1 - t) * base with mean = [0, 0.25]
    base = torch.zeros(2)
    c = -1.0 / math.sqrt(1.25)
    t = 2 * c / (1 + c)
    out = merge("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5])], base)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.25 * t]))


def test_model_stock_weight_is_accepted_and_unused(merge):
    xs, base = _case(7, shape=(5, 4))
    assert torch.equal(merge("model_stock", xs, base, weight=[3.0, 1.0, 0.5]), merge("model_stock", xs, base))


@pytest.mark.parametrize("shape", [(11,), (6, 5), (3, 4, 5)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("models", [2, 3])
def test_model_stock_equals_mergekit(merge, shape, filter_wise, models):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) for _ in range(models)]
    xs[0] = base - (xs[1] - base) + 0.3 * torch.randn(shape, generator=g)  # a negative cosine somewhere
    ours = merge("model_stock", xs, base, filter_wise=filter_wise)
    theirs = _mergekit("model_stock", xs, base, filter_wise=filter_wise)
    # near 1 + (k - 1) cos = 0, t magnifies float32 rounding of the cosine (summed in another order)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
