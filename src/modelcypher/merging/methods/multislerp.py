"""``multislerp``: spherical interpolation of any number of models (or task vectors) by their weights."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_shapes, f32, per_model
from modelcypher.merging.methods._sphere import Blocks, combine, gram
from modelcypher.merging.registry import register


def multislerp_blocks(passes: Blocks, numel: int, *, weight: Sequence[float], normalize_weights: bool,
                      eps: float) -> Iterator[Tensor]:
    """:func:`multislerp` on a tensor seen in blocks of rows (``passes()`` yields each block's float32
    ``(xs, base)``): the vectors' Gram matrix in a first pass gives the coefficients of the result as a
    combination of them, applied block by block in a second."""
    k = len(weight)
    if k == 1:  # one model: itself, whatever the base
        for xs, _ in passes():
            yield f32(xs[0]).clone()
        return
    w = per_model(weight, k, "weight")
    if normalize_weights:
        total = sum(w)
        if total == 0.0:
            raise UserError("multislerp: the models' weights sum to zero; they cannot be normalized")
        w = [x / total for x in w]
    with torch.no_grad():
        g = gram(passes)
        norms = [math.sqrt(float(g[i, i])) for i in range(k)]
        a = torch.tensor([wi / (n + eps) for wi, n in zip(w, norms, strict=True)], dtype=torch.float64)
        mean_norm = math.sqrt(max(0.0, float(a @ g @ a)))  # |sum_i w_i u_i|
        if mean_norm < eps:
            if k != 2:
                raise UserError("multislerp: the models' weighted directions cancel out (e.g. antipodal "
                                "vectors of equal weight); change the weights")
            coeffs = w  # two opposite directions: their weighted sum, as lerp would
        else:
            radius = sum(wi * n for wi, n in zip(w, norms, strict=True))
            coeffs = [float(ai) * radius / mean_norm for ai in a]
        yield from combine(passes, coeffs)


@register(
    "multislerp",
    base="optional",
    paper=("Multi-SLERP: barycentric interpolation on a hypersphere; Charles Goddard; 2025 "
           "(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea, no arXiv id)"),
    model_params=("weight",),
    global_params=("normalize_weights", "eps"),
    stream=multislerp_blocks,
)
def multislerp(xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Weighted interpolation of ``k`` vectors on a hypersphere.

    With ``v_i = x_i - base`` (or ``x_i`` without a base), flattened, ``u_i = v_i / (|v_i| + eps)``
    and weights ``w_i`` (divided by their sum when ``normalize_weights``, the default):

        m      = sum_i w_i u_i / |sum_i w_i u_i|        (direction: the weighted mean on the sphere)
        result = (sum_i w_i |v_i|) * m  (+ base)        (radius: the weighted mean of the norms)

    The construction projects the ``u_i`` onto the tangent space at ``m``, averages there and maps
    back by the exponential map; the weighted tangent average is ``sum_i w_i (u_i - <u_i, m> m) = 0``
    since ``sum_i w_i u_i`` is parallel to ``m``, so the map returns ``m`` itself. One model returns
    itself (the base is not used). Where the weighted directions cancel (``|sum_i w_i u_i| < eps``),
    two models give ``w_0 v_0 + w_1 v_1`` (+ base) and more are refused. For two models of equal
    norm and weight the result is their slerp midpoint. The whole tensor is one block of
    :func:`multislerp_blocks`, which the runner streams.
    """
    check_shapes([*xs, *([] if base is None else [base])])
    block = ([f32(x) for x in xs], None if base is None else f32(base))
    (out,) = multislerp_blocks(lambda: [block], xs[0].numel(), weight=per_model(weight, len(xs), "weight"),
                               normalize_weights=normalize_weights, eps=eps)
    return out
