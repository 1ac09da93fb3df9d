"""Random drops that keep the expectation: DARE's drop-and-rescale and DELLA's MagPrune."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import as_rows, count, f32

# DARE's coin flips come as 16-bit uniform integers, four from each 64-bit draw: torch's CPU generator
# makes one number per ~3 ns on one core, so a float32 draw per entry was most of a DARE merge. The
# keep probability is then ``density`` rounded to a multiple of 2**-16, and survivors are rescaled by
# the inverse of that probability, so ``E[result] = delta`` still holds exactly.
KEEP_LEVELS = 1 << 16


def keep_levels(density: float) -> int:
    """The keep probability ``density`` as a count of 2**-16 steps (round half up, clipped)."""
    return count(density, KEEP_LEVELS)


def coins(n: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """Uniform random bits for ``n`` 16-bit coins: ``ceil(n / 4)`` int64 draws."""
    return torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=rng)


def bernoulli_mask(shape: Sequence[int], levels: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """float32 ones with probability ``levels / 2**16``, zeros elsewhere, independently per entry."""
    n = math.prod(shape)
    u = coins(n, rng, device).view(torch.int16)[:n].to(torch.float32).reshape(shape)  # uniform on [-2**15, 2**15)
    # kept where u < levels - 2**15, i.e. where (levels - 2**15 - u) >= 1; elsewhere it is <= 0
    return u.neg_().add_(levels - 2**15).clamp_(0.0, 1.0)


def drop_and_rescale(delta: Tensor, density: float, rng: torch.Generator, weight: float = 1.0,
                     rescale: bool = True) -> Tensor:
    """DARE: keep each entry independently with probability ``p`` (``density`` to 2**-16), rescale
    survivors by ``1/p`` (times ``weight``, folded into the same multiplication).

    ``E[result] = weight * delta``. ``p = 1`` returns ``delta * weight`` (no random numbers drawn);
    ``p = 0`` returns zeros. A dropped entry is ``0 * delta``: NaN or Inf, which only
    ``--allow-nonfinite`` lets in, stay non-finite, as in task arithmetic. Without ``rescale`` the
    survivors keep their value (times ``weight``), as mergekit's ``rescale: false``.
    """
    return dropped_contribution(delta, None, density, rng, weight, rescale)


def dropped_contribution(x: Tensor, b: Tensor | None, density: float, rng: torch.Generator,
                         weight: float = 1.0, rescale: bool = True) -> Tensor:
    """:func:`drop_and_rescale` of ``x - b`` (float32 or bfloat16 blocks; of ``x`` itself when ``b`` is
    None), as float32."""
    levels = keep_levels(density)
    if levels <= 0:
        return torch.zeros_like(x, dtype=torch.float32)
    delta = f32(x) if b is None else f32(x) - f32(b)
    if levels >= KEEP_LEVELS:
        return delta.clone() if weight == 1.0 and b is None else delta * weight
    mask = bernoulli_mask(x.shape, levels, rng, x.device)
    return mask.mul_(delta).mul_(weight * KEEP_LEVELS / levels if rescale else weight)


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


def magprune(delta: Tensor, density: float, epsilon: float, rng: torch.Generator, rescale: bool = True) -> Tensor:
    """DELLA MagPrune: drop entry j with probability ``1 - p_j`` (``p`` from :func:`magprune_keep_prob`),
    rescale survivors by ``1 / p_j`` (``E[result] = delta``) or, without ``rescale``, keep them as they are."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    p = magprune_keep_prob(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=rng, device=delta.device, dtype=torch.float32)
    return torch.where(u < p, delta / p.clamp_min(torch.finfo(torch.float32).tiny) if rescale else delta,
                       torch.zeros((), device=delta.device))
