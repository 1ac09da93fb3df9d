"""The merge config: mergekit's YAML format for everything we share with it, validated up front.

Parameter values take three forms, as in mergekit:
  - a scalar:                       ``density: 0.5``
  - a gradient over depth:          ``t: [0, 0.5, 1]`` (interpolated linearly over the layer index)
  - filtered by tensor name:        ``t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]``
    (the first entry whose ``filter`` is a substring of the tensor name wins; no filter = fallback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelcypher.errors import UserError
from modelcypher.options import AlignOptions

Scalar = Union[float, int, bool, str]  # noqa: UP007  (pydantic reads the union order)
Gradient = list[float]


class Filtered(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, Gradient]  # noqa: UP007


ParamValue = Union[Scalar, Gradient, list[Filtered]]  # noqa: UP007

# mergekit keys that mean something we do not do yet: refuse them by name rather than ignore them.
NOT_YET = {
    "tokenizer": "the 'tokenizer' section (vocabulary union/merging)",
    "chat_template": "'chat_template'",
    "modules": "'modules' (per-module configs)",
    "embed_slice": "'embed_slice'",
}
SLICE_NOT_YET = {
    "base_model": "a slice's own 'base_model'",
    "residual_weight": "a slice's 'residual_weight'",
}


def _without_nulls(data: Any) -> Any:
    """A key set to null means the key left out, as in mergekit (its ``MergeConfiguration.model_dump()``
    writes every optional key, most of them null), in the config and its model and slice entries."""
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if v is not None}
    for key in ("models", "slices", "sources"):
        if isinstance(out.get(key), list):
            out[key] = [_without_nulls(e) for e in out[key]]
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(Strict):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceSource(ModelEntry):
    layer_range: tuple[int, int]

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        a, b = self.layer_range
        if not 0 <= a < b:
            raise ValueError(f"layer_range {list(self.layer_range)} of {self.model}: need 0 <= start < end")
        return self


class Slice(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    # For every tensor of the slice, between its sources' parameters and the top-level ones (mergekit).
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        for key, what in SLICE_NOT_YET.items():
            if isinstance(data, dict) and data.get(key) is not None:
                raise ValueError(f"{what} is not supported yet")
        return data

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice need layer ranges of the same length")
        return self


class MergeConfig(Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    layer_pattern: str | None = None  # frankenmerge shorthand: "ABBA" over the models, in order
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None
    align: AlignOptions | None = None  # align every model onto the base (or the first) before merging
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        data = _without_nulls(data)
        if isinstance(data, dict):
            for key, what in NOT_YET.items():
                if key in data:
                    raise ValueError(f"{what} is not supported yet")
            if data.get("tokenizer_source") == "union":
                raise ValueError("tokenizer_source: union is not supported yet (use base or a model's name)")
        return data

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        if self.align is not None and self.align.method == "activation" and not self.align.data:
            raise ValueError(f"align: method {self.align.method} needs data (a probe text file)")
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.layer_pattern is not None:
            if self.models is None:
                raise ValueError("layer_pattern works with 'models', not 'slices'")
            letters = {chr(ord("A") + i) for i in range(len(self.models))}
            bad = sorted(set(self.layer_pattern) - letters)
            if not self.layer_pattern or bad:
                raise ValueError(f"layer_pattern {self.layer_pattern!r}: letters must be among "
                                 f"{''.join(sorted(letters))} (one per model, in order)")
        return self

    def model_names(self) -> list[str]:
        """Every model the config names, base first, then in config order, without repeats."""
        names = [self.base_model] if self.base_model else []
        for e in self.models or [s for sl in self.slices or [] for s in sl.sources]:
            names.append(e.model)
        return list(dict.fromkeys(names))


_UNION_TAGS = {"float", "int", "bool", "str", "list[float]", "list[Filtered]"}


def first_error_line(e: ValidationError) -> str:
    """The first error of a validation, as ``key.path: what is wrong``."""
    err = e.errors()[0]
    parts = [str(p) for p in err["loc"]]
    if any(p in _UNION_TAGS for p in parts):  # a value matched none of the accepted forms
        loc = ".".join(p for p in parts[: next(i for i, p in enumerate(parts) if p in _UNION_TAGS)])
        return (f"{loc}: expected a number, a list of numbers (a gradient over layers) or a list of "
                "{filter, value} entries")
    loc = ".".join(parts)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "missing key"
    return f"{loc}: {msg}" if loc else msg


M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in the file at ``path``; a missing file, non-UTF-8 bytes or bad YAML is one line."""
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return _yaml(text, str(path))


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML ({str(e).splitlines()[0]})") from None


def validated(cls: type[M], data: Any, where: str, keys: str) -> M:
    """``data`` as ``cls``; anything else is one line naming ``where`` and the first bad key."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with {keys}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{where}: {first_error_line(e)}") from None


def parse_config(source: str | Path | dict) -> MergeConfig:
    """A config from a YAML file path, a YAML string or a dict; any mistake is one UserError line."""
    if isinstance(source, dict):
        return validated(MergeConfig, source, "config", "merge_method and models")
    text = str(source)
    if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
        path = Path(source)
        return validated(MergeConfig, read_yaml(path, "config file"), str(path), "merge_method and models")
    return validated(MergeConfig, _yaml(text, "config"), "config", "merge_method and models")
