"""Alignment: find the symmetry transforms that bring model B onto model A, and apply them exactly.

- ``pipeline``: checkpoints on disk: read lazily, match (``MATCHERS``: weight | activation | learned, one
  signature, settings in ``modelcypher.options.AlignOptions``), write streamed, prove, rename;
- ``prealign``: a merge config's ``align:`` section, carried out before the merge is planned;
- ``transform``: the ``Alignment`` (one transform per symmetry group) and ``apply`` / ``fold_norms``;
- ``weight_matching``: data-free Git Re-Basin coordinate descent (``match_weights``);
- ``activation_matching``: the same solves from activation statistics (``match_activations``);
- ``learned_matching``: weight matching's rotations refined on the midpoint's loss (``match_learned``), and
  a universe's on Dirichlet mixtures (``refine_universe``);
- ``universe``: N models onto a shared universe, cycle-consistent (``match_universe``);
- ``lift``: a narrower model into a wider one's widths, the same function (``lift_state``);
- ``equivalence``: the proof that an aligned checkpoint computes the same function (``check_equivalent``);
- ``solvers``: the exact per-group solvers (``solve_lap``, ``procrustes``, ...); ``rope``: rotary pairs.

The symmetry groups of each family are data, in ``modelcypher.arch.symmetry``.
"""

from modelcypher.align.activation_matching import match_activations
from modelcypher.align.equivalence import NotEquivalentError, apply_verified, check_equivalent
from modelcypher.align.learned_matching import match_learned, refine_universe
from modelcypher.align.lift import lift_state
from modelcypher.align.transform import Alignment, apply, compose, fold_norms, invert, random_alignment
from modelcypher.align.universe import match_universe
from modelcypher.align.weight_matching import match_weights

__all__ = [
    "Alignment",
    "NotEquivalentError",
    "apply",
    "apply_verified",
    "check_equivalent",
    "compose",
    "fold_norms",
    "invert",
    "lift_state",
    "match_activations",
    "match_learned",
    "match_universe",
    "match_weights",
    "random_alignment",
    "refine_universe",
]
