"""``sce``: Select, Calculate, Erase (select high-variance entries, weight models by energy, erase sign conflicts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._sparsify import check_fraction, f32, task_vectors, topk_magnitude_mask
from modelcypher.merging.registry import register


def select(taus: Tensor, select_topk: float) -> Tensor:
    """Select: a mask (one for all models) of the ``floor(select_topk * m)`` entries whose task vectors
    vary most across the models (population variance over the first axis of ``taus``; ``m`` the
    number of entries with a nonzero variance; equal variances: smaller flat index first)."""
    var = taus.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k <= 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return topk_magnitude_mask(var, k)


@register(
    "sce",
    base="required",
    paper=("FuseChat: Knowledge Fusion of Chat Models (SCE: Select, Calculate, Erase); Wan, Zhong, Yang, Chen, "
           "Quan, Bi, Shi; 2024; arXiv:2408.07990"),
    global_params=("select_topk", "int8_mask"),
)
def sce(xs: Sequence[Tensor], base: Tensor | None, *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE on the task vectors ``tau_i = x_i - base``:

    1. select: when ``select_topk < 1`` (default 1: keep all), zero every ``tau_i`` outside the
       ``floor(select_topk * m)`` entries of largest variance across the models (:func:`select`);
    2. calculate: ``w_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` (equal weights when every ``tau`` is 0);
    3. erase: the elected sign is ``s = +1`` where ``sum_i tau_i >= 0``, else ``-1``; model i counts
       where ``sign(tau_i) = s`` (zeros never count);
    4. ``result = base + sum_{i counts} w_i tau_i / sum_{i counts} w_i`` (the base where nobody counts).

    ``int8_mask`` (a storage option for masks elsewhere) changes nothing here; it is accepted so that
    such configs run. The whole tensor is computed at once (the selection is a whole-tensor top-k).
    """
    if base is None:
        raise UserError("sce needs a base_model")
    check_fraction([select_topk], "select_topk")
    with torch.no_grad():
        taus = torch.stack(task_vectors(xs, base))
        if select_topk < 1.0:
            taus.mul_(select(taus, select_topk))
        energy = taus.square().reshape(len(xs), -1).mean(dim=1, dtype=torch.float64)
        total = float(energy.sum())
        w = (energy / total if total > 0 else torch.full_like(energy, 1.0 / len(xs))).to(torch.float32)
        elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
        counts = (taus.sign() == elected).to(torch.float32) * w.reshape((-1,) + (1,) * (taus.dim() - 1))
        num = (taus * counts).sum(dim=0)
        den = counts.sum(dim=0)
        return f32(base) + num / torch.where(den > 0, den, 1.0)
