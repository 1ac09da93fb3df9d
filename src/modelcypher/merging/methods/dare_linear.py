"""``dare_linear``: DARE drop-and-rescale, then task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._consensus import combine
from modelcypher.merging.methods._drop import drop_and_rescale
from modelcypher.merging.methods._inputs import fractions, per_model
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.registry import register

DARE_PAPER = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch; "
    "Le Yu, Bowen Yu, Haiyang Yu, Fei Huang, Yongbin Li; 2023 (ICML 2024); arXiv:2311.03099"
)


# what dare_linear and dare_ties share at registration (why their bodies differ: see dare_ties)
DARE = {"rowwise": True, "base": "required", "random": True, "model_params": ("weight", "density"),
        "global_params": ("normalize", "lambda", "rescale", "int8_mask")}


@register("dare_linear", paper=DARE_PAPER, **DARE)
def dare_linear(
    xs: Sequence[Tensor], base: Tensor | None, *, rng: torch.Generator,
    weight: Sequence[float] | float = 1.0, density: Sequence[float] | float = 1.0,
    normalize: bool = False, lambda_: float = 1.0, rescale: bool = True, int8_mask: bool = False,
) -> Tensor:
    """DARE + task arithmetic.

    ``d_i = m_i * (x_i - base) / density_i`` with ``m_i ~ Bernoulli(density_i)`` elementwise (drop
    rate ``p = 1 - density_i``; ``density_i`` taken to a multiple of 2**-16, see
    :func:`~modelcypher.merging.methods._drop.drop_and_rescale`; ``density_i = 1`` keeps
    everything exactly, ``density_i = 0`` drops everything); ``result = base + lambda_ * sum_i w_i d_i``
    (sum divided by ``sum_i w_i`` when ``normalize``, default False). ``E[result]`` is the undropped
    task-arithmetic result. The masks come from ``rng``, drawn model by model in config order.
    ``rescale`` False keeps survivors undivided by ``density_i`` (then ``E[result]`` shrinks by it).
    ``int8_mask`` is accepted and changes nothing: mergekit stores its sign mask in int8 to
    save memory, and the mask's values, so the result, are the same.
    """
    w, dens = per_model(weight, len(xs), "weight"), fractions(density, len(xs), "density")
    with torch.no_grad():
        taus = task_vectors(xs, base)
        dropped = [drop_and_rescale(t, d, rng, rescale=rescale) for t, d in zip(taus, dens, strict=True)]
        return combine("sum", dropped, base, w, normalize, lambda_)
