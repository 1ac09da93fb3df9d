"""Pre-merge diagnosis: how much do the task vectors interfere? Pure functions on tensors.

Task vectors are ``τ_i = x_i − base`` (one tensor, or one flattened model). The figures:

- ``task_vector_cosine``: pairwise cosine similarity (flattened),
- ``sign_conflict_rate``: TIES-style share of coordinates on which the (optionally trimmed) task vectors
  disagree in sign,
- ``effective_rank``: Roy & Vetterli's entropy effective rank of a task matrix,
- ``topk_energy``: share of a task matrix's squared Frobenius norm in its top-k singular values,
- ``principal_angles`` / ``subspace_overlap``: how the top-k left (or right) singular subspaces of two
  task matrices align,
- ``recommend``: which merge method the figures favour, and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from modelcypher.errors import UserError

NEGLIGIBLE = 1e-6  # singular values below this share of the largest count as zero


def _flat(t: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.reshape(-1).double()
    return torch.cat([x.reshape(-1).double() for x in t])


def task_vector_cosine(taus: Sequence) -> torch.Tensor:
    """``[T, T]`` matrix of cosine similarities between task vectors (each flattened; a task vector may be
    a tensor or a list of tensors, concatenated). A zero vector has cosine 0 with everything but itself."""
    vs = [_flat(t) for t in taus]
    x = torch.stack(vs)
    n = x.norm(dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    c = (x @ x.T) / (safe[:, None] * safe[None, :])
    c.fill_diagonal_(1.0)
    return c.float()


def _trim(v: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` share of entries by magnitude (TIES' trim step), zero the rest."""
    if density >= 1.0:
        return v
    k = int(round(density * v.numel()))
    if k <= 0:
        return torch.zeros_like(v)
    thresh = v.abs().kthvalue(v.numel() - k + 1).values
    return torch.where(v.abs() >= thresh, v, torch.zeros_like(v))


def sign_conflict_rate(taus: Sequence, density: float = 1.0) -> float:
    """Share of coordinates with a sign conflict, in the TIES sense.

    Each task vector is first trimmed to its top ``density`` share of entries by magnitude (1.0: no
    trimming). A coordinate conflicts when at least one task is positive and another negative there.
    The rate is over the coordinates where at least one (trimmed) task is non-zero. Identical vectors
    give 0, a vector and its negation 1; independent random vectors give ``1 − 2^(1−T)`` (0.5 for T = 2).
    """
    if not 0.0 < density <= 1.0:
        raise UserError(f"sign_conflict_rate: density must be in (0, 1], got {density}")
    x = torch.stack([_trim(_flat(t), density) for t in taus])
    pos = (x > 0).any(0)
    neg = (x < 0).any(0)
    live = pos | neg
    n = int(live.sum())
    return float((pos & neg).sum()) / n if n else 0.0


def _singular_values(m: torch.Tensor) -> torch.Tensor:
    if m.dim() != 2:
        raise UserError(f"expected a 2-D task matrix, got shape {tuple(m.shape)}")
    return torch.linalg.svdvals(m.double())


