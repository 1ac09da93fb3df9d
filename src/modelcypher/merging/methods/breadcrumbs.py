"""``breadcrumbs``: Model Breadcrumbs (mask outliers and small updates, then task arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._inputs import fractions, per_model
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
    """``tau_i`` masked to its magnitude-rank band (:func:`~modelcypher.merging.methods._trim.band_mask`)."""
    n = len(xs)
    dens = fractions(density, n, "density")
    gam = fractions(gamma, n, "gamma")
    out = []
    for tau, d, g in zip(task_vectors(xs, base), dens, gam, strict=True):
        out.append(torch.where(band_mask(tau, d, g), tau, torch.zeros((), device=tau.device)))
    return out


# breadcrumbs and breadcrumbs_ties: one method but for how the masked task vectors are merged
BREADCRUMBS = {"base": "required", "model_params": ("weight", "density", "gamma"),
               "global_params": ("normalize", "lambda", "int8_mask"),
               "inert": {"rescale": (False, "mergekit's L1 rescaling after a magnitude trim is not done here")}}


@register("breadcrumbs", paper=BREADCRUMBS_PAPER, **BREADCRUMBS)
def breadcrumbs(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    density: Sequence[float] | float = 1.0, gamma: Sequence[float] | float = 0.01,
    normalize: bool = False, lambda_: float = 1.0, int8_mask: bool = False, how: str = "sum",
) -> Tensor:
    """Model Breadcrumbs.

    Rank the entries of ``tau_i = x_i - base`` by magnitude over the whole tensor (rank 0 = largest,
    ties by flat index); with ``k = int(density_i n)``, ``d_i`` keeps ranks ``[lo, lo + k)`` where
    ``lo = min(int(gamma_i n), n - k)``: the top ``gamma`` fraction (outliers, default 0.01) and
    everything past the next ``density`` fraction are zeroed; ``density`` 1 (default) keeps every entry
    (mergekit's rule). ``result = base + lambda_ * sum_i w_i d_i`` (divided by ``sum_i w_i`` when
    ``normalize``, default False); with ``how="elect"`` (``breadcrumbs_ties``), TIES' sign election and
    disjoint merge instead of the sum (:func:`~modelcypher.merging.methods._consensus.combine`).
    ``int8_mask`` is accepted and changes nothing: mergekit stores its sign mask in int8 to
    save memory, and the mask's values, so the result, are the same.
    """
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return combine(how, breadcrumb_deltas(xs, base, density, gamma), base, w, normalize, lambda_)
