"""``karcher``: the Karcher (Riemannian) mean of the models' directions, scaled by their mean norm."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import check_shapes, f32
from modelcypher.merging.methods._sphere import Blocks, combine, gram
from modelcypher.merging.registry import register


def karcher_coefficients(g: Tensor, max_iter: int, tol: float) -> list[float]:
    """The coefficients ``c`` of the result ``sum_j c_j x_j`` from the models' Gram matrix ``g`` (float64).

    The iteration runs on coefficients over the unit vectors ``u_j = x_j / |x_j|``: a point
    ``p = sum_j a_j u_j`` has ``<p, u_i> = (U a)_i`` and ``|p|^2 = a^T U a`` with ``U`` the units'
    Gram matrix, so no pass over the tensor is needed until the mean is known.
    """
    k = g.shape[0]
    norms = g.diagonal().clamp_min(0.0).sqrt()
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    units = g * inv[:, None] * inv[None, :]
    valid = [i for i in range(k) if float(norms[i]) > tol]
    scale = float(norms.sum()) / k  # sum_i alpha_i |x_i|, alpha_i = 1 / k over every model
    if not valid:
        return [0.0] * k
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[valid] = 1.0 / len(valid)

    def length(a: Tensor) -> float:
        return math.sqrt(max(0.0, float(a @ units @ a)))

    mean = alpha.clone()
    n = length(mean)
    if n < tol:  # the directions cancel: start from the first
        mean = torch.zeros(k, dtype=torch.float64)
        mean[valid[0]] = 1.0
    else:
        mean = mean / n
    for _ in range(max_iter):
        # Riemannian gradient step: the weighted mean of the log maps log_mean(u_i) = theta_i / sin(theta_i)
        # * (u_i - cos(theta_i) mean), then the exponential map along it.
        cos = (units @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros(k, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(cos[i]))
            if theta < tol:
                continue
            tangent[i] += float(alpha[i]) * theta / math.sin(theta)
            tangent -= float(alpha[i]) * theta / math.sin(theta) * float(cos[i]) * mean
        step = length(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) / step * tangent
        n = length(mean)
        if n > tol:
            mean = mean / n
    return [scale * float(a) * float(i) for a, i in zip(mean, inv, strict=True)]


def karcher_blocks(passes: Blocks, numel: int, *, max_iter: int, tol: float) -> Iterator[Tensor]:
    """:func:`karcher` on a tensor seen in blocks of rows: the Gram matrix in a first pass, the iteration
    on it (:func:`karcher_coefficients`), then each block combined in a second pass."""
    with torch.no_grad():
        g = gram(passes)
        if g.shape[0] == 1:
            coeffs = [1.0]
        else:
            coeffs = karcher_coefficients(g, int(max_iter), float(tol))
        yield from combine(passes, coeffs)


@register(
    "karcher",
    base="none",
    paper=("Riemannian center of mass and mollifier smoothing; H. Karcher; Communications on Pure and Applied "
           "Mathematics 30(5), 1977 (no arXiv id); spherical averages by fixed-point iteration as in Buss & "
           "Fillmore, ACM Transactions on Graphics 20(2), 2001"),
    global_params=("max_iter", "tol"),
    stream=karcher_blocks,
)
def karcher(xs: Sequence[Tensor], base: Tensor | None = None, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher mean on the unit sphere of the models' flattened tensors, scaled by their mean norm.

    With ``u_i = x_i / |x_i|`` over the models with ``|x_i| > tol`` (equal weights ``alpha_i``), the mean
    ``m`` minimizes ``sum_i alpha_i d(m, u_i)^2`` (``d`` the great-circle distance). From
    ``m = normalize(sum_i alpha_i u_i)``, at most ``max_iter`` (default 10) steps of

        T = sum_i alpha_i theta_i / sin(theta_i) * (u_i - cos(theta_i) m),   cos(theta_i) = <m, u_i>
        m <- cos(|T|) m + sin(|T|) T / |T|

    (terms with ``theta_i < tol`` left out), stopping once ``|T| < tol`` (default ``1e-5``). Then
    ``result = (1/k) sum_i |x_i| * m`` over all ``k`` models. Two models give their slerp midpoint
    direction; one model is returned as is; all-zero models give zeros. ``base`` is not used (a base
    listed among the models is one of ``xs``). The whole tensor is one block of
    :func:`karcher_blocks`, which the runner streams.
    """
    check_shapes(xs)
    block = ([f32(x) for x in xs], None)
    (out,) = karcher_blocks(lambda: [block], xs[0].numel(), max_iter=max_iter, tol=tol)
    return out
