"""Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832), diagonal Fisher.

    merged = Σ_i w_i (F_i + ε) ⊙ x_i  /  Σ_i w_i (F_i + ε)

element-wise, where ``F_i`` is model i's diagonal Fisher for this parameter (same shape as the
parameter; see ``modelcypher.merging.statistics.fisher_diagonal``: the empirical Fisher, the mean over
sequences of the squared gradient of the model's mean token log-likelihood on its own data), ``w_i``
the per-model ``weight`` (default 1) and ``ε`` = ``epsilon`` (default 1e-8) a floor that keeps the
ratio defined where every Fisher vanishes (there the merge falls back to the weight-averaged
parameters). With equal Fishers the result is the (weighted) average; a model whose Fisher is much
larger on an entry dominates that entry.

``normalize=True`` divides each model's Fisher by its mean over this tensor first, so that only the
pattern of importance within the tensor counts, not differences in overall scale between models
(e.g. from different probe-set sizes or loss scales).

Statistic: ``fisher`` — a list, one tensor per entry of ``xs``, each of the parameter's shape
(float32, ≥ 0). Entries may be ``None`` for tensors without a Fisher (buffers); if any is ``None``
the method falls back to the weighted average for that tensor.

Works on full parameters: the base cancels out (the merge is a Fisher-weighted average of the task
vectors, added to the base). ``lambda`` (default 1) scales it from the base as in task arithmetic,
``base + lambda (merged - base)``, which needs a ``base_model`` when it is not 1: an average of ``T``
task vectors shrinks each task's update about ``T``-fold. With ``lambda`` 1 the base is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import per_model
from modelcypher.merging.methods._task import scale_from_base
from modelcypher.merging.registry import register


@register(
    "fisher",
    base="optional",
    paper="Merging Models with Fisher-Weighted Averaging (arXiv 2111.09832)",
    model_params=("weight",),
    global_params=("epsilon", "normalize", "lambda"),
    stats=("fisher",),
)
def fisher(xs, base=None, *, fisher=None, weight: Sequence[float] | float = 1.0, epsilon: float = 1e-8,
           normalize: bool = False, lambda_: float = 1.0, base_fisher=None):
    return scale_from_base(_fisher(xs, fisher, weight, epsilon, normalize), base, lambda_, "fisher")


def _fisher(xs, fisher, weight, epsilon: float, normalize: bool) -> torch.Tensor:
    n = len(xs)
    w = per_model(weight, n, "weight")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise UserError(f"fisher: weights must be non-negative and not all zero, got {w}")
    xs = [x.float() for x in xs]
    if fisher is None or any(f is None for f in fisher):
        return sum(wi * x for wi, x in zip(w, xs, strict=True)) / sum(w)
    if len(fisher) != n:
        raise UserError(f"fisher: {len(fisher)} Fisher tensors for {n} models")
    num = torch.zeros_like(xs[0])
    den = torch.zeros_like(xs[0])
    for wi, x, f in zip(w, xs, fisher, strict=True):
        f = f.float().to(x.device)
        if f.shape != x.shape:
            raise UserError(f"fisher: Fisher of shape {tuple(f.shape)} for a parameter of shape {tuple(x.shape)}")
        if normalize:
            mean = f.mean()
            f = f / mean if mean > 0 else f
        fw = wi * (f + epsilon)
        num += fw * x
        den += fw
    return num / den
