"""``slerp``: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import f32
from modelcypher.merging.registry import register

#: Below this norm a tensor has no usable direction and slerp falls back to lerp.
NORM_EPS = 1e-12


Blocks = Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]]


def slerp_blocks(passes: Blocks, numel: int, *, t: float, DOT_THRESHOLD: float = 1.0 - 1e-6) -> Iterator[Tensor]:
    """:func:`slerp` on a tensor seen in blocks of rows (``passes()`` yields each block's float32
    ``([v1], v0)`` once per call): a first pass sums ``|v0|^2``, ``|v1|^2`` and ``|v1 - v0|^2``, a
    second combines each block with the two coefficients they give. Memory: a few blocks."""
    with torch.no_grad():
        n00 = n11 = dd = 0.0
        for (v1,), v0 in passes():
            a, b, c = _squares(v0, v1)
            n00, n11, dd = n00 + a, n11 + b, dd + c
        s0, s1 = coefficients(n00, n11, dd, float(t), DOT_THRESHOLD)
        for (v1,), v0 in passes():
            yield v0 * s0 + v1 * s1


def coefficients(n00: float, n11: float, dd: float, t: float, dot_threshold: float) -> tuple[float, float]:
    """``(s0, s1)`` of ``s0 v0 + s1 v1`` from ``|v0|^2, |v1|^2, |v1 - v0|^2``: slerp's, else lerp's."""
    n0, n1 = math.sqrt(n00), math.sqrt(n11)
    if n0 > NORM_EPS and n1 > NORM_EPS and math.isfinite(n0) and math.isfinite(n1) and math.isfinite(dd):
        # |u0 - u1|^2 = 2 - 2 cos = (|v1 - v0|^2 - (n1 - n0)^2) / (n0 n1), and |u0 + u1|^2 = 4 minus it:
        # from the difference, which keeps small angles accurate where a dot product would cancel.
        diff2 = min(4.0, max(0.0, (dd - (n1 - n0) ** 2) / (n0 * n1)))
        theta = 2.0 * math.atan2(math.sqrt(diff2), math.sqrt(4.0 - diff2))
        if abs(1.0 - diff2 / 2.0) <= dot_threshold:
            sin_theta = math.sin(theta)
            return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    return 1.0 - t, t


@register(
    "slerp",
    base="required",
    paper="Animating Rotation with Quaternion Curves; Ken Shoemake; SIGGRAPH 1985 (no arXiv id)",
    global_params=("t", "DOT_THRESHOLD"),
    min_models=1,
    max_models=1,
    stream=slerp_blocks,
)
def slerp(
    xs: Sequence[Tensor], base: Tensor | None, *, t: float, DOT_THRESHOLD: float = 1.0 - 1e-6,
) -> Tensor:
    """Spherical interpolation from ``v0 = base`` (``t = 0``) to ``v1 = xs[0]`` (``t = 1``).

    The flattened tensors are treated as vectors. The angle comes from normalized copies,
    ``theta = 2 * atan2(|u0 - u1|, |u0 + u1|)`` with ``u = v / |v|`` (accurate also for tiny
    angles, unlike ``acos`` of a float32 dot product), and the ORIGINAL vectors are combined:

        result = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

    Falls back to ``lerp = (1 - t) v0 + t v1`` when ``|cos theta| > DOT_THRESHOLD`` (default
    ``1 - 1e-6``, i.e. an angle under ~0.08 degrees of parallel or antiparallel: there lerp and slerp
    differ by less than ``theta**2 / 8 ~ 2.5e-7`` relatively, below float32 resolution, and for the
    antiparallel case slerp is undefined) or when either norm is below ``1e-12``. ``t`` outside
    ``[0, 1]`` extrapolates. ``t = 0`` returns the base and ``t = 1`` the other model exactly.
    The whole tensor is one block of :func:`slerp_blocks`, which the runner streams.
    """
    if base is None:
        raise UserError("slerp needs a base_model")
    if len(xs) != 1:
        raise UserError(f"slerp interpolates the base with exactly one other model, got {len(xs)}")
    v0, v1 = f32(base), f32(xs[0])
    if v0.shape != v1.shape:
        raise UserError(f"slerp: tensor shape {tuple(v1.shape)} differs from the base's {tuple(v0.shape)}")
    (out,) = slerp_blocks(lambda: [([v1], v0)], v0.numel(), t=t, DOT_THRESHOLD=DOT_THRESHOLD)
    return out


def _squares(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> tuple[float, float, float]:
    """|a|^2, |b|^2, |b - a|^2, float32 dot products over chunks summed in float64 (about 1e-6
    relative error each; the angle comes from the difference, so small angles keep their precision)."""
    a, b = a.reshape(-1), b.reshape(-1)
    aa = bb = dd = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk], b[i:i + chunk]
        d = y - x
        aa, bb, dd = aa + float(x @ x), bb + float(y @ y), dd + float(d @ d)
    return aa, bb, dd
