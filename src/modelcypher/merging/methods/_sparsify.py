"""Pieces shared by the task-vector merge methods (registers nothing).

Conventions used throughout:

- every function returns new tensors and never writes into its arguments;
- a "row" is ``t.reshape(t.shape[0], -1)[r]`` for tensors with two or more dimensions, and the whole
  (flattened) tensor for 0-D and 1-D tensors;
- magnitude ranking is a total order: larger ``|x|`` first, equal magnitudes broken by the smaller
  flat index first, so every mask below is deterministic and the top-k sets are nested in k;
- a fraction ``f`` of ``n`` entries means ``floor(f * n + 0.5)`` entries (round half up), clipped
  to ``[0, n]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from modelcypher.errors import UserError

# ---------------------------------------------------------------------------------------------
# parameter plumbing


def per_model(value: Any, n: int, name: str) -> list[float]:
    """A per-model parameter as a list of ``n`` floats (a scalar is broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"parameter {name!r}: got {len(value)} values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n


def check_fraction(values: Sequence[float], name: str) -> None:
    for v in values:
        if not (0.0 <= v <= 1.0):
            raise UserError(f"parameter {name!r} must be in [0, 1], got {v}")


def f32(t: Tensor) -> Tensor:
    """``t`` as float32 (no copy when it already is; callers must not write into the result)."""
    return t.to(torch.float32)


def as_rows(t: Tensor) -> Tensor:
    """A 2-D ``[rows, cols]`` view (or copy) of ``t``; see the module docstring for "row"."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def check_shapes(xs: Sequence[Tensor]) -> None:
    """All models' tensors must have one shape (no silent broadcasting)."""
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise UserError(f"tensor shapes differ across models: {tuple(xs[0].shape)} vs {tuple(x.shape)}")


def task_vectors(xs: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
    """``tau_i = x_i - base`` in float32 (new tensors)."""
    if base is None:
        raise UserError("this merge method needs a base_model")
    b = f32(base)
    out = []
    for x in xs:
        if x.shape != base.shape:
            raise UserError(f"tensor shape {tuple(x.shape)} differs from the base's {tuple(base.shape)}")
        out.append(f32(x) - b)
    return out


# ---------------------------------------------------------------------------------------------
# deterministic magnitude masks


def count(fraction: float, n: int) -> int:
    """``floor(fraction * n + 0.5)`` clipped to ``[0, n]``."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))


def kth_largest(m: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry (1-based) of a flat non-negative float32 tensor, exactly.

    A radix select: for non-negative floats the int32 bit pattern orders like the value, so two
    histograms (high 16 bits, then the low 16 bits inside the chosen bucket) find it in a few O(n)
    passes, several times faster than ``kthvalue`` on large tensors, on CPU and CUDA alike.
    """
    bits = m.contiguous().view(torch.int32)
    hi = bits >> 16  # 0 .. 2**15 - 1: the sign bit is 0
    at_or_above = torch.bincount(hi, minlength=1 << 15).flip(0).cumsum(0)
    j = int(torch.searchsorted(at_or_above, k))  # first bucket (from the top) reaching k entries
    bucket = (1 << 15) - 1 - j
    k_in = k - (int(at_or_above[j - 1]) if j > 0 else 0)
    lo = bits[hi == bucket] & 0xFFFF
    at_or_above_lo = torch.bincount(lo, minlength=1 << 16).flip(0).cumsum(0)
    j_lo = int(torch.searchsorted(at_or_above_lo, k_in))
    value = (bucket << 16) | ((1 << 16) - 1 - j_lo)
    return torch.tensor([value], dtype=torch.int32).view(torch.float32)[0].to(m.device)


def topk_magnitude_mask(t: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``t``) of the ``k`` largest-magnitude entries of the whole tensor.

    Ties in magnitude are broken by flat index (smaller index kept first). O(n): the threshold by
    :func:`kth_largest`, then, only when several entries equal it, the first ``need`` of those.
    """
    n = t.numel()
    if k <= 0:
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    if k >= n:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    m = t.to(torch.float32).abs().reshape(-1)
    v = kth_largest(m, k)
    keep = m > v
    need = k - int(torch.count_nonzero(keep))
    at = m == v
    if int(torch.count_nonzero(at)) <= need:
        keep |= at
    else:
        keep[at.nonzero().reshape(-1)[:need]] = True
    return keep.reshape(t.shape)


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of ``delta`` by magnitude, zero the rest (TIES "trim")."""
    k = count(density, delta.numel())
    if k >= delta.numel():
        return delta.clone()
    return torch.where(topk_magnitude_mask(delta, k), delta, torch.zeros((), device=delta.device))


def band_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: entries whose magnitude rank lies in ``[gamma * n, (gamma + density) * n)``.

    Rank 0 is the largest magnitude, so the top ``gamma`` fraction (outliers) and everything below
    the next ``density`` fraction are masked out. ``gamma + density > 1`` simply keeps everything
    below the outliers.
    """
    n = delta.numel()
    lo = count(gamma, n)
    hi = count(gamma + density, n)
    return topk_magnitude_mask(delta, hi) & ~topk_magnitude_mask(delta, lo)


# ---------------------------------------------------------------------------------------------
# random drops


def drop_and_rescale(delta: Tensor, density: float, rng: torch.Generator) -> Tensor:
    """DARE: keep each entry independently with probability ``density``, rescale survivors by ``1/density``.

    ``E[result] = delta``. ``density >= 1`` returns an exact copy (no random numbers drawn);
    ``density <= 0`` returns zeros.
    """
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    u = torch.rand(delta.shape, generator=rng, device=delta.device, dtype=torch.float32)
    return torch.where(u < density, delta / density, torch.zeros((), device=delta.device))


def magprune_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities (shape of ``delta``, float32).

    Within each row the entries are ranked by magnitude (rank 0 = largest; ties by index) and get
    keep probabilities linearly spaced from ``density + e`` (largest) down to ``density - e``
    (smallest), where ``e = min(epsilon, density, 1 - density)``: the cap keeps every probability
    inside ``[0, 1]`` while the row's mean keep probability stays exactly ``density``. A row of one
    entry gets ``density``.
    """
    e = min(epsilon, density, 1.0 - density)
    rows = as_rows(delta)
    n_rows, n_cols = rows.shape
    if e <= 0.0 or n_cols == 1:
        return torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_cols, device=delta.device).expand(n_rows, n_cols))
    p = (density + e) - (2.0 * e / (n_cols - 1)) * rank.to(torch.float32)
    return p.reshape(delta.shape)


