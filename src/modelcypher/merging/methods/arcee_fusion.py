"""``arcee_fusion``: take the other model's entries whose change from the base is an outlier in importance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._sparsify import check_base, f32
from modelcypher.merging.registry import register

#: Added to both softmax distributions before the divergence (keeps log p / q finite).
PROB_EPS = 1e-8


def importance(x: Tensor, b: Tensor) -> Tensor:
    """``|x - b| * KL(softmax(x) || softmax(b))``, the softmax and divergence along the last axis (one
    divergence per row, broadcast over it); probabilities offset by ``1e-8``."""
    p = torch.softmax(x, dim=-1) + PROB_EPS
    q = torch.softmax(b, dim=-1) + PROB_EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)
    return (x - b).abs() * kl


def quantile(v: Tensor, q: float) -> Tensor:
    """The ``floor(q * (n - 1))``-th smallest entry of ``v`` (0-based; no interpolation)."""
    flat = v.reshape(-1)
    return flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values


@register(
    "arcee_fusion",
    base="required",
    paper=("Arcee Fusion (importance = |delta| x KL divergence of the rows' softmax; an outlier threshold "
           "median + 1.5 IQR); Arcee AI; 2025 (https://arcee.ai, no paper)"),
    min_models=1,
    max_models=1,
)
def arcee_fusion(xs: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """With ``b = base`` and ``x = xs[0]``, the importance ``I = |x - b| * KL(softmax(x) || softmax(b))``
    (:func:`importance`) and its quartiles ``Q1, Q2, Q3`` over the whole tensor (:func:`quantile`):

        result = x where I >= Q2 + 1.5 (Q3 - Q1), else b

    i.e. only the changes that are outliers by Tukey's rule are fused into the base. The quartiles are
    exact, whatever the tensor's size. The whole tensor is computed at once.
    """
    if len(xs) != 1:
        raise UserError(f"arcee_fusion needs exactly one model besides the base, got {len(xs)}")
    check_base(xs, base)
    with torch.no_grad():
        x, b = f32(xs[0]), f32(base)
        imp = importance(x, b)
        q1, q2, q3 = (quantile(imp, q) for q in (0.25, 0.5, 0.75))
        return torch.where(imp >= q2 + 1.5 * (q3 - q1), x, b)
