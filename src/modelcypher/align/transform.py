"""An alignment (one transform per symmetry group) and its exact application to a checkpoint.

Transforms, keyed by group name (``arch.symmetry``); a group left out keeps the identity:

- ``perm`` groups: a long tensor ``perm`` of the units; aligned unit ``i`` is original unit ``perm[i]``.
- ``heads`` groups: a long tensor over the query heads, same convention, grouped-query structure kept.
- ``vo`` groups: a float ``[n_kv_heads, head_dim, head_dim]`` tensor of invertible ``A`` (``v' = A v``).
- ``qk`` groups: the same for ``B`` (``q' = B q``, ``k' = B^{-T} k``); under RoPE each ``B`` must be a
  scaled rotation of every rotary pair (``rope_commuting``).
- ``residual``: a long tensor (a permutation, exact everywhere, no folding) or a float ``d x d``
  orthogonal ``Q`` acting as ``x -> x Q`` on the residual stream (row vectors). A matrix triggers norm
  folding first; the LayerNorm family needs ``Q 1 = 1``; post-norm families refuse it.

Groups are applied in spec order, so a ``vo`` transform acts on heads already permuted by ``heads``.
Arithmetic runs in ``working_dtype`` (float64; float32 for 16-bit tensors); each tensor goes back to its
own dtype. Folding a tied output head makes it
differ from the embedding, and the returned config then unties them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelcypher.align.rope import rope_block, rope_commuting, rope_pairs  # noqa: F401  (public here too)
from modelcypher.align.solvers import ones_complement_basis
from modelcypher.arch.families import spec_for
from modelcypher.arch.symmetry import Group, Slot, SymmetrySpec
from modelcypher.errors import UserError

StateDict = dict[str, torch.Tensor]
# A group's action on one unit space: a permutation (index vector) or a pair of matrices
# (the transform ``T`` for out slots, ``T^{-T}`` for in slots).
Op = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class Alignment:
    transforms: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # matching objective: start, then after each sweep

    def apply(self, state_dict: Mapping[str, torch.Tensor], config: dict) -> tuple[StateDict, dict]:
        return apply(state_dict, config, self)

    def save(self, path: str | Path) -> None:
        tensors = {k: v.contiguous() for k, v in self.transforms.items()}
        save_file(tensors, str(path), metadata={"history": json.dumps(self.history)})

    @classmethod
    def load(cls, path: str | Path) -> Alignment:
        with safe_open(str(path), framework="pt") as f:
            history = json.loads((f.metadata() or {}).get("history", "[]"))
            return cls({k: f.get_tensor(k) for k in f.keys()}, history)


def is_perm(t: torch.Tensor) -> bool:
    return not t.is_floating_point()


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to transform tensors of ``dtype`` in: float64, but float32 for 16-bit floats, whose own
    rounding (2^-8 for bfloat16) dwarfs float32's and which it holds in half the memory and time."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def apply(state_dict: Mapping[str, torch.Tensor], config: dict, alignment: Alignment) -> tuple[StateDict, dict]:
    """Apply ``alignment`` to a checkpoint; returns the new state dict and config (same family)."""
    spec = spec_for(config, state_dict.keys())
    validate(spec, alignment.transforms)
    sd, had_head = materialize_tied(dict(state_dict), spec)
    check_tensors(sd, spec)
    q = alignment.transforms.get("residual")
    if q is not None and not is_perm(q):
        sd = fold(sd, spec)
    sd = transform_state(sd, spec, alignment.transforms)
    return settle_tie(sd, config, spec, had_head)


def fold_norms(state_dict: Mapping[str, torch.Tensor], config: dict) -> tuple[StateDict, dict]:
    """Fold every norm's gain (and LayerNorm bias) into its readers: same function, gains all ones.

    Use it on model A before interpolating with a B aligned by an orthogonal residual (which is folded).
    """
    spec = spec_for(config, state_dict.keys())
    sd, had_head = materialize_tied(dict(state_dict), spec)
    check_tensors(sd, spec)
    return settle_tie(fold(sd, spec), config, spec, had_head)


# ----------------------------------------------------------------------------- checks


def validate(spec: SymmetrySpec, transforms: Mapping[str, torch.Tensor]) -> None:
    for name, t in transforms.items():
        g = spec.group(name)
        if g.kind in ("perm", "heads") or (g.kind == "residual" and is_perm(t)):
            if not is_perm(t) or t.shape != (g.size,) or not torch.equal(t.sort().values, torch.arange(g.size)):
                raise UserError(f"transform of {name!r} is not a permutation of {g.size} units")
            if g.kind == "heads":
                gs = g.heads.group_size
                kv = t.view(-1, gs) // gs
                if not torch.equal(kv, kv[:, :1].expand_as(kv)):
                    raise UserError(f"head permutation of {name!r} splits a grouped-query KV group")
        elif g.kind in ("vo", "qk"):
            shape = (g.heads.n_kv_heads, g.heads.head_dim, g.heads.head_dim)
            if t.shape != shape or not bool((torch.linalg.cond(t.double()) <= 1e8).all()):  # NaN when singular
                raise UserError(f"transform of {name!r} must be {list(shape)} invertible matrices")
            if g.kind == "qk" and g.heads.rope and not rope_commuting(t):
                raise UserError(f"transform of {name!r} must commute with RoPE: a scaled 2x2 rotation of each "
                                f"rotary pair (i, i + {g.heads.head_dim // 2})")
        else:
            if not spec.residual_orthogonal_ok:
                raise UserError(f"{spec.family} is post-norm: only a permutation of the residual is exact")
            q = t.double()
            if q.shape != (g.size, g.size) or (q.T @ q - torch.eye(g.size, dtype=q.dtype)).abs().max() > 1e-5:
                raise UserError(f"residual transform must be an orthogonal {g.size}x{g.size} matrix")
            if spec.norm == "layernorm" and (q.sum(1) - 1).abs().max() > 1e-5:
                raise UserError("LayerNorm residual transform must map the all-ones vector to itself")


def check_tensors(sd: StateDict, spec: SymmetrySpec) -> None:
    needed = {s.tensor for g in spec.groups for s in g.slots} | {f.weight for f in spec.folds}
    missing = sorted(needed - sd.keys())
    if missing:
        raise UserError(f"checkpoint lacks tensors the {spec.family} spec expects: {', '.join(missing[:5])}")


# ----------------------------------------------------------------------------- tied embeddings


def materialize_tied(sd: StateDict, spec: SymmetrySpec) -> tuple[StateDict, bool]:
    """Give a tied output head its own entry (checkpoints store it once); report whether it had one."""
    if spec.embedding_head is None:
        return sd, True
    embed, head = spec.embedding_head
    had_head = head in sd
    if not had_head and embed in sd:
        sd[head] = sd[embed]
    return sd, had_head


def settle_tie(sd: StateDict, config: dict, spec: SymmetrySpec, had_head: bool) -> tuple[StateDict, dict]:
    """Keep the tie when head and embedding still agree (up to rounding), otherwise untie in the config."""
    config = dict(config)
    if not spec.tied:
        return sd, config
    embed, head = spec.embedding_head
    e, h = sd[embed], sd[head]
    scale = float(e.abs().max()) if e.numel() else 0.0
    if torch.allclose(e.float(), h.float(), rtol=1e-5, atol=1e-6 * scale):
        if had_head:
            sd[head] = e
        else:
            del sd[head]
    else:
        config["tie_word_embeddings"] = False
    return sd, config


# ----------------------------------------------------------------------------- folding


def fold(sd: StateDict, spec: SymmetrySpec) -> StateDict:
    """Fold norm gains into readers (``W <- W diag(gamma)``), LayerNorm biases into ``beta / gamma``."""
    sd = dict(sd)
    for f in spec.folds:
        gamma = sd[f.weight].double()
        old = {r.tensor: sd[r.tensor] for r in f.readers}
        for r in f.readers:
            sd[r.tensor] = scaled(old[r.tensor], gamma, r.axis)
        if f.bias is not None:
            beta = sd[f.bias].double()
            dead = gamma == 0
            if (beta[dead] != 0).any():
                # A zero gain leaves beta with nothing to divide into: move it into the readers' biases.
                for r, b in zip(f.readers, f.reader_biases, strict=True):
                    if b is None:
                        raise UserError(f"cannot fold {f.bias}: zero gain and reader {r.tensor} has no bias")
                    extra = torch.tensordot(beta * dead, old[r.tensor].double(), dims=([0], [r.axis]))
                    sd[b] = (sd[b].double() + extra).to(sd[b].dtype)
            safe = torch.where(dead, torch.ones_like(gamma), gamma)
            sd[f.bias] = torch.where(dead, torch.zeros_like(beta), beta / safe).to(sd[f.bias].dtype)
        sd[f.weight] = torch.ones_like(sd[f.weight])
    return sd


def scaled(w: torch.Tensor, gamma: torch.Tensor, axis: int, block: int = 1 << 22) -> torch.Tensor:
    """``w * gamma`` along ``axis`` in ``w``'s dtype, computed in ``working_dtype`` about ``block``
    elements at a time (an output head is folded without a widened copy of it)."""
    dt = working_dtype(w.dtype)
    g = gamma.to(dt).view([-1 if ax == axis else 1 for ax in range(w.dim())])
    if w.dim() < 2:
        return (w.to(dt) * g).to(w.dtype)
    out = torch.empty_like(w)
    step = max(1, block // w[0].numel())
    for k in range(0, len(w), step):
        rows = slice(k, k + step)
        out[rows] = w[rows].to(dt) * (g[rows] if axis == 0 else g)
    return out


# ----------------------------------------------------------------------------- applying transforms


def space_ops(group: Group, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> dict[str, Op]:
    """The action of transform ``t`` of ``group`` on each unit space its slots live in; matrices in
    ``dtype``, the dtype ``apply_slot`` then computes in."""
    if group.kind in ("perm", "residual"):
        if is_perm(t):
            return {"unit": t}
        q = t.to(dtype)  # x -> x Q on rows is T = Q^T on unit columns; orthogonal, so T^{-T} = T
        return {"unit": (q.T, q.T)}
    h = group.heads
    gs, hd = h.group_size, h.head_dim
    if group.kind == "heads":
        kv = t[::gs] // gs
        expand = lambda p: (p[:, None] * hd + torch.arange(hd)).reshape(-1)  # noqa: E731
        return {"query": expand(t), "kv": expand(kv)}
    a = t.double()
    a_inv_t = torch.linalg.inv(a).transpose(1, 2)
    a, a_inv_t = a.to(dtype), a_inv_t.to(dtype)
    per_query = torch.arange(h.n_heads) // gs
    return {
        "kv": (torch.block_diag(*a), torch.block_diag(*a_inv_t)),
        "query": (torch.block_diag(*a[per_query]), torch.block_diag(*a_inv_t[per_query])),
    }


def apply_slot(w: torch.Tensor, slot: Slot, op: Op) -> torch.Tensor:
    """``w`` with the slot's units transformed (out: by ``T``, in: by ``T^{-T}``, permutations: indexed),
    computed in the dtype of the op's matrices and returned in ``w``'s."""
    stop = w.shape[slot.axis] if slot.stop is None else slot.stop
    part = w.narrow(slot.axis, slot.start, stop - slot.start)
    if isinstance(op, torch.Tensor):
        new = part.index_select(slot.axis, op)
    elif slot.role == "diag":
        if not torch.all(part == 1):
            raise UserError(f"{slot.tensor}: a norm gain must be folded before an orthogonal transform")
        return w
    else:
        m = op[0] if slot.role == "out" else op[1]
        part = part.to(m.dtype)
        # Contract so that the result comes out contiguous in w's layout (no transposed copy to make).
        if slot.axis == 0:
            new = torch.tensordot(m, part, dims=([1], [0]))
        else:
            new = torch.movedim(torch.tensordot(part, m, dims=([slot.axis], [1])), -1, slot.axis)
        new = new.to(w.dtype)
    if slot.start == 0 and stop == w.shape[slot.axis]:
        return new
    out = w.clone()
    out.narrow(slot.axis, slot.start, stop - slot.start).copy_(new)
    return out


def slots_by_tensor(spec: SymmetrySpec) -> dict[str, list[tuple[int, Slot]]]:
    """For each tensor, the (group index, slot) pairs acting on it, in spec order."""
    out: dict[str, list[tuple[int, Slot]]] = {}
    for i, g in enumerate(spec.groups):
        for s in g.slots:
            out.setdefault(s.tensor, []).append((i, s))
    return out


def group_ops(spec: SymmetrySpec, transforms: Mapping[str, torch.Tensor],
              dtype: torch.dtype = torch.float64) -> dict[int, dict[str, Op]]:
    return {i: space_ops(g, transforms[g.name], dtype) for i, g in enumerate(spec.groups) if g.name in transforms}


def transform_tensor(w: torch.Tensor, entries: list[tuple[int, Slot]], ops: dict[int, dict[str, Op]]) -> torch.Tensor:
    for i, s in entries:
        if i in ops:
            w = apply_slot(w, s, ops[i][s.space])
    return w


def transform_state(sd: StateDict, spec: SymmetrySpec, transforms: Mapping[str, torch.Tensor]) -> StateDict:
    ops = group_ops(spec, transforms)
    out = dict(sd)
    for name, entries in slots_by_tensor(spec).items():
        out[name] = transform_tensor(sd[name], entries, ops)
    return out


# ----------------------------------------------------------------------------- random alignments


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_alignment(
    spec: SymmetrySpec,
    *,
    kinds: tuple[str, ...] = ("perm", "heads", "vo", "qk", "residual"),
    residual: str = "orthogonal",
    vo: str = "orthogonal",
    qk: str = "orthogonal",
    seed: int = 0,
) -> Alignment:
    """A random element of the symmetry group (for tests and demonstrations).

    ``residual``: ``"orthogonal"`` (fixing the all-ones vector for LayerNorm; a permutation where only
    that is exact) or ``"permutation"``;
    ``vo``, ``qk``: ``"orthogonal"`` or ``"invertible"`` (well conditioned; under RoPE, Q-K bases are
    scaled rotations of the rotary pairs).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        if g.kind not in kinds:
            continue
        as_perm = residual == "permutation" or not spec.residual_orthogonal_ok
        if g.kind == "perm" or (g.kind == "residual" and as_perm):
            out[g.name] = torch.randperm(g.size, generator=gen)
        elif g.kind == "heads":
            gs = g.heads.group_size
            kv = torch.randperm(g.heads.n_kv_heads, generator=gen)
            out[g.name] = torch.cat([kv[i] * gs + torch.randperm(gs, generator=gen) for i in range(len(kv))])
        elif g.kind == "qk" and g.heads.rope:
            shape = (g.heads.n_kv_heads, g.heads.head_dim // 2)
            angle = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 * torch.pi
            scale = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5 if qk == "invertible" else 1.0
            out[g.name] = rope_block(scale * torch.cos(angle), scale * torch.sin(angle))
        elif g.kind in ("vo", "qk"):
            hd = g.heads.head_dim
            mats = []
            for _ in range(g.heads.n_kv_heads):
                a = random_orthogonal(hd, gen)
                if (vo if g.kind == "vo" else qk) == "invertible":
                    scale = torch.rand(hd, generator=gen, dtype=torch.float64) * 1.5 + 0.5
                    a = a @ torch.diag(scale) @ random_orthogonal(hd, gen)
                mats.append(a)
            out[g.name] = torch.stack(mats)
        elif spec.norm == "layernorm":
            b = ones_complement_basis(g.size)
            r = random_orthogonal(g.size - 1, gen)
            out[g.name] = torch.full((g.size, g.size), 1.0 / g.size, dtype=torch.float64) + b @ r @ b.T
        else:
            out[g.name] = random_orthogonal(g.size, gen)
    return Alignment(out)


# ----------------------------------------------------------------------------- composing alignments


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A residual permutation as the orthogonal ``Q`` of ``x -> x Q`` (``Q[perm[i], i] = 1``)."""
    if not is_perm(t):
        return t.double()
    q = torch.zeros(len(t), len(t), dtype=torch.float64)
    q[t, torch.arange(len(t))] = 1.0
    return q


def basis_heads(spec: SymmetrySpec) -> dict[str, str]:
    """For each in-head basis group, the heads group whose slots hold its slots."""
    where = lambda g: {(x.tensor, x.axis, x.space) for x in g.slots}  # noqa: E731
    return {g.name: next(h.name for h in spec.groups if h.kind == "heads" and where(g) <= where(h))
            for g in spec.groups if g.kind in ("vo", "qk")}


def kv_perm(g: Group, heads: torch.Tensor) -> torch.Tensor:
    """The KV-head permutation a query-head permutation of ``g``'s heads carries."""
    gs = g.heads.group_size
    return heads[::gs] // gs


def _identity_like(g: Group, other: torch.Tensor) -> torch.Tensor:
    if g.kind in ("vo", "qk"):
        return torch.eye(g.heads.head_dim, dtype=torch.float64).expand(g.heads.n_kv_heads, -1, -1)
    return torch.arange(g.size) if is_perm(other) else torch.eye(g.size, dtype=torch.float64)


def compose(spec: SymmetrySpec, first: Alignment, then: Alignment) -> Alignment:
    """The alignment that applies ``first``, then ``then`` (a group missing from either is the identity).

    Permutations (units, heads) compose as index vectors, ``p = s[t]``; the residual as ``x Q_s Q_t``; an
    in-head basis acts after its heads' permutation, so the composed basis of KV head ``k`` is
    ``A_t[k] A_s[t_kv[k]]``.
    """
    s, t = first.transforms, then.transforms
    heads = basis_heads(spec)
    out: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        if g.name not in s and g.name not in t:
            continue
        a = s.get(g.name, _identity_like(g, t.get(g.name, torch.empty(0))))
        b = t.get(g.name, _identity_like(g, a))
        if g.kind in ("vo", "qk"):
            h = t.get(heads[g.name])
            out[g.name] = b.double() @ (a.double() if h is None else a.double()[kv_perm(g, h)])
        elif is_perm(a) and is_perm(b):
            out[g.name] = a[b]
        else:
            out[g.name] = as_matrix(a) @ as_matrix(b)
    return Alignment(out)


def invert(spec: SymmetrySpec, alignment: Alignment) -> Alignment:
    """The alignment undoing ``alignment`` (``compose`` of the two is the identity)."""
    t = alignment.transforms
    heads = basis_heads(spec)
    out = {}
    for g in spec.groups:
        if g.name not in t:
            continue
        if is_perm(t[g.name]):
            out[g.name] = torch.argsort(t[g.name])
        elif g.kind == "residual":
            out[g.name] = t[g.name].double().T
    for g in spec.groups:
        if g.name in t and g.kind in ("vo", "qk"):
            inv = torch.linalg.inv(t[g.name].double())
            h = out.get(heads[g.name])
            out[g.name] = inv if h is None else inv[kv_perm(g, h)]
    return Alignment(out)
