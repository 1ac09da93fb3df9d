"""The search file: the models and merge method (as in a merge config), the space to search, the
objective and the optimizer, validated up front; unknown keys are refused.

```yaml
merge_method: task_arithmetic        # any data-free method of ours; base_model / models as in a merge config
base_model: ./base
models: [./ft-a, ./ft-b]             # paths, or {model: ..., parameters: {...}} entries
parameters: {normalize: false}       # fixed parameters, as in a merge config (never searched ones)
search:                              # searched parameters with bounds, per layer group and tensor filter
  weight: {min: 0.0, max: 1.5}
  lambda: {min: 0.5, max: 2.0}
  layer_granularity: 2               # layers per group (default: the whole depth is one group)
  filters: [attn, mlp]               # optional: each filter (a substring of tensor names) its own values
objective:
  loss: heldout.txt                  # or  task: tasks.jsonl  or  python: module:function
  # or a weighted list: [{loss: a.txt, weight: 1}, {task: t.jsonl, weight: 2}]
optimizer: {population: 8, generations: 6, seed: 0, sigma: 0.3}   # method: cma (default) or sep_cma
```

``optimizer.method: sep_cma`` (separable CMA-ES, Ros & Hansen 2008: a diagonal covariance, learned in
O(n) rather than O(n^2) evaluations) suits spaces of hundreds of genes, e.g. a weight per tensor.

The data-flow space (layers drawn from a pool of models, see :mod:`modelcypher.evolve.dataflow`) takes
a ``dataflow:`` section instead of merge_method, models, parameters and search:

```yaml
dataflow:
  models:                            # the pool, in order; an entry may be a merge recipe, merged first
    - ./ft-a
    - ./ft-b
    - {merge: ../ps/best.yaml, name: ps}  # a merge config file, or {merge: {merge_method: ...}}, merged first
  repeats: 2                         # r: the pool's layers repeated r times, T = r x (layers of all models)
  max_layers: 12                     # a candidate keeps its first max_layers included layers (default: all)
  scale: {min: 0.5, max: 2.0}        # each slot's input scaling (the default)
  start: ./ft-a                      # the search starts from this model's layers (default: the first)
  base_model: ./ft-a                 # embeddings, final norm and head (default: the first and last layer's model)
objective: {loss: heldout.txt}
optimizer: {population: 8, generations: 6, seed: 0, sigma: 0.3}
```
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelcypher.errors import UserError
from modelcypher.merging.config import ModelEntry, ParamValue, first_error_line, read_yaml, validated


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bounds(Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min >= self.max:
            raise ValueError(f"bounds need finite min < max, got min {self.min}, max {self.max}")
        return self


class Search(BaseModel):
    """``{parameter: {min, max}, ..., layer_granularity: g, filters: [...]}``."""

    model_config = ConfigDict(extra="allow")  # the extra keys are the searched parameters, checked below
    layer_granularity: int | None = Field(default=None, ge=1)
    filters: list[str] = Field(default_factory=list)

    @property
    def bounds(self) -> dict[str, Bounds]:
        """Each searched parameter's bounds; a mistake is one line naming ``search.<parameter>``."""
        out = {}
        for k, v in (self.model_extra or {}).items():
            try:
                out[k] = Bounds.model_validate(v)
            except ValidationError as e:
                raise UserError(f"search.{k}: {first_error_line(e)} (expected {{min: ..., max: ...}})") from None
        return out

    @model_validator(mode="after")
    def _filters(self) -> Search:
        if len(set(self.filters)) != len(self.filters) or any(not f for f in self.filters):
            raise ValueError("filters: expected distinct, non-empty substrings of tensor names")
        return self


