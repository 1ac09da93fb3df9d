import torch

from modelcypher.merging.registry import get_method


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def test_flattens_the_spectrum_of_the_sum():
    # Sum of the task vectors U diag(s) Vᵀ with known factors: Iso-C gives mean(s) U Vᵀ
    g = torch.Generator().manual_seed(0)
    u, v = _orthonormal(12, 8, g), _orthonormal(8, 8, g)
    s = torch.tensor([9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    total = (u * s) @ v.T
    base = torch.randn(12, 8, generator=g)
    tau1 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    xs = [base + tau1.float(), base + (total - tau1).float()]
    out = get_method("iso_c").fn(xs, base, lambda_=0.5)
    want = base.double() + 0.5 * s.mean() * (u @ v.T)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals((out - base).double())
    torch.testing.assert_close(sv, torch.full((8,), 0.5 * float(s.mean()), dtype=torch.float64), atol=1e-5, rtol=0)


def test_orthogonal_tasks_of_equal_norm_give_their_sum():
    # rank-1 tasks on orthogonal directions with one norm: the sum's spectrum is already flat
    g = torch.Generator().manual_seed(1)
    u, v = _orthonormal(10, 3, g), _orthonormal(7, 3, g)
    base = torch.randn(10, 7, generator=g)
    taus = [(2.0 * torch.outer(u[:, i], v[:, i])).float() for i in range(3)]
    out = get_method("iso_c").fn([base + t for t in taus], base)
    torch.testing.assert_close(out, base + sum(taus), atol=1e-5, rtol=0)


def test_vectors_are_averaged_and_zero_tasks_keep_the_base():
    fn = get_method("iso_c").fn
    base = torch.tensor([1.0, 2.0])
    out = fn([base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 4.0])], base, lambda_=2.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 6.0]))
    w = torch.randn(4, 5)
    assert torch.equal(fn([w.clone(), w.clone()], w), w)
