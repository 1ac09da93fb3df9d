"""Reading a method's inputs: per-model parameters, fractions, float32 views, rows, shapes.

Conventions of every shared piece in this package:

- functions return new tensors and never write into their arguments, except those whose names end
  in ``_``, which overwrite their first argument (a temporary the caller owns), as torch's in-place
  methods do;
- a "row" is ``t.reshape(t.shape[0], -1)[r]`` for tensors with two or more dimensions, and the whole
  (flattened) tensor for 0-D and 1-D tensors;
- a fraction ``f`` of ``n`` entries means ``floor(f * n + 0.5)`` entries (round half up), clipped
  to ``[0, n]`` (:func:`count`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from modelcypher.errors import UserError


def per_model(value: Any, n: int, name: str) -> list[float]:
    """A per-model parameter as a list of ``n`` floats (a scalar is broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"parameter {name!r}: got {len(value)} values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n


def fractions(value: Any, n: int, name: str) -> list[float]:
    """:func:`per_model`, each value checked to lie in ``[0, 1]``."""
    values = per_model(value, n, name)
    for v in values:
        if not (0.0 <= v <= 1.0):
            raise UserError(f"parameter {name!r} must be in [0, 1], got {v}")
    return values


def f32(t: Tensor) -> Tensor:
    """``t`` as float32 (no copy when it already is; callers must not write into the result)."""
    return t.to(torch.float32)


def as_rows(t: Tensor) -> Tensor:
    """A 2-D ``[rows, cols]`` view (or copy) of ``t``; see the module docstring for "row"."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def check_shapes(xs: Sequence[Tensor]) -> None:
    """All models' tensors must have one shape (no silent broadcasting)."""
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise UserError(f"tensor shapes differ across models: {tuple(xs[0].shape)} vs {tuple(x.shape)}")


def check_base(xs: Sequence[Tensor], base: Tensor | None) -> None:
    """A base is given, and every model's tensor has its shape."""
    if base is None:
        raise UserError("this merge method needs a base_model")
    for x in xs:
        if x.shape != base.shape:
            raise UserError(f"tensor shape {tuple(x.shape)} differs from the base's {tuple(base.shape)}")


def count(fraction: float, n: int) -> int:
    """``floor(fraction * n + 0.5)`` clipped to ``[0, n]``."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))
