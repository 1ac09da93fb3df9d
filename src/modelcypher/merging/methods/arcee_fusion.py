"""``arcee_fusion``: take the other model's entries whose change from the base is an outlier in importance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import check_base, f32
from modelcypher.merging.methods._sphere import Blocks
from modelcypher.merging.methods._trim import magnitude_bits_, sample_bits, top_k_cuts
from modelcypher.merging.registry import register

#: Added to both softmax distributions before the divergence (keeps log p / q finite).
PROB_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(x: Tensor, b: Tensor) -> Tensor:
    """``|x - b| * KL(softmax(x) || softmax(b))``, the softmax and divergence along the last axis (one
    divergence per row, broadcast over it); probabilities offset by ``1e-8``. Non-negative: a divergence
    that rounding makes negative counts as 0."""
    p = torch.softmax(x, dim=-1) + PROB_EPS
    q = torch.softmax(b, dim=-1) + PROB_EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True).clamp_min(0.0)
    return (x - b).abs() * kl


def quartile_ranks(n: int) -> list[int]:
    """Each quartile as a rank from the top (1 = the largest): the ``floor(q (n - 1))``-th smallest
    entry (0-based) is the ``(n - floor(q (n - 1)))``-th largest."""
    return [n - int(q * (n - 1)) for q in QUARTILES]


def arcee_fusion_blocks(passes: Blocks, numel: int) -> Iterator[Tensor]:
    """:func:`arcee_fusion` on a tensor seen in blocks of rows (``passes()`` yields each block's float32
    ``([x], base)``; a row's divergence needs only its row). The quartiles of the importance are exact
    order statistics, found from its float bits as a top-k cut is (a sampled window, then a count:
    two passes, rarely four), then a last pass fuses each block."""
    with torch.no_grad():
        ks = quartile_ranks(numel)

        def bits():
            for (x,), b in passes():
                v = magnitude_bits_(importance(x, b))  # importance >= 0: bits order as values do
                yield {i: v for i in range(len(ks))}

        # samples copied: a strided view would keep every block alive
        cuts = top_k_cuts(bits, ks, numel, sample=lambda v, stride: sample_bits(v, stride).clone())
        values = []
        for k, cut in zip(ks, cuts, strict=True):
            if k >= numel:  # the smallest entry: no cut needed to keep everything, so none was made
                v = min(float(importance(x, b).min()) for (x,), b in passes())
            else:
                v = float(torch.tensor(cut.bits, dtype=torch.int32).view(torch.float32))
            values.append(v)
        q1, q2, q3 = values
        threshold = q2 + 1.5 * (q3 - q1)
        for (x,), b in passes():
            yield torch.where(importance(x, b) >= threshold, x, b)


@register(
    "arcee_fusion",
    base="required",
    paper=("Arcee Fusion (importance = |delta| x KL divergence of the rows' softmax; an outlier threshold "
           "median + 1.5 IQR); Arcee AI; 2025 (https://arcee.ai, no paper)"),
    min_models=1,
    max_models=1,
    stream=arcee_fusion_blocks,
)
def arcee_fusion(xs: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """With ``b = base`` and ``x = xs[0]``, the importance ``I = |x - b| * KL(softmax(x) || softmax(b))``
    (:func:`importance`) and its quartiles ``Q1, Q2, Q3`` over the whole tensor (the
    ``floor(q (n - 1))``-th smallest of its ``n`` entries, 0-based, no interpolation):

        result = x where I >= Q2 + 1.5 (Q3 - Q1), else b

    i.e. only the changes that are outliers by Tukey's rule are fused into the base. The quartiles are
    exact, whatever the tensor's size. The whole tensor is one block of :func:`arcee_fusion_blocks`,
    which the runner streams.
    """
    if len(xs) != 1:
        raise UserError(f"arcee_fusion needs exactly one model besides the base, got {len(xs)}")
    check_base(xs, base)
    block = ([f32(xs[0])], f32(base))
    (out,) = arcee_fusion_blocks(lambda: [block], base.numel())
    return out
