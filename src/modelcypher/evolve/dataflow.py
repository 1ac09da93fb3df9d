"""The data-flow space of evolutionary model merging (Akiba, Shing, Tang, Sun, Ha, 'Evolutionary
Optimization of Model Merging Recipes', 2024, arXiv:2403.13187, section 3.2): a candidate is a path of
layers through a pool of models, each layer's input scaled.

The pool's layers, model after model, repeated ``r`` times, are the ``T`` slots of the search. A
genome holds an indicator per slot (the slot's layer is in the path or not) and a scaling per slot (the
hidden state entering that layer is multiplied by it; the paper's ``W``, which it indexes by the pair
of consecutive layers, is here one value per slot). The path keeps the included slots in pool order
(at most ``max_layers`` of them, the first ones).

A path is written as a passthrough frankenmerge, one slice per layer, with the scalings folded into
weights (:func:`fold`), so the result is a plain checkpoint of the pool's family: ``best.yaml`` is a
merge config that ``modelcypher merge`` (or mergekit) runs as it is. A pool entry may itself be a
merge recipe (e.g. the ``best.yaml`` of a parameter-space search): it is merged into ``DIR/pool/<name>``
first and its layers join the pool, the paper's two spaces in sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from modelcypher.arch.families import family_of, layer_index, num_layers, with_layer
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.guard import atomic_dir
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.evolve.config import PoolEntry, SearchConfig
from modelcypher.merging.config import MergeConfig, read_yaml, validated
from modelcypher.merging.plan import make_plan
from modelcypher.merging.run import execute
from modelcypher.merging.stats import collect

POOL = "pool"  # the search directory's folder for the pool's merges


def fold(scales: Sequence[float]) -> list[float]:
    """The factor on the residual writers of each layer of a path that folds its input scalings
    ``s_0, s_1, ...`` into weights: ``1 / P_k`` with ``P_k = s_0 s_1 ... s_k``.

    A pre-norm layer is ``x -> x + F(x)`` with ``F(x) = A(n1(x)) + M(n2(x + A(n1(x))))``; its norms
    ``n`` are invariant to a positive scaling, so ``F`` with its writers (the last matrices of ``A`` and
    ``M``, with their biases) scaled by ``1/c`` satisfies ``F'(x / c) = F(x) / c``. The scaled path
    ``h_{k+1} = s_k h_k + F_k(s_k h_k)``, carried as ``g_k = h_k / P_{k-1}``, is then
    ``g_{k+1} = g_k + F_k'(g_k)`` with ``c = P_k``: a plain stack of the folded layers, from the same
    embeddings, into the same final norm (which reads ``h_T / P_{T-1}``, the same after normalizing).
    With a norm's ``eps > 0`` the fold is exact for the path whose layer-``k`` norms use ``eps P_k^2``
    (the final norm ``eps P_{T-1}^2``): the difference is ``eps`` against the hidden states' mean square.
    """
    out, p = [], 1.0
    for s in scales:
        if not s > 0:
            raise ValueError(f"input scalings must be positive, got {s}")
        p *= float(s)
        out.append(1.0 / p)
    return out


@dataclass(frozen=True)
class PoolModel:
    name: str  # as the search file names it
    path: Path  # its checkpoint (a merge's: where the search writes it), absolute
    config: dict
    tokenizer: Path  # the folder its tokenizer comes from
    shapes: dict[str, tuple[int, ...]]  # tensor shapes, layer tensors named as in layer 0
    recipe: dict | None = None  # a merge config to write at ``path`` first
    recipe_dir: Path | None = None  # where the recipe's relative paths resolve

    @property
    def layers(self) -> int:
        return num_layers(self.config) or 0


def _shapes(named: Sequence[tuple[str, Sequence[int]]]) -> dict[str, tuple[int, ...]]:
    return {(n if layer_index(n) is None else with_layer(n, 0)): tuple(s) for n, s in named}


def _pool_model(entry: PoolEntry, name: str, where: str, config_dir: Path | None, pool_at: Path) -> PoolModel:
    if entry.model is not None:
        ck = Checkpoint(resolve_path(entry.model, config_dir))
        path = ck.path.resolve()
        return PoolModel(name, path, ck.config, path, _shapes([(n, ck.shape(n)) for n in ck.names]))
    if isinstance(entry.merge, str):
        file = resolve_path(entry.merge, config_dir, what="merge config")
        recipe, recipe_dir, where = read_yaml(file, "merge config"), file.parent, str(file)
    else:
        recipe, recipe_dir = entry.merge, config_dir
    cfg = validated(MergeConfig, recipe, where, "merge_method and models")
    if cfg.align is not None:
        raise UserError(f"{where}: a pool merge with an align: section is not run by the search; merge it with "
                        "modelcypher merge and list the result")
    try:
        plan = make_plan(cfg, config_dir=recipe_dir)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return PoolModel(name, (pool_at / name).resolve(), plan.out_config, plan.models[plan.tokenizer_from].path,
                     _shapes([(t.name, t.shape) for t in plan.tasks]), recipe, recipe_dir)


@dataclass(frozen=True)
class Slot:
    model: int  # index in the pool
    layer: int
    copy: int  # which of the r repetitions


@dataclass(frozen=True)
class DataflowSpace:
    """Genome ``[indicator per slot..., scaling per slot...]``; the optimizer's point is the same with
    each scaling mapped onto [0, 1] of its bounds."""

    pool: tuple[PoolModel, ...]
    slots: tuple[Slot, ...]
    scale: tuple[float, float]
    writers: tuple[str, ...]
    start: int
    base: int | None = None
    max_layers: int | None = None
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> PoolModel:
        """The model whose tokenizer and context length the objective uses."""
        return self.pool[self.start if self.base is None else self.base]

    def steps(self) -> np.ndarray:
        """Per optimizer coordinate, its discretization step (indicators) or 0 (scalings)."""
        t = len(self.slots)
        return np.concatenate([np.ones(t), np.zeros(t)])

    def mean(self) -> np.ndarray:
        """The start: the start model's layers of the first repetition, every scaling 1 (clipped)."""
        lo, hi = self.scale
        on = [1.0 if s.model == self.start and s.copy == 0 else 0.0 for s in self.slots]
        u = min(max((1.0 - lo) / (hi - lo), 0.0), 1.0)
        return np.array(on + [u] * len(self.slots))

    def values(self, x: np.ndarray) -> list[float]:
        """A point (indicators already discretized by the optimizer) as genome values."""
        t, (lo, hi) = len(self.slots), self.scale
        return [float(v) for v in x[:t]] + [float(lo + float(u) * (hi - lo)) for u in x[t:]]

    def labels(self) -> list[str]:
        def where(s: Slot) -> str:
            return f"{self.pool[s.model].name} layer {s.layer}" + (f" (copy {s.copy})" if s.copy else "")

        return [f"in: {where(s)}" for s in self.slots] + [f"scale: {where(s)}" for s in self.slots]

    def path(self, values: Sequence[float]) -> list[tuple[Slot, float]]:
        """The layers of a genome, in order, each with its input scaling."""
        t = len(self.slots)
        chosen = [(s, float(values[t + i])) for i, s in enumerate(self.slots) if values[i] >= 0.5]
        return chosen[: self.max_layers] if self.max_layers else chosen

    def describe(self, values: Sequence[float]) -> list[dict[str, Any]]:
        return [{"model": self.pool[s.model].name, "layer": s.layer, "scale": v} for s, v in self.path(values)]

    def recipe(self, values: Sequence[float]) -> dict:
        """The merge config of a genome: a passthrough slice per layer, the scalings folded into each
        layer's residual writers (``scale`` on filters), absolute paths."""
        path = self.path(values)
        if not path:
            raise UserError("the candidate includes no layer")
        slices = []
        for (s, _), c in zip(path, fold([v for _, v in path]), strict=True):
            src: dict[str, Any] = {"model": str(self.pool[s.model].path), "layer_range": [s.layer, s.layer + 1]}
            if c != 1.0:
                src["parameters"] = {"scale": [{"filter": w, "value": c} for w in self.writers]}
            slices.append({"sources": [src]})
        out: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        if self.base is not None:
            out["base_model"] = str(self.pool[self.base].path)
        return out | self.dtypes


