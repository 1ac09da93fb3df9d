import torch

from modelcypher.merging.methods.wudi import wudi_objective, wudi_optimize
from modelcypher.merging.registry import get_method


def test_registered():
    m = get_method("wudi")
    assert m.base == "required"
    assert m.global_params == {"lambda": 1.0, "steps": 300, "lr": 1e-5, "layout": "linear"}


def test_objective_decreases():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(12, 16, generator=g) * 0.1 for _ in range(3)]
    start = wudi_objective(torch.stack(taus).sum(0), taus)
    out = wudi_optimize(taus, steps=200, lr=1e-2)
    assert wudi_objective(out, taus) < 0.5 * start


def test_gradient_matches_autograd():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    tm = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sum(((tm - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)
    loss.backward()
    a = sum(t.T @ t / t.pow(2).sum() for t in taus)
    b = sum(t @ t.T @ t / t.pow(2).sum() for t in taus)
    torch.testing.assert_close(tm.grad, 2 * (tm.detach() @ a - b))


def test_orthogonal_tasks_optimum_is_the_sum():
    fn = get_method("wudi").fn
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    # row spaces (input sides) mutually orthogonal: tau_i tau_j^T = 0
    taus = [torch.randn(6, 4, generator=g) @ q[4 * i : 4 * i + 4] for i in range(3)]
    base = torch.randn(6, 12, generator=g)
    xs = [base + t for t in taus]
    # the sum is a global minimum (the objective is >= 0 and vanishes there)
    assert wudi_objective(sum(taus), taus) < 1e-9
    # Adam started there does not leave it beyond its step bound (steps * lr; the gradient is round-off)
    steps, lr = 50, 1e-5
    out = fn(xs, base, steps=steps, lr=lr)
    assert (out - (base + sum(taus))).abs().max() <= 1.01 * steps * lr
    assert wudi_objective(out - base, taus) < 1e-4 * wudi_objective(taus[0], taus)


def test_conv1d_layout_is_the_transpose():
    fn = get_method("wudi").fn
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 9, generator=g)
    xs = [base + 0.1 * torch.randn(6, 9, generator=g) for _ in range(2)]
    lin = fn([x.T for x in xs], base.T, steps=20, lr=1e-3)
    conv = fn(xs, base, steps=20, lr=1e-3, layout="conv1d")
    torch.testing.assert_close(conv, lin.T)


def test_non_matrix_tensors_get_the_mean():
    fn = get_method("wudi").fn
    base = torch.ones(4)
    out = fn([base + 1, base + 3], base, lambda_=0.5)
    torch.testing.assert_close(out, base + 1.0)
