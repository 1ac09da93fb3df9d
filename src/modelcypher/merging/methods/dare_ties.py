"""``dare_ties``: DARE drop-and-rescale, then TIES sign election and disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import dropped_merge
from modelcypher.merging.methods._inputs import check_base, fractions, per_model
from modelcypher.merging.methods.dare_linear import DARE, DARE_PAPER
from modelcypher.merging.methods.ties import TIES_PAPER
from modelcypher.merging.registry import register


@register("dare_ties", paper=f"{DARE_PAPER}. Sign election and disjoint merge from {TIES_PAPER}", raw=True, **DARE)
def dare_ties(
    xs: Sequence[Tensor], base: Tensor | None, *, rng: torch.Generator,
    weight: Sequence[float] | float = 1.0, density: Sequence[float] | float = 1.0,
    normalize: bool = False, lambda_: float = 1.0, rescale: bool = True, int8_mask: bool = False,
) -> Tensor:
    """DARE + TIES.

    ``d_i = m_i * (x_i - base) / density_i`` with ``m_i ~ Bernoulli(density_i)`` (as ``dare_linear``);
    then with ``c_i = w_i d_i``, ``s = sign(sum_i c_i)``, ``A = {i : c_i * s > 0}``:
    ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` (``normalize``) or the bare sum (default, as mergekit);
    ``result = base + lambda_ * tau``. ``rescale`` and ``int8_mask`` as in ``dare_linear``.
    """
    w, dens = per_model(weight, len(xs), "weight"), fractions(density, len(xs), "density")
    check_base(xs, base)
    # Not combine("elect", <dare_linear's drops>): the drop is fused with the election in one pass over
    # raw (bf16) blocks, w_i folded into the rescale, so no float32 copy of each task vector is made.
    with torch.no_grad():
        return dropped_merge(xs, base, dens, rng, w, normalize, lambda_, rescale)
