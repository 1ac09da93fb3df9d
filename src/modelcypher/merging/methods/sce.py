"""``sce``: Select, Calculate, Erase (select high-variance entries, weight models by energy, erase sign conflicts)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_base, f32, fractions
from modelcypher.merging.methods._sphere import Blocks
from modelcypher.merging.methods._trim import KEEP_ALL, KEEP_NONE, cut_mask_, magnitude_bits_, sample_bits, top_k_cuts
from modelcypher.merging.registry import register


def _taus(xs: Sequence[Tensor], base: Tensor) -> Tensor:
    b = f32(base)
    return torch.stack([f32(x) - b for x in xs])


def _variance_bits(taus: Tensor) -> Tensor:
    """The float bits of each entry's population variance across the models (ordered as the values)."""
    return magnitude_bits_(taus.var(dim=0, unbiased=False))


def sce_blocks(passes: Blocks, numel: int, *, select_topk: float, int8_mask: bool) -> Iterator[Tensor]:
    """:func:`sce` on a tensor seen in blocks of rows (``passes()`` yields each block's float32
    ``(xs, base)``). Select is a whole-tensor top-k of the variance: a pass counts the entries of
    nonzero variance, two more find the cut (as TIES's trim does); a pass sums each model's energy,
    a last one erases and merges each block. Memory: a few blocks."""
    fractions(select_topk, 1, "select_topk")
    with torch.no_grad():
        cut = KEEP_ALL
        if select_topk < 1.0:
            nonzero = sum(int(torch.count_nonzero(_taus(xs, b).var(dim=0, unbiased=False))) for xs, b in passes())
            k = int(nonzero * select_topk)
            cut = KEEP_NONE if k <= 0 else top_k_cuts(
                lambda: ({0: _variance_bits(_taus(xs, b))} for xs, b in passes()), [k], numel,
                sample=lambda v, stride: sample_bits(v, stride).clone())[0]

        def selected(xs: Sequence[Tensor], b: Tensor, seen: int) -> tuple[Tensor, int]:
            """The block's task vectors, zero outside the selection (equal variances: flat order)."""
            taus = _taus(xs, b)
            if cut is KEEP_ALL:
                return taus, seen
            mask, seen = cut_mask_(_variance_bits(taus), cut, seen)
            return taus * (mask != 0), seen

        n_models, seen, energy = None, 0, 0.0
        for xs, b in passes():
            taus, seen = selected(xs, b, seen)
            n_models = len(xs)
            energy = energy + taus.square().reshape(n_models, -1).sum(dim=1, dtype=torch.float64)
        total = float(energy.sum())
        w = energy / total if total > 0 else torch.full_like(energy, 1.0 / n_models)
        w = w.to(torch.float32)
        seen = 0
        for xs, b in passes():
            taus, seen = selected(xs, b, seen)
            elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
            counts = (taus.sign() == elected).to(torch.float32) * w.reshape((-1,) + (1,) * (taus.dim() - 1))
            den = counts.sum(dim=0)
            yield f32(b) + (taus * counts).sum(dim=0) / torch.where(den > 0, den, 1.0)


@register(
    "sce",
    base="required",
    paper=("FuseChat: Knowledge Fusion of Chat Models (SCE: Select, Calculate, Erase); Wan, Zhong, Yang, Chen, Quan; "
           "2024; arXiv:2408.07990"),
    global_params=("select_topk", "int8_mask"),
    stream=sce_blocks,
)
def sce(xs: Sequence[Tensor], base: Tensor | None, *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE on the task vectors ``tau_i = x_i - base``:

    1. select: when ``select_topk < 1`` (default 1: keep all), zero every ``tau_i`` outside the
       ``floor(select_topk * m)`` entries of largest population variance across the models (``m``: the
       number of entries with a nonzero variance; equal variances: smaller flat index first);
    2. calculate: ``w_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` (equal weights when every ``tau`` is 0);
    3. erase: the elected sign is ``s = +1`` where ``sum_i tau_i >= 0``, else ``-1``; model i counts
       where ``sign(tau_i) = s`` (zeros never count);
    4. ``result = base + sum_{i counts} w_i tau_i / sum_{i counts} w_i`` (the base where nobody counts).

    ``int8_mask`` (a storage option for masks elsewhere) changes nothing here; it is accepted so that
    such configs run. The whole tensor is one block of :func:`sce_blocks`, which the runner streams.
    """
    if base is None:
        raise UserError("sce needs a base_model")
    check_base(xs, base)
    block = ([f32(x) for x in xs], f32(base))
    (out,) = sce_blocks(lambda: [block], base.numel(), select_topk=select_topk, int8_mask=int8_mask)
    return out
