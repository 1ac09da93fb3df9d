import math

import pytest
import torch

from modelcypher.measure.interference import (
    diagnose,
    effective_rank,
    principal_angles,
    recommend,
    sign_conflict_rate,
    subspace_overlap,
    task_vector_cosine,
    topk_energy,
)


def _orth(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k]


def test_cosine():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=g)
    c = task_vector_cosine([a, a.clone(), -a, torch.zeros(4, 5)])
    assert c[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert c[0, 2] == pytest.approx(-1.0, abs=1e-6)
    assert c[0, 3] == 0.0 and c[3, 3] == 1.0
    e = torch.eye(3)
    assert task_vector_cosine([e[0], e[1]])[0, 1] == 0.0
    # a task vector given as a list of tensors is concatenated
    assert task_vector_cosine([[a, a], [a, -a]])[0, 1] == pytest.approx(0.0, abs=1e-6)


def test_sign_conflict():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, generator=g)
    assert sign_conflict_rate([a, -a]) == 1.0
    assert sign_conflict_rate([a, 2 * a]) == 0.0
    assert sign_conflict_rate([torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])]) == 1 / 3
    rnd = sign_conflict_rate([torch.randn(20000, generator=g) for _ in range(3)])
    assert rnd == pytest.approx(0.75, abs=0.02)  # chance level 1 - 2^(1-T)
    # trimming: only the largest entries vote
    x, y = torch.tensor([10.0, 0.1, 0.1, 0.1]), torch.tensor([0.1, -10.0, 0.1, 0.1])
    assert sign_conflict_rate([x, y], density=0.25) == 0.0
    assert sign_conflict_rate([x, y]) == 0.25


def test_effective_rank_and_energy():
    u, v = _orth(10, 3, 0), _orth(8, 3, 1)
    m = (u @ v.T).float()  # rank 3, equal singular values
    assert effective_rank(m) == pytest.approx(3.0, rel=1e-5)
    assert effective_rank(torch.zeros(4, 4)) == 0.0
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-6)
    skew = (u * torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)) @ v.T
    assert 1.0 < effective_rank(skew) < 2.0
    assert topk_energy(m, 3) == pytest.approx(1.0)
    assert topk_energy(m, 1) == pytest.approx(1 / 3, rel=1e-5)
    assert topk_energy(skew, 1) == pytest.approx(100 / 101.01, rel=1e-5)


def test_principal_angles_and_overlap():
    u = _orth(12, 6, 2)
    v = _orth(9, 6, 3)
    a = (u[:, :3] * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v[:, :3].T
    same = (u[:, :3] * torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)) @ v[:, :3].T  # same subspaces
    orth = u[:, 3:] @ v[:, 3:].T
    for side in ("left", "right"):
        assert principal_angles(a, same, 3, side).abs().max() < 1e-3
        torch.testing.assert_close(principal_angles(a, orth, 3, side), torch.full((3,), math.pi / 2))
        assert subspace_overlap(a, same, 3, side) == pytest.approx(1.0, abs=1e-6)
        assert subspace_overlap(a, orth, 3, side) == pytest.approx(0.0, abs=1e-6)
    # one shared direction out of two: angles (0, pi/2), overlap 1/2
    b = u[:, [0, 4]] @ v[:, [0, 4]].T
    c = u[:, :2] @ v[:, :2].T
    torch.testing.assert_close(principal_angles(c, b, 2), torch.tensor([0.0, math.pi / 2]), atol=1e-3, rtol=0)
    assert subspace_overlap(c, b, 2) == pytest.approx(0.5, abs=1e-6)


def test_diagnose_and_recommend():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(16, 16, generator=g)
    near = diagnose([a, a + 0.01 * torch.randn(16, 16, generator=g)])
    assert near["cosine"] > 0.99
    assert recommend(near)[0] == "linear"
    u, v = _orth(16, 4, 5).float(), _orth(16, 4, 6).float()
    disjoint = diagnose([u[:, :2] @ v[:, :2].T, u[:, 2:] @ v[:, 2:].T])
    assert disjoint["subspace_overlap"] < 1e-6
    name, reason = recommend(disjoint)
    assert name == "tsv" and "overlap" in reason
    shared = torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)
    overl = diagnose([shared + torch.randn(16, 16, generator=g) for _ in range(2)], k=2)
    assert overl["cosine"] < 0.8 and overl["subspace_overlap"] > 0.8
    assert recommend({**overl, "has_data": True})[0] == "regmean"
    moderate = {**overl, "subspace_overlap": 0.3, "has_data": True}
    assert recommend(moderate)[0] == "null_space"
    assert recommend({**overl, "topk_energy": 0.9})[0] == "tsv"
    assert recommend({**overl, "topk_energy": 0.3})[0] == "wudi"
    rnd = diagnose([torch.randn(32, 32, generator=g) for _ in range(2)])
    assert rnd["sign_conflict"] == pytest.approx(rnd["sign_conflict_chance"], abs=0.1)
    assert "near chance" in recommend(rnd)[1]