class Term(Strict):
    """One objective; ``weight`` scales its fitness in a weighted sum."""

    loss: str | None = None
    task: str | None = None
    python: str | None = None
    weight: float = 1.0
    max_tokens: int = Field(default=16384, ge=2)  # of a loss objective's text

    @model_validator(mode="after")
    def _one(self) -> Term:
        given = [k for k in ("loss", "task", "python") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("an objective is exactly one of loss: FILE, task: FILE or python: module:function")
        if self.python is not None and (self.python.count(":") != 1 or not all(self.python.split(":"))):
            raise ValueError(f"python: {self.python!r}: expected module:function")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loss", "task", "python") if getattr(self, k) is not None)

    @property
    def target(self) -> str:
        return getattr(self, self.kind)


class Optimizer(Strict):
    method: Literal["cma", "sep_cma"] = "cma"
    population: int = Field(default=8, ge=2)
    generations: int = Field(default=6, ge=1)
    seed: int = 0
    sigma: float = Field(default=0.3, gt=0)  # initial step, in units of each parameter's range


POOL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a pool merge's folder under DIR/pool/


class PoolEntry(Strict):
    """A model of the data-flow pool: a checkpoint (``model``, or just its path) or a merge of models
    (``merge``: a merge config file, e.g. a parameter-space search's best.yaml, or a merge config
    written inline), written into ``DIR/pool/<name>`` first. ``name`` is how labels and reports call it
    (default: the model's path as written, ``merge-<i>`` for a merge)."""

    model: str | None = None
    merge: Any = None
    name: str | None = None

    @model_validator(mode="after")
    def _one(self) -> PoolEntry:
        if (self.model is None) == (self.merge is None):
            raise ValueError("a pool entry is exactly one of model: PATH or merge: FILE | {merge config}")
        if self.merge is not None and not isinstance(self.merge, str | dict):
            raise ValueError("merge: expected a merge config file or a merge config written inline")
        if self.name is not None and not POOL_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '.', '_' and '-' only, not starting with '.'")
        return self


class Dataflow(Strict):
    models: list[PoolEntry] = Field(min_length=1)
    repeats: int = Field(default=1, ge=1)
    max_layers: int | None = Field(default=None, ge=1)
    scale: Bounds = Field(default_factory=lambda: Bounds(min=0.5, max=2.0))
    start: str | None = None
    base_model: str | None = None

    @field_validator("scale")
    @classmethod
    def _positive(cls, b: Bounds) -> Bounds:
        if b.min <= 0:  # a norm is invariant to positive scalings only: the fold needs s > 0
            raise ValueError(f"min {b.min:g}: input scalings must be positive")
        return b

    @field_validator("models", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    def names(self) -> list[str]:
        return [m.name or m.model or f"merge-{i}" for i, m in enumerate(self.models)]

    @model_validator(mode="after")
    def _known(self) -> Dataflow:
        names = self.names()
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"models: {dup!r} listed twice (a model's layers repeat through repeats)")
        for key in ("start", "base_model"):
            v = getattr(self, key)
            if v is not None and v not in names:
                raise ValueError(f"{key}: {v!r} is not one of the models {names}")
        return self


PARAMETER_KEYS = ("merge_method", "base_model", "models", "parameters", "tokenizer_source", "search")


class SearchConfig(Strict):
    merge_method: str | None = None
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    search: Search | None = None
    dataflow: Dataflow | None = None
    objective: list[Term]
    optimizer: Optimizer = Field(default_factory=Optimizer)

    @model_validator(mode="after")
    def _one_space(self) -> SearchConfig:
        if self.dataflow is not None:
            given = [k for k in PARAMETER_KEYS if getattr(self, k)]
            if given:
                raise ValueError(f"{given[0]}: belongs to a parameter-space search; a dataflow search lists its "
                                 "models under dataflow.models")
            if self.optimizer.method != "cma":
                raise ValueError(f"optimizer.method: {self.optimizer.method} searches the parameter space only; a "
                                 "dataflow search uses CMA-ES with margin (method: cma)")
        else:
            missing = [k for k in ("merge_method", "models", "search") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{missing[0]}: missing key (or give a dataflow: section to search the data-flow "
                                 "space)")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("objective", mode="before")
    @classmethod
    def _terms(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    def merge_dict(self) -> dict:
        """The merge config's part of the search file (no search, objective, optimizer)."""
        keys = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
        return self.model_dump(include=set(keys), exclude_none=True)


def parse_search(path: str | Path) -> SearchConfig:
    """The search file at ``path``; any mistake is one UserError line naming the file and key."""
    path = Path(path)
    return validated(SearchConfig, read_yaml(path, "search file"), str(path),
                     "merge_method, models, search (or dataflow) and objective")
