"""The best rank-r approximation of an update matrix, as LoRA factors.

By Eckart-Young, truncating the SVD ``delta = U diag(s) V^T`` to its r largest singular values gives
the closest rank-r matrix in Frobenius norm; its error is ``sum_{i>r} s_i^2``. The factors split the
singular values evenly, ``B = U_r diag(sqrt s_r)`` and ``A = diag(sqrt s_r) V_r^T``, so that
``B @ A = U_r diag(s_r) V_r^T`` and neither factor carries the whole scale.
"""

from __future__ import annotations

import torch


def low_rank_factors(delta: torch.Tensor, rank: int, sv_epsilon: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, kept) with ``B @ A`` the best approximation of ``delta`` (m x n) of rank at most ``rank``,
    smaller where singular values fall to ``sv_epsilon`` times the largest or below (at least 1).
    A is (r, n), B is (m, r), in float32; ``kept`` is the share of the update's energy
    ``||B A||_F^2 / ||delta||_F^2`` (1.0 for a zero update)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    if sv_epsilon > 0 and s.numel() and s[0] > 0:
        r = max(1, min(r, int((s > sv_epsilon * s[0]).sum())))
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    total = float((s * s).sum())
    kept = float((s[:r] * s[:r]).sum()) / total if total > 0 else 1.0
    return a.contiguous(), b.contiguous(), kept
