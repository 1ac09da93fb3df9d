"""Lifting a narrower model into a wider one's shape, computing exactly the narrow model's function.

Seed 004's residual symmetry allows rectangular transforms: a ``d``-wide residual stream ``x`` becomes
``x T`` in ``D >= d`` dimensions, with ``T = sqrt(D/d) Q`` and ``Q`` (``d x D``) with orthonormal rows.
With every norm's gain folded into its readers first (``transform.fold``):

- writers and embeddings (``out`` slots) absorb ``T``: ``E' = E T``, ``W' = T^T W``, biases ``b T``;
- readers after a norm (``in`` slots) absorb ``T^+T = (d/D) T``: ``W' = (d/D) W T``.

Why the factor ``sqrt(D/d)``: it keeps the mean square of the stream's coordinates, so the norms see the
same statistics over the wider width and their epsilon stays as it is. RMSNorm over ``D``:
``rms_D(x T)^2 = |x T|^2 / D + eps = |x|^2 / d + eps = rms_d(x)^2``, hence ``RMSNorm_D(x T) = RMSNorm_d(x) T``
exactly, epsilon included, and the readers' ``(d/D) T`` undoes ``T`` (``T (d/D) T^T = I``). LayerNorm
also centres, which commutes with ``T`` only if ``T`` maps the all-ones vector to the all-ones vector:
``Q = 1_d^T 1_D / sqrt(d D) + B_d R B_D^T`` (``B`` orthonormal bases of the complements of the all-ones
vectors, ``R`` with orthonormal rows) gives ``1_d T = 1_D``; then the centred part of ``x T`` is ``x_c T``,
its variance over ``D`` is ``|x_c T|^2 / D = |x_c|^2 / d``, the variance over ``d``, and
``LN_D(x T) = LN_d(x) T`` with the folded bias ``beta' = beta T``: exact, epsilon included.

MLP hidden units and attention heads that the wider model has in excess are zero: a zero MLP unit
writes nothing; a zero head (query, key, value and output all zero) adds nothing. Under grouped-query
attention narrow KV group ``k`` sits in wide KV group ``k`` with its query heads first, so narrow query
head ``k g + j`` becomes wide query head ``k G + j`` (``g <= G``: query heads per KV head); a zero query
head inside a used group attends uniformly, and its zero output projection drops what it reads. Heads
must have one size.

The lifted model is a plain checkpoint of the wide shape (norm gains all one, its head untied), so the
ordinary square alignment then moves it onto the wide model: the result's residual map is ``T Q_align``,
still ``sqrt(D/d)`` times a matrix with orthonormal rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from modelcypher.align.solvers import ones_complement_basis
from modelcypher.arch.families import family_of
from modelcypher.arch.symmetry import Group, SymmetrySpec
from modelcypher.errors import UserError

StateDict = dict[str, torch.Tensor]
ONE_WAY = "a narrower model is lifted into a wider one, never the reverse; make the wider one the reference"
# A segment of an axis: old units [start, stop) -> new units [start, stop), by an index map (unit i goes
# to new unit idx[i]) or a dense matrix [new units, old units].
Segment = tuple[int, int, int, int, torch.Tensor]


def isometry(d: int, big: int, layernorm: bool) -> torch.Tensor:
    """``T = sqrt(D/d) Q`` (``d x D``, ``Q`` with orthonormal rows); for LayerNorm ``1_d T = 1_D``."""
    if layernorm:
        bd, bb = ones_complement_basis(d), ones_complement_basis(big)
        q = torch.full((d, big), 1.0 / math.sqrt(d * big), dtype=torch.float64) + bd @ bb[:, : d - 1].T
    else:
        q = torch.eye(d, big, dtype=torch.float64)
    return math.sqrt(big / d) * q


def check_widths(spec_n: SymmetrySpec, spec_w: SymmetrySpec, narrow: str, wide: str) -> bool:
    """Whether the models differ in width (``True``: lift the narrow one); one line when they cannot be
    lifted that way round."""
    if [g.name for g in spec_n.groups] != [g.name for g in spec_w.groups]:
        raise UserError(f"{narrow} and {wide} differ in depth or structure: only widths may differ")
    differ = False
    for gn, gw in zip(spec_n.groups, spec_w.groups, strict=True):
        if gn.kind in ("vo", "qk"):
            continue
        if gn.kind == "heads":
            hn, hw = gn.heads, gw.heads
            if hn.head_dim != hw.head_dim:
                raise UserError(f"{narrow} and {wide} differ in head size ({hn.head_dim} vs {hw.head_dim}) at "
                                f"{gn.name}: only head counts may differ")
            if hn.n_kv_heads > hw.n_kv_heads or hn.group_size > hw.group_size:
                raise UserError(f"{narrow} has more heads ({hn.n_heads}, {hn.n_kv_heads} KV) than {wide} "
                                f"({hw.n_heads}, {hw.n_kv_heads} KV) at {gn.name}: {ONE_WAY}")
            differ |= hn != hw
        elif gn.size > gw.size:
            raise UserError(f"{narrow} is wider than {wide} at {gn.name} ({gn.size} > {gw.size}): {ONE_WAY}")
        else:
            differ |= gn.size != gw.size
    if differ and not spec_w.residual_orthogonal_ok:
        raise UserError(f"{spec_w.family} models of different widths cannot be lifted: its residual admits "
                        "only permutations")
    return differ


def lift_config(config_n: dict, config_w: dict) -> dict:
    """The narrow model's config with the wide one's widths (the family record's ``width_keys``)."""
    keys = family_of(config_n).width_keys
    if not keys:
        raise UserError(f"no width keys for model_type {config_n.get('model_type')!r}: cannot lift it")
    out = dict(config_n)
    for k in keys:
        if k in config_w:
            out[k] = config_w[k]
        else:
            out.pop(k, None)
    return out


def units(g: Group, space: str) -> int:
    if g.kind != "heads":
        return g.size
    return (g.heads.n_heads if space == "query" else g.heads.n_kv_heads) * g.heads.head_dim


def head_map(gn: Group, gw: Group, space: str) -> torch.Tensor:
    """Where each narrow unit of a heads slot goes: query head ``k g + j`` -> ``k G + j``, KV ``k`` -> ``k``."""
    hn, hw = gn.heads, gw.heads
    if space == "query":
        h = torch.arange(hn.n_heads)
        heads = (h // hn.group_size) * hw.group_size + h % hn.group_size
    else:
        heads = torch.arange(hn.n_kv_heads)
    return (heads[:, None] * hn.head_dim + torch.arange(hn.head_dim)).reshape(-1)


def segments(spec_n: SymmetrySpec, spec_w: SymmetrySpec, shapes: Mapping[str, tuple[int, ...]]
             ) -> tuple[dict[str, dict[int, list[Segment]]], dict[str, dict[int, int]]]:
    """Per tensor and axis, the segments of the lift and the axis's new length."""
    d, big = spec_n.residual.size, spec_w.residual.size
    t = isometry(d, big, spec_n.norm == "layernorm")
    plans: dict[str, dict[int, list[Segment]]] = {}
    lengths: dict[str, dict[int, int]] = {}
    for gn, gw in zip(spec_n.groups, spec_w.groups, strict=True):
        if gn.kind in ("vo", "qk"):
            continue
        for sn, sw in zip(gn.slots, gw.slots, strict=True):
            if sn.role == "diag":
                lengths.setdefault(sn.tensor, {})[0] = big
                plans.setdefault(sn.tensor, {})[0] = []  # a folded gain: all ones, filled in by lift_tensor
                continue
            old = (sn.start, shapes[sn.tensor][sn.axis] if sn.stop is None else sn.stop)
            new = (sw.start, sw.start + units(gw, sw.space) if sw.stop is None else sw.stop)
            if gn.kind == "residual":
                op = t.T if sn.role == "out" else (d / big) * t.T
            elif gn.kind == "heads":
                op = head_map(gn, gw, sn.space)
            else:
                op = torch.arange(gn.size)
            plans.setdefault(sn.tensor, {}).setdefault(sn.axis, []).append((*old, *new, op))
            axis_len = lengths.setdefault(sn.tensor, {})
            axis_len[sn.axis] = max(axis_len.get(sn.axis, 0), new[1])
    return plans, lengths


def lift_tensor(w: torch.Tensor, name: str, plan: Mapping[int, list[Segment]], lengths: Mapping[int, int]
                ) -> torch.Tensor:
    """One tensor lifted axis by axis, computed in float64 and returned in ``w``'s dtype."""
    dtype = w.dtype
    x = w.double()
    for axis, segs in plan.items():
        shape = list(x.shape)
        shape[axis] = lengths[axis]
        if not segs:  # a folded norm gain
            if not torch.all(x == 1):
                raise UserError(f"{name}: a norm gain must be folded before lifting")
            x = torch.ones(shape, dtype=x.dtype)
            continue
        out = torch.zeros(shape, dtype=x.dtype)
        for o0, o1, n0, n1, op in segs:
            part = x.narrow(axis, o0, o1 - o0)
            dest = out.narrow(axis, n0, n1 - n0)
            if op.is_floating_point():
                dest.copy_(torch.movedim(torch.tensordot(part, op, dims=([axis], [1])), -1, axis))
            else:
                dest.index_copy_(axis, op, part)
        x = out
    return x.to(dtype)


def lift_state(sd: Mapping[str, torch.Tensor], spec_n: SymmetrySpec, spec_w: SymmetrySpec) -> StateDict:
    """A folded narrow state dict (tied head present) in the wide shape (``spec_w``, the narrow model's
    spec under :func:`lift_config`), computing the same function."""
    plans, lengths = segments(spec_n, spec_w, {k: tuple(v.shape) for k, v in sd.items()})
    return {k: lift_tensor(v, k, plans.get(k, {}), lengths.get(k, {})) for k, v in sd.items()}


def lifted_shape(shape: tuple[int, ...], lengths: Mapping[int, int]) -> tuple[int, ...]:
    return tuple(lengths.get(ax, n) for ax, n in enumerate(shape))

