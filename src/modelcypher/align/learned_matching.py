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
    q = init.transforms.get(spec.residual.name) if spec.residual is not None else None
    if q is None or is_perm(q):
        raise UserError("learned matching refines an orthogonal residual: start from weight matching with "
                        "--residual orthogonal")
    if not batches:
        raise UserError("learned matching needs training text: no token batches")
    device = torch.device(device)
    kinds = {k for k, on in (("vo", vo), ("qk", qk)) if on}
    bases = {g.name: rope_mask(g.heads.head_dim) if g.kind == "qk" and g.heads.rope else None
             for g in spec.groups if g.kind in kinds}
    start = dict(init.transforms)
    for g in spec.groups:
        if g.name in bases and g.name not in start:
            start[g.name] = torch.eye(g.heads.head_dim, dtype=torch.float64).expand(g.heads.n_kv_heads, -1, -1)
    rot = Rotations(start, spec.residual.name, spec.norm == "layernorm", bases)

    a_folded, config_a = fold_norms(sd_a, config)
    model, a_full = causal_lm(config_a, a_folded)
    holder = untied_model(model).to(device)
    for p in holder.parameters():
        p.requires_grad_(False)
    b_folded = fold(materialize_tied({k: v.float() for k, v in sd_b.items()}, spec)[0], spec)
    a_full = {k: v.float().to(device) for k, v in a_full.items()}

    opt = torch.optim.Adam(rot.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        x = batches[step % len(batches)].to(device)
        t = lam[0] + (lam[1] - lam[0]) * float(torch.rand((), generator=gen))
        b_aligned = transform_state(b_folded, spec, rot.transforms())
        mix = {}
        for k, a in a_full.items():
            b = b_aligned.get(k)  # None: a buffer of the model class, not a checkpoint tensor
            mix[k] = a if b is None or not a.is_floating_point() else torch.lerp(a, b.float().to(device), t)
        logits = torch.func.functional_call(holder, mix, args=(x[:, :-1],), kwargs={"use_cache": False}).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"learned matching step {step + 1}/{steps}: midpoint loss {losses[-1]:.4f} (lambda {t:.2f})")
        if not math.isfinite(losses[-1]):
            raise UserError(f"learned matching diverged at step {step + 1} (loss {losses[-1]}): lower the lr")
    with torch.no_grad():
        final = {k: v.detach().clone() for k, v in rot.transforms().items()}
    return Alignment(final, list(init.history)), losses
