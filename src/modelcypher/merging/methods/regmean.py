"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): closed-form merge of linear layers.

For a linear map ``y = x Wᵀ`` (``nn.Linear`` weight ``W`` of shape ``[out, in]``) RegMean picks the
weight minimising ``Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²`` over every model's own inputs ``X_i``:

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,      G̃_i = α G_i + (1 − α) diag(G_i)

where ``G_i = X_iᵀ X_i / n_i`` is model i's input Gram matrix and ``α`` = ``alpha`` (default 0.9) scales
the off-diagonal entries, the paper's regularisation towards averaging (α = 0 gives a per-input-feature
weighted average; α = 1 the unregularised least-squares solution; identical Grams give the plain
average for every α). For GPT-2 ``Conv1D`` (weight
``[in, out]``, ``y = x W``) the same formula applies to ``W`` itself.

Statistic: ``gram`` — a list, one tensor per entry of ``xs``: the Gram matrix ``X_iᵀ X_i / n_tokens``
of the INPUT activations of the linear layer this weight belongs to, shape ``[in, in]``, float32
(``modelcypher.merging.statistics.input_grams`` produces exactly this, keyed by the weight's name).
Because each Gram is a per-token mean, every model counts equally whatever its probe-set size.

Layout (global ``layout``): ``"linear"`` (``[out, in]``), ``"conv1d"`` (``[in, out]``) or ``"auto"``
(default): inferred from which weight axis matches the Gram's size; a square weight is taken as
``"linear"`` (PyTorch's convention), so for GPT-2's square ``Conv1D`` (``attn.c_proj``) the runner must
pass ``layout="conv1d"`` (``modelcypher.merging.statistics.linear_layouts`` says which weight is which).

``ridge`` (default 1e-6, relative to the mean diagonal of ``Σ G̃_i``) adds a small pull towards the
plain average: input directions no model ever excites are otherwise undetermined; with it they get the
average weight and the solve stays well-posed. It changes the fit on seen directions by ~``ridge``.

Tensors that are not 2-D, or whose ``gram`` is missing (``None``: embeddings, norms, biases), are
averaged. RegMean merges full weights, and the base cancels out of the formula: the merge is a
(Gram-weighted) average of the task vectors ``tau_i = W_i - base``, added to the base. Like every average
of ``T`` task vectors it shrinks each task's own update about ``T``-fold, so ``lambda`` (default 1)
scales it, as in task arithmetic: ``base + lambda (W - base)``, which needs a ``base_model`` when
``lambda`` is not 1. With ``lambda`` 1 the base is not used.
"""

from __future__ import annotations

import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._task import scale_from_base
from modelcypher.merging.registry import register

LAYOUTS = ("auto", "linear", "conv1d")


def resolve_layout(shape: tuple[int, ...], in_features: int, layout: str, method: str) -> str:
    """``"linear"`` ([out, in]) or ``"conv1d"`` ([in, out]) for a 2-D weight of ``shape``."""
    if layout not in LAYOUTS:
        raise UserError(f"{method}: layout must be one of {LAYOUTS}, got {layout!r}")
    a, b = shape
    if layout == "auto":
        if b == in_features:
            return "linear"
        if a == in_features:
            return "conv1d"
        raise UserError(f"{method}: Gram of size {in_features} fits neither axis of a weight of shape {shape}")
    expect = b if layout == "linear" else a
    if expect != in_features:
        raise UserError(f"{method}: layout {layout!r} needs input size {expect}, but the Gram is {in_features}")
    return layout


def regmean_matrix(
    ws_in_out: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9, ridge: float = 1e-6
) -> torch.Tensor:
    """RegMean on weights given as ``[in, out]`` (``y = x W``) with Grams ``[in, in]``; returns [in, out]."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"regmean: alpha must be in [0, 1], got {alpha}")
    dt = torch.float64
    s = None
    r = None
    for w, g in zip(ws_in_out, grams, strict=True):
        g = g.to(device=w.device, dtype=dt)
        g = alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g))
        gw = g @ w.to(dt)
        s = g if s is None else s + g
        r = gw if r is None else r + gw
    scale = float(torch.diagonal(s).mean()) if s.numel() else 0.0
    eps = ridge * scale if scale > 0 else 1.0
    avg = torch.stack([w.to(dt) for w in ws_in_out]).mean(0)
    s = s + eps * torch.eye(s.shape[0], dtype=dt, device=s.device)
    r = r + eps * avg
    return torch.linalg.solve(s, r).to(torch.float32)


@register(
    "regmean",
    paper="Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean, arXiv 2212.09849)",
    base="optional",
    global_params=("alpha", "ridge", "layout", "lambda"),
    stats=("gram",),
)
def regmean(xs, base=None, *, gram=None, alpha: float = 0.9, ridge: float = 1e-6, layout: str = "auto",
            lambda_: float = 1.0, base_gram=None):
    return scale_from_base(_regmean(xs, gram, alpha, ridge, layout), base, lambda_, "regmean")


def _regmean(xs, gram, alpha: float, ridge: float, layout: str) -> torch.Tensor:
    xs = [x.float() for x in xs]
    if xs[0].dim() != 2 or gram is None or any(g is None for g in gram):
        return torch.stack(xs).mean(0)
    if len(gram) != len(xs):
        raise UserError(f"regmean: {len(gram)} Gram matrices for {len(xs)} models")
    d = gram[0].shape[0]
    for g in gram:
        if g.dim() != 2 or g.shape != (d, d):
            raise UserError(f"regmean: Gram matrices must all be square [in, in]; got {tuple(g.shape)}")
    lay = resolve_layout(tuple(xs[0].shape), d, layout, "regmean")
    ws = [x.T for x in xs] if lay == "linear" else xs
    merged = regmean_matrix(ws, gram, float(alpha), float(ridge))
    return merged.T.contiguous() if lay == "linear" else merged
