"""TIES's sign election and disjoint merge, and the merges that fuse a sparsifier into it block by block."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods import _kernels
from modelcypher.merging.methods._drop import KEEP_LEVELS, coins, dropped_contribution, keep_levels
from modelcypher.merging.methods._inputs import f32
from modelcypher.merging.methods._task import apply_delta, weighted_sum
from modelcypher.merging.methods._trim import Cut, trimmed_contribution


def combine(how: str, deltas: Sequence[Tensor], base: Tensor, weights: Sequence[float], normalize: bool,
            lambda_: float) -> Tensor:
    """``base + lambda_ * merged`` of sparsified task vectors: ``how`` names the merge, ``"sum"`` (task
    arithmetic, :func:`weighted_sum`) or ``"elect"`` (TIES, :func:`sign_consensus`). A sparsifier's
    ``_linear`` and ``_ties`` variants are the same method but for this name."""
    return apply_delta(base, COMBINE[how](deltas, weights, normalize), lambda_)


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
    return disjoint_merge_([d * w for d, w in zip(deltas, weights, strict=True)], weights, normalize)


def disjoint_merge_(contributions: list[Tensor], weights: Sequence[float], normalize: bool,
                    lambda_: float = 1.0, base: Tensor | None = None) -> Tensor:
    """:func:`sign_consensus` from the contributions ``c_i = w_i d_i``, which it may overwrite (callers
    hand over temporaries: no copies); with a ``base``, ``base + lambda_ * merged`` instead (float32).
    Elementwise, so blocks of rows give the whole tensor's result. On the CPU a fused loop computes
    the same bits (:mod:`._kernels`).

    In float arithmetic only (comparisons and boolean masks cost several times more on CPU): model i
    agrees where ``a_i = relu(sign(c_i) * s)`` is 1, and adds ``c_i * a_i`` (``c_i`` or a zero) to the
    numerator and ``w_i * a_i`` to the denominator, in model order, so the sums are those of the
    boolean-mask formula to the bit. Where the elected sign is NaN (a NaN contribution, or opposite
    infinities) nobody agrees: ``a_i`` is NaN there, and both sums are set back to 0.
    """
    if _kernels.usable(*contributions, *([] if base is None else [base])):
        return _kernels.consensus(contributions, weights, normalize, lambda_, base)
    merged = _disjoint_merge_(contributions, weights, normalize)
    return merged if base is None else merged.mul_(lambda_).add_(f32(base))


def _disjoint_merge_(contributions: list[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    total = contributions[0].clone()
    for c in contributions[1:]:
        total.add_(c)
    s = total.sign_()
    num = torch.zeros_like(s)
    den = torch.zeros_like(s) if normalize else None
    for c, w in zip(contributions, weights, strict=True):
        agree = torch.sign(c).mul_(s).relu_()
        num.addcmul_(c, agree)
        if normalize:
            den.add_(agree, alpha=w)
    # a finite elected sign leaves no NaN behind (an infinite contribution agrees with it, or it is NaN)
    num.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if not normalize:
        return num
    den.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if min(weights) >= 0:
        # den is 0 only where nobody agrees, and num is +0 there: dividing by 1 keeps it
        return num.div_(den.add_(den.sign().neg_().add_(1.0)))
    nobody = den == 0  # weights of both signs can cancel where models agree
    return num.masked_fill_(nobody, 0.0).div_(den.masked_fill_(nobody, 1.0))


def trimmed_merge(xs: Sequence[Tensor], b: Tensor, cuts: Sequence[Cut], ties_seen: list[int],
                  w: Sequence[float], normalize: bool, lambda_: float) -> Tensor:
    """TIES on a block: each model's :func:`trimmed_contribution` (``ties_seen`` updated in place),
    then ``b + lambda_ * merged`` by :func:`disjoint_merge_`; on the CPU one fused loop (:mod:`._kernels`)."""
    if _kernels.usable(*xs, b):
        return _kernels.ties_merge(list(xs), b, cuts, ties_seen, w, normalize, lambda_)
    contributions = []
    for i, (x, cut) in enumerate(zip(xs, cuts, strict=True)):
        c, ties_seen[i] = trimmed_contribution(x, b, cut, ties_seen[i], w[i])
        contributions.append(c)
    return disjoint_merge_(contributions, w, normalize, lambda_, b)


def dropped_merge(xs: Sequence[Tensor], b: Tensor, density: Sequence[float], rng: torch.Generator,
                  w: Sequence[float], normalize: bool, lambda_: float, rescale: bool = True) -> Tensor:
    """DARE-TIES on a block: each model's :func:`dropped_contribution` (``w_i`` folded into the rescale,
    coins drawn in model order), then ``b + lambda_ * merged`` by :func:`disjoint_merge_`; on the CPU one
    fused loop (:mod:`._kernels`) with the same coins and bits."""
    if _kernels.usable(*xs, b):
        levels = [keep_levels(d) for d in density]
        draws = [coins(b.numel(), rng, b.device) if 0 < k < KEEP_LEVELS else None for k in levels]
        scales = [wi * KEEP_LEVELS / k if rescale and 0 < k < KEEP_LEVELS else wi
                  for wi, k in zip(w, levels, strict=True)]
        return _kernels.dare_merge(list(xs), b, draws, levels, scales, w, normalize, lambda_)
    c = [dropped_contribution(x, b, d, rng, wi, rescale) for x, d, wi in zip(xs, density, w, strict=True)]
    return disjoint_merge_(c, w, normalize, lambda_, b)


COMBINE = {"sum": weighted_sum, "elect": sign_consensus}
