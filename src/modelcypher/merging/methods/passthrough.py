"""``passthrough``: copy the single model's tensor (frankenmerge slices; layer choice is the planner's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import per_model
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
    model_params=("scale",),
    min_models=1,
    max_models=1,
)
def passthrough(xs: Sequence[Tensor], base: Tensor | None = None, *, scale: Sequence[float] | float = 1.0) -> Tensor:
    """``result = scale * x_0`` (a new float32 tensor). Exactly one model; ``scale`` (default 1) lets a
    frankenmerge damp a repeated layer's output, e.g. ``{filter: o_proj, value: 0.5}``."""
    if len(xs) != 1:
        raise UserError(f"passthrough takes exactly one model per tensor, got {len(xs)}")
    (s,) = per_model(scale, 1, "scale")
    x = xs[0].to(torch.float32, copy=True)
    return x if s == 1.0 else x.mul_(s)
