"""Merge methods, registered by name.

A method is a pure function on float32 tensors of one parameter:

    fn(xs, base, **params) -> Tensor

- ``xs``: the models' tensors in config order (the base model excluded when the method uses a base),
- ``base``: the base model's tensor, or None,
- per-model parameters (``weight``, ``density``, ...) arrive as lists, one value per entry of ``xs``;
  global parameters (``normalize``, ``t``, ...) as scalars; the config name ``lambda`` arrives as
  ``lambda_`` (a Python keyword);
- ``rng``: a ``torch.Generator`` on the tensors' device, when the method is registered ``random=True``;
- statistics named in ``stats`` (e.g. a per-model Fisher diagonal) arrive as lists of tensors, one per
  entry of ``xs`` (None where a tensor has no statistic), and ``base_<stat>`` for the base's;
- ``rowwise=True`` declares that row r of the result depends only on row r of the inputs (for tensors
  of two or more axes); the runner may then call the method on blocks of rows to bound memory;
- ``stream``: for a method whose rows depend on the whole tensor (e.g. a whole-tensor top-k), a
  ``stream(passes, numel, **params)`` that computes the same result block by block: ``passes()``
  starts a pass over the tensor's row blocks, yielding each block's ``(xs, base)`` (float32, base
  None without one), and ``stream`` yields the result of each block in order. The runner then
  bounds memory by blocks as for ``rowwise`` methods, at the price of re-reading the inputs per pass;
- ``raw=True``: the method gets its blocks as stored (bfloat16, float16 or float32) rather than in
  float32, and widens them itself (e.g. in a compiled loop, without a float32 copy of every input);
- ``report``: a dict the method may fill with figures about this tensor (registered ``reports=True``);
  the runner writes them to ``merge_report.json``.

Methods never modify their inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelcypher.errors import UserError

REQUIRED = object()  # default marking a parameter the config must give


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    base: Literal["required", "optional", "none"]
    paper: str
    model_params: Mapping[str, Any] = field(default_factory=dict)
    global_params: Mapping[str, Any] = field(default_factory=dict)
    random: bool = False
    stats: tuple[str, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    reports: bool = False
    rowwise: bool = False
    stream: Callable[..., Any] | None = None
    raw: bool = False
    # Parameters mergekit accepts for this method that change nothing here: name -> (the only value
    # accepted, or ANY; why). A config written for mergekit keeps running, with a note, never silently.
    inert: Mapping[str, tuple[Any, str]] = field(default_factory=dict)


ANY = object()
METHODS: dict[str, Method] = {}

# mergekit 0.1.5's methods and every parameter name any of them takes. mergekit ignores a parameter its
# method does not take; for its methods, so do we (with a note), while a name no method knows is a typo.
MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "passthrough", "task_arithmetic", "ties", "dare_ties",
    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl"})
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "normalize_weights",
    "eps", "nuslerp_row_wise", "nuslerp_flatten", "scale", "filter_wise", "max_iter", "tol", "select_topk", "r",
    "alpha"})


def register(
    name: str,
    *,
    base: Literal["required", "optional", "none"],
    paper: str,
    model_params: Iterable[str] = (),
    global_params: Iterable[str] = (),
    random: bool = False,
    stats: tuple[str, ...] = (),
    min_models: int = 1,
    max_models: int | None = None,
    reports: bool = False,
    rowwise: bool = False,
    stream: Callable[..., Any] | None = None,
    raw: bool = False,
    inert: Mapping[str, tuple[Any, str]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(
            name, fn, base, paper, defaults(fn, model_params), defaults(fn, global_params),
            random, stats, min_models, max_models, reports, rowwise, stream, raw, dict(inert or {}),
        )
        return fn

    return deco


def defaults(fn: Callable[..., Any], names: Iterable[str]) -> dict[str, Any]:
    """Each named parameter's default, read from ``fn``'s signature (the one place it is stated);
    a keyword without a default is ``REQUIRED``. The config's ``lambda`` is the keyword ``lambda_``."""
    params = inspect.signature(fn).parameters
    out = {}
    for n in names:
        p = params.get("lambda_" if n == "lambda" else n)
        if p is None:
            raise ValueError(f"{getattr(fn, '__name__', fn)} has no parameter {n!r}")  # fn may be a partial
        out[n] = REQUIRED if p.default is inspect.Parameter.empty else p.default
    return out


def get_method(name: str) -> Method:
    """The registered method of a config's ``merge_method`` (``modelcypher.merging`` registers every
    method of ``merging/methods/`` when it is imported)."""
    if name not in METHODS:
        raise UserError(f"unknown merge_method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
