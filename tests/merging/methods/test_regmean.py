import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method


def _gram(x):
    return x.T @ x / x.shape[0]


def test_registered():
    m = get_method("regmean")
    assert m.stats == ("gram",) and m.global_params["alpha"] == 0.9


def test_identical_grams_give_the_average():
    fn = get_method("regmean").fn
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 8, generator=g) for _ in range(3)]
    gram = _gram(torch.randn(40, 8, generator=g))
    out = fn(xs, None, gram=[gram] * 3)
    torch.testing.assert_close(out, torch.stack(xs).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_disjoint_input_subspaces_reproduce_each_models_outputs(layout):
    fn = get_method("regmean").fn
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    # model 1 sees inputs in span(q[:, :4]), model 2 in span(q[:, 4:8]); q[:, 8:] is never seen
    x1 = torch.randn(30, 4, generator=g) @ q[:, :4].T
    x2 = torch.randn(30, 4, generator=g) @ q[:, 4:8].T
    w1, w2 = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)  # [out, in]
    if layout == "linear":
        out = fn([w1, w2], None, gram=[_gram(x1), _gram(x2)], alpha=1.0)
        y = lambda w, x: x @ w.T  # noqa: E731
    else:  # Conv1D: weight [in, out]; square-ambiguous shapes need the explicit layout
        out = fn([w1.T, w2.T], None, gram=[_gram(x1), _gram(x2)], alpha=1.0, layout="conv1d")
        y = lambda w, x: x @ w  # noqa: E731
        w1, w2 = w1.T, w2.T
    torch.testing.assert_close(y(out, x1), y(w1, x1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y(out, x2), y(w2, x2), atol=1e-4, rtol=1e-4)


def test_unseen_input_directions_get_the_average():
    fn = get_method("regmean").fn
    g = torch.Generator().manual_seed(4)
    x1 = torch.zeros(20, 6)
    x1[:, :2] = torch.randn(20, 2, generator=g)
    x2 = torch.zeros(20, 6)
    x2[:, 2:4] = torch.randn(20, 2, generator=g)  # inputs 4, 5 are never excited (exact zeros)
    w1, w2 = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    out = fn([w1, w2], None, gram=[_gram(x1), _gram(x2)])
    torch.testing.assert_close(out[:, 4:], 0.5 * (w1[:, 4:] + w2[:, 4:]), atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_diagonal_weighting():
    fn = get_method("regmean").fn
    w1, w2 = torch.zeros(2, 2), torch.ones(2, 2)
    g1, g2 = torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.5], [0.5, 3.0]])
    out = fn([w1, w2], None, gram=[g1, g2], alpha=0.0, ridge=0.0)
    # column j (input feature j) weighted by diag(G_i)[j]: [1/4, 3/4]
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.75], [0.25, 0.75]]))


def test_auto_layout_and_fallbacks():
    fn = get_method("regmean").fn
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 7, generator=g) for _ in range(2)]  # [in=4, out=7]: conv1d inferred
    gram = _gram(torch.randn(20, 4, generator=g))
    torch.testing.assert_close(fn(xs, None, gram=[gram, gram]), torch.stack(xs).mean(0), atol=1e-5, rtol=1e-5)
    # non-matrix or no Gram: average
    torch.testing.assert_close(fn([torch.zeros(3), torch.ones(3)], None, gram=None), torch.full((3,), 0.5))
    with pytest.raises(UserError):
        fn(xs, None, gram=[torch.eye(5), torch.eye(5)])


def test_lambda_scales_the_merge_from_the_base():
    # identical Grams: the average, base + mean(tau); lambda T gives task arithmetic's sum of the tau_i
    fn = get_method("regmean").fn
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 8, generator=g)
    taus = [torch.randn(5, 8, generator=g) for _ in range(3)]
    gram = _gram(torch.randn(40, 8, generator=g))
    out = fn([base + t for t in taus], base, gram=[gram] * 3, lambda_=3.0)
    torch.testing.assert_close(out, base + sum(taus), atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="regmean: lambda 3 .*base_model"):
        fn([base + t for t in taus], None, gram=[gram] * 3, lambda_=3.0)
