"""Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959).

For a 2-D parameter, the task arithmetic sum ``Δ = Σ_i (x_i - base)`` is decomposed, ``Δ = U S Vᵀ``,
and its spectrum flattened: every singular value is replaced by their mean ``σ̄``, giving
``Δ_iso = σ̄ U Vᵀ``; the result is ``base + lambda · Δ_iso``. A few large singular directions, shared
by the tasks, dominate the sum; flattening lifts the many weaker directions that carry each task's own
update, so no task is left underrepresented. Tensors that are not 2-D (biases, norms) get
``base + lambda · mean_i (x_i - base)``, as in the paper.

The mean runs over the numerical rank of ``Δ`` only (singular values above ``1e-6 · σ_max``): on full-
rank sums (any real fine-tune) that is every singular value, as in the paper; on an exactly low-rank sum
the zero singular values have arbitrary singular vectors, which would otherwise be added to the merge.
As in TSV-M, task matrices up to 4M entries are formed and decomposed in float64 on CPU.
"""

from __future__ import annotations

import torch

from modelcypher.merging.methods._task import mean_update
from modelcypher.merging.methods.tsv import NEGLIGIBLE, svd_dtype
from modelcypher.merging.registry import register


def isotropic(delta: torch.Tensor) -> torch.Tensor:
    """``σ̄ U Vᵀ`` of a 2-D matrix: its singular values all replaced by their mean (over its rank)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(delta)
    r = int((s > NEGLIGIBLE * s[0]).sum())
    return s[:r].mean() * (u[:, :r] @ vh[:r])


@register(
    "iso_c",
    base="required",
    paper="No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
          "(Iso-C; Marczak et al., ICML 2025, arXiv 2502.04959)",
    global_params=("lambda",),
)
def iso_c(xs, base, *, lambda_: float = 1.0):
    b = base.float()
    if b.dim() != 2:
        return mean_update(xs, base, lambda_)
    dt = svd_dtype(b)
    bd = base.to(dt)
    delta = sum(x.to(dt) - bd for x in xs)
    return b + float(lambda_) * isotropic(delta).to(torch.float32)
