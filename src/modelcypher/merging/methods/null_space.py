"""Null-space filtering (in the spirit of MINGLE, arXiv 2509.21413): interference removed by construction.

Each task vector ``τ_i = x_i − base`` of a linear weight is restricted, on its INPUT side, to the null
space of the activations of the other tasks (``reference="others"``, default) or of the base model
(``reference="base"``), then the filtered task vectors are summed:

    merged = base + lambda · Σ_i τ_i P_i,      P_i = I − V_i V_iᵀ

(``[out, in]`` orientation), where ``V_i`` are the eigenvectors of the reference Gram
``Σ_{j≠i} G_j`` (or ``G_base``) whose eigenvalue is at least ``rank_threshold`` times the largest
(default 1e-4 on Gram eigenvalues, i.e. activation singular values ≥ 1 % of the largest). For any input
``x`` in the span the other tasks excite, ``τ_i P_i x = 0``: task i's update does not move the outputs
the other tasks rely on, so the updates can be summed rather than averaged. The price is the part of
``τ_i`` that acts on shared input directions; ``null_space_project`` reports the share kept,
``‖τ_i P_i‖_F² / ‖τ_i‖_F²`` (an energy fraction: kept + removed = 1, since ``P_i`` is an orthogonal
projector).

Statistic: ``gram`` — a list, one tensor per entry of ``xs``: the Gram ``X_iᵀ X_i / n_tokens`` of the
INPUT activations of the linear layer this weight belongs to, ``[in, in]`` float32 (as produced by
``modelcypher.merging.statistics.input_grams``). With ``reference="base"`` the runner must also pass
``base_gram`` (the base model's Gram for this weight, ``[in, in]``); the ``gram`` list is then unused.

Layout: ``"auto"`` (default; inferred from the Gram size, a square weight taken as ``nn.Linear``
``[out, in]``), ``"linear"`` or ``"conv1d"`` (GPT-2 ``Conv1D`` ``[in, out]``, filtered as ``P_i τ_i``).

Tensors that are not 2-D, or without Grams, get ``base + lambda · mean_i τ_i`` (task arithmetic with 1/T).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._task import mean_update
from modelcypher.merging.methods.regmean import resolve_layout
from modelcypher.merging.registry import register

REFERENCES = ("others", "base")


def occupied_basis(gram: torch.Tensor, rank_threshold: float) -> torch.Tensor:
    """Orthonormal basis ``[in, r]`` of the directions a Gram excites (eigenvalue ≥ threshold · max)."""
    g = gram.double() if gram.device.type == "cpu" else gram.float()
    g = 0.5 * (g + g.T)
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals[-1]) if evals.numel() else 0.0
    if top <= 0:
        return evecs[:, :0]
    return evecs[:, evals >= rank_threshold * top]


def null_space_project(
    tau: torch.Tensor,
    other_grams: torch.Tensor | Sequence[torch.Tensor],
    rank_threshold: float = 1e-4,
) -> tuple[torch.Tensor, float]:
    """Project ``tau`` (``[out, in]``) onto the null space of the summed ``other_grams`` (``[in, in]``).

    Returns ``(tau @ (I − V Vᵀ), kept)`` with ``kept = ‖projected‖_F² / ‖tau‖_F²`` (1.0 for a zero tau
    or when there is no other Gram). For a Conv1D weight ``[in, out]`` pass ``tau.T`` and transpose back.
    """
    if not 0.0 < rank_threshold <= 1.0:
        raise UserError(f"null_space: rank_threshold must be in (0, 1], got {rank_threshold}")
    if isinstance(other_grams, torch.Tensor):
        other_grams = [other_grams]
    grams = [g for g in other_grams if g is not None]
    tau32 = tau.float()
    if not grams:
        return tau32.clone(), 1.0
    total = sum(g.to(device=tau.device, dtype=torch.float64 if tau.device.type == "cpu" else torch.float32)
                for g in grams)
    if total.shape != (tau.shape[1], tau.shape[1]):
        raise UserError(f"null_space: Gram of shape {tuple(total.shape)} for a task matrix of shape "
                        f"{tuple(tau.shape)} ([out, in] expected)")
    v = occupied_basis(total, rank_threshold)
    t = tau.to(v.dtype)
    projected = t - (t @ v) @ v.T
    before = float(t.pow(2).sum())
    kept = float(projected.pow(2).sum()) / before if before > 0 else 1.0
    return projected.to(torch.float32), kept


def _references(n: int, gram, base_gram, reference: str) -> list[list[torch.Tensor]]:
    if reference not in REFERENCES:
        raise UserError(f"null_space: reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "base":
        if base_gram is None:
            raise UserError("null_space: reference='base' needs the base model's Gram (base_gram)")
        return [[base_gram] for _ in range(n)]
    return [[g for j, g in enumerate(gram) if j != i] for i in range(n)]


def null_space_filter(
    xs, base, gram=None, *, rank_threshold: float = 1e-4, reference: str = "others",
    layout: str = "auto", base_gram=None,
) -> tuple[list[torch.Tensor], list[float]]:
    """The filtered task vectors (in the weight's own layout) and the kept energy fraction of each.

    For the runner's report: call with the same arguments as the method to get each model's kept share
    for this weight.
    """
    b = base.float()
    taus = [x.float() - b for x in xs]
    refs = _references(len(xs), gram, base_gram, reference)
    in_features = (base_gram if reference == "base" else gram[0]).shape[0]
    lay = resolve_layout(tuple(b.shape), in_features, layout, "null_space")
    out, kept = [], []
    for tau, ref in zip(taus, refs, strict=True):
        t = tau if lay == "linear" else tau.T
        p, k = null_space_project(t, ref, rank_threshold)
        out.append(p if lay == "linear" else p.T.contiguous())
        kept.append(k)
    return out, kept


@register(
    "null_space",
    base="required",
    paper="Null-space filtering of task vectors (after MINGLE, arXiv 2509.21413)",
    global_params=("lambda", "rank_threshold", "reference", "layout"),
    stats=("gram",),
    reports=True,
)
def null_space(
    xs, base, *, gram=None, lambda_: float = 1.0, rank_threshold: float = 1e-4, reference: str = "others",
    layout: str = "auto", base_gram=None, report: dict | None = None,
):
    if reference not in REFERENCES:
        raise UserError(f"null_space: reference must be one of {REFERENCES}, got {reference!r}")
    b = base.float()
    grams_given = gram is not None and all(g is not None for g in gram)
    if reference == "base" and base_gram is None and grams_given and b.dim() == 2:
        raise UserError("null_space: reference='base' needs the base model's Gram (base_gram) for this weight")
    have = base_gram is not None if reference == "base" else grams_given
    if b.dim() != 2 or not have:
        return mean_update(xs, base, lambda_)
    filtered, kept = null_space_filter(
        xs, base, gram, rank_threshold=float(rank_threshold), reference=reference, layout=layout,
        base_gram=base_gram,
    )
    if report is not None:
        report["kept"] = [float(k) for k in kept]
    return b + float(lambda_) * torch.stack(filtered).sum(0)
