import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method

BASE = torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, -2.0]])
TAU1 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -2.0, 3.0]])
TAU2 = torch.tensor([[-1.0, 1.0, 2.0], [1.5, 1.0, -1.0]])
XS = [BASE + TAU1, BASE + TAU2]
# undropped task arithmetic with weights [1, 2], lambda 1: base + tau1 + 2 tau2
TA = torch.tensor([[0.0, 3.0, 3.5], [5.5, 0.0, -1.0]])


def test_registration():
    m = get_method("dare_linear")
    assert m.base == "required" and m.random
    assert m.model_params == {"weight": 1.0, "density": 1.0}
    assert m.global_params == {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}
    assert "2311.03099" in m.paper


def test_density_one_is_exact_task_arithmetic(merge, gen):
    out = merge("dare_linear", XS, BASE, rng=gen(0), weight=[1.0, 2.0])
    assert torch.allclose(out, TA)
    ta = merge("task_arithmetic", XS, BASE, weight=[1.0, 2.0])
    assert torch.equal(out, ta)


def test_same_seed_same_result_other_seed_differs(merge, gen):
    a = merge("dare_linear", XS, BASE, rng=gen(7), weight=[1.0, 2.0], density=[0.5, 0.5])
    b = merge("dare_linear", XS, BASE, rng=gen(7), weight=[1.0, 2.0], density=[0.5, 0.5])
    c = merge("dare_linear", XS, BASE, rng=gen(8), weight=[1.0, 2.0], density=[0.5, 0.5])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_survivors_are_rescaled(merge, gen):
    # one model, density 0.25: each entry of the delta is either 0 or tau / 0.25
    out = merge("dare_linear", [XS[0]], BASE, rng=gen(3), density=[0.25])
    d = out - BASE
    assert torch.all(torch.isclose(d, torch.zeros(())) | torch.isclose(d, 4.0 * TAU1))


def test_expectation_is_task_arithmetic(merge, gen):
    n = 2000
    acc = torch.zeros_like(BASE)
    for seed in range(n):
        acc += merge("dare_linear", XS, BASE, rng=gen(seed), weight=[1.0, 2.0], density=[0.5, 0.6])
    # Var of one draw = tau1^2 (1-.5)/.5 + 2^2 tau2^2 (1-.6)/.6; worst entry (tau1=3, tau2=-1):
    # sqrt(9 + 8/3) / sqrt(2000) ~ 0.076, so 0.35 is > 4.5 sigma everywhere.
    assert torch.allclose(acc / n, TA, atol=0.35)


def test_density_zero_is_base(merge, gen):
    assert torch.equal(merge("dare_linear", XS, BASE, rng=gen(0), density=[0.0, 0.0]), BASE)


def test_density_out_of_range(merge, gen):
    with pytest.raises(UserError):
        merge("dare_linear", XS, BASE, rng=gen(0), density=[1.5, 0.5])


def test_keep_probability_is_density_to_two_to_the_minus_16(gen):
    """Coins come from 16-bit integers: p = round(density * 2**16) / 2**16, survivors scaled by 1/p."""
    from modelcypher.merging.methods._drop import drop_and_rescale

    n, density = 1 << 20, 0.3
    p = round(density * 2**16) / 2**16  # 19661 / 65536
    out = drop_and_rescale(torch.ones(n), density, gen(5))
    kept = out != 0
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1.0 / p))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(kept.float().mean()) - p) < 5 * sigma
    # four coins per 64-bit draw, and no lane is stuck: every quarter of the entries keeps about p
    for lane in range(4):
        assert abs(float(kept[lane::4].float().mean()) - p) < 10 * sigma
