"""``nearswap``: take the other model's value where it is near the base's, move toward it elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_base, f32
from modelcypher.merging.registry import register

#: Differences below this are treated as this (a floor that keeps t / |a - b| finite).
MIN_DIFF = 1e-6


@register(
    "nearswap",
    base="required",
    paper=("NearSwap (interpolate toward the other model where it is near the base); alchemonaut; 2024 "
           "(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001, no paper)"),
    global_params=("t",),
    min_models=1,
    max_models=1,
    rowwise=True,
)
def nearswap(xs: Sequence[Tensor], base: Tensor | None, *, t: float) -> Tensor:
    """Elementwise, with ``a = base`` and ``b = xs[0]``:

        w      = clamp(t / max(|a - b|, 1e-6), 0, 1)
        result = w b + (1 - w) a

    so ``b`` is taken wherever ``|a - b| <= t``, and elsewhere ``a`` moves toward ``b`` by exactly ``t``:
    ``result = a + clamp(b - a, -t, t)`` (for ``t >= 1e-6``). ``t <= 0`` returns the base.
    """
    if len(xs) != 1:
        raise UserError(f"nearswap needs exactly one model besides the base, got {len(xs)}")
    check_base(xs, base)
    with torch.no_grad():
        a, b = f32(base), f32(xs[0])
        w = (float(t) / (a - b).abs().clamp_min(MIN_DIFF)).clamp(0.0, 1.0)
        return w * b + (1.0 - w) * a
