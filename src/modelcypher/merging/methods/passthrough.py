"""``passthrough``: copy the single model's tensor (frankenmerge slices; layer choice is the planner's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.registry import register


@register(
    "passthrough",
    rowwise=True,
    base="none",
    paper=(
        "No merge: the tensor is copied unchanged (layer stacking / 'frankenmerge', as in "
        "Arcee's MergeKit: A Toolkit for Merging Large Language Models; Goddard, Siriwardhana, "
        "Ehghaghi, Meyers, Karpukhin, Benedict, McQuade, Solawetz; 2024; arXiv:2403.13257)"
    ),
    min_models=1,
    max_models=1,
)
def passthrough(xs: Sequence[Tensor], base: Tensor | None = None) -> Tensor:
    """``result = x_0`` (a new float32 tensor). Exactly one model."""
    if len(xs) != 1:
        raise UserError(f"passthrough takes exactly one model per tensor, got {len(xs)}")
    return xs[0].to(torch.float32, copy=True)
