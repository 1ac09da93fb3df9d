"""Activation matching: the same solves as weight matching, driven by activations on probe data.

Forward hooks read each group's units where the spec's probes say (the input of the MLP's down
projection, of the attention output projection, of every norm on the residual stream, ...), batch by
batch, and accumulate first and second moments in float64 on the device, so memory does not grow with
the probe set. Then, per group, independently (activations carry no trace of the other groups):

- permutations (MLP units, the residual when asked): linear assignment on the correlation matrix;
- heads: the structured GQA assignment on per-head sums of unit correlations (the attention output of
  a query head is what the output projection reads; KV groups follow their query heads);
- an orthogonal residual: Procrustes on the uncentred cross-moment ``E[a b^T]`` (fixing the all-ones
  vector for LayerNorm models), which recovers ``Q`` exactly when B is a rotated copy of A.

V-O bases are not matched from activations; weight matching does that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from modelcypher.align.solvers import procrustes, procrustes_fixing_ones, solve_heads, solve_lap
from modelcypher.align.transform import Alignment
from modelcypher.align.weight_matching import ResidualMode, head_blocks, resolve_residual, trace
from modelcypher.arch.symmetry import Group, SymmetrySpec
from modelcypher.errors import UserError

Batch = torch.Tensor | Mapping[str, torch.Tensor]


class CrossMoments:
    """Running sums for the correlation and cross-moment between A's and B's units."""

    def __init__(self, n: int, device: torch.device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.sum_a, self.sum_b, self.sq_a, self.sq_b = z(n), z(n), z(n), z(n)
        self.ab = z(n, n)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        xa, xb = xa.double(), xb.double()
        self.count += xa.shape[0]
        self.sum_a += xa.sum(0)
        self.sum_b += xb.sum(0)
        self.sq_a += (xa * xa).sum(0)
        self.sq_b += (xb * xb).sum(0)
        self.ab += xa.T @ xb

    def cross(self) -> torch.Tensor:
        return (self.ab / self.count).cpu()

    def correlation(self) -> torch.Tensor:
        mean_a, mean_b = self.sum_a / self.count, self.sum_b / self.count
        cov = self.ab / self.count - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / self.count - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / self.count - mean_b**2).clamp_min(0).sqrt()
        return (cov / (torch.outer(std_a, std_b) + 1e-12)).cpu()


class Recorder:
    """Forward hooks that keep the latest activation at each probe of each group."""

    def __init__(self, model: torch.nn.Module, groups: list[Group]):
        modules = dict(model.named_modules())
        self.acts: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for g in groups:
            for k, probe in enumerate(g.probes):
                if probe.module not in modules:
                    raise UserError(f"model has no module {probe.module!r} to probe for group {g.name}")
                self.handles.append(modules[probe.module].register_forward_hook(self.hook(g.name, k, probe.at)))

    def hook(self, name: str, k: int, at: str):
        def record(module, inputs, output):
            x = inputs[0] if at == "input" else output
            self.acts[name, k] = (x[0] if isinstance(x, tuple) else x).detach()

        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor | None:
    """Forward one batch; return the mask of real (non-padding) positions, if any."""
    if isinstance(batch, Mapping):
        batch = {k: v.to(device) for k, v in batch.items()}
        model(**batch)
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()
    model(batch.to(device))
    return None


def rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Activations as ``[positions, units]``, padding dropped."""
    if mask is not None and x.dim() == mask.dim() + 1:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def match_activations(
    model_b: torch.nn.Module,
    model_a: torch.nn.Module,
    spec: SymmetrySpec,
    token_batches: Iterable[Batch],
    device: str | torch.device = "cpu",
    *,
    residual: ResidualMode = "auto",
) -> Alignment:
    """Transforms bringing B onto A from activation statistics on ``token_batches``.

    A batch is a tensor of token ids (features for the MLP family) or a dict of model inputs whose
    ``attention_mask`` marks the positions to use. Both models are moved to ``device`` and set to eval.
    """
    device = torch.device(device)
    residual = resolve_residual(spec, residual)
    groups = [g for g in spec.groups if g.probes and (g.kind != "residual" or residual != "none")]
    units = {g.name: g.heads.n_heads * g.heads.head_dim if g.kind == "heads" else g.size for g in groups}
    moments = {g.name: CrossMoments(units[g.name], device) for g in groups}
    models = [m.to(device).eval() for m in (model_a, model_b)]
    recorders = [Recorder(m, groups) for m in models]
    try:
        for batch in token_batches:
            masks = [run(m, batch, device) for m in models]
            for g in groups:
                for k in range(len(g.probes)):
                    xa, xb = (rows(r.acts[g.name, k], mask) for r, mask in zip(recorders, masks, strict=True))
                    moments[g.name].update(xa, xb)
    finally:
        for r in recorders:
            r.close()
    if any(m.count == 0 for m in moments.values()):
        raise UserError("activation matching saw no tokens: give at least one non-empty batch")
    return Alignment({g.name: solve_group(g, moments[g.name], spec, residual) for g in groups})


def solve_group(g: Group, m: CrossMoments, spec: SymmetrySpec, residual: str) -> torch.Tensor:
    if g.kind == "perm" or (g.kind == "residual" and residual == "permutation"):
        return solve_lap(m.correlation())
    if g.kind == "residual":
        cross = m.cross()
        t = procrustes_fixing_ones(cross) if spec.norm == "layernorm" else procrustes(cross)
        return t.T  # stored as Q (x -> x Q)
    mq, _ = head_blocks({"query": m.correlation()}, g)
    h = g.heads
    return solve_heads(trace(mq), torch.zeros(h.n_kv_heads, h.n_kv_heads), h.group_size)
