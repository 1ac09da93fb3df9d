"""``breadcrumbs_ties``: Model Breadcrumbs masks, then TIES sign election and disjoint merge.

``result = base + lambda_ * tau`` with, for the masked ``c_i = w_i d_i``, ``s = sign(sum_i c_i)``,
``A = {i : c_i * s > 0}``, ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` (``normalize``) or the bare
sum (default, as mergekit). Parameters and masks as ``breadcrumbs``.
"""

from __future__ import annotations

from functools import partial

from modelcypher.merging.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_PAPER, breadcrumbs
from modelcypher.merging.methods.ties import TIES_PAPER
from modelcypher.merging.registry import register

breadcrumbs_ties = register(
    "breadcrumbs_ties", paper=f"{BREADCRUMBS_PAPER}. Sign election and disjoint merge from {TIES_PAPER}",
    **BREADCRUMBS,
)(partial(breadcrumbs, how="elect"))
