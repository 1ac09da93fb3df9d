"""Weight matching (data-free): Git Re-Basin's coordinate descent over every symmetry group.

Objective: ``<aligned theta_B, theta_A>``, summed over all tensors. One group at a time, with all others
fixed, the objective is linear in the group's transform, ``<T, M>`` with ``M = sum X_A X_B^T`` over the
group's slots (B's other axes already transformed, A's side of later transforms on the same axis undone),
and an exact solver maximizes it: linear assignment for permutations, a structured assignment for GQA
heads, Procrustes for the residual and for the per-head V-O and Q-K bases (under RoPE, one rotation
angle per rotary pair). Groups are visited in a fresh random
order each sweep; a solve is kept only if it raises the group's exact objective (which also covers a
group acting on two axes of one tensor, where the objective is not linear), so the history is
non-decreasing. The descent stops after a sweep with no improvement or after ``max_sweeps``.

With an orthogonal residual both models are compared with their norms folded (gains all ones): that is
the parameterization the aligned B is written in, so fold A too (``transform.fold_norms``) before
interpolating.

Scale: tensors are read one at a time (from disk, with ``align.pipeline.CheckpointView``) and compared in
float32, which the solvers only need to rank candidates; inner products accumulate in float64 over
chunks. Each tensor's term of the objective is kept (one number per tensor), so a solve recomputes only
the terms of the tensors its group touches, under the candidate transform; the terms of the current
transforms are already known.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from modelcypher.align.solvers import (
    procrustes,
    procrustes_fixing_ones,
    rope_pair_terms,
    rope_procrustes,
    solve_heads,
    solve_lap,
)
from modelcypher.align.transform import (
    Alignment,
    Op,
    StateDict,
    check_tensors,
    fold,
    is_perm,
    materialize_tied,
    slots_by_tensor,
    space_ops,
    transform_tensor,
)
from modelcypher.arch.symmetry import Group, Slot, SymmetrySpec, place
from modelcypher.errors import UserError

ResidualMode = Literal["auto", "orthogonal", "permutation", "none"]
# Matching arithmetic: float32 GEMMs run at twice float64's speed in half its memory; the transforms
# found are exact group elements whatever precision ranked them (orthogonalized in float64).
COMPUTE = torch.float32
CHUNK = 1 << 22  # elements per float64 partial sum of an inner product


def resolve_residual(spec: SymmetrySpec, residual: ResidualMode) -> str:
    """``auto``: orthogonal where exact after folding, otherwise a permutation."""
    if spec.residual is None:
        return "none"
    if residual == "auto":
        return "orthogonal" if spec.residual_orthogonal_ok else "permutation"
    if residual == "orthogonal" and not spec.residual_orthogonal_ok:
        raise UserError(f"{spec.family} is post-norm: only residual='permutation' (or 'none') is exact")
    if residual not in ("orthogonal", "permutation", "none"):
        raise UserError(f"residual must be auto, orthogonal, permutation or none, not {residual!r}")
    return residual


def identity(group: Group, residual: str) -> torch.Tensor:
    if group.kind in ("vo", "qk"):
        h = group.heads
        return torch.eye(h.head_dim, dtype=torch.float64).expand(h.n_kv_heads, -1, -1).clone()
    if group.kind == "residual" and residual == "orthogonal":
        return torch.eye(group.size, dtype=torch.float64)
    return torch.arange(group.size)


def inverse(group: Group, t: torch.Tensor) -> torch.Tensor:
    """Inverse of a transform produced by matching (permutations and orthogonal matrices only)."""
    if is_perm(t):
        return torch.argsort(t)
    return t.transpose(-1, -2)


def prepare(sd: Mapping[str, torch.Tensor], spec: SymmetrySpec, residual: str) -> StateDict:
    sd, _ = materialize_tied(dict(sd), spec)
    check_tensors(sd, spec)
    return fold(sd, spec) if residual == "orthogonal" else sd


def overlaps(s: Slot, t: Slot) -> bool:
    if s.axis != t.axis:
        return False
    s_stop = float("inf") if s.stop is None else s.stop
    t_stop = float("inf") if t.stop is None else t.stop
    return s.start < t_stop and t.start < s_stop


def unit_rows(w: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The slot's units as rows: ``[units, everything else]``; a (transposed) view of a 2-D ``w``."""
    stop = w.shape[slot.axis] if slot.stop is None else slot.stop
    part = w.narrow(slot.axis, slot.start, stop - slot.start)
    return torch.movedim(part, slot.axis, 0).reshape(stop - slot.start, -1)


