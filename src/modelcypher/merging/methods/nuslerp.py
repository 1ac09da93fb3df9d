"""``nuslerp``: slerp between two models by their weights, optionally of task vectors, per row or column."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_shapes, f32, per_model
from modelcypher.merging.methods._sphere import Blocks, slerp_coefficients, vectors
from modelcypher.merging.registry import register


def interpolation_t(weight: Sequence[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``: how far from the first model toward the second; 1/2 when the weights
    cancel (``|w_0 + w_1| < 1e-6``)."""
    if len(weight) != 2:
        raise UserError(f"nuslerp interpolates exactly two models besides the base, got {len(weight)}")
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def nuslerp_blocks(passes: Blocks, numel: int, *, weight: Sequence[float], nuslerp_row_wise: bool,
                   nuslerp_flatten: bool) -> Iterator[Tensor]:
    """:func:`nuslerp` on a tensor seen in blocks of rows (``passes()`` yields each block's float32
    ``([x0, x1], base)``, base None without one). Vectors along the last axis lie inside a row block:
    one pass. The whole tensor, or vectors along the first axis (columns), need a first pass summing
    their squared norms and dot products, then a second combining each block."""
    t = interpolation_t(per_model(weight, 2, "weight"))

    def squares(v0: Tensor, v1: Tensor, dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
        def dot(a: Tensor, b: Tensor) -> Tensor:
            return (a * b).sum(dtype=torch.float64) if dim is None else (a * b).sum(dim, keepdim=True,
                                                                                  dtype=torch.float64)
        return dot(v0, v0), dot(v1, v1), dot(v0, v1)

    def mix(xs: Sequence[Tensor], base: Tensor | None, s0: Tensor, s1: Tensor) -> Tensor:
        v0, v1 = vectors(xs, base)
        out = v0 * s0.to(torch.float32) + v1 * s1.to(torch.float32)
        return out if base is None else out.add_(f32(base))

    with torch.no_grad():
        if not nuslerp_flatten and not nuslerp_row_wise:
            for xs, base in passes():
                dim = -1 if xs[0].dim() >= 2 else None  # a 1-D tensor is one block, one vector
                s0, s1 = slerp_coefficients(*squares(*vectors(xs, base), dim), t)
                yield mix(xs, base, s0, s1)
            return
        sums = None
        for xs, base in passes():
            dim = None if nuslerp_flatten or xs[0].dim() < 2 else 0
            part = squares(*vectors(xs, base), dim)
            sums = part if sums is None else tuple(a + b for a, b in zip(sums, part, strict=True))
        s0, s1 = slerp_coefficients(*sums, t)
        for xs, base in passes():
            yield mix(xs, base, s0, s1)


@register(
    "nuslerp",
    base="optional",
    paper=("Slerp (Animating Rotation with Quaternion Curves; Ken Shoemake; SIGGRAPH 1985) between two models "
           "or their task vectors, t from their weights: mergekit's NuSLERP (no paper)"),
    model_params=("weight",),
    global_params=("nuslerp_row_wise", "nuslerp_flatten"),
    min_models=2,
    max_models=2,
    stream=nuslerp_blocks,
)
def nuslerp(xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    """Spherical interpolation between ``x_0`` and ``x_1`` at ``t = w_1 / (w_0 + w_1)``.

    With a base, the task vectors are interpolated and added back:
    ``base + slerp(x_0 - base, x_1 - base; t)``; without one, ``slerp(x_0, x_1; t)``, where

        slerp(v0, v1; t) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1,
        cos(theta) = <v0, v1> / (|v0| |v1|)

    (lerp where a vector is zero or the two are parallel or antiparallel within ``1e-6`` in cosine).
    Which vectors: the whole flattened tensor when ``nuslerp_flatten`` (default); else each vector
    along the last axis (each row of a ``[out, in]`` weight), or along the first axis (each column)
    when ``nuslerp_row_wise``. A 1-D tensor is one vector in every mode. The whole tensor is one
    block of :func:`nuslerp_blocks`, which the runner streams.
    """
    if len(xs) != 2:
        raise UserError(f"nuslerp interpolates exactly two models besides the base, got {len(xs)}")
    check_shapes([*xs, *([] if base is None else [base])])
    block = ([f32(x) for x in xs], None if base is None else f32(base))
    (out,) = nuslerp_blocks(lambda: [block], xs[0].numel(), weight=weight, nuslerp_row_wise=nuslerp_row_wise,
                            nuslerp_flatten=nuslerp_flatten)
    return out
