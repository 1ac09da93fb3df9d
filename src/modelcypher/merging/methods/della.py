"""``della``: DELLA-Merging (MagPrune, then TIES sign election and disjoint merge).

MagPrune each task vector as ``della_linear``; then with ``c_i = w_i d_i``, ``s = sign(sum_i c_i)``,
``A = {i : c_i * s > 0}``, ``tau = sum_{i in A} c_i / sum_{i in A} w_i`` (``normalize``, default True,
as mergekit) or the bare sum; ``result = base + lambda_ * tau``. Other parameters as ``della_linear``.
"""

from __future__ import annotations

from functools import partial

from modelcypher.merging.methods.della_linear import DELLA, della_linear
from modelcypher.merging.registry import register

della = register("della", **DELLA)(partial(della_linear, how="elect", normalize=True))
