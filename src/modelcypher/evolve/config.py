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
optimizer: {population: 8, generations: 6, seed: 0, sigma: 0.3}
```
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    population: int = Field(default=8, ge=2)
    generations: int = Field(default=6, ge=1)
    seed: int = 0
    sigma: float = Field(default=0.3, gt=0)  # initial step, in units of each parameter's range


class SearchConfig(Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    search: Search
    objective: list[Term]
    optimizer: Optimizer = Field(default_factory=Optimizer)

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
                     "merge_method, models, search and objective")
