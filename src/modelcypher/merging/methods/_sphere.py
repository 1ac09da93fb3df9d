"""Pieces shared by the spherical merge methods (registers nothing).

Methods that treat each model's (flattened) tensor as one vector need only the vectors' Gram matrix
to find the merge's coefficients: the result is a linear combination ``sum_i c_i v_i`` of the
inputs. So they stream in two passes over a tensor's row blocks: one sums the Gram matrix, the other
combines each block with the coefficients it gave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import f32

Blocks = Callable[[], Iterable[tuple[Sequence[Tensor], Tensor | None]]]

#: |cos theta| above this: the two directions are (anti)parallel and slerp falls back to lerp; there
#: the two differ by less than theta**2 / 8 ~ 2.5e-7 relatively, below float32 resolution.
DOT_THRESHOLD = 1.0 - 1e-6


def vectors(xs: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
    """The vectors a spherical method works on: ``x_i - base`` with a base, else ``x_i`` (float32)."""
    if base is None:
        return [f32(x) for x in xs]
    b = f32(base)
    return [f32(x) - b for x in xs]


def gram(passes: Blocks) -> Tensor:
    """``G_ij = <v_i, v_j>`` (float64, ``k x k``, on the CPU: the coefficients are worked out there) of
    the flattened :func:`vectors` of each block, summed over a pass."""
    g = None
    for xs, base in passes():
        v = torch.stack(vectors(xs, base)).reshape(len(xs), -1).to(torch.float64)
        part = v @ v.T
        g = part if g is None else g + part
    return g.cpu()


def combine(passes: Blocks, coeffs: Sequence[float]) -> Iterator[Tensor]:
    """Each block's ``sum_i c_i v_i`` (plus the base, when there is one), float32."""
    for xs, base in passes():
        out = torch.zeros_like(f32(xs[0]))
        for v, c in zip(vectors(xs, base), coeffs, strict=True):
            out.add_(v, alpha=float(c))
        yield out if base is None else out.add_(f32(base))


def slerp_coefficients(n00: Tensor, n11: Tensor, n01: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(s0, s1)`` of ``slerp(v0, v1; t) = s0 v0 + s1 v1`` from ``|v0|^2``, ``|v1|^2`` and ``<v0, v1>``
    (float64 tensors of one shape: one slerp per entry).

    ``cos theta = <v0, v1> / (|v0| |v1|)``, ``s0 = sin((1 - t) theta) / sin theta``,
    ``s1 = sin(t theta) / sin theta``; lerp's ``(1 - t, t)`` where a vector is zero (no direction) or
    ``|cos theta| > DOT_THRESHOLD``.
    """
    norms = (n00 * n11).sqrt()
    defined = norms > 0
    cos = torch.where(defined, n01 / torch.where(defined, norms, 1.0), 1.0).clamp(-1.0, 1.0)
    spherical = cos.abs() <= DOT_THRESHOLD
    theta = torch.where(spherical, torch.arccos(cos), torch.pi / 2)  # pi/2: a harmless stand-in elsewhere
    sin = torch.sin(theta)
    s0 = torch.where(spherical, torch.sin((1.0 - t) * theta) / sin, 1.0 - t)
    s1 = torch.where(spherical, torch.sin(t * theta) / sin, t)
    return s0, s1
