import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method

BASE = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
TAU1 = torch.tensor([[1.0, 3.0], [0.0, 2.0]])  # row variances 1, 1
TAU2 = torch.tensor([[0.0, 4.0], [2.0, 2.5]])  # row variances 4, 1/16
XS = [BASE + TAU1, BASE + TAU2]


def test_registration():
    m = get_method("dfs")
    assert m.base == "optional"
    assert m.model_params == {"weight": 1.0}
    assert m.global_params == {"eps": 1e-6}
    assert "Inverse-variance" in m.paper and "2403.13187" in m.paper


def test_with_base_hand_computed(merge):
    # row 0: importances 1/1, 1/4 -> ([1,3] + [0,4]/4) / 1.25 = [0.8, 3.2]
    # row 1: importances 1/1, 16  -> ([0,2] + 16 [2,2.5]) / 17 = [32/17, 42/17]
    out = merge("dfs", XS, BASE)
    assert torch.allclose(out, torch.tensor([[0.8, 3.2], [1.0 + 32.0 / 17.0, 1.0 + 42.0 / 17.0]]), atol=1e-5)


def test_lower_variance_model_gets_more_weight(merge):
    out = merge("dfs", XS, BASE)
    # row 1: model 2 (variance 1/16) dominates, so the result sits much closer to x2 than to x1
    assert float((out[1] - XS[1][1]).norm()) < 0.1 * float((out[1] - XS[0][1]).norm())
    # row 0: model 1 (variance 1) beats model 2 (variance 4)
    assert float((out[0] - XS[0][0]).norm()) < float((out[0] - XS[1][0]).norm())


def test_weights_scale_importance(merge):
    # row 0 with weights [1, 4]: importances 1 and 4 * 1/4 = 1 -> plain mean of the deltas
    out = merge("dfs", XS, BASE, weight=[1.0, 4.0])
    assert torch.allclose(out[0], torch.tensor([0.5, 3.5]), atol=1e-5)


def test_without_base_hand_computed(merge):
    xs = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.5])]
    # consensus [2, 13/6]; deviations' first-minus-second gaps -11/6, 13/6, -1/3, so variances
    # (gap/2)^2 = 121/144, 169/144, 4/144 -> importances proportional to 1/121, 1/169, 1/4
    s = 1 / 121 + 1 / 169 + 1 / 4
    expected = torch.tensor([(1 / 121 + 3 / 169 + 2 / 4) / s, (3 / 121 + 1 / 169 + 2.5 / 4) / s])
    assert torch.allclose(merge("dfs", xs), expected, atol=1e-5)


def test_two_models_without_base_is_mean_and_one_model_is_identity(merge):
    a, b = torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[4.0, -1.0, 0.0]])
    assert torch.allclose(merge("dfs", [a, b]), (a + b) / 2)
    assert torch.equal(merge("dfs", [a]), a)


def test_unchanged_row_dominates_and_stays_finite(merge):
    # model 1 equals the base: its variance 0 is floored at eps * mean variance -> ~all the weight
    base = torch.tensor([1.0, 2.0, 3.0])
    out = merge("dfs", [base.clone(), base + torch.tensor([1.0, -1.0, 0.5])], base)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, base, atol=1e-5)


def test_scale_invariant(merge):
    # zero base so float32 rounding of base + delta does not blur the tiny deltas
    zero = torch.zeros(2, 2)
    big = merge("dfs", [TAU1, TAU2], zero)
    small = merge("dfs", [1e-4 * TAU1, 1e-4 * TAU2], zero)
    assert torch.allclose(small * 1e4, big, atol=1e-5)


def test_eps_must_be_positive(merge):
    with pytest.raises(UserError):
        merge("dfs", XS, BASE, eps=0.0)
