"""The merge config: mergekit's YAML format for everything we share with it, validated up front.

Parameter values take three forms, as in mergekit:
  - a scalar:                       ``density: 0.5``
  - a gradient over depth:          ``t: [0, 0.5, 1]`` (interpolated linearly over the layer index)
  - filtered by tensor name:        ``t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]``
    (the first entry whose ``filter`` is a substring of the tensor name wins; no filter = fallback).
"""

from __future__ import annotations

from collections.abc import Callable
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
    if isinstance(out.get("modules"), dict):
        out["modules"] = {k: _without_nulls(v) for k, v in out["modules"].items()}
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


# mergekit's name for the one module of a single-module architecture: every family merged here has only it.
MODULES = ("default",)


class Module(Strict):
    """One module's section of a ``modules:`` config (mergekit's ``OutputModuleDefinition``)."""

    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    # Between the slices' (or models') own parameters and the top-level ones (mergekit).
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> Module:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self


def _falling_back(high: ParamValue, low: ParamValue) -> ParamValue:
    """One setting for two levels of precedence: ``high`` where it has a value for a tensor, else ``low``.
    A filter list without a catch-all falls through to the lower level, as mergekit's levels do."""
    if isinstance(high, list) and high and isinstance(high[0], Filtered):
        rest = low if isinstance(low, list) and low and isinstance(low[0], Filtered) else [Filtered(value=low)]
        return [*high, *rest]
    return high


class ZeroEmbedding(Strict):
    kind: Literal["zero"]


class ModelTokenEmbedding(Strict):
    """Row ``token_id`` of ``model``'s vocabulary tensors, or the row of ``token`` in its tokenizer."""
    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class TokenEmbedding(Strict):
    """Where one output token's row comes from: a model's own row for it (a model's name), another row
    (model_token), zeros; ``force``: every model takes it, not only the models without the token."""
    source: Union[ModelTokenEmbedding, ZeroEmbedding, str, None] = None  # noqa: UP007
    force: bool = False


class TokenizerConfig(Strict):
    source: str = "union"  # union | base | a model's name: the output's vocabulary
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


def renamed_tokenizer(tk: TokenizerConfig, rename: Callable[[str], str]) -> TokenizerConfig:
    """The tokenizer section with every model it names renamed (``union`` and ``base`` kept)."""
    def rule(r: TokenEmbedding) -> TokenEmbedding:
        if isinstance(r.source, str):
            return r.model_copy(update={"source": rename(r.source)})
        if isinstance(r.source, ModelTokenEmbedding):
            return r.model_copy(update={"source": r.source.model_copy(update={"model": rename(r.source.model)})})
        return r

    source = tk.source if tk.source in ("union", "base") else rename(tk.source)
    tokens = None if tk.tokens is None else {t: rule(r) for t, r in tk.tokens.items()}
    return tk.model_copy(update={"source": source, "tokens": tokens})


class MergeConfig(Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    layer_pattern: str | None = None  # frankenmerge shorthand: "ABBA" over the models, in order
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None  # union | base | a model's name (mergekit's older key)
    tokenizer: TokenizerConfig | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)  # the same as tokenizer.pad_to_multiple_of
    chat_template: str | None = None  # a template's name, auto, or a Jinja template
    align: AlignOptions | None = None  # align every model onto the base (or the first) before merging
    name: str | None = None  # a pipeline's stage name (see merging/pipeline.py)
    # mergekit's per-module sections; the one module here, 'default', reads as that section at top level
    modules: dict[str, Module] | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        data = _without_nulls(data)
        if isinstance(data, dict):
            for key, what in NOT_YET.items():
                if key in data:
                    raise ValueError(f"{what} is not supported yet")
        return data

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        if self.modules is not None:
            self._lift_module()
        if self.align is not None and self.align.method == "activation" and not self.align.data:
            raise ValueError(f"align: method {self.align.method} needs data (a probe text file)")
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'")
        if self.layer_pattern is not None:
            if self.models is None:
                raise ValueError("layer_pattern works with 'models', not 'slices'")
            letters = {chr(ord("A") + i) for i in range(len(self.models))}
            bad = sorted(set(self.layer_pattern) - letters)
            if not self.layer_pattern or bad:
                raise ValueError(f"layer_pattern {self.layer_pattern!r}: letters must be among "
                                 f"{''.join(sorted(letters))} (one per model, in order)")
        return self

    def _lift_module(self) -> None:
        """``modules: {default: M}`` as M at top level, M's parameters between its own and the top-level ones."""
        if self.models is not None or self.slices is not None:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'")
        unknown = sorted(set(self.modules) - set(MODULES))
        if unknown or not self.modules:
            what = f"no module {unknown[0]!r}" if unknown else "no module given"
            raise ValueError(f"modules: {what}; the architectures merged here have one module, "
                             + ", ".join(repr(m) for m in MODULES))
        module = self.modules[MODULES[0]]
        self.models, self.slices, self.modules = module.models, module.slices, None
        low = self.parameters
        self.parameters = {**low, **{k: v if k not in low else _falling_back(v, low[k])
                                     for k, v in module.parameters.items()}}

    @model_validator(mode="after")
    def _tokenizer_models(self) -> MergeConfig:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give one of tokenizer_source or tokenizer, not both (as mergekit)")
        if self.tokenizer is not None and None not in (self.pad_to_multiple_of, self.tokenizer.pad_to_multiple_of):
            raise ValueError("give pad_to_multiple_of once: at the top level or under tokenizer")
        names = self.model_names()
        spec = self.tokenizer or TokenizerConfig(source=self.tokenizer_source or "base")
        if spec.source not in ("union", "base", *names):
            key = "tokenizer.source" if self.tokenizer else "tokenizer_source"
            raise ValueError(f"{key}: {spec.source!r} is not 'union', 'base' nor one of the models {names}")
        for token, rule in (spec.tokens or {}).items():
            model = rule.source.model if isinstance(rule.source, ModelTokenEmbedding) else rule.source
            if isinstance(model, str) and model not in names:
                raise ValueError(f"tokenizer.tokens.{token}.source: model {model!r} is not one of the models {names}")
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


def read_yaml(path: Path, what: str, every: bool = False) -> Any:
    """The YAML document in the file at ``path`` (``every``: the list of its non-empty documents); a missing
    file, non-UTF-8 bytes or bad YAML is one line."""
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return _yaml(text, str(path), every)


def _yaml(text: str, where: str, every: bool = False) -> Any:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None] if every else yaml.safe_load(text)
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


def config_path(source: str | Path) -> Path | None:
    """The file a config source names (a Path, or a one-line string ending in .yaml/.yml), else None: YAML text."""
    text = str(source)
    if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
        return Path(source)
    return None


def parse_config(source: str | Path | dict) -> MergeConfig:
    """A config from a YAML file path, a YAML string or a dict; any mistake is one UserError line."""
    if isinstance(source, dict):
        return validated(MergeConfig, source, "config", "merge_method and models")
    path = config_path(source)
    if path is not None:
        return validated(MergeConfig, read_yaml(path, "config file"), str(path), "merge_method and models")
    return validated(MergeConfig, _yaml(str(source), "config"), "config", "merge_method and models")


def config_documents(source: str | Path) -> tuple[list[Any], str]:
    """The non-empty YAML documents of a config file or text, and its name for messages."""
    path = config_path(source)
    if path is not None:
        return read_yaml(path, "config file", every=True), str(path)
    return _yaml(str(source), "config", every=True), "config"
