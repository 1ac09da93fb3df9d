import torch

from modelcypher.merging.methods.tsv import tsv_merge_matrix
from modelcypher.merging.registry import get_method


def _orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :k].float()


def test_registered():
    m = get_method("tsv")
    assert m.base == "required" and m.global_params["lambda"] == 1.0


def test_orthogonal_rank1_tasks_reproduce_their_sum():
    fn = get_method("tsv").fn
    u, v = _orthonormal(8, 3, 0), _orthonormal(6, 3, 1)
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)) * 0.1
    deltas = [s * torch.outer(u[:, i], v[:, i]) for i, s in enumerate((3.0, 2.0, 0.5))]
    xs = [base + d for d in deltas]
    # default fraction 1/T keeps 2 components each; zero-energy components are dropped
    out = fn(xs, base)
    torch.testing.assert_close(out, base + sum(deltas), atol=1e-5, rtol=1e-5)
    # explicit fraction giving one component each, and lambda scaling
    out = fn(xs, base, fraction=1 / 6, lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * sum(deltas), atol=1e-5, rtol=1e-5)


def test_truncates_to_top_components_and_orthogonalises():
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(10, 10, generator=g) for _ in range(2)]
    merged = tsv_merge_matrix(deltas)  # 5 components each, 10 total -> full rank
    assert torch.linalg.matrix_rank(merged) == 10
    # one task: the result is its best rank-k approximation
    d = deltas[0]
    u, s, vh = torch.linalg.svd(d.double())
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(tsv_merge_matrix([d], fraction=0.3), best3.float(), atol=1e-4, rtol=1e-4)


def test_non_matrix_tensors_are_averaged_and_inputs_untouched():
    fn = get_method("tsv").fn
    base = torch.zeros(5)
    xs = [torch.ones(5), 3 * torch.ones(5)]
    before = [x.clone() for x in xs]
    torch.testing.assert_close(fn(xs, base, lambda_=2.0), 4 * torch.ones(5))
    assert all(torch.equal(a, b) for a, b in zip(xs, before, strict=True))
