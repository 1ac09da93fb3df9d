"""``ramplus_tl``: RAM+ with its overlap ratios counted per tensor (tensor-local)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

from modelcypher.merging.methods._inputs import check_base, f32
from modelcypher.merging.methods._sphere import Blocks
from modelcypher.merging.methods.ram import RAM_PAPER, ram_merge_blocks
from modelcypher.merging.registry import register


def ramplus_tl_blocks(passes: Blocks, numel: int, *, r: float, alpha: float, epsilon: float) -> Iterator[Tensor]:
    return ram_merge_blocks(passes, r=r, alpha=alpha, epsilon=epsilon)


@register("ramplus_tl", base="required", paper=RAM_PAPER, global_params=("r", "alpha", "epsilon"),
          stream=ramplus_tl_blocks)
def ramplus_tl(xs: Sequence[Tensor], base: Tensor | None, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM+ (:func:`~modelcypher.merging.methods.ram.ram`, with the unique updates rescaled), its ratios
    counted over this tensor. Per model i, over the tensor's entries it updates (``|tau_i| > epsilon``):

        rho_i    = #(entries i shares with another model) / max(#(entries only i updates), epsilon)
        lambda_i = 1 + r * clamp(rho_i, 0, alpha)

    and an entry only model i updates gets ``base + lambda_i tau_i``; shared entries get the mean of
    the updating models' ``tau``, as in RAM. Defaults: ``r`` 0.1, ``alpha`` 0.2, ``epsilon`` 1e-5. The
    more a model's updates overlap others', the more its unique ones are boosted, countering their
    dilution. Streamed: one pass counts, a second merges.
    """
    check_base(xs, base)
    (out,) = ramplus_tl_blocks(lambda: [([f32(x) for x in xs], f32(base))], base.numel(), r=r, alpha=alpha,
                               epsilon=epsilon)
    return out
