"""From a config to a plan: which output tensors to make, from which input tensors, with which
parameters. Only headers are read here; every user mistake surfaces before any tensor data is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcypher.arch.families import family_of, layer_index, num_layers, ties_embeddings, with_layer
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.adapted import AdaptedCheckpoint
from modelcypher.errors import UserError
from modelcypher.merging.config import Filtered, MergeConfig, ModelEntry, ParamValue
from modelcypher.merging.registry import REQUIRED, Method, get_method

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorTask:
    name: str  # output tensor name
    sources: tuple[tuple[int, str], ...]  # (model index, tensor name), one per x
    base: tuple[int, str] | None
    params: dict[str, Any]
    shape: tuple[int, ...]  # a truncated vocabulary has already cut the first axis
    dtype: torch.dtype
    copy: bool = False  # integer/bool buffers: copied from the first source, never merged


@dataclass
class Plan:
    config: MergeConfig
    method: Method
    models: list[Checkpoint]  # index -> checkpoint; names as written in the config in `names`
    names: list[str]
    tasks: list[TensorTask]
    out_config: dict
    reference: int  # the model whose config, generation defaults and layout the output follows
    tokenizer_from: int
    notes: list[str] = field(default_factory=list)
    data: dict[int, Path] = field(default_factory=dict)  # model index -> its text, for data statistics
    reports: dict[str, dict] = field(default_factory=dict)  # per-tensor figures from the method, after a run
    config_dir: Path | None = None  # where relative paths in the config also resolve

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize for t in self.tasks)


def resolve_path(ref: str, config_dir: Path | None, what: str = "model") -> Path:
    """A path as written in the config: relative to the working directory, else to the config's folder."""
    for root in (Path.cwd(), config_dir):
        if root is not None and (root / ref).exists():
            return root / ref
    where = f" (looked in {Path.cwd()}" + (f" and {config_dir})" if config_dir else ")")
    if what != "model":
        raise UserError(f"{what} {ref!r}: not found{where}")
    raise UserError(f"model {ref!r}: no such local model directory{where}; downloads from a hub are not done")


def open_model(ref: str, config_dir: Path | None) -> Checkpoint | AdaptedCheckpoint:
    """A model reference: a directory, else ``base+adapter`` (a PEFT LoRA applied as it is read; a
    directory whose name contains '+' is still that directory)."""
    try:
        return Checkpoint(resolve_path(ref, config_dir))
    except UserError:
        for i in [i for i, c in enumerate(ref) if c == "+"]:
            try:
                base, adapter = resolve_path(ref[:i], config_dir), resolve_path(ref[i + 1:], config_dir)
            except UserError:
                continue
            return AdaptedCheckpoint(base, adapter, name=ref)
        raise


def _value_at(value: Any, layer: int | None, depth: int, before_layers: bool) -> Any:
    """A gradient (list) is spread evenly over the layers; tensors outside the layers take its first
    value when they come before them (embeddings) and its last when they come after (final norm, head)."""
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return value[0]
    if layer is None:
        return value[0] if before_layers else value[-1]
    x = layer / max(depth - 1, 1) * (len(value) - 1)
    return float(np.interp(x, np.arange(len(value)), value))


def _param(value: ParamValue, name: str, layer: int | None, depth: int, before: bool) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], Filtered):
        for f in value:
            if f.filter is None or f.filter in name:
                return _value_at(f.value, layer, depth, before)
        return None
    return _value_at(value, layer, depth, before)


def _check_params(method: Method, cfg: MergeConfig, entries: list[ModelEntry]) -> None:
    known = {**method.model_params, **method.global_params}
    if method.stats:
        known["data"] = None
    takes = ", ".join(sorted(known)) or "no parameters"
    for where, params in [("parameters", cfg.parameters)] + [(f"parameters of {e.model}", e.parameters)
                                                               for e in entries]:
        for key in params:
            if key not in known:
                raise UserError(f"{where}: merge_method {method.name} has no parameter {key!r} (it takes {takes})")
            if where != "parameters" and key in method.global_params and key not in method.model_params:
                raise UserError(f"{where}: {key!r} is a global parameter of {method.name}; set it under "
                                "the top-level 'parameters'")
    for key, default in known.items():
        if default is REQUIRED:
            missing = [e.model for e in entries if key not in e.parameters and key not in cfg.parameters]
            if key in method.global_params and key not in cfg.parameters:
                missing = ["the top-level parameters"]
            if missing:
                raise UserError(f"merge_method {method.name} needs parameter {key!r} (missing for {missing[0]})")