def inner(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> float:
    """``<x, y>`` summed in float64 a chunk at a time: float64 accuracy without float64 copies."""
    x, y = x.reshape(-1), y.reshape(-1)
    return math.fsum(float(torch.dot(x[k : k + chunk].double(), y[k : k + chunk].double()))
                     for k in range(0, x.numel(), chunk))


def is_identity(t: torch.Tensor) -> bool:
    if is_perm(t):
        return torch.equal(t, torch.arange(len(t)))
    return torch.equal(t, torch.eye(t.shape[-1], dtype=t.dtype).expand_as(t))


class Matcher:
    """The state of one coordinate descent: both models, the current transforms, their actions, and the
    objective's term of each tensor under them.

    Identity transforms have no action (``ops`` leaves them out), so nothing is multiplied by an identity.
    """

    def __init__(self, a: StateDict, b: StateDict, spec: SymmetrySpec, transforms: dict[str, torch.Tensor]):
        self.a, self.b, self.spec = a, b, spec
        self.by_tensor = slots_by_tensor(spec)
        self.transforms: dict[str, torch.Tensor] = {}
        self.ops: dict[int, dict[str, Op]] = {}
        self.inv_ops: dict[int, dict[str, Op]] = {}
        self.terms: dict[str, float] = {}  # <aligned B[name], A[name]> under the current transforms
        for i, g in enumerate(spec.groups):
            if g.name in transforms:
                self.set(i, transforms[g.name])

    def set(self, i: int, t: torch.Tensor, terms: Mapping[str, float] | None = None) -> None:
        """Make ``t`` group ``i``'s transform; ``terms``: the objective's terms it gives its tensors."""
        g = self.spec.groups[i]
        self.transforms[g.name] = t
        if is_identity(t):
            self.ops.pop(i, None)
            self.inv_ops.pop(i, None)
        else:
            self.ops[i] = space_ops(g, t, COMPUTE)
            self.inv_ops[i] = space_ops(g, inverse(g, t), COMPUTE)
        for name in tensors_of(self.spec, [i]):
            self.terms.pop(name, None)
        self.terms.update(terms or {})

    def blocks(self, name: str, w: torch.Tensor) -> list[slice]:
        """Blocks of rows of ``w`` to work on one at a time: rows are independent when no group acts on
        them (the embedding and the output head), and then never widened to float32 all at once."""
        if w.dim() < 2 or any(s.axis == 0 for _, s in self.by_tensor.get(name, [])):
            return [slice(None)]
        step = max(1, CHUNK // w[0].numel())
        return [slice(k, k + step) for k in range(0, len(w), step)]

    def term(self, name: str, ops: Mapping[int, Mapping[str, Op]]) -> float:
        """``<aligned B, A>`` for one tensor; A as stored, since ``inner`` widens a chunk at a time."""
        wa, wb = self.a[name], self.b[name]
        entries = [(i, s) for i, s in self.by_tensor.get(name, []) if i in ops]
        return math.fsum(inner(transform_tensor(wb[r].to(COMPUTE), entries, ops), wa[r])
                         for r in self.blocks(name, wb))

    def objective(self, names: Iterable[str] | None = None) -> float:
        """The objective (over ``names``, else all tensors) under the current transforms."""
        names = self.a if names is None else names
        for k in names:
            if k not in self.terms:
                self.terms[k] = self.term(k, self.ops)
        return math.fsum(self.terms[k] for k in names)

    def candidate_terms(self, candidates: Mapping[int, torch.Tensor]) -> dict[str, float]:
        """The terms of the tensors the candidate groups touch, with those groups' transforms replaced."""
        ops = dict(self.ops)
        for i, t in candidates.items():
            ops.pop(i, None)
            if not is_identity(t):
                ops[i] = space_ops(self.spec.groups[i], t, COMPUTE)
        return {k: self.term(k, ops) for k in tensors_of(self.spec, candidates)}

    def similarity(self, i: int, skip_diag: bool = False, only: set[tuple] | None = None) -> dict[str, torch.Tensor]:
        """``M[space] = sum X_A X_B^T`` over the group's slots (or those whose ``place`` is in ``only``), the
        rest held fixed.

        One tensor of each model at a time; each slot adds one float32 GEMM into ``M`` in place.
        """
        m: dict[str, torch.Tensor] = {}
        for slot in self.spec.groups[i].slots:
            if (skip_diag and slot.role == "diag") or (only is not None and place(slot) not in only):
                continue
            on_b, undo = [], []
            for j, other in self.by_tensor[slot.tensor]:
                if j not in self.ops or (j == i and overlaps(slot, other)):
                    continue
                if not overlaps(slot, other) or j < i:
                    on_b.append((j, other))
                else:  # applied after this group on the same units: undo it on A's side instead
                    undo.append((j, other))
            wa_all, wb_all = self.a[slot.tensor], self.b[slot.tensor]
            for r in self.blocks(slot.tensor, wb_all):
                wb = transform_tensor(wb_all[r].to(COMPUTE), on_b, self.ops)
                wa = transform_tensor(wa_all[r].to(COMPUTE), undo[::-1], self.inv_ops)
                xa, xb = unit_rows(wa, slot), unit_rows(wb, slot)
                if slot.space not in m:
                    m[slot.space] = torch.zeros(len(xa), len(xa), dtype=COMPUTE)
                m[slot.space].addmm_(xa, xb.T)
                del wa, wb, xa, xb
        return m

    def solve(self, i: int, residual: str, only: set[tuple] | None = None) -> torch.Tensor:
        """The best transform of group ``i`` with the others fixed (over the slots in ``only``, if given)."""
        g = self.spec.groups[i]
        if g.kind == "perm":
            return solve_lap(self.similarity(i, only=only)["unit"])
        if g.kind == "residual":
            if residual == "permutation":
                return solve_lap(self.similarity(i, only=only)["unit"])
            m = self.similarity(i, skip_diag=True, only=only)["unit"]
            t = procrustes_fixing_ones(m) if self.spec.norm == "layernorm" else procrustes(m)
            return t.T  # the alignment stores Q (x -> x Q), the transpose of the unit transform
        mq, mkv = head_blocks(self.similarity(i, only=only), g)
        if g.kind == "heads":
            return solve_heads(trace(mq), trace(mkv), g.heads.group_size)
        blocks = per_kv_blocks(mq, mkv, g)
        if g.kind == "qk" and g.heads.rope:
            return rope_procrustes(blocks)
        return torch.stack([procrustes(x) for x in blocks])

    def solve_heads_and_bases(self, i: int, *bases: int) -> dict[int, torch.Tensor]:
        """Heads and their in-head bases (V-O, Q-K) together: a head pairing is scored with the best basis
        for it (the best ``<B, M>`` over the basis group, e.g. the nuclear norm of its similarity block)
        rather than with the current one."""
        g = self.spec.groups[i]
        saved_bases = {j: self.transforms[self.spec.groups[j].name] for j in bases}
        saved_terms = dict(self.terms)
        for j in bases:
            self.set(j, identity(self.spec.groups[j], "none"))
        basis_places = [{place(s) for s in self.spec.groups[j].slots} for j in bases]
        free = {place(s) for s in g.slots} - set().union(*basis_places)
        cost_q, cost_kv = (trace(x).double() for x in head_blocks(self.similarity(i, only=free), g))
        for j, places in zip(bases, basis_places, strict=True):
            bq, bkv = head_blocks(self.similarity(i, only=places), g)
            cost_q = cost_q + best_basis_value(bq, self.spec.groups[j])
            cost_kv = cost_kv + best_basis_value(bkv, self.spec.groups[j])
        perm = solve_heads(cost_q, cost_kv, g.heads.group_size)
        saved_heads = self.transforms[g.name]
        self.set(i, perm)
        found = {j: self.solve(j, "none") for j in bases}
        self.set(i, saved_heads)
        for j, t in saved_bases.items():
            self.set(j, t)
        self.terms = saved_terms
        return {i: perm, **found}


def tensors_of(spec: SymmetrySpec, groups: Iterable[int]) -> list[str]:
    return list(dict.fromkeys(s.tensor for i in groups for s in spec.groups[i].slots))


def trace(x: torch.Tensor) -> torch.Tensor:
    return x.diagonal(dim1=2, dim2=3).sum(-1)


def head_blocks(m: Mapping[str, torch.Tensor], g: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities per pair of heads: ``[n_heads, n_heads, hd, hd]`` (query) and ``[n_kv, n_kv, hd, hd]``."""
    h = g.heads
    hd = h.head_dim

    def blocks(space: str, n: int) -> torch.Tensor:
        if space not in m:
            return torch.zeros(n, n, hd, hd, dtype=COMPUTE)
        return m[space].view(n, hd, n, hd).transpose(1, 2)

    return blocks("query", h.n_heads), blocks("kv", h.n_kv_heads)


def best_basis_value(m: torch.Tensor, g: Group) -> torch.Tensor:
    """``max <B, m>`` over the basis group for each block of ``m`` (``[..., hd, hd]``): the nuclear norm
    for an orthogonal basis; under RoPE, ``sum_pairs |(m_ii + m_jj, m_ji - m_ij)|``."""
    if g.kind == "qk" and g.heads.rope:
        return torch.hypot(*rope_pair_terms(m)).sum(-1)
    return torch.linalg.matrix_norm(m.double(), ord="nuc")


def per_kv_blocks(mq: torch.Tensor, mkv: torch.Tensor, g: Group) -> torch.Tensor:
    """Per KV head, the similarity an in-head basis sees: its own KV block plus its query heads' blocks."""
    h = g.heads
    own = torch.arange(h.n_heads)
    own_kv = torch.arange(h.n_kv_heads)
    per_kv = mq[own, own].view(h.n_kv_heads, h.group_size, h.head_dim, h.head_dim).sum(1)
    return mkv[own_kv, own_kv] + per_kv


def match_weights(
    sd_b: Mapping[str, torch.Tensor],
    sd_a: Mapping[str, torch.Tensor],
    spec: SymmetrySpec,
    *,
    residual: ResidualMode = "auto",
    vo: bool = False,
    qk: bool = False,
    max_sweeps: int = 20,
    seed: int = 0,
    restarts: int = 1,
    prepared: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
) -> Alignment:
    """Transforms bringing B onto A, by coordinate descent; ``history`` holds the objective per sweep.

    A first descent matches permutations and the residual; with ``vo`` and/or ``qk`` a second one adds
    each head's V-O and/or Q-K basis (orthogonal; under RoPE, Q-K rotates each rotary pair), solved
    jointly with its head permutation. ``max_sweeps`` caps each descent. The residual starts from its
    solve on the tensors only it acts on (``anchors``). The objective has many local maxima: with
    ``restarts`` > 1 the descent runs from seeds ``seed, seed + 1, ...`` (other visiting orders) and the
    highest final objective wins.
    ``residual``: ``orthogonal`` (Procrustes; norms folded), ``permutation`` (exact in the original
    parameterization), ``none``, or ``auto`` (orthogonal where exact, else permutation).
    ``prepared``: the mappings already hold a tied head and, for an orthogonal residual, folded norms,
    with shapes checked (``align.pipeline.CheckpointView`` reads them lazily from disk); nothing is copied.
    ``init``: transforms to start every descent from instead of the anchored identity (a warm start, e.g.
    the previous round of universe matching).
    """
    residual = resolve_residual(spec, residual)
    if prepared:
        a, b = sd_a, sd_b
    else:
        a, b = prepare(sd_a, spec, residual), prepare(sd_b, spec, residual)
        for name in {s.tensor for g in spec.groups for s in g.slots}:
            if a[name].shape != b[name].shape:
                raise UserError(f"models differ in shape at {name}: {list(a[name].shape)} vs {list(b[name].shape)}")
    if restarts < 1:
        raise UserError(f"restarts must be at least 1, not {restarts}")
    kinds = {k for k, on in (("vo", vo), ("qk", qk)) if on}
    best = None
    for k in range(restarts):
        found = descent(Matcher(a, b, spec, {}), residual, kinds, max_sweeps, random.Random(seed + k), init)
        if best is None or found.history[-1] > best.history[-1]:
            best = found
    return best


def descent(matcher: Matcher, residual: str, kinds: set[str], max_sweeps: int, rng: random.Random,
            init: Mapping[str, torch.Tensor] | None = None) -> Alignment:
    """One coordinate descent from the anchored start (or from ``init``): permutations and the residual,
    then (``kinds``) the heads with their in-head bases."""
    spec = matcher.spec
    stage_1 = [(i,) for i, g in enumerate(spec.groups)
               if g.kind in ("perm", "heads") or (g.kind == "residual" and residual != "none")]
    for (i,) in stage_1:
        matcher.set(i, start(spec.groups[i], residual, init))
    r = next((i for (i,) in stage_1 if spec.groups[i].kind == "residual"), None)
    anchored = anchors(spec)
    if r is not None and anchored and init is None:
        # The tensors only the residual acts on (embeddings, untied head) compare without any other
        # transform: their solve is a meaningful start, where identity would be an arbitrary one.
        matcher.set(r, matcher.solve(r, residual, only=anchored))
    history = [matcher.objective()]
    descend(matcher, stage_1, residual, max_sweeps, rng, history)
    if kinds:
        joint = heads_with_bases(spec, kinds)
        for c in joint:
            for j in c[1:]:
                matcher.set(j, start(spec.groups[j], residual, init))
        heads = {c[0] for c in joint}
        stage_2 = [c for c in stage_1 if c[0] not in heads] + joint
        descend(matcher, stage_2, residual, max_sweeps, rng, history)
    return Alignment(dict(matcher.transforms), history)


def start(group: Group, residual: str, init: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """A group's transform at the start of a descent: ``init``'s, else the identity."""
    return init[group.name] if init is not None and group.name in init else identity(group, residual)


def anchors(spec: SymmetrySpec) -> set[tuple]:
    """Places of the residual's slots on tensors no other group touches (the embeddings; the output
    head; not the norm gains)."""
    res = spec.residual
    if res is None:
        return set()
    others = {s.tensor for g in spec.groups if g is not res for s in g.slots}
    return {place(s) for s in res.slots if s.tensor not in others and s.role != "diag"}


def heads_with_bases(spec: SymmetrySpec, kinds: set[str]) -> list[tuple[int, ...]]:
    """(heads group, its in-head basis groups of ``kinds``...): a basis group's slots sit on some of its
    heads group's slots."""
    out = []
    for i, g in enumerate(spec.groups):
        if g.kind == "heads":
            mine = {place(s) for s in g.slots}
            bases = tuple(j for j, b in enumerate(spec.groups)
                          if b.kind in kinds and {place(s) for s in b.slots} <= mine)
            if bases:
                out.append((i, *bases))
    return out


def descend(matcher: Matcher, coords: list[tuple[int, ...]], residual: str, max_sweeps: int,
            rng: random.Random, history: list[float]) -> None:
    """Sweeps over ``coords`` (single groups, or a heads group with its basis groups) in random order."""
    for _ in range(max_sweeps):
        improved = False
        for c in rng.sample(coords, len(coords)):
            new = {c[0]: matcher.solve(c[0], residual)} if len(c) == 1 else matcher.solve_heads_and_bases(*c)
            before = matcher.objective(tensors_of(matcher.spec, c))
            terms = matcher.candidate_terms(new)
            after = math.fsum(terms.values())
            if after > before + 1e-9 * (abs(before) + 1.0):
                for i, t in new.items():
                    matcher.set(i, t)
                matcher.terms.update(terms)
                improved = True
        history.append(matcher.objective())
        if not improved:
            return
