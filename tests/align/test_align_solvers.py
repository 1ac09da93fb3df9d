"""The exact solvers: optimal against brute force, and the constraints they promise."""

from __future__ import annotations

import itertools

import pytest
import torch

from modelcypher.align.solvers import procrustes, procrustes_fixing_ones, solve_heads, solve_lap
from modelcypher.align.transform import random_orthogonal


def test_solve_lap_is_optimal():
    m = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    perm = solve_lap(m)
    best = max(itertools.permutations(range(6)), key=lambda p: float(m[range(6), list(p)].sum()))
    assert perm.tolist() == list(best)


def test_solve_lap_recovers_a_shuffle():
    x = torch.randn(10, 5)
    p = torch.randperm(10)
    assert torch.equal(solve_lap(x @ x[p].T), torch.argsort(p))


def test_procrustes_recovers_a_rotation():
    g = torch.Generator().manual_seed(1)
    q = random_orthogonal(8, g)
    x = torch.randn(8, 30, generator=g, dtype=torch.float64)
    t = procrustes(x @ (q @ x).T)  # B's units are q @ A's; T maps them back
    torch.testing.assert_close(t, q.T)


def test_procrustes_fixing_ones_keeps_ones_and_beats_random_feasible_points():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    t = procrustes_fixing_ones(m)
    torch.testing.assert_close(t @ t.T, torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(t @ torch.ones(7, dtype=torch.float64), torch.ones(7, dtype=torch.float64))
    best = float((t * m).sum())
    for _ in range(50):
        r = procrustes_fixing_ones(torch.randn(7, 7, generator=g, dtype=torch.float64))
        assert float((r * m).sum()) <= best + 1e-9


@pytest.mark.parametrize("n_kv, group_size", [(2, 2), (3, 2), (2, 3), (4, 1)])
def test_solve_heads_is_optimal_among_group_preserving_permutations(n_kv, group_size):
    g = torch.Generator().manual_seed(n_kv * 10 + group_size)
    n = n_kv * group_size
    cq, ckv = torch.randn(n, n, generator=g), torch.randn(n_kv, n_kv, generator=g)

    def value(p):
        kv = [p[k * group_size] // group_size for k in range(n_kv)]
        return float(cq[range(n), list(p)].sum() + ckv[range(n_kv), kv].sum())

    feasible = [
        p for p in itertools.permutations(range(n))
        if all(len({p[k * group_size + r] // group_size for r in range(group_size)}) == 1 for k in range(n_kv))
    ]
    perm = solve_heads(cq, ckv, group_size).tolist()
    assert perm in [list(p) for p in feasible]
    assert value(perm) == pytest.approx(max(value(p) for p in feasible))


def test_rope_procrustes_finds_the_best_rotation_per_rotary_pair():
    from modelcypher.align.solvers import rope_procrustes
    from modelcypher.align.transform import rope_block, rope_commuting

    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    t = rope_procrustes(m)
    assert rope_commuting(t)
    assert torch.allclose(t.transpose(1, 2) @ t, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-12)
    best = (t * m).sum((1, 2))
    for _ in range(200):  # no other rotation of the pairs does better
        phi = torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 * torch.pi
        other = rope_block(torch.cos(phi), torch.sin(phi))
        assert bool(((other * m).sum((1, 2)) <= best + 1e-12).all())
