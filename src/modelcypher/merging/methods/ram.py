"""``ram``: Reinforced Agent Merging (average the shared updates, keep the unique ones whole)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.merging.methods._inputs import check_base, f32
from modelcypher.merging.methods._sphere import Blocks
from modelcypher.merging.registry import register

RAM_PAPER = "Behavior Knowledge Merge in Reinforced Agentic Models (RAM); 2026; arXiv:2601.13572"


def _updates(xs: Sequence[Tensor], base: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(tau, updated, count)``: the task vectors stacked, where each is updated (``|tau_i| > epsilon``),
    and how many models update each entry."""
    b = f32(base)
    tau = torch.stack([f32(x) - b for x in xs])
    updated = tau.abs() > epsilon
    return tau, updated, updated.sum(dim=0)


def ram_merge_blocks(passes: Blocks, *, r: float, alpha: float, epsilon: float) -> Iterator[Tensor]:
    """RAM+ (``r > 0``) or RAM (``r = 0``: one pass) over a tensor's row blocks (``passes()`` yields each
    block's float32 ``(xs, base)``). RAM+ first counts, per model, the entries it shares with another
    model and those only it updates (whole tensor), then merges each block."""
    with torch.no_grad():
        lam = None
        if r != 0.0:
            shared = unique = 0
            for xs, base in passes():
                _, updated, count = _updates(xs, base, epsilon)
                dims = tuple(range(1, updated.dim()))
                shared = shared + (updated & (count > 1)).sum(dim=dims, dtype=torch.float64)
                unique = unique + (updated & (count == 1)).sum(dim=dims, dtype=torch.float64)
            rho = shared / unique.clamp_min(epsilon)
            lam = 1.0 + r * rho.clamp(0.0, alpha)
        for xs, base in passes():
            tau, updated, count = _updates(xs, base, epsilon)
            tau = tau * updated
            lone = count == 1
            if lam is not None:
                tau_lone = (tau * lam.to(torch.float32).reshape((-1,) + (1,) * (tau.dim() - 1))).sum(dim=0)
            else:
                tau_lone = tau.sum(dim=0)
            shared_mean = tau.sum(dim=0) / count.clamp_min(1)
            yield f32(base) + torch.where(lone, tau_lone, torch.where(count > 1, shared_mean, 0.0))


def ram_blocks(passes: Blocks, numel: int, *, epsilon: float) -> Iterator[Tensor]:
    return ram_merge_blocks(passes, r=0.0, alpha=0.0, epsilon=epsilon)


@register("ram", base="required", paper=RAM_PAPER, global_params=("epsilon",), stream=ram_blocks)
def ram(xs: Sequence[Tensor], base: Tensor | None, *, epsilon: float = 1e-5) -> Tensor:
    """RAM on the task vectors ``tau_i = x_i - base``: an entry counts as updated by model i where
    ``|tau_i| > epsilon`` (default ``1e-5``); with ``n`` the number of models updating it,

        result = base + tau_i            where only model i updates it (n = 1; the update is kept whole),
                 base + mean of the n updating models' tau    where n > 1 (shared updates averaged),
                 base                                          where none does.

    Averaging every model (as task arithmetic does) would dilute the sparse, disjoint updates of
    reinforcement-learned models by the number of models. Elementwise; streamed in row blocks.
    """
    check_base(xs, base)
    (out,) = ram_blocks(lambda: [([f32(x) for x in xs], f32(base))], base.numel(), epsilon=epsilon)
    return out
