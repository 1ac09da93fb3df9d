import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods.null_space import null_space_filter, null_space_project
from modelcypher.merging.registry import get_method


def _gram(x):
    return x.T @ x / x.shape[0]


def test_registered():
    m = get_method("null_space")
    assert m.stats == ("gram",) and m.base == "required"
    assert m.global_params["rank_threshold"] == 1e-4 and m.global_params["lambda"] == 1.0


def test_projection_annihilates_other_tasks_inputs():
    g = torch.Generator().manual_seed(0)
    x_other = torch.randn(50, 5, generator=g) @ torch.randn(5, 12, generator=g)  # rank-5 inputs in R^12
    tau = torch.randn(7, 12, generator=g)
    proj, kept = null_space_project(tau, [_gram(x_other)])
    assert (proj @ x_other.T).abs().max() < 1e-4 * (tau @ x_other.T).abs().max()
    # orthogonal projection: the kept energy fraction is exact and about (12 - 5) / 12 for random tau
    assert kept == pytest.approx(float(proj.pow(2).sum() / tau.pow(2).sum()), rel=1e-6)
    assert 0.3 < kept < 0.9
    # a delta living in the null space already is untouched
    same, k2 = null_space_project(proj, [_gram(x_other)])
    torch.testing.assert_close(same, proj, atol=1e-5, rtol=1e-5)
    assert k2 == pytest.approx(1.0, abs=1e-6)


def test_merge_keeps_outputs_on_the_other_tasks_inputs():
    fn = get_method("null_space").fn
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    x1 = torch.randn(40, 4, generator=g) @ q[:, :4].T
    x2 = torch.randn(40, 4, generator=g) @ q[:, 2:6].T  # shares a 2-D subspace with x1
    base = torch.randn(6, 12, generator=g)
    taus = [torch.randn(6, 12, generator=g) for _ in range(2)]
    xs = [base + t for t in taus]
    grams = [_gram(x1), _gram(x2)]
    out = fn(xs, base, gram=grams)
    filtered, kept = null_space_filter(xs, base, grams)
    # task 2's filtered delta leaves task 1's outputs alone, and vice versa
    assert (filtered[1] @ x1.T).abs().max() < 1e-4
    assert (filtered[0] @ x2.T).abs().max() < 1e-4
    torch.testing.assert_close(out, base + filtered[0] + filtered[1])
    assert all(0 < k < 1 for k in kept)
    # conv1d layout gives the transposed result
    conv = fn([x.T for x in xs], base.T, gram=grams, layout="conv1d")
    torch.testing.assert_close(conv, out.T, atol=1e-5, rtol=1e-5)


def test_reference_base_and_fallbacks():
    fn = get_method("null_space").fn
    g = torch.Generator().manual_seed(2)
    xb = torch.randn(30, 3, generator=g) @ torch.randn(3, 8, generator=g)
    base = torch.zeros(4, 8)
    xs = [torch.randn(4, 8, generator=g) for _ in range(2)]
    out = fn(xs, base, reference="base", base_gram=_gram(xb))
    assert (out @ xb.T).abs().max() < 1e-4
    with pytest.raises(UserError):
        fn(xs, base, gram=[torch.eye(8)] * 2, reference="base")
    # non-matrix tensors: task-arithmetic mean
    torch.testing.assert_close(fn([torch.ones(3), 3 * torch.ones(3)], torch.zeros(3)), 2 * torch.ones(3))
