"""``della_linear``: DELLA MagPrune (magnitude-ranked drop-and-rescale), then task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._drop import magprune
from modelcypher.merging.methods._inputs import fractions, per_model
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.registry import register

DELLA_PAPER = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling; "
    "Pala Tej Deep, Rishabh Bhardwaj, Soujanya Poria; 2024; arXiv:2406.11617"
)


def della_deltas(
    xs: Sequence[Tensor], base: Tensor | None, density: Sequence[float] | float,
    epsilon: Sequence[float] | float, rng: torch.Generator, rescale: bool = True,
) -> list[Tensor]:
    """MagPrune each ``tau_i = x_i - base`` (see ``_drop.magprune``)."""
    n = len(xs)
    dens = fractions(density, n, "density")
    eps = per_model(epsilon, n, "epsilon")
    for d, e in zip(dens, eps, strict=True):
        if e < 0.0:
            raise UserError(f"parameter 'epsilon' must be >= 0, got {e}")
        if 0.0 < d < 1.0 and not (0.0 < d - e and d + e < 1.0):  # mergekit refuses these too
            raise UserError(f"parameter 'epsilon' {e} with density {d}: density +/- epsilon must lie in (0, 1)")
    return [magprune(t, d, e, rng, rescale) for t, d, e in zip(task_vectors(xs, base), dens, eps, strict=True)]


# della_linear and della: one method but for how the pruned task vectors are merged
DELLA = {"rowwise": True, "base": "required", "paper": DELLA_PAPER, "random": True,
         "model_params": ("weight", "density", "epsilon"),
         "global_params": ("normalize", "lambda", "rescale", "int8_mask")}


@register("della_linear", **DELLA)
def della_linear(
    xs: Sequence[Tensor], base: Tensor | None, *, rng: torch.Generator,
    weight: Sequence[float] | float = 1.0, density: Sequence[float] | float = 1.0,
    epsilon: Sequence[float] | float = 0.15, normalize: bool = False, lambda_: float = 1.0,
    rescale: bool = True, int8_mask: bool = False, how: str = "sum",
) -> Tensor:
    """DELLA MagPrune + task arithmetic.

    Within each row of ``tau_i = x_i - base`` (row = first dimension; the whole tensor when 1-D),
    entries ranked by magnitude (largest first, ties by index) get keep probabilities ``p_j`` linearly
    spaced from ``density_i + e_i`` (largest) to ``density_i - e_i`` (smallest), with
    ``e_i = epsilon_i``; ``density_i +/- e_i`` must lie in ``(0, 1)`` (mergekit refuses the rest too), so
    ``p`` averages ``density_i`` (the paper spaces drop probabilities over a window of total width epsilon; here the
    half-width is ``epsilon``, as mergekit configs use it). ``d_ij = m_ij tau_ij / p_j`` with
    ``m_ij ~ Bernoulli(p_j)``; ``result = base + lambda_ * sum_i w_i d_i`` (divided by ``sum_i w_i``
    when ``normalize``, default False). ``E[d_i] = tau_i``; ``density`` 1 keeps everything exactly.
    Defaults: ``weight`` 1, ``density`` 1, ``epsilon`` 0.15 (mergekit's), ``lambda_`` 1.
    ``rescale`` False keeps survivors undivided by ``p_j``. ``how="elect"`` (``della``) merges by TIES'
    sign election and disjoint merge instead of the sum (:func:`~modelcypher.merging.methods._consensus.combine`).
    ``int8_mask`` is accepted and changes nothing: mergekit stores its sign mask in int8 to
    save memory, and the mask's values, so the result, are the same.
    """
    w = per_model(weight, len(xs), "weight")
    with torch.no_grad():
        return combine(how, della_deltas(xs, base, density, epsilon, rng, rescale), base, w, normalize, lambda_)
