"""``breadcrumbs_ties``: Model Breadcrumbs masks, then TIES sign election and disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._inputs import per_model
from modelcypher.merging.methods.breadcrumbs import BREADCRUMBS_PAPER, breadcrumb_deltas
from modelcypher.merging.methods.ties import TIES_PAPER
from modelcypher.merging.registry import register


@register(
    "breadcrumbs_ties",
    base="required",
    paper=f"{BREADCRUMBS_PAPER}. Sign election and disjoint merge from {TIES_PAPER}",
    model_params=("weight", "density", "gamma"),
    global_params=("normalize", "lambda", "int8_mask"),
)
def breadcrumbs_ties(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    density: Sequence[float] | float = 1.0, gamma: Sequence[float] | float = 0.01,
    normalize: bool = False, lambda_: float = 1.0, int8_mask: bool = False,
) -> Tensor:
    """Breadcrumbs masks (see ``breadcrumbs``) + TIES: with ``c_i = w_i d_i``,
    ``s = sign(sum_i c_i)``, ``A = {i : c_i * s > 0}``, ``tau = sum_{i in A} c_i / sum_{i in A} w_i``
    (``normalize``) or the bare sum (default, as mergekit); ``result = base + lambda_ * tau``."""
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return combine("elect", breadcrumb_deltas(xs, base, density, gamma), base, w, normalize, lambda_)
