"""``della``: DELLA-Merging (MagPrune, then TIES sign election and disjoint merge)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._inputs import per_model
from modelcypher.merging.methods.della_linear import DELLA_PAPER, della_deltas
from modelcypher.merging.registry import register


@register(
    "della",
    rowwise=True,
    base="required",
    paper=DELLA_PAPER,
    model_params=("weight", "density", "epsilon"),
    global_params=("normalize", "lambda", "rescale", "int8_mask"),
    random=True,
)
def della(
    xs: Sequence[Tensor], base: Tensor | None, *, rng: torch.Generator,
    weight: Sequence[float] | float = 1.0, density: Sequence[float] | float = 1.0,
    epsilon: Sequence[float] | float = 0.15, normalize: bool = True, lambda_: float = 1.0,
    rescale: bool = True, int8_mask: bool = False,
) -> Tensor:
    """DELLA: MagPrune each task vector (see ``della_linear``), then elect and fuse as in TIES: with
    ``c_i = w_i d_i``, ``s = sign(sum_i c_i)``, ``A = {i : c_i * s > 0}``,
    ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` (``normalize``, default True) or the bare sum;
    ``result = base + lambda_ * tau``. Defaults: ``weight`` 1, ``density`` 1, ``epsilon`` 0.15 (mergekit's),
    ``lambda_`` 1.
    """
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return combine("elect", della_deltas(xs, base, density, epsilon, rng, rescale), base, w, normalize, lambda_)
