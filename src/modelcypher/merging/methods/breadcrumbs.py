"""``breadcrumbs``: Model Breadcrumbs (mask outliers and small updates, then task arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._inputs import check_fraction, per_model
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.methods._trim import band_mask
from modelcypher.merging.registry import register

BREADCRUMBS_PAPER = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks; MohammadReza Davari, "
    "Eugene Belilovsky; 2023 (ECCV 2024); arXiv:2312.06795"
)


def breadcrumb_deltas(
    xs: Sequence[Tensor], base: Tensor | None, density: Sequence[float] | float,
    gamma: Sequence[float] | float,
) -> list[Tensor]:
    """``tau_i`` masked to the magnitude-rank band ``[gamma_i n, (gamma_i + density_i) n)``."""
    n = len(xs)
    dens = per_model(density, n, "density")
    gam = per_model(gamma, n, "gamma")
    check_fraction(dens, "density")
    check_fraction(gam, "gamma")
    out = []
    for tau, d, g in zip(task_vectors(xs, base), dens, gam, strict=True):
        out.append(torch.where(band_mask(tau, d, g), tau, torch.zeros((), device=tau.device)))
    return out


@register(
    "breadcrumbs",
    base="required",
    paper=BREADCRUMBS_PAPER,
    model_params=("weight", "density", "gamma"),
    global_params=("normalize", "lambda", "int8_mask"),
)
def breadcrumbs(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    density: Sequence[float] | float = 1.0, gamma: Sequence[float] | float = 0.01,
    normalize: bool = False, lambda_: float = 1.0, int8_mask: bool = False,
) -> Tensor:
    """Model Breadcrumbs.

    Rank the entries of ``tau_i = x_i - base`` by magnitude over the whole tensor (rank 0 = largest,
    ties by flat index); ``d_i`` keeps ranks in ``[round(gamma_i n), round((gamma_i + density_i) n))``
    -- the top ``gamma`` fraction (outliers, default 0.01) and everything past the next ``density``
    fraction (default 1.0, clipped at ``n``) are zeroed. ``result = base + lambda_ * sum_i w_i d_i``
    (divided by ``sum_i w_i`` when ``normalize``, default False).
    """
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return combine("sum", breadcrumb_deltas(xs, base, density, gamma), base, w, normalize, lambda_)
