"""Task vectors and their weighted sums: ``tau_i = x_i - base``, ``sum_i w_i tau_i``, ``base + lambda tau``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_base, f32


def task_vectors(xs: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
    """``tau_i = x_i - base`` in float32 (new tensors)."""
    check_base(xs, base)
    b = f32(base)
    return [f32(x) - b for x in xs]


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


def scale_from_base(merged: Tensor, base: Tensor | None, lambda_: float, method: str) -> Tensor:
    """``base + lambda_ (merged - base)`` for a method that averages full weights (so, in effect, the
    task vectors); ``merged`` itself when ``lambda_`` is 1, which needs no base."""
    if lambda_ == 1.0:
        return merged
    if base is None:
        raise UserError(f"{method}: lambda {lambda_:g} scales the merge from the base, which needs a base_model")
    return apply_delta(base, merged - f32(base), lambda_)


def apply_delta(base: Tensor, merged_delta: Tensor, lambda_: float) -> Tensor:
    """``base + lambda_ * merged_delta`` as a new float32 tensor."""
    return f32(base) + merged_delta * lambda_


def mean_update(xs: Sequence[Tensor], base: Tensor, lambda_: float) -> Tensor:
    """``base + lambda_ * mean_i (x_i - base)`` (float32): task arithmetic with equal weights, what the
    methods defined on matrices do for a tensor that is not one (a norm, a bias)."""
    b = base.float()
    return b + float(lambda_) * torch.stack([x.float() - b for x in xs]).mean(0)
