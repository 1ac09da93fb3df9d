"""The maps between two models' spaces: a moved update is neither inflated nor shrunk by a poor fit."""

from __future__ import annotations

import pytest
import torch

from modelcypher.transfer.move import MIN_COS, block_pairs, fit_update, projection_gain, updated
from modelcypher.transfer.spaces import fit_map


def pair(noise: float, d_a: int = 12, d_b: int = 12, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d_a, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d_a, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(max(d_a, d_b), max(d_a, d_b), generator=g, dtype=torch.float64))[0][:d_a, :d_b]
    return a, 3.0 * a @ q + noise * torch.randn(n, d_b, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method", ["orthogonal", "ridge"])
def test_an_exact_copy_maps_back_by_the_inverse(method):
    a, b = pair(0.0)
    m = fit_map(a, b, method)
    tol = 1e-9 if method == "orthogonal" else 1e-2  # ridge shrinks both ways by its small penalty
    torch.testing.assert_close(m.backward(), torch.linalg.pinv(m.forward()), atol=tol, rtol=tol)
    torch.testing.assert_close(b @ m.backward(), a, atol=tol * 10, rtol=tol)


def test_a_partly_correlated_space_keeps_its_norm_both_ways():
    a, b = pair(4.0)  # rho about 0.6: a least-squares scale would shrink by rho, its inverse grow by 1/rho
    m = fit_map(a, b)
    torch.testing.assert_close(m.backward(), torch.linalg.pinv(m.forward()))  # a similarity: exact inverses
    torch.testing.assert_close((a @ m.forward()).norm(), b.norm())
    torch.testing.assert_close((b @ m.backward()).norm(), a.norm())
    ls = float(torch.trace(m.t.T @ a.T @ b) / a.square().sum())
    assert ls < 0.8 * m.scale  # what the least-squares scale would have been


def test_a_ridge_map_goes_back_by_its_own_fit_not_the_inverse():
    a, b = pair(4.0)
    m = fit_map(a, b, "ridge")
    assert (a - b @ m.backward()).norm() < 0.9 * (a - b @ torch.linalg.pinv(m.forward())).norm()


def test_blocks_pair_in_order_on_distinct_blocks_of_a_deeper_model():
    # A's blocks 1 and 2 both resemble B's block 1 most; B is deeper, so they take distinct blocks in order
    sim = torch.tensor([[0.9, 0.2, 0.1, 0.0, 0.0],
                        [0.1, 0.8, 0.6, 0.1, 0.0],
                        [0.0, 0.7, 0.5, 0.4, 0.1],
                        [0.0, 0.1, 0.2, 0.3, 0.9]], dtype=torch.float64)
    assert block_pairs(sim) == {0: 0, 1: 1, 2: 2, 3: 4}  # 3.1; 1 -> 2, 2 -> 3 gives 2.8
    # a shallower B: several of A's blocks share one of B's
    assert block_pairs(sim.T[:, :2]) == {0: 0, 1: 1, 2: 1, 3: 1, 4: 1}


def test_the_projection_gain_restores_the_share_of_the_effect_along_the_target():
    """``p = rho t + n`` with ``n`` orthogonal to ``t``: the gain is ``1 / rho``, and ``g p`` projected on ``t``
    is ``t``; an exact copy gets 1, an update working against ``t`` 0, a nearly orthogonal one the cap."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 6, generator=g, dtype=torch.float64)
    n = torch.randn(200, 6, generator=g, dtype=torch.float64)
    n -= (n * t).sum() / t.square().sum() * t  # orthogonal to t
    p = 0.5 * t + n
    gain = projection_gain(p, t)
    assert gain == pytest.approx(2.0)
    assert ((gain * p) * t).sum() / t.norm() == pytest.approx(float(t.norm()))
    assert projection_gain(t, t) == pytest.approx(1.0)
    assert projection_gain(-p, t) == 0.0
    q = 0.01 * t + n  # nearly orthogonal: boosted no further than the cap allows
    cos = float((q * t).sum() / (q.norm() * t.norm()))
    assert cos < MIN_COS and projection_gain(q, t) == pytest.approx(float(t.norm() / q.norm()) / MIN_COS)


@pytest.mark.parametrize("conv1d", [False, True])
def test_a_model_runs_with_a_low_rank_update_and_is_left_untouched(conv1d):
    """Inside ``updated`` the module computes as with ``W + left @ right`` (``[out, in]``; a Conv1D-style
    module stores ``[in, out]`` and computes ``x W``); its weight is never changed, and afterwards it
    computes as before, bit for bit."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(lin)
    if conv1d:  # GPT-2's Conv1D: weight [in, out], output x W + b
        w = lin.weight.detach().T.clone()

        class Conv1D(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight, self.bias = torch.nn.Parameter(w), lin.bias

            def forward(self, x):
                return x @ self.weight + self.bias

        model = torch.nn.Sequential(Conv1D())
    mod = model[0]
    before = mod.weight.detach().clone()
    left, right = torch.randn(3, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    x = torch.randn(5, 4)
    plain = model(x)
    dense = (left @ right).float()
    want = x @ ((before + dense.T) if conv1d else (before + dense).T) + lin.bias
    with updated(model, {"0": (left, right)}):
        got = model(x)
        assert torch.equal(mod.weight, before)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert torch.equal(model(x), plain) and torch.equal(mod.weight, before)


def test_a_fitted_update_recovers_a_low_rank_update_from_its_effect():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    true = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    left, right = fit_update(x, x @ true.T, 3)
    assert left.shape == (16, 3) and right.shape == (3, 24)
    assert (left @ right - true).norm() / true.norm() < 1e-5  # the ridge that keeps the solve safe is 1e-8


def test_a_fitted_update_is_the_best_of_its_rank_on_the_inputs_not_a_truncation_of_the_full_fit():
    """Reduced-rank regression: its residual on ``x`` is no larger than the full least-squares solution
    truncated to the rank by its own SVD (the two differ when ``x`` is anisotropic), or than random updates
    of that rank near it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 12, dtype=torch.float64)
    t = torch.randn(400, 10, generator=g, dtype=torch.float64)
    left, right = fit_update(x, t, 2)
    best = (t - x @ (left @ right).T).square().sum()
    w = torch.linalg.lstsq(x, t).solution.T  # [out, in]
    u, s, vh = torch.linalg.svd(w)
    truncated = (t - x @ (u[:, :2] * s[:2] @ vh[:2]).T).square().sum()
    assert best < truncated * (1 - 1e-3)
    for _ in range(20):
        near = left @ right + 0.01 * torch.randn(10, 2, generator=g, dtype=torch.float64) @ right
        assert (t - x @ near.T).square().sum() >= best
