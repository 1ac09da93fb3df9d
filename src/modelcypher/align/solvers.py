"""Exact solvers for one symmetry group with everything else fixed.

Every solver takes a similarity matrix ``m`` (rows: units of model A, columns: units of model B, e.g.
``m = sum X_A X_B^T`` over the weights a group touches) and returns the transform ``T`` of B's units
maximizing ``<T, m>``: new unit ``i`` of B is ``sum_j T[i, j]`` old unit ``j``.
Permutations come back as index vectors: new unit ``i`` is old unit ``perm[i]``.
"""

from __future__ import annotations

import torch

from modelcypher.align.rope import rope_block, rope_pairs


def solve_lap(m: torch.Tensor) -> torch.Tensor:
    """The permutation maximizing ``sum_i m[i, perm[i]]`` (exact linear assignment, Jonker-Volgenant)."""
    from scipy.optimize import linear_sum_assignment  # on first use: scipy.optimize takes half a second to import

    # Negated here rather than by ``maximize=True``, which would copy the (f x f, float64) matrix again.
    cost = m.detach().cpu().to(torch.float64, copy=True).neg_()
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def procrustes(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``T`` maximizing ``<T, m>``: ``U V^T`` from ``m = U S V^T``."""
    u, _, vh = torch.linalg.svd(m.double())
    return u @ vh


def rope_pair_terms(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_ii + m_jj, m_ji - m_ij)`` for every rotary pair ``(i, j = i + hd/2)`` of each ``[hd, hd]``
    block of ``m``: ``<T, m>`` for a rotation by ``phi`` of each pair is ``sum cos(phi) c + sin(phi) s``."""
    m = m.double()
    i, j = rope_pairs(m.shape[-1])
    return m[..., i, i] + m[..., j, j], m[..., j, i] - m[..., i, j]


def rope_procrustes(m: torch.Tensor) -> torch.Tensor:
    """For each ``[hd, hd]`` block of ``m``, the rotation of every rotary pair maximizing ``<T, m>``:
    ``phi = atan2(s, c)`` from :func:`rope_pair_terms`. The only orthogonal Q-K bases that commute with
    RoPE."""
    phi = torch.atan2(*reversed(rope_pair_terms(m)))
    return rope_block(torch.cos(phi), torch.sin(phi))


def ones_complement_basis(d: int) -> torch.Tensor:
    """An orthonormal basis (``d x (d-1)``) of the subspace orthogonal to the all-ones vector.

    Columns 2..d of the Householder reflection that swaps ``e_1`` and ``1/sqrt(d)``.
    """
    e = torch.full((d,), d**-0.5, dtype=torch.float64)
    v = e.clone()
    v[0] -= 1.0
    h = torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)
    return h[:, 1:]


def procrustes_fixing_ones(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``T`` with ``T 1 = 1`` maximizing ``<T, m>`` (residuals of pre-norm LayerNorm models).

    ``T = 11^T/d + B R B^T`` with ``B`` a basis of the complement of ``1``; only ``R`` is free, and
    ``<T, m> = const + <R, B^T m B>`` is an ordinary Procrustes problem in ``d - 1`` dimensions.
    """
    d = m.shape[0]
    b = ones_complement_basis(d)
    r = procrustes(b.T @ m.double() @ b)
    return torch.full((d, d), 1.0 / d, dtype=torch.float64) + b @ r @ b.T


def solve_heads(cost_q: torch.Tensor, cost_kv: torch.Tensor, group_size: int) -> torch.Tensor:
    """The query-head permutation maximizing ``sum_h cost_q[h, perm[h]] + sum_g cost_kv[g, kvperm[g]]``
    among those that keep grouped-query structure (a KV group moves with all its query heads).

    Exact: for every pair of KV groups the best assignment of their query heads is a small LAP; the
    outer LAP over KV groups then uses those optimal values.
    """
    n_kv = cost_kv.shape[0]
    if group_size == 1:
        return solve_lap(cost_q.double() + cost_kv.double())
    inner = {}
    total = torch.empty(n_kv, n_kv, dtype=torch.float64)
    for g in range(n_kv):
        for h in range(n_kv):
            block = cost_q[g * group_size : (g + 1) * group_size, h * group_size : (h + 1) * group_size].double()
            inner[g, h] = solve_lap(block)
            total[g, h] = cost_kv[g, h] + block[torch.arange(group_size), inner[g, h]].sum()
    outer = solve_lap(total)
    return torch.cat([outer[g] * group_size + inner[g, int(outer[g])] for g in range(n_kv)])
