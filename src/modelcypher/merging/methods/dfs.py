"""``dfs``: inverse-variance importance weighting across models (the design doc's "DFS")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import as_rows, check_shapes, f32, per_model
from modelcypher.merging.methods._task import task_vectors
from modelcypher.merging.registry import register


@register(
    "dfs",
    rowwise=True,
    base="optional",
    paper=(
        "Inverse-variance weighting (classical; e.g. W. G. Cochran, 'The combination of estimates from "
        "different experiments', Biometrics 10:101-129, 1954; no arXiv id). Named DFS in the ModelCypher "
        "design doc; NOT the data-flow-space (DFS) layer routing of Akiba, Shing, Tang, Sun, Ha, "
        "'Evolutionary Optimization of Model Merging Recipes', 2024, arXiv:2403.13187"
    ),
    model_params=("weight",),
    global_params=("eps",),
)
def dfs(
    xs: Sequence[Tensor], base: Tensor | None = None, *, weight: Sequence[float] | float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """Inverse-variance weighting, per output row (row = first dimension; whole tensor when 1-D).

    ``tau_i = x_i - base`` with a base, else ``tau_i = x_i - mean_j x_j`` (unweighted consensus).
    For row ``r``: ``v_{i,r}`` = population variance of ``tau_i``'s row ``r`` over its elements,
    ``s_r = mean_i v_{i,r}``, ``sigma2_{i,r} = v_{i,r} + eps * s_r`` and importance
    ``w_{i,r} = weight_i / sigma2_{i,r}`` (all ``sigma2`` taken equal when ``s_r = 0``, i.e. every
    deviation in the row is zero). Then

        no base:   row_r = sum_i w_{i,r} x_{i,r} / sum_i w_{i,r}
        with base: row_r = base_r + sum_i w_{i,r} tau_{i,r} / sum_i w_{i,r}

    ``eps`` (default 1e-6) is RELATIVE to the row's mean delta variance, so the result does not
    depend on the deltas' scale: bf16 checkpoints' deltas have variances anywhere from ~1e-12 to
    ~1e-4, so any absolute floor would either swamp small fine-tunes or vanish for large ones. At
    1e-6 it changes no real variance measurably, while a model whose row is (nearly) unchanged gets
    a finite importance at most ~1e6 times the others' (it still takes > 99.9% of the weight),
    keeping the float32 coefficients well conditioned.
    """
    k = len(xs)
    w = per_model(weight, k, "weight")
    check_shapes(xs)
    if not eps > 0.0:
        raise UserError(f"dfs: eps must be > 0, got {eps}")
    with torch.no_grad():
        xs32 = [f32(x) for x in xs]
        if base is not None:
            taus = task_vectors(xs, base)
        else:
            mean = torch.stack(xs32).mean(dim=0)
            taus = [x - mean for x in xs32]
        v = torch.stack([as_rows(t).var(dim=1, unbiased=False) for t in taus])  # [k, R]
        s = v.mean(dim=0)
        # sigma2 / s_r = v / s_r + eps: dimensionless, in [eps, k + eps], so the importances
        # (at most ~weight / eps) stay well inside float32 range.
        rel = torch.where(s > 0, v / torch.where(s > 0, s, 1.0) + eps, 1.0)
        imp = torch.tensor(w, dtype=torch.float32, device=v.device)[:, None] / rel
        tot = imp.sum(dim=0)
        if bool((tot == 0).any()):
            raise UserError("dfs: the models' weights cancel (importances sum to zero)")
        coef = imp / tot  # [k, R]
        terms = taus if base is not None else xs32
        shape = (-1,) + (1,) * (terms[0].dim() - 1) if terms[0].dim() >= 2 else ()
        out = torch.zeros_like(terms[0]) if base is None else f32(base).clone()
        for c, term in zip(coef, terms, strict=True):
            out += c.reshape(shape) * term
        return out
