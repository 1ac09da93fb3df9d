"""The parameter space: which values of a merge config a search varies, and how a point of the unit
cube the optimizer works in becomes a merge config.

A gene is one value of one searched parameter, for one model (a per-model parameter such as
``weight``; global ones such as ``lambda`` have one gene for all models), one tensor filter (or the
tensors no filter matches) and one group of ``layer_granularity`` consecutive layers. In the merge
config a gene's value appears in mergekit's forms: a list with one value per layer (each layer of a
group the group's value; tensors before the layers take the first group's, tensors after them the
last group's), under ``{filter, value}`` entries when the search has filters.

Which gene each output tensor reads is decided by the merge planner itself: the search plans once a
config whose values are the genes' indices (:func:`template`), so a candidate's tensors and the
merge of its recipe (:func:`recipe`) read the same values by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelcypher.arch.families import num_layers
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.evolve.config import Bounds, SearchConfig
from modelcypher.merging.config import MergeConfig
from modelcypher.merging.plan import Plan, check_config, make_plan
from modelcypher.merging.registry import Method, get_method
from modelcypher.merging.stats import JOINT


@dataclass(frozen=True)
class Domain:
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False  # lo itself is outside (a positive step, a positive epsilon)

    def __str__(self) -> str:
        return f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"

    def holds(self, b: Bounds) -> bool:
        above = b.min > self.lo if self.open_lo else b.min >= self.lo
        return above and b.max <= self.hi


# The real-valued parameters of our merge methods and where each is defined (fractions in [0, 1],
# scales and weights anywhere on the line, steps and tolerances positive); the rest (booleans, counts,
# names) are not searched.
UNIT, REAL, POSITIVE = Domain(0.0, 1.0), Domain(), Domain(0.0, math.inf, open_lo=True)
DOMAINS: dict[str, Domain] = {
    "weight": REAL, "lambda": REAL, "init": REAL,
    "density": UNIT, "gamma": UNIT, "epsilon": UNIT, "t": UNIT, "DOT_THRESHOLD": UNIT, "alpha": UNIT,
    "fraction": Domain(0.0, 1.0, open_lo=True),
    "eps": POSITIVE, "lr": POSITIVE, "ridge": POSITIVE, "rank_threshold": POSITIVE,
}
METHOD_DOMAINS: dict[tuple[str, str], Domain] = {("fisher", "epsilon"): POSITIVE}


@dataclass(frozen=True)
class Gene:
    param: str  # as the config spells it (``lambda``)
    model: str | None  # the model entry of a per-model parameter
    filter: str | None  # None: the tensors no filter matches
    group: int  # layers [group * granularity, (group + 1) * granularity)
    lo: float
    hi: float

    def label(self, granularity: int, groups: int, filtered: bool = False) -> str:
        where = [f"model {self.model}"] if self.model is not None else []
        if self.filter is not None:
            where.append(f"filter {self.filter}")
        elif filtered:
            where.append("other tensors")
        if groups > 1:
            a, b = self.group * granularity, (self.group + 1) * granularity - 1
            where.append(f"layer {a}" if a == b else f"layers {a}-{b}")
        return self.param + (f" ({', '.join(where)})" if where else "")


@dataclass(frozen=True)
class Space:
    genes: tuple[Gene, ...]
    depth: int  # layers of the merged model (1 for a model without layers)
    granularity: int
    filters: tuple[str | None, ...]  # the search's filters, then None (the rest)

    @property
    def groups(self) -> int:
        return -(-self.depth // self.granularity)

    def values(self, u: np.ndarray) -> list[float]:
        """A point of the unit cube as parameter values (``lo + u (hi - lo)``, each gene its own bounds)."""
        return [float(g.lo + float(x) * (g.hi - g.lo)) for g, x in zip(self.genes, u, strict=True)]

    def labels(self) -> list[str]:
        return [g.label(self.granularity, self.groups, len(self.filters) > 1) for g in self.genes]


def _domain(method: Method, name: str) -> Domain | None:
    known = {**method.model_params, **method.global_params}
    if name not in known:
        raise UserError(f"search: merge_method {method.name} has no parameter {name!r} "
                        f"(it takes {', '.join(sorted(known)) or 'no parameters'})")
    return METHOD_DOMAINS.get((method.name, name), DOMAINS.get(name))


def build_space(cfg: SearchConfig, config_dir: Path | None) -> tuple[Space, MergeConfig]:
    """The genes of ``cfg.search`` (bounds checked against each parameter's domain), and the merge
    config without the searched values (what stays fixed)."""
    base_cfg = MergeConfig.model_validate(cfg.merge_dict())
    method = get_method(base_cfg.merge_method)
    if set(method.stats) & JOINT:
        raise UserError(f"merge_method {method.name} fits its coefficients to data with its parameters; "
                        "they are not searched (search e.g. task_arithmetic, ties, fisher or regmean)")
    bounds = cfg.search.bounds
    if not bounds:
        raise UserError("search: no parameter to search; give at least one with bounds, e.g. "
                        "weight: {min: 0.0, max: 1.5}")
    for name, b in bounds.items():
        dom = _domain(method, name)
        if dom is None:
            raise UserError(f"search.{name}: not a real-valued parameter of {method.name}; only those are searched")
        if not dom.holds(b):
            raise UserError(f"search.{name}: bounds [{b.min:g}, {b.max:g}] leave its domain {dom}")
        fixed = [e.model for e in cfg.models if name in e.parameters] + (["parameters"] if name in cfg.parameters
                                                                         else [])
        if fixed:
            raise UserError(f"search.{name}: also fixed (in {fixed[0]}); a parameter is either searched or set")
    ref = cfg.base_model or cfg.models[0].model
    depth = num_layers(Checkpoint(resolve_path(ref, config_dir)).config) or 1
    granularity = min(cfg.search.layer_granularity or depth, depth)
    filters = (*cfg.search.filters, None)
    groups = -(-depth // granularity)
    uses_base = method.base != "none" and cfg.base_model is not None
    sources = [e.model for e in cfg.models if not (uses_base and e.model == cfg.base_model)]
    genes = []
    for name, b in bounds.items():
        owners = sources if name in method.model_params else [None]
        for model in owners:
            for f in filters:
                for g in range(groups):
                    genes.append(Gene(name, model, f, g, b.min, b.max))
    space = Space(tuple(genes), depth, granularity, filters)
    check_config(MergeConfig.model_validate(recipe(space, cfg, [g.lo for g in genes])))  # base, other parameters
    return space, base_cfg


def _form(space: Space, per: dict[tuple[str | None, int], float]):
    """A parameter's config value from its value per (filter, group): a scalar, a list per layer, or
    ``{filter, value}`` entries (the last without a filter)."""
    def layers(f):
        if space.groups == 1:
            return per[f, 0]
        return [per[f, layer // space.granularity] for layer in range(space.depth)]

    if len(space.filters) == 1:
        return layers(None)
    return [({"filter": f} if f is not None else {}) | {"value": layers(f)} for f in space.filters]


def recipe(space: Space, cfg: SearchConfig, values: list[float]) -> dict:
    """The merge config (a dict, as ``modelcypher merge`` reads it) of one point of the space."""
    out = cfg.merge_dict()
    by: dict[tuple[str, str | None], dict] = {}
    for g, v in zip(space.genes, values, strict=True):
        by.setdefault((g.param, g.model), {})[g.filter, g.group] = v
    for (param, model), per in by.items():
        if model is None:
            out.setdefault("parameters", {})[param] = _form(space, per)
        else:
            for e in out["models"]:
                if e["model"] == model:
                    e.setdefault("parameters", {})[param] = _form(space, per)
    return out


def template(space: Space, cfg: SearchConfig, config_dir: Path | None) -> tuple[Plan, list[dict[str, object]]]:
    """The plan of every candidate, and per task the gene each searched parameter reads there: for a
    global parameter one gene index, for a per-model one a list (one per source model).

    Planned once, from a recipe whose values are the genes' own indices, so that which gene a tensor
    reads is what the planner decides for any recipe of the same form."""
    plan = make_plan(MergeConfig.model_validate(recipe(space, cfg, [float(i) for i in range(len(space.genes))])),
                     config_dir=config_dir)
    keys = {g.param: ("lambda_" if g.param == "lambda" else g.param) for g in space.genes}
    slots, used = [], set()
    for task in plan.tasks:
        per: dict[str, object] = {}
        if not task.copy:
            for key in keys.values():
                v = task.params[key]
                per[key] = [round(x) for x in v] if isinstance(v, list) else round(v)
                used.update(per[key] if isinstance(per[key], list) else [per[key]])
        slots.append(per)
    unused = [g for i, g in enumerate(space.genes) if i not in used]
    if unused:
        g = unused[0]
        what = f"filter {g.filter!r} matches no tensor" if g.filter is not None else "no tensor reads it"
        label = g.label(space.granularity, space.groups, len(space.filters) > 1)
        raise UserError(f"search: {label}: {what} of the models")
    return plan, slots
