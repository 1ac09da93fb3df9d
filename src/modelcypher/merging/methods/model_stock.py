"""``model_stock``: Model Stock (interpolate the models' average toward the base by their angle)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import f32
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.registry import register


@register(
    "model_stock",
    base="required",
    paper=(
        "Model Stock: All we need is just a few fine-tuned models; Dong-Hwan Jang, Sangdoo Yun, "
        "Dongyoon Han; 2024 (ECCV 2024); arXiv:2403.19522"
    ),
    model_params=("weight",),
    global_params=("filter_wise",),
    min_models=2,
)
def model_stock(xs: Sequence[Tensor], base: Tensor | None, *, filter_wise: bool = False,
                weight: Sequence[float] | float = 1.0) -> Tensor:
    """Model Stock.

    With ``k = len(xs) >= 2`` and ``tau_i = x_i - base`` (flattened; with ``filter_wise``, per
    vector along the last axis, as mergekit, the whole tensor when 1-D):

        cos = mean_{i<j} <tau_i, tau_j> / (|tau_i| |tau_j|)
        t   = k cos / (1 + (k - 1) cos)
        result = t * mean_i(x_i) + (1 - t) * base

    A negative mean cosine extrapolates (``t < 0``), as mergekit does; where ``1 + (k - 1) cos`` is
    within 1e-6 of 0 (``t`` infinite) the result is the base, as is a pair involving a zero ``tau``
    (no angle: ``cos = 0``). ``weight`` is accepted, as mergekit accepts it, and plays no part: the
    method's interpolation is set by the angle alone.
    """
    k = len(xs)
    if k < 2:
        raise UserError(f"model_stock needs at least 2 models besides the base, got {k}")
    with torch.no_grad():
        taus = task_vectors(xs, base)
        rows = [t.reshape(-1, t.shape[-1]) if filter_wise and t.dim() >= 2 else t.reshape(1, -1) for t in taus]
        # unit rows; an all-zero row stays zero, so its dot products (cosines) are 0
        units = [r / torch.where(n > 0, n, 1.0)[:, None] for r, n in ((r, r.norm(dim=1)) for r in rows)]
        cos_sum = torch.zeros(units[0].shape[0], dtype=torch.float32, device=units[0].device)
        for i in range(k):
            for j in range(i + 1, k):
                cos_sum += (units[i] * units[j]).sum(dim=1)
        cos = cos_sum / (k * (k - 1) / 2)
        den = 1.0 + (k - 1) * cos
        singular = den.abs() < 1e-6
        t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, den))
        b = f32(base)
        mean = torch.stack([f32(x) for x in xs]).mean(dim=0)
        if filter_wise and b.dim() >= 2:
            t = t.reshape(b.shape[:-1] + (1,))
        else:
            t = t.reshape(())
        return t * mean + (1.0 - t) * b