def effective_rank(m: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` (Shannon entropy, nats).

    Lies in ``[1, min(m, n)]``; a rank-r matrix with r equal singular values has effective rank r.
    A zero matrix returns 0.
    """
    s = _singular_values(m)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def topk_energy(m: torch.Tensor, k: int) -> float:
    """``Σ_{i<k} σ_i² / Σ_i σ_i²``: the share of ``‖m‖_F²`` its best rank-k approximation keeps."""
    s2 = _singular_values(m).pow(2)
    total = float(s2.sum())
    return float(s2[: max(0, k)].sum()) / total if total > 0 else 0.0


def _top_basis(m: torch.Tensor, k: int, side: str) -> torch.Tensor:
    if side not in ("left", "right"):
        raise UserError(f"side must be 'left' or 'right', got {side!r}")
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    # a singular subspace is only defined where the singular values are not (numerically) zero
    k = min(k, int((s > NEGLIGIBLE * s[0]).sum())) if s.numel() and s[0] > 0 else 0
    return u[:, :k] if side == "left" else vh[:k].T


def principal_angles(a: torch.Tensor, b: torch.Tensor, k: int, side: str = "left") -> torch.Tensor:
    """Principal angles (radians, ascending) between the top-k ``side`` singular subspaces of ``a`` and ``b``.

    ``side="left"``: column (output) spaces; ``"right"``: row (input) spaces for ``[out, in]`` weights.
    ``k`` is capped at each matrix's numerical rank (singular values below 1e-6 of the largest do not
    span anything), so fewer than k angles come back for matrices of lower rank. Computed as ``arccos``
    of the singular values of ``Q_aᵀ Q_b`` (Björck & Golub). 0 for identical
    subspaces, π/2 for orthogonal ones.
    """
    qa, qb = _top_basis(a, k, side), _top_basis(b, k, side)
    c = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(c).sort().values.float()


def subspace_overlap(a: torch.Tensor, b: torch.Tensor, k: int, side: str = "left") -> float:
    """Mean squared cosine of the principal angles, ``‖Q_aᵀ Q_b‖_F² / k``: 1 identical, 0 orthogonal.

    ``k`` is capped at the smaller numerical rank of the two, as in ``principal_angles``. For two random
    k-dimensional subspaces of R^d the expectation is ``k / d``.
    """
    qa, qb = _top_basis(a, k, side), _top_basis(b, k, side)
    kk = min(qa.shape[1], qb.shape[1])
    return float((qa.T @ qb).pow(2).sum()) / kk if kk else 0.0


def diagnose(taus: Sequence[torch.Tensor], k: int | None = None, density: float = 1.0) -> dict[str, float]:
    """The figures ``recommend`` reads, for the task matrices of one 2-D weight (T ≥ 2 tasks).

    ``k`` defaults to TSV's per-task budget ``max(1, min(m, n) // T)``. Returns mean off-diagonal
    cosine, sign-conflict rate and its chance level ``1 − 2^(1−T)``, mean effective rank divided by
    ``min(m, n)``, mean top-k energy, and mean pairwise left/right subspace overlap with its chance
    level ``k / dim``.
    """
    t = len(taus)
    if t < 2:
        raise UserError("diagnose needs at least two task vectors")
    m, n = taus[0].shape
    kk = max(1, min(m, n) // t) if k is None else k
    cos = task_vector_cosine(taus)
    off = float((cos.sum() - cos.diagonal().sum()) / (t * (t - 1)))
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    left = sum(subspace_overlap(taus[i], taus[j], kk, "left") for i, j in pairs) / len(pairs)
    right = sum(subspace_overlap(taus[i], taus[j], kk, "right") for i, j in pairs) / len(pairs)
    return {
        "n_tasks": float(t),
        "cosine": off,
        "sign_conflict": sign_conflict_rate(taus, density),
        "sign_conflict_chance": 1.0 - 2.0 ** (1 - t),
        "effective_rank_ratio": sum(effective_rank(x) for x in taus) / (t * min(m, n)),
        "topk_energy": sum(topk_energy(x, kk) for x in taus) / t,
        "subspace_overlap": 0.5 * (left + right),
        "subspace_overlap_chance": 0.5 * (min(kk, m) / m + min(kk, n) / n),
    }


# Thresholds of ``recommend``; see its docstring for the reasoning.
NEAR_PARALLEL_COSINE = 0.8
RANDOM_LIKE_OVERLAP = 0.05  # overlap excess over chance at or below this: no systematic sharing
HIGH_OVERLAP = 0.3  # overlap excess over chance at or above this: tasks share directions
LOW_RANK_ENERGY = 0.6
NEAR_CHANCE_CONFLICT = 0.9  # sign-conflict rate at >= 90 % of chance level: signs carry no agreement


def overlap_excess(overlap: float, chance: float) -> float:
    """``(overlap − chance) / (1 − chance)``: 0 for subspaces as aligned as random ones, 1 for identical."""
    return (overlap - chance) / (1.0 - chance) if chance < 1.0 else 0.0


def recommend(metrics: Mapping[str, float]) -> tuple[str, str]:
    """Which merge method the diagnosis favours, and why (a heuristic, not a guarantee).

    ``metrics`` is ``diagnose``'s dict (averaged over layers if wanted), optionally with ``has_data``
    (truthy when probe data is available for the data-driven methods). Subspace overlap is judged by its
    excess over chance, ``e = (overlap − chance) / (1 − chance)``, because the raw figure grows with k/dim
    (two random k-dim subspaces of R^d overlap k/d on average). Rules, first match wins:

    1. mean cosine ≥ 0.8 → ``linear``: the task vectors nearly coincide, so averaging loses little and
       any interference treatment only adds noise.
    2. e ≤ 0.05 → ``tsv``: the tasks' dominant singular subspaces are no more aligned than random ones,
       so what overlap there is is accidental; TSV's orthogonalisation (the smallest rotation making them
       orthogonal) removes it while keeping each task's top components, summed rather than averaged.
    3. with data and e ≥ 0.3 → ``regmean``: tasks systematically share directions; only the activations
       can say how to trade them off, and RegMean solves that least-squares problem exactly.
    4. with data (moderate sharing) → ``null_space``: the shared part is small, so projecting each delta
       off the others' activations removes interference at little cost (check the kept fractions).
    5. top-k energy ≥ 0.6 (k = TSV's 1/T budget) → ``tsv``: task matrices are effectively low-rank, so
       truncation keeps most of each task and the orthogonalisation removes the overlap.
    6. otherwise → ``wudi``: full-rank, overlapping, data-free: the setting WUDI's objective targets
       (interference measured on the tasks' own input subspaces, solved per layer).

    The sign-conflict rate is reported in the reason; at ≥ 90 % of its chance level ``1 − 2^(1−T)`` the
    signs carry no shared structure, which argues against sign-election methods (TIES) and for the
    subspace methods above.
    """
    cos = float(metrics.get("cosine", 0.0))
    overlap = float(metrics.get("subspace_overlap", math.nan))
    chance = float(metrics.get("subspace_overlap_chance", 0.0))
    excess = overlap_excess(overlap, chance)
    energy = float(metrics.get("topk_energy", 0.0))
    conflict = float(metrics.get("sign_conflict", math.nan))
    conflict_chance = float(metrics.get("sign_conflict_chance", math.nan))
    has_data = bool(metrics.get("has_data", False))
    note = ""
    if not math.isnan(conflict) and not math.isnan(conflict_chance) and conflict_chance > 0:
        ratio = conflict / conflict_chance
        level = ("above chance: the tasks pull weights in opposite directions" if ratio > 1.0 / NEAR_CHANCE_CONFLICT
                 else "near chance" if ratio >= NEAR_CHANCE_CONFLICT else "below chance")
        note = f"; sign conflicts {conflict:.2f} ({level}, chance {conflict_chance:.2f})"
    ov = f"subspace overlap {overlap:.2f} (chance {chance:.2f}, excess {excess:.2f})"
    if cos >= NEAR_PARALLEL_COSINE:
        return "linear", f"task vectors nearly parallel (mean cosine {cos:.2f} >= {NEAR_PARALLEL_COSINE}){note}"
    if not math.isnan(overlap) and excess <= RANDOM_LIKE_OVERLAP:
        return "tsv", (f"{ov}: no systematic sharing of singular directions, TSV orthogonalises the "
                       f"accidental overlap and keeps each task's top components{note}")
    if has_data and not math.isnan(overlap) and excess >= HIGH_OVERLAP:
        return "regmean", (f"{ov}: tasks share directions and data is available, RegMean resolves them "
                           f"from the activations{note}")
    if has_data:
        return "null_space", (f"{ov}: moderate sharing and data available, null-space filtering removes "
                              f"cross-task interference at little cost{note}")
    if energy >= LOW_RANK_ENERGY:
        return "tsv", (f"task matrices are low-rank (top-k energy {energy:.2f} >= {LOW_RANK_ENERGY}), "
                       f"truncation keeps most of each task; {ov}{note}")
    return "wudi", (f"{ov}, top-k energy {energy:.2f}, no data: WUDI minimises interference on the "
                    f"tasks' own input subspaces{note}")
