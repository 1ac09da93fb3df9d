"""Function-preserving symmetries of each supported family, described as data.

A :class:`SymmetrySpec` lists symmetry *groups*. Each group acts on a space of *units* (MLP hidden
units, attention heads, the residual stream) and names every (tensor, axis) pair that carries those
units as a :class:`Slot`. One algorithm per task then serves every family: ``align.transform.apply``
applies a transform to the slots, ``align.weight_matching`` builds its cost matrices from the same slots.

Group kinds and the transform each one takes (see ``align.transform.Alignment``):

- ``perm``: a permutation of ``size`` units (MLP hidden units, the residual of post-norm BERT, ...).
- ``heads``: a permutation of the query heads that keeps grouped-query structure: the KV groups move
  as blocks together with their query heads, and query heads may also move within their group.
  Slots live in the ``query`` space (one block of ``head_dim`` units per query head) or in the ``kv``
  space (one block per KV head).
- ``vo``: one invertible ``head_dim x head_dim`` matrix per KV head, acting on values and, through
  the attention average, on the input of the output projection of each query head of the group.
- ``qk``: one invertible ``head_dim x head_dim`` matrix ``B`` per KV head, ``q' = B q`` for each query
  head of the group and ``k' = B^{-T} k`` (the key slots are ``in`` slots), which keeps every score
  ``q . k``. Under RoPE (``Heads.rope``) only ``B`` that commute with the rotary blocks qualify: a scaled
  2x2 rotation of each frequency pair ``(i, i + head_dim/2)`` (HF's ``rotate_half`` pairing).
- ``residual``: the residual stream; a permutation, or an orthogonal matrix where the norms allow it
  (``SymmetrySpec.norm``): after folding each norm's gain into its readers (``folds``), RMSNorm
  commutes with any orthogonal matrix and pre-norm LayerNorm with those that fix the all-ones vector.

Slot roles: ``out`` slots produce the units (a unit transform ``T`` mixes them by ``T``), ``in`` slots
consume them (mixed by ``T^{-T}``, which keeps the product unchanged), ``diag`` slots are norm gains
(permuted with the units, and folded away before any non-permutation transform).

Which spec a checkpoint takes is its family record's (``arch.families.spec_for``).

Tensor names are the state-dict names of the family's language-model class; when the checkpoint's own
names are given, the base-model prefix (``model.``, ``transformer.``, ``bert.``) is detected from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from modelcypher.errors import UserError

Role = Literal["out", "in", "diag"]
Space = Literal["unit", "query", "kv"]
GroupKind = Literal["perm", "heads", "vo", "qk", "residual"]
NormKind = Literal["rmsnorm", "layernorm", "postnorm", "none"]


@dataclass(frozen=True)
class Slot:
    """Units of a group laid along ``axis`` of ``tensor``, in the index range ``[start, stop)``."""

    tensor: str
    axis: int
    role: Role = "out"
    space: Space = "unit"
    start: int = 0
    stop: int | None = None  # None: to the end of the axis


def place(slot: Slot) -> tuple:
    """Where a slot's units sit, whatever role a group gives them (a key slot is ``out`` for the head
    permutation and ``in`` for the Q-K basis)."""
    return slot.tensor, slot.axis, slot.space, slot.start, slot.stop


@dataclass(frozen=True)
class Heads:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: bool = False  # rotary positions: Q/K transforms must commute with the rotary blocks

    @property
    def group_size(self) -> int:
        """Query heads per KV head; HF's ``repeat_kv`` gives query head ``h`` the KV head ``h // group_size``."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Probe:
    """Where activation matching reads a group's units: the input or output of a named module."""

    module: str
    at: Literal["input", "output"] = "input"


@dataclass(frozen=True)
class Group:
    name: str
    kind: GroupKind
    size: int  # perm/residual: units; heads: query heads; vo/qk: KV heads
    slots: tuple[Slot, ...]
    heads: Heads | None = None
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class NormFold:
    """A norm whose gain (and bias) folds into the readers that follow it."""

    weight: str
    bias: str | None
    readers: tuple[Slot, ...]  # the readers' residual-input axes
    reader_biases: tuple[str | None, ...]  # each reader's output bias, or None


@dataclass(frozen=True)
class SymmetrySpec:
    family: str
    groups: tuple[Group, ...]
    norm: NormKind = "none"
    folds: tuple[NormFold, ...] = ()
    embedding_head: tuple[str, str] | None = None  # (token embedding, output head) that can be tied
    tied: bool = False  # the config ties them: checkpoints may store the head only as the embedding

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise UserError(f"no symmetry group named {name!r} in the {self.family} spec")

    @property
    def residual(self) -> Group | None:
        return next((g for g in self.groups if g.kind == "residual"), None)

    @property
    def residual_orthogonal_ok(self) -> bool:
        """Whether an orthogonal residual transform is exact (after folding the norms)."""
        return self.norm in ("rmsnorm", "layernorm")


def detect_prefix(names: set[str] | None, default: str, probe: str) -> str:
    """``default`` unless the checkpoint stores ``probe`` without the base-model prefix."""
    if names is not None and probe in names and default + probe not in names:
        return ""
    return default