def _resolve_name(ck: Checkpoint, name: str) -> str | None:
    """The tensor that transformers would load for `name`: a tied head reads the input embedding."""
    if name in ck:
        return name
    for inp, out in family_of(ck.config).tied:
        if name == out and inp in ck and ties_embeddings(ck.config):
            return inp
    return None


@dataclass(frozen=True)
class _Block:
    """Output layers [out_start, out_start+length) come from these (entry, first source layer) pairs."""
    out_start: int
    length: int
    sources: tuple[tuple[ModelEntry, int], ...]


def make_plan(cfg: MergeConfig, *, config_dir: Path | None = None, truncate_vocab: bool = False) -> Plan:
    method = get_method(cfg.merge_method)
    names = cfg.model_names()
    models = [open_model(n, config_dir) for n in names]
    if (method.stats or cfg.align is not None) and any(isinstance(m, AdaptedCheckpoint) for m in models):
        raise UserError("a model+lora reference cannot be aligned or run through a model for statistics yet; "
                        "merge the adapter first (e.g. a linear merge of that model alone)")
    idx = {n: i for i, n in enumerate(names)}
    _check_family(models, names)

    if cfg.slices is not None or cfg.layer_pattern is not None:
        blocks, entries = _blocks(cfg, models, idx)
    else:
        blocks, entries = None, list(cfg.models or [])
    base = idx[cfg.base_model] if cfg.base_model else None
    if method.base == "required" and base is None:
        raise UserError(f"merge_method {method.name} needs a base_model")
    uses_base = method.base != "none" and base is not None
    _check_params(method, cfg, entries)
    if method.base == "optional" and base is None and cfg.parameters.get("lambda", 1.0) != 1.0:
        # lambda scales a merge from its base (task arithmetic's convention): refused before any work
        raise UserError(f"merge_method {method.name}: lambda scales the merge from the base, which needs a base_model")

    ref = base if base is not None else idx[entries[0].model]
    if cfg.tokenizer_source in (None, "base"):
        tok = ref
    elif cfg.tokenizer_source in idx:
        tok = idx[cfg.tokenizer_source]
    else:
        raise UserError(f"tokenizer_source {cfg.tokenizer_source!r}: not 'base' nor one of the models {names}")

    ref_ck = models[ref]
    out_dtype = DTYPES.get(cfg.out_dtype or cfg.dtype or "") or _model_dtype(ref_ck)
    out_config = dict(ref_ck.config)
    notes: list[str] = []

    # Which output tensors exist: the reference's; the head is untied unless every model ties it.
    for i, ck in enumerate(models):
        for n in ck.names:
            if _resolve_name(ref_ck, n) is None:
                raise UserError(f"tensor {n!r} is in model {names[i]} but missing from {names[ref]}")
    out_names = list(ref_ck.names)
    if family_of(ref_ck.config).tied and not all(ties_embeddings(ck.config) for ck in models):
        for inp, out in family_of(ref_ck.config).tied:
            if out not in out_names and inp in out_names:
                out_names.append(out)
                notes.append(f"{out} written untied: not every model ties it to {inp}")
        out_config["tie_word_embeddings"] = False

    depth = num_layers(ref_ck.config) or 0
    layer_plan: list[tuple[str, int | None, list[tuple[ModelEntry, str]], str | None]] = []
    if blocks is None:
        for n in out_names:
            layer_plan.append((n, layer_index(n), [(e, n) for e in entries], n if uses_base else None))
    else:
        depth = sum(b.length for b in blocks)
        # Tensors outside the layers come from the base model when the method has no use for a base
        # (passthrough), else they are merged over the first block's models.
        outside = ([ModelEntry(model=cfg.base_model)] if base is not None and not uses_base
                   else [e for e, _ in blocks[0].sources])
        for n in out_names:
            if layer_index(n) is None:
                srcs = [(e, n) for e in outside]
                layer_plan.append((n, None, srcs, n if uses_base else None))
        src_layers = []  # the source layer behind each output layer
        for b in blocks:
            e0, s0 = b.sources[0]
            template = models[idx[e0.model]]
            for k in range(b.length):
                src_names = [t for t in template.names if layer_index(t) == s0 + k]
                for t in src_names:
                    out_n = with_layer(t, b.out_start + k)
                    srcs = [(e, with_layer(t, s + k)) for e, s in b.sources]
                    base_n = None
                    if uses_base:
                        bs = [s for e, s in b.sources if idx[e.model] == base]
                        base_n = with_layer(t, (bs[0] if bs else s0) + k)
                    layer_plan.append((out_n, b.out_start + k, srcs, base_n))
                src_layers.append(s0 + k)
        _relayer_config(out_config, ref_ck.config, src_layers)

    tasks = []
    vocab = set(family_of(ref_ck.config).vocab_tensors)
    trunc_rows: int | None = None
    fam_embeds = {inp for inp, _ in family_of(ref_ck.config).tied} | {
        v for v in vocab if "embed" in v or "wte" in v}
    for out_n, layer, srcs, base_n in layer_plan:
        srcs = [(e, n) for e, n in srcs if not (uses_base and idx[e.model] == base)]
        before = out_n in fam_embeds or "embed" in out_n or ".wpe." in out_n
        params = _task_params(method, cfg, [e for e, _ in srcs], out_n, layer, depth, before,
                              family_of(ref_ck.config).conv1d)
        sources = []
        for e, n in srcs:
            mi = idx[e.model]
            rn = _resolve_name(models[mi], n)
            if rn is None:
                raise UserError(f"tensor {n!r} is missing from model {e.model}")
            sources.append((mi, rn))
        base_src = None
        if uses_base:
            rn = _resolve_name(models[base], base_n)
            if rn is None:
                raise UserError(f"tensor {base_n!r} is missing from base model {names[base]}")
            base_src = (base, rn)
        if len(sources) < method.min_models or (method.max_models and len(sources) > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}")
            raise UserError(f"merge_method {method.name} merges {want} model(s) besides the base; "
                            f"got {len(sources)}")
        everyone = sources + ([base_src] if base_src else [])
        shapes = {(mi, models[mi].shape(n)) for mi, n in everyone}
        rows = None
        if len({s for _, s in shapes}) > 1:
            pair = [(names[mi], list(s)) for mi, s in sorted(shapes)]
            if out_n in vocab and len({s[1:] for _, s in shapes}) == 1:
                ref_rows = models[ref].shape(_resolve_name(models[ref], out_n) or out_n)[0]
                if not truncate_vocab:
                    raise UserError(f"vocabulary sizes differ: tensor {out_n!r} has "
                                    + ", ".join(f"{s[0]} rows in {n}" for n, s in pair)
                                    + f"; pass --truncate-vocab to keep the first {ref_rows} rows "
                                      f"(the vocabulary of {names[ref]})")
                short = [n for n, s in pair if s[0] < ref_rows]
                if short:
                    raise UserError(f"--truncate-vocab: {short[0]} has fewer rows than {names[ref]} "
                                    f"in tensor {out_n!r}; cannot truncate up")
                rows = trunc_rows = ref_rows
            else:
                raise UserError(f"tensor {out_n!r} has different shapes: "
                                + ", ".join(f"{n} {s}" for n, s in pair))
        shape0 = models[everyone[0][0]].shape(everyone[0][1])
        shape = ((rows,) + tuple(shape0[1:])) if rows else tuple(shape0)
        in_dtype = models[everyone[0][0]].dtype(everyone[0][1])
        copy = not in_dtype.is_floating_point
        tasks.append(TensorTask(out_n, tuple(sources), base_src, params, shape,
                                in_dtype if copy else out_dtype, copy))
    if trunc_rows is not None:
        out_config["vocab_size"] = trunc_rows
        notes.append(f"vocabulary truncated to the first {trunc_rows} rows")
    _set_dtype(out_config, out_dtype)
    data = _data_files(cfg, method, entries, idx, base if uses_base else None, config_dir)
    return Plan(cfg, method, models, names, tasks, out_config, ref, tok, notes, data, config_dir=config_dir)


