import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method


def test_registered():
    m = get_method("fisher")
    assert m.stats == ("fisher",) and m.model_params == {"weight": 1.0}


def test_equal_fishers_give_the_average():
    fn = get_method("fisher").fn
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g) for _ in range(3)]
    f = torch.rand(3, 4, generator=g)
    out = fn(xs, None, fisher=[f, f, f])
    torch.testing.assert_close(out, torch.stack(xs).mean(0))
    # weighted average with per-model weights
    out = fn(xs, None, fisher=[f, f, f], weight=[1.0, 0.0, 3.0])
    torch.testing.assert_close(out, (xs[0] + 3 * xs[2]) / 4)


def test_large_fisher_dominates_elementwise():
    fn = get_method("fisher").fn
    a, b = torch.zeros(2, 2), torch.ones(2, 2)
    fa = torch.tensor([[1e6, 1.0], [1.0, 1.0]])
    fb = torch.tensor([[1.0, 1e6], [1.0, 1.0]])
    out = fn([a, b], None, fisher=[fa, fb])
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0], [0.5, 0.5]]), atol=1e-5, rtol=0)


def test_zero_fishers_fall_back_to_average_and_missing_fisher():
    fn = get_method("fisher").fn
    xs = [torch.zeros(3), torch.full((3,), 2.0)]
    torch.testing.assert_close(fn(xs, None, fisher=[torch.zeros(3), torch.zeros(3)]), torch.ones(3))
    torch.testing.assert_close(fn(xs, None, fisher=[None, None]), torch.ones(3))


def test_normalize_removes_global_scale():
    fn = get_method("fisher").fn
    xs = [torch.zeros(2), torch.ones(2)]
    f = torch.tensor([1.0, 3.0])
    out = fn(xs, None, fisher=[f, 1000 * f], normalize=True)
    torch.testing.assert_close(out, torch.full((2,), 0.5))


def test_lambda_scales_the_merge_from_the_base():
    # equal Fishers: the average of x_i = base + tau_i, i.e. base + mean(tau); lambda 2 doubles mean(tau)
    fn = get_method("fisher").fn
    base = torch.tensor([1.0, -1.0])
    xs = [base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 4.0])]
    f = torch.ones(2)
    torch.testing.assert_close(fn(xs, base, fisher=[f, f], lambda_=2.0), torch.tensor([3.0, 3.0]))
    assert torch.equal(fn(xs, base, fisher=[f, f]), fn(xs, None, fisher=[f, f]))  # lambda 1: base unused
    with pytest.raises(UserError, match="lambda 2 .*base_model"):
        fn(xs, None, fisher=[f, f], lambda_=2.0)
