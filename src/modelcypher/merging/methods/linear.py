"""``linear``: weighted average of the models' tensors (a "model soup")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import check_shapes, f32, per_model
from modelcypher.merging.methods._task import weighted_sum
from modelcypher.merging.registry import register


@register(
    "linear",
    rowwise=True,
    base="none",
    paper=(
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
        "increasing inference time; Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, "
        "Farhadi, Carmon, Kornblith, Schmidt; 2022; arXiv:2203.05482"
    ),
    model_params=("weight",),
    global_params=("normalize",),
)
def linear(
    xs: Sequence[Tensor], base: Tensor | None = None, *, weight: Sequence[float] | float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (default True).

    ``base`` is ignored: a base listed among the models is just one of ``xs``. Raises
    :class:`~modelcypher.errors.UserError` when ``normalize`` and the weights sum to zero.
    """
    w = per_model(weight, len(xs), "weight")
    check_shapes(xs)
    with torch.no_grad():
        return weighted_sum([f32(x) for x in xs], w, normalize)