def _data_files(cfg: MergeConfig, method: Method, entries: list[ModelEntry], idx: dict[str, int],
                base: int | None, config_dir: Path | None) -> dict[int, Path]:
    """Each model's text for the method's statistics: its own `data` parameter, else the global one."""
    if not method.stats:
        return {}
    out: dict[int, Path] = {}
    for e in entries + ([ModelEntry(model=cfg.base_model)] if base is not None else []):
        ref = e.parameters.get("data", cfg.parameters.get("data"))
        if ref is None:
            if idx[e.model] == base:
                continue  # the base's statistics are optional (null_space reference: base)
            raise UserError(f"merge_method {method.name} needs data for model {e.model}: "
                            "add parameters: {data: path/to/text.txt}")
        if not isinstance(ref, str):
            raise UserError(f"parameter data of {e.model}: expected a path to a text file")
        path = resolve_path(ref, config_dir, what="data file")
        if not path.is_file():
            raise UserError(f"data file {ref!r} of {e.model}: not a file")
        out[idx[e.model]] = path
    return out


def _task_params(method: Method, cfg: MergeConfig, entries: list[ModelEntry], name: str,
                 layer: int | None, depth: int, before: bool, conv1d: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, default in method.model_params.items():
        if key == "data":
            continue
        vals = []
        for e in entries:
            v = e.parameters.get(key, cfg.parameters.get(key))
            v = None if v is None else _param(v, name, layer, depth, before)
            vals.append(default if v is None else v)
        out[key] = vals
    for key, default in method.global_params.items():
        if key == "layout" and "layout" not in cfg.parameters:
            out[key] = "conv1d" if name.endswith(conv1d) else "linear"
            continue
        v = cfg.parameters.get(key)
        v = None if v is None else _param(v, name, layer, depth, before)
        if v is None and default is REQUIRED:
            raise UserError(f"parameter {key!r} has no value for tensor {name!r} (no filter matches it)")
        out["lambda_" if key == "lambda" else key] = default if v is None else v
    return out


def _check_family(models: list[Checkpoint], names: list[str]) -> None:
    def arch(ck: Checkpoint) -> str:
        return ",".join(ck.config.get("architectures") or []) or ck.config.get("model_type", "?")

    a0 = arch(models[0])
    for ck, n in zip(models[1:], names[1:], strict=True):
        if arch(ck) != a0 or ck.config.get("model_type") != models[0].config.get("model_type"):
            raise UserError(f"models differ in architecture: {names[0]} is {a0}, {n} is {arch(ck)}")


def _blocks(cfg: MergeConfig, models: list[Checkpoint], idx: dict[str, int]):
    if cfg.layer_pattern is not None:
        entries = list(cfg.models or [])
        depth = num_layers(models[idx[entries[0].model]].config)
        for e in entries:
            if num_layers(models[idx[e.model]].config) != depth:
                raise UserError("layer_pattern needs models of the same depth")
        pat = cfg.layer_pattern
        blocks = [_Block(i, 1, ((entries[ord(pat[i % len(pat)]) - 65], i),)) for i in range(depth)]
        return blocks, entries
    blocks, out = [], 0
    for sl in cfg.slices or []:
        for s in sl.sources:
            n = num_layers(models[idx[s.model]].config)
            if n is not None and s.layer_range[1] > n:
                raise UserError(f"layer_range {list(s.layer_range)} of {s.model}: it has only {n} layers")
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        blocks.append(_Block(out, length, tuple((s, s.layer_range[0]) for s in sl.sources)))
        out += length
    entries = [s for sl in cfg.slices or [] for s in sl.sources]
    return blocks, entries


def _relayer_config(out: dict, ref: dict, src_layers: list[int]) -> None:
    """A new depth: the layer count, and every per-layer list in the config (e.g. layer_types)."""
    old = num_layers(ref)
    for key in (family_of(ref).num_layers_key, "num_hidden_layers", "n_layer"):
        if key in out:
            out[key] = len(src_layers)
    for key, v in ref.items():
        if isinstance(v, list) and old and len(v) == old and key != "architectures":
            out[key] = [v[i] for i in src_layers]


def _model_dtype(ck: Checkpoint) -> torch.dtype:
    name = ck.config.get("dtype") or ck.config.get("torch_dtype")
    if name in DTYPES:
        return DTYPES[name]
    for n in ck.names:
        if ck.dtype(n).is_floating_point:
            return ck.dtype(n)
    return torch.float32


def _set_dtype(config: dict, dtype: torch.dtype) -> None:
    name = {v: k for k, v in DTYPES.items()}[dtype]
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
