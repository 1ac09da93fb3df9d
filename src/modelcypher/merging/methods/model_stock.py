"""``model_stock``: Model Stock (interpolate the models' average toward the base by their angle)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import as_rows, f32
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.registry import register


@register(
    "model_stock",
    base="required",
    paper=(
        "Model Stock: All we need is just a few fine-tuned models; Dong-Hwan Jang, Sangdoo Yun, "
        "Dongyoon Han; 2024 (ECCV 2024); arXiv:2403.19522"
    ),
    global_params=("filter_wise",),
    min_models=2,
)
def model_stock(xs: Sequence[Tensor], base: Tensor | None, *, filter_wise: bool = False) -> Tensor:
    """Model Stock.

    With ``k = len(xs) >= 2`` and ``tau_i = x_i - base`` (flattened; per row when ``filter_wise``,
    row = first dimension, the whole tensor when 1-D):

        cos = clamp(mean_{i<j} <tau_i, tau_j> / (|tau_i| |tau_j|), 0, 1)
        t   = k cos / (1 + (k - 1) cos)
        result = t * mean_i(x_i) + (1 - t) * base

    Degenerate cases: a pair involving a zero ``tau`` has no angle and counts as ``cos = 0``; a
    negative mean cosine (outside the paper's geometry, where ``t`` would be negative or infinite)
    is clamped to 0. Both give ``t = 0``, i.e. the base (which, when every ``tau`` is zero, is
    also the models' mean).
    """
    k = len(xs)
    if k < 2:
        raise UserError(f"model_stock needs at least 2 models besides the base, got {k}")
    with torch.no_grad():
        taus = task_vectors(xs, base)
        rows = [as_rows(t) if filter_wise else t.reshape(1, -1) for t in taus]
        # unit rows; an all-zero row stays zero, so its dot products (cosines) are 0
        units = [r / torch.where(n > 0, n, 1.0)[:, None] for r, n in ((r, r.norm(dim=1)) for r in rows)]
        cos_sum = torch.zeros(units[0].shape[0], dtype=torch.float32, device=units[0].device)
        for i in range(k):
            for j in range(i + 1, k):
                cos_sum += (units[i] * units[j]).sum(dim=1)
        cos = (cos_sum / (k * (k - 1) / 2)).clamp(0.0, 1.0)
        t = k * cos / (1.0 + (k - 1) * cos)
        b = f32(base)
        mean = torch.stack([f32(x) for x in xs]).mean(dim=0)
        if filter_wise and b.dim() >= 2:
            t = t.reshape((-1,) + (1,) * (b.dim() - 1))
        else:
            t = t.reshape(())
        return t * mean + (1.0 - t) * b
