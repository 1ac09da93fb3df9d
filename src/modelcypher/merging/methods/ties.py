"""``ties``: TIES-Merging (trim, elect sign, disjoint merge)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._consensus import trimmed_merge
from modelcypher.merging.methods._inputs import check_shapes, f32, fractions, per_model
from modelcypher.merging.methods._trim import (
    tau_high_counts,
    tau_low_counts,
    tau_sample,
    tau_window,
    top_count,
    top_k_cuts,
)
from modelcypher.merging.registry import register

TIES_PAPER = (
    "TIES-Merging: Resolving Interference When Merging Models; Yadav, Tam, Choshen, Raffel, Bansal; "
    "2023 (NeurIPS 2023); arXiv:2306.01708"
)

Blocks = Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]]


def ties_blocks(
    passes: Blocks, numel: int, *, weight: Sequence[float], density: Sequence[float],
    normalize: bool = True, lambda_: float = 1.0, int8_mask: bool = False,
) -> Iterator[Tensor]:
    """TIES on a tensor of ``numel`` entries seen in blocks of rows: ``passes()`` yields each block's
    ``(xs, base)`` in order, once per call (float32, or as stored: the arithmetic is float32's);
    ``weight`` and ``density`` hold one value per model. Yields the result block by block (float32).

    The trim keeps a whole-tensor top-k, so its cut is found first, in two passes (:func:`top_k_cuts`:
    a sample, then a count around the sampled window); elect and disjoint merge are elementwise, done
    in a third pass. Memory: a
    few blocks, whatever the tensor's size; the result does not depend on how rows are blocked.
    """
    n = len(weight)
    with torch.no_grad():
        w = per_model(weight, n, "weight")
        dens = fractions(density, n, "density")
        ks = [top_count(d, numel) for d in dens]
        ranked = [i for i, k in enumerate(ks) if 0 < k < numel]
        # 1-2. trim: the cut of each task vector tau_i = x_i - base, from the bits of |tau_i|
        cuts = top_k_cuts(lambda: ({i: (xs[i], b) for i in ranked} for xs, b in passes()), ks, numel,
                          sample=lambda xb, stride: tau_sample(*xb, stride),
                          window=lambda xb, lo, hi: tau_window(*xb, lo, hi),
                          high=lambda xb: tau_high_counts(*xb), low=lambda xb, bucket: tau_low_counts(*xb, bucket))
        # c_i = w_i d_i; 3-4. elect, disjoint merge, then base + lambda * tau
        ties_seen = [0] * n
        for xs, b in passes():
            yield trimmed_merge(xs, b, cuts, ties_seen, w, normalize, lambda_)


@register(
    "ties",
    base="required",
    paper=TIES_PAPER,
    model_params=("weight", "density"),
    global_params=("normalize", "lambda", "int8_mask"),
    stream=ties_blocks,
    raw=True,
    inert={"rescale": (False, "mergekit's L1 rescaling after a magnitude trim is not done here")},
)
def ties(
    xs: Sequence[Tensor], base: Tensor | None, *, weight: Sequence[float] | float = 1.0,
    density: Sequence[float] | float = 1.0, normalize: bool = True, lambda_: float = 1.0, int8_mask: bool = False,
) -> Tensor:
    """TIES-Merging.

    1. trim: ``tau_i = x_i - base``; ``d_i`` keeps the ``int(density_i * n)`` largest-magnitude
       entries of ``tau_i`` (at least one for a positive density, all at density 1, as mergekit;
       whole tensor; equal magnitudes: smaller flat index first), zeros the rest;
    2. elect: ``c_i = w_i d_i``, ``s = sign(sum_i c_i)`` per element;
    3. disjoint merge: ``A = {i : c_i * s > 0}``; ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` if
       ``normalize`` (default True) else ``sum_{i in A} c_i``; 0 where ``A`` is empty;
    4. ``result = base + lambda_ * tau``.

    Defaults: ``weight`` 1, ``density`` 1 (keep all), ``lambda_`` 1. The whole tensor is one block
    of :func:`ties_blocks`, which the runner streams.
    """
    if base is None:
        raise UserError("ties needs a base_model")
    check_shapes([base, *xs])
    block = ([f32(x) for x in xs], f32(base))
    (out,) = ties_blocks(lambda: [block], base.numel(), weight=per_model(weight, len(xs), "weight"),
                         density=per_model(density, len(xs), "density"), normalize=normalize, lambda_=lambda_)
    return out
