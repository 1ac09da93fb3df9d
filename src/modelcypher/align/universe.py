"""Universe matching (seed 004, "Multi-Model Merging"): N models of one family onto a shared universe.

Aligning every model onto one reference is not cycle-consistent: B onto A and C onto A leaves B and C
as far apart as the two solves' errors add up. Here every model ``k`` gets its own transform ``T_k``
onto a universe ``U`` built from all of them:

- start: the first model, then each next one weight-matched onto the mean of those before it;
- round ``t``: for each model ``k`` in turn, ``T_k = argmax_T <T(theta_k), U_-k>`` by weight matching
  (``match_weights``, started from ``T_k``), where ``U_-k`` is the mean of the other models as aligned so
  far (leaving the model itself out: it would pull ``T_k`` towards its current value and slow the rounds
  down to a crawl). Each solve raises ``sum_{j<k} <T_j theta_j, T_k theta_k>``, the agreement of all pairs.
  The universe is ``U_t = mean_k T_k(theta_k)``, written in the first model's frame (``T_0`` = identity):
  it is defined only up to one symmetry shared by every model, along which it would otherwise drift;
- convergence: the universe's relative movement ``delta_t = ||U_t - U_{t-1}||_F / ||U_t||_F`` (over
  every tensor). The rounds stop when ``delta_t <= tol`` or after ``max_rounds``; ``Universe.movement``
  keeps every ``delta_t``. Once the permutations settle, the Procrustes steps converge geometrically.

Any pair's map is ``T_j^{-1} T_k`` (``transform.compose``, ``transform.invert``), so the maps of a
cycle compose to the identity by construction. Learned refinement of the whole set is
``learned_matching.refine_universe``.

The universe is held in memory in float32, one model's worth; the models are read tensor by tensor
(any mapping, e.g. ``align.pipeline.CheckpointView``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from modelcypher.align.transform import Alignment, compose, group_ops, invert, slots_by_tensor, transform_tensor
from modelcypher.align.weight_matching import ResidualMode, match_weights, prepare, resolve_residual
from modelcypher.arch.symmetry import SymmetrySpec
from modelcypher.errors import UserError

StateDict = dict[str, torch.Tensor]


@dataclass
class Universe:
    alignments: list[Alignment]  # T_k: model k onto the universe
    movement: list[float] = field(default_factory=list)  # delta_t per round
    residual: str = "orthogonal"


def aligned_mean(states: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec,
                 alignments: Sequence[Alignment], weights: Sequence[float] | None = None) -> StateDict:
    """``sum_k w_k T_k(theta_k)`` (the mean when no weights are given), in float32, tensor by tensor;
    tensors that are not floating point come from the first model."""
    weights = weights if weights is not None else [1.0 / len(states)] * len(states)
    by_tensor = slots_by_tensor(spec)
    ops = [group_ops(spec, a.transforms, torch.float32) for a in alignments]
    out: StateDict = {}
    for name in states[0]:
        first = states[0][name]
        if not first.is_floating_point():
            out[name] = first
            continue
        total = torch.zeros(first.shape, dtype=torch.float32)
        for sd, op, w in zip(states, ops, weights, strict=True):
            total.add_(transform_tensor(sd[name].float(), by_tensor.get(name, []), op), alpha=w)
        out[name] = total
    return out


def movement(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """``||new - old||_F / ||new||_F`` over every floating tensor."""
    diff = math.fsum(float((new[k].double() - old[k].double()).square().sum()) for k in new
                     if new[k].is_floating_point())
    norm = math.fsum(float(new[k].double().square().sum()) for k in new if new[k].is_floating_point())
    return math.sqrt(diff / norm) if norm > 0 else 0.0


def combine(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], a: float, b: float) -> StateDict:
    """``a x + b y`` for floating tensors (the rest from ``x``)."""
    return {k: a * v + b * y[k] if v.is_floating_point() else v for k, v in x.items()}


def match_universe(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: SymmetrySpec,
    *,
    residual: ResidualMode = "auto",
    vo: bool = False,
    qk: bool = False,
    max_sweeps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    max_rounds: int = 10,
    tol: float = 1e-4,
    prepared: bool = False,
) -> Universe:
    """Transforms bringing every model onto their shared universe, by weight matching against it.

    ``states``: two or more models of one family and shape. ``prepared`` as in ``match_weights`` (tied
    head present, norms folded for an orthogonal residual). The first descents use ``restarts`` visiting
    orders; later ones start from the model's previous transform.
    """
    if len(states) < 2:
        raise UserError(f"universe matching needs at least two models, got {len(states)}")
    residual = resolve_residual(spec, residual)
    if not prepared:
        states = [prepare(sd, spec, residual) for sd in states]
    n = len(states)

    def solve(k: int, target: Mapping[str, torch.Tensor], init: Alignment | None) -> Alignment:
        return match_weights(states[k], target, spec, residual=residual, vo=vo, qk=qk, max_sweeps=max_sweeps,
                             prepared=True, seed=seed + k, restarts=restarts if init is None else 1,
                             init=None if init is None else init.transforms)

    def moved(k: int, a: Alignment) -> StateDict:
        return aligned_mean([states[k]], spec, [a], [1.0])

    # Start: the first model, then each next one matched onto the mean of those before it.
    alignments = [Alignment()]
    total = moved(0, alignments[0])  # sum_k T_k(theta_k)
    for k in range(1, n):
        alignments.append(solve(k, combine(total, total, 1.0 / k, 0.0), None))
        total = combine(total, moved(k, alignments[k]), 1.0, 1.0)
    universe = combine(total, total, 1.0 / n, 0.0)
    history: list[float] = []
    for _ in range(max_rounds):
        for k in range(n):
            mine = moved(k, alignments[k])
            others = combine(total, mine, 1.0 / (n - 1), -1.0 / (n - 1))
            alignments[k] = solve(k, others, alignments[k])
            total = combine(combine(total, mine, 1.0, -1.0), moved(k, alignments[k]), 1.0, 1.0)
        # The universe is defined up to one symmetry shared by every model; expressing it in the first
        # model's frame (T_0 = identity) keeps it from drifting along that symmetry between rounds.
        gauge = invert(spec, alignments[0])
        alignments = [compose(spec, a, gauge) for a in alignments]
        new = aligned_mean(states, spec, alignments)
        total = combine(new, new, float(n), 0.0)
        history.append(movement(new, universe))
        universe = new
        if history[-1] <= tol:
            break
    return Universe(alignments, history, residual)