def magprune(delta: Tensor, density: float, epsilon: float, rng: torch.Generator) -> Tensor:
    """DELLA MagPrune: drop entry j with probability ``1 - p_j`` (``p`` from :func:`magprune_keep_prob`),
    rescale survivors by ``1 / p_j``. ``E[result] = delta``."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    p = magprune_keep_prob(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=rng, device=delta.device, dtype=torch.float32)
    return torch.where(u < p, delta / p.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros((), device=delta.device))


# ---------------------------------------------------------------------------------------------
# combining task vectors


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """``sum_i w_i d_i``, divided by ``sum_i w_i`` when ``normalize``."""
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        out.add_(d, alpha=w)
    if normalize:
        total = sum(weights)
        if total == 0.0:
            raise UserError("normalize: the models' weights sum to zero")
        out.div_(total)
    return out


def sign_consensus(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES "elect sign" + "disjoint merge" on (already sparsified) deltas.

    With contributions ``c_i = w_i * d_i``:

    - elected sign ``s = sign(sum_i c_i)`` (the "mass" election), per element;
    - model i agrees where ``c_i * s > 0`` (so zeros, i.e. trimmed/dropped entries, never agree,
      and nothing agrees where ``s = 0``);
    - merged ``= sum_{i agrees} c_i / sum_{i agrees} w_i`` when ``normalize``, else the numerator
      alone; elements where the denominator is 0 (no model agrees) are 0.

    For non-negative weights "c_i agrees" is the same as "d_i has the elected sign".
    """
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        total.add_(d, alpha=w)
    up, down = total > 0, total < 0
    del total
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(num) if normalize else None
    for d, w in zip(deltas, weights, strict=True):  # c_i recomputed per model: one at a time in memory
        c = d * w
        agree = torch.where(up, c > 0, down & (c < 0))
        num.add_(c.masked_fill_(~agree, 0.0))
        if normalize:
            den.add_(agree, alpha=w)
    if not normalize:
        return num
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def apply_delta(base: Tensor, merged_delta: Tensor, lambda_: float) -> Tensor:
    """``base + lambda_ * merged_delta`` as a new float32 tensor."""
    return f32(base) + merged_delta * lambda_
