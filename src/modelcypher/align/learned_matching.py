"""Learned matching (seed 004): refine an alignment's continuous transforms on the loss of the midpoint.

Weight matching maximizes weight similarity, a proxy. Learned matching descends what the barrier
measures: the task loss of ``(1 - lam) theta_A + lam T(theta_B)`` with ``lam ~ U(0.4, 0.6)``, starting
from weight matching (the paper finds the start critical). Its analysis puts the gap between the two
in the residual rotation, with small corrections and the permutations left as they were; so here the
permutations stay fixed and the orthogonal transforms move on their manifold:

- the residual ``Q = Q0 exp(S - S^T)``; for pre-norm LayerNorm ``Q = 11^T/d + B R0 exp(S - S^T) B^T``
  with ``B`` a basis of the complement of the all-ones vector, so ``Q 1 = 1`` holds at every step;
- each KV group's V-O and Q-K bases ``A = A0 exp(K - K^T)`` (orthogonal), when asked; under RoPE the
  Q-K generator is masked to the rotary pairs, so ``exp`` stays a rotation of each pair.

The exponential of a skew matrix is orthogonal, so every iterate is an exact symmetry: the aligned B
still computes B's function, whatever the optimizer does. Only causal language models (a next-token
loss on text) are supported.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from modelcypher.align.rope import rope_pairs
from modelcypher.align.solvers import ones_complement_basis
from modelcypher.align.transform import (
    Alignment,
    fold,
    fold_norms,
    is_perm,
    materialize_tied,
    transform_state,
)
from modelcypher.arch.families import spec_for
from modelcypher.arch.symmetry import SymmetrySpec
from modelcypher.errors import UserError
from modelcypher.hf import causal_lm, untied_model


def skew(s: torch.Tensor) -> torch.Tensor:
    return s - s.transpose(-1, -2)


def rope_mask(head_dim: int) -> torch.Tensor:
    """Generator entries ``(i, i + head_dim/2)``: their skew part generates rotations of the rotary pairs."""
    mask = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    i, j = rope_pairs(head_dim)
    mask[i, j] = 1.0
    return mask


class Rotations(torch.nn.Module):
    """The free parameters (skew generators) around the starting transforms, and the transforms they give."""

    def __init__(self, init: Mapping[str, torch.Tensor], residual: str, layernorm: bool,
                 bases: Mapping[str, torch.Tensor | None]):
        """``bases``: the in-head basis groups to learn, each with a mask of its free generator entries
        (None: all free)."""
        super().__init__()
        self.fixed = {k: v for k, v in init.items() if k != residual and k not in bases}
        self.residual, self.layernorm = residual, layernorm
        q0 = init[residual].double()
        if layernorm:
            self.basis = ones_complement_basis(q0.shape[0])
            q0 = self.basis.T @ q0 @ self.basis  # R0: the rotation of the complement of 1
        self.start: dict[str, torch.Tensor] = {residual: q0, **{name: init[name].double() for name in bases}}
        self.masks = [None, *bases.values()]
        self.gen = torch.nn.ParameterList()  # group names hold dots, which ParameterDict refuses
        for t in self.start.values():
            self.gen.append(torch.nn.Parameter(torch.zeros_like(t)))

    def transforms(self) -> dict[str, torch.Tensor]:
        out = dict(self.fixed)
        for (name, t0), s, mask in zip(self.start.items(), self.gen, self.masks, strict=True):
            t = t0 @ torch.linalg.matrix_exp(skew(s if mask is None else s * mask))
            if name == self.residual and self.layernorm:
                d = t.shape[0] + 1
                t = torch.full((d, d), 1.0 / d, dtype=t.dtype) + self.basis @ t @ self.basis.T
            out[name] = t
        return out


def rotations_for(spec: SymmetrySpec, init: Alignment, vo: bool, qk: bool) -> Rotations:
    """The learnable rotations around ``init``: the residual and, when asked, every V-O and Q-K basis."""
    q = init.transforms.get(spec.residual.name) if spec.residual is not None else None
    if q is None or is_perm(q):
        raise UserError("learned matching refines an orthogonal residual: start from weight matching with "
                        "--residual orthogonal")
    kinds = {k for k, on in (("vo", vo), ("qk", qk)) if on}
    bases = {g.name: rope_mask(g.heads.head_dim) if g.kind == "qk" and g.heads.rope else None
             for g in spec.groups if g.kind in kinds}
    start = dict(init.transforms)
    for g in spec.groups:
        if g.name in bases and g.name not in start:
            start[g.name] = torch.eye(g.heads.head_dim, dtype=torch.float64).expand(g.heads.n_kv_heads, -1, -1)
    return Rotations(start, spec.residual.name, spec.norm == "layernorm", bases)


def descend_mixture(
    holder: torch.nn.Module,
    template: Mapping[str, torch.Tensor],
    parts: Sequence[tuple[Mapping[str, torch.Tensor], Rotations | None]],
    spec: SymmetrySpec,
    draw: Callable[[torch.Generator], list[float]],
    batches: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Adam on the rotations of ``parts`` (folded state dicts, each with its rotations or None when fixed),
    minimizing the next-token loss of the mixture ``sum_k w_k T_k(theta_k)``, weights drawn afresh each
    step by ``draw``. ``template``: the holder's full state on ``device`` (buffers, and every tensor no
    part has). Returns the loss per step."""
    rots = [r for _, r in parts if r is not None]
    opt = torch.optim.Adam([p for r in rots for p in r.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    fixed = [None if r is not None else {k: v.float().to(device) for k, v in sd.items()} for sd, r in parts]
    losses: list[float] = []
    for step in range(steps):
        x = batches[step % len(batches)].to(device)
        w = draw(gen)
        aligned = [f if f is not None else transform_state(sd, spec, r.transforms())
                   for f, (sd, r) in zip(fixed, parts, strict=True)]
        mix = {}
        for k, t in template.items():
            if not t.is_floating_point() or any(k not in a for a in aligned):
                mix[k] = t  # a buffer of the model class, not a checkpoint tensor
            else:
                mix[k] = sum(wk * a[k].float().to(device) for wk, a in zip(w, aligned, strict=True))
        logits = torch.func.functional_call(holder, mix, args=(x[:, :-1],), kwargs={"use_cache": False}).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"learned matching step {step + 1}/{steps}: mixture loss {losses[-1]:.4f} "
                f"(weights {', '.join(f'{x:.2f}' for x in w)})")
        if not math.isfinite(losses[-1]):
            raise UserError(f"learned matching diverged at step {step + 1} (loss {losses[-1]}): lower the lr")
    return losses


def frozen_holder(config: dict, sd: Mapping[str, torch.Tensor], device: torch.device
                  ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A model of ``config`` with its head untied and no gradients, and the full float32 state of ``sd``
    in it, on ``device``."""
    model, full = causal_lm(config, sd)
    holder = untied_model(model).to(device)
    for p in holder.parameters():
        p.requires_grad_(False)
    return holder, {k: v.float().to(device) for k, v in full.items()}


def match_learned(
    sd_b: Mapping[str, torch.Tensor],
    sd_a: Mapping[str, torch.Tensor],
    config: dict,
    init: Alignment,
    batches: Sequence[torch.Tensor],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    lam: tuple[float, float] = (0.4, 0.6),
    vo: bool = True,
    qk: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[Alignment, list[float]]:
    """Refine ``init`` (B onto A, from weight matching) by Adam on the midpoint's next-token loss.

    ``batches``: ``[batch, seq]`` token ids of training text (held-out text stays for the barrier).
    Returns the refined alignment and the loss per step.
    """
    spec = spec_for(config, sd_b.keys())
    rot = rotations_for(spec, init, vo, qk)
    if not batches:
        raise UserError("learned matching needs training text: no token batches")
    device = torch.device(device)
    a_folded, config_a = fold_norms(sd_a, config)
    holder, a_full = frozen_holder(config_a, a_folded, device)
    b_folded = fold(materialize_tied({k: v.float() for k, v in sd_b.items()}, spec)[0], spec)

    def draw(gen: torch.Generator) -> list[float]:
        t = lam[0] + (lam[1] - lam[0]) * float(torch.rand((), generator=gen))
        return [1.0 - t, t]

    losses = descend_mixture(holder, a_full, [(a_full, None), (b_folded, rot)], spec, draw, batches, steps=steps,
                             lr=lr, seed=seed, device=device, log=log)
    with torch.no_grad():
        final = {k: v.detach().clone() for k, v in rot.transforms().items()}
    return Alignment(final, list(init.history)), losses


def dirichlet(alpha: float, n: int) -> Callable[[torch.Generator], list[float]]:
    """Draws of ``lambda ~ Dirichlet(alpha 1_n)``: ``n`` Gamma(alpha, 1) draws, normalized."""

    def draw(gen: torch.Generator) -> list[float]:
        rng = random.Random(int(torch.randint(2**62, (), generator=gen)))
        g = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
        total = math.fsum(g)
        return [x / total for x in g] if total > 0 else [1.0 / n] * n

    return draw


def refine_universe(
    states: Sequence[Mapping[str, torch.Tensor]],
    config: dict,
    inits: Sequence[Alignment],
    batches: Sequence[torch.Tensor],
    *,
    alpha: float = 0.1,
    steps: int = 200,
    lr: float = 1e-3,
    vo: bool = True,
    qk: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[list[Alignment], list[float]]:
    """Refine every model's transform onto the universe (``inits``, from universe matching) by Adam on
    the loss of ``sum_k lambda_k T_k(theta_k)``, ``lambda ~ Dirichlet(alpha 1)`` drawn each step (seed 004;
    a small ``alpha`` draws points near the simplex's corners and edges, where the barrier sits). Every
    model's rotations move; the permutations stay. Returns the refined alignments and the loss per step.
    """
    spec = spec_for(config, states[0].keys())
    rots = [rotations_for(spec, a, vo, qk) for a in inits]
    if not batches:
        raise UserError("learned matching needs training text: no token batches")
    if not alpha > 0:
        raise UserError(f"alpha must be positive, not {alpha}")
    device = torch.device(device)
    folded = [fold(materialize_tied({k: v.float() for k, v in sd.items()}, spec)[0], spec) for sd in states]
    config_0 = fold_norms(states[0], config)[1]
    holder, template = frozen_holder(config_0, folded[0], device)
    losses = descend_mixture(holder, template, list(zip(folded, rots, strict=True)), spec,
                             dirichlet(alpha, len(states)), batches, steps=steps, lr=lr, seed=seed, device=device,
                             log=log)
    with torch.no_grad():
        final = [Alignment({k: v.detach().clone() for k, v in r.transforms().items()}, list(a.history))
                 for r, a in zip(rots, inits, strict=True)]
    return final, losses
