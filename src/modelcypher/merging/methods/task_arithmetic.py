"""``task_arithmetic``: add a weighted sum of task vectors to the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import per_model
from modelcypher.merging.methods._task import apply_delta, task_vectors, weighted_sum
from modelcypher.merging.registry import ANY, register


@register(
    "task_arithmetic",
    rowwise=True,
    base="required",
    paper=(
        "Editing Models with Task Arithmetic; Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, "
        "Hajishirzi, Farhadi; 2022 (ICLR 2023); arXiv:2212.04089"
    ),
    model_params=("weight",),
    global_params=("normalize", "lambda", "int8_mask"),
    inert={"density": (ANY, "task arithmetic prunes nothing"), "rescale": (ANY, "nothing is pruned to rescale")},
)
def task_arithmetic(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    normalize: bool = False, lambda_: float = 1.0, int8_mask: bool = False,
) -> Tensor:
    """``base + lambda_ * sum_i w_i (x_i - base)``; the sum is divided by ``sum_i w_i`` when
    ``normalize`` (default False). Config ``lambda`` arrives as ``lambda_`` (default 1.0)."""
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return apply_delta(base, weighted_sum(task_vectors(xs, base), w, normalize), lambda_)
