"""A candidate merged in memory: the models held once on the worker's device, each output tensor
computed by the merge engine's own per-tensor step, nothing written. In the parameter space one plan
serves every candidate (its searched values swapped in); in the data-flow space each candidate's
recipe is planned (headers only) and read from the held pool."""

from __future__ import annotations

from dataclasses import replace

import torch

from modelcypher.checkpoint import Checkpoint
from modelcypher.merging.config import MergeConfig
from modelcypher.merging.plan import Plan, TensorTask, make_plan
from modelcypher.merging.run import compute_blocks

RANDOM_SEED = 0  # what ``modelcypher merge`` uses by default: a recipe reproduces its candidate as it is


class HeldCheckpoint:
    """The tensors of a checkpoint that a plan reads, read once and held on ``device``, behind the
    reader's verbs (``shape``, ``dtype``, ``get``)."""

    def __init__(self, ck, names: set[str], device: torch.device):
        self.path, self.config = ck.path, ck.config
        self._t = {n: ck.get(n).to(device) for n in sorted(names)}

    @property
    def names(self) -> list[str]:
        return list(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t[name].dtype

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self._t[name]
        return t if rows is None or t.dim() == 0 else t[rows]


def held(plan: Plan, device: torch.device) -> Plan:
    """``plan`` reading from its models held in memory on ``device``."""
    reads: dict[int, set[str]] = {}
    for t in plan.tasks:
        for mi, n in list(t.sources) + ([t.base] if t.base else []) + list(t.rows.slots if t.rows else []):
            reads.setdefault(mi, set()).add(n)
    return replace(plan, models=[HeldCheckpoint(ck, reads.get(mi, set()), device) for mi, ck in enumerate(plan.models)])


def with_values(task: TensorTask, slots: dict, values: list[float]) -> TensorTask:
    """``task`` with its searched parameters set from ``values`` (``slots``: the gene index of each)."""
    params = dict(task.params)
    for key, s in slots.items():
        params[key] = [values[i] for i in s] if isinstance(s, list) else values[s]
    return replace(task, params=params)


def merged_state(plan: Plan, slots: list[dict], values: list[float], device: torch.device,
                 stats=None) -> dict[str, torch.Tensor]:
    """Every output tensor of the candidate ``values``, as ``modelcypher merge`` of its recipe writes it
    (``stats``: the data statistics of a method that needs them)."""
    out = {}
    for task, s in zip(plan.tasks, slots, strict=True):
        parts = [y for _, y in compute_blocks(plan, with_values(task, s, values), device, RANDOM_SEED, False, stats)]
        out[task.name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out


class ParameterCandidates:
    """The parameter space's candidates: one plan, each candidate's values put into its tasks."""

    def __init__(self, plan: Plan, slots: list[dict], device: torch.device, stats=None):
        self.plan, self.slots, self.device, self.stats = held(plan, device), slots, device, stats

    def merged(self, values: list[float]) -> tuple[dict, dict[str, torch.Tensor]]:
        """The candidate's config and tensors."""
        return self.plan.out_config, merged_state(self.plan, self.slots, values, self.device, self.stats)


class DataflowCandidates:
    """The data-flow space's candidates: every pool model held whole; a candidate is the plan of its
    recipe (``space.recipe``, absolute paths) reading from them."""

    def __init__(self, space, device: torch.device):
        self.space, self.device = space, device
        self.pool = {}
        for pm in space.pool:
            ck = Checkpoint(pm.path)
            self.pool[pm.path] = HeldCheckpoint(ck, set(ck.names), device)

    def merged(self, values: list[float]) -> tuple[dict, dict[str, torch.Tensor]]:
        plan = make_plan(MergeConfig.model_validate(self.space.recipe(values)))
        plan = replace(plan, models=[self.pool[ck.path] for ck in plan.models])
        return plan.out_config, merged_state(plan, [{}] * len(plan.tasks), [], self.device)
