"""``ties``: TIES-Merging (trim, elect sign, disjoint merge)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._sparsify import (
    apply_delta,
    check_fraction,
    check_shapes,
    count,
    per_model,
    sign_consensus,
    topk_magnitude_mask,
)
from modelcypher.merging.registry import register

TIES_PAPER = (
    "TIES-Merging: Resolving Interference When Merging Models; Yadav, Tam, Choshen, Raffel, Bansal; "
    "2023 (NeurIPS 2023); arXiv:2306.01708"
)


@register(
    "ties",
    base="required",
    paper=TIES_PAPER,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"normalize": True, "lambda": 1.0},
)
def ties(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    density: Sequence[float] | float = 1.0, normalize: bool = True, lambda_: float = 1.0,
) -> Tensor:
    """TIES-Merging.

    1. trim: ``tau_i = x_i - base``; ``d_i`` keeps the ``round(density_i * n)`` largest-magnitude
       entries of ``tau_i`` (whole tensor; equal magnitudes: smaller flat index first), zeros the rest;
    2. elect: ``c_i = w_i d_i``, ``s = sign(sum_i c_i)`` per element;
    3. disjoint merge: ``A = {i : c_i * s > 0}``; ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` if
       ``normalize`` (default True) else ``sum_{i in A} c_i``; 0 where ``A`` is empty;
    4. ``result = base + lambda_ * tau``.

    Defaults: ``weight`` 1, ``density`` 1 (keep all), ``lambda_`` 1.
    """
    n = len(xs)
    w = per_model(weight, n, "weight")
    dens = per_model(density, n, "density")
    check_fraction(dens, "density")
    with torch.no_grad():
        if base is None:
            raise UserError("ties needs a base_model")
        check_shapes([base, *xs])
        b = base.to(torch.float32)
        trimmed = []
        for x, d in zip(xs, dens, strict=True):  # one untrimmed task vector alive at a time, trimmed in place
            tau = x.to(torch.float32) - b
            trimmed.append(tau.masked_fill_(~topk_magnitude_mask(tau, count(d, tau.numel())), 0.0))
        return apply_delta(base, sign_consensus(trimmed, w, normalize), lambda_)