def build_dataflow(cfg: SearchConfig, config_dir: Path | None, pool_at: Path) -> DataflowSpace:
    """The data-flow space of ``cfg`` (headers only: a pool merge is planned, not run), its pool's
    models checked to stack: one family whose scalings fold, the same tensor shapes."""
    df = cfg.dataflow
    names = df.names()
    pool = tuple(_pool_model(e, n, f"dataflow.models[{i}]", config_dir, pool_at)
                 for i, (e, n) in enumerate(zip(df.models, names, strict=True)))
    first = pool[0]
    fam = family_of(first.config)
    if not fam.residual_writers:
        raise UserError(f"dataflow: model_type {first.config.get('model_type')!r}: its layers' input scalings do "
                        "not fold into its weights (pre-norm families with known residual writers only: gpt2, "
                        "llama, mistral, qwen2)")
    for pm in pool:
        if pm.config.get("model_type") != first.config.get("model_type"):
            raise UserError(f"dataflow.models: {pm.name} is {pm.config.get('model_type')}, {first.name} is "
                            f"{first.config.get('model_type')}; layers stack within one family")
        if not pm.layers:
            raise UserError(f"dataflow.models: {pm.name} has no layers")
        for n, shape in pm.shapes.items():
            if n in first.shapes and first.shapes[n] != shape:
                raise UserError(f"dataflow.models: tensor {n!r} is {list(shape)} in {pm.name} but "
                                f"{list(first.shapes[n])} in {first.name}; layers stack only across models of one "
                                "width")
    slots = tuple(Slot(m, layer, c) for c in range(df.repeats) for m, pm in enumerate(pool)
                  for layer in range(pm.layers))
    dtypes = {k: v for k, v in (("dtype", cfg.dtype), ("out_dtype", cfg.out_dtype)) if v is not None}
    return DataflowSpace(pool, slots, (df.scale.min, df.scale.max), fam.residual_writers,
                         names.index(df.start) if df.start else 0,
                         names.index(df.base_model) if df.base_model else None, df.max_layers, dtypes)


def write_pool_model(pm: PoolModel, device: torch.device) -> None:
    """Merge a pool entry's recipe into its folder, atomically (as ``modelcypher merge`` would, at its
    default seed)."""
    plan = make_plan(MergeConfig.model_validate(pm.recipe), config_dir=pm.recipe_dir)
    with atomic_dir(pm.path, inputs=[ck.path for ck in plan.models]) as tmp:
        stats = collect(plan, pm.path, device, log=lambda _: None) if plan.method.stats else None
        execute(plan, tmp, device=device, stats=stats)
        (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(pm.recipe, sort_keys=False))
