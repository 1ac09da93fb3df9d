"""From a config to a plan: which output tensors to make, from which input tensors, with which
parameters. Only headers are read here; every user mistake surfaces before any tensor data is."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcypher.arch.families import (
    family_of,
    layer_index,
    num_layers,
    relayer_config,
    ties_embeddings,
    with_layer,
)
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.adapted import AdaptedCheckpoint
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.merging.config import Filtered, MergeConfig, ModelEntry, ParamValue
from modelcypher.merging.registry import ANY, MERGEKIT_METHODS, MERGEKIT_PARAMETERS, REQUIRED, Method, get_method
from modelcypher.merging.vocab import (
    RowMap,
    Vocabulary,
    chat_template,
    input_templates,
    plan_vocabulary,
    row_map,
    spec_of,
)

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
    rows: RowMap | None = None  # a vocabulary tensor laid out in the output's vocabulary as it is read


@dataclass(frozen=True)
class Plan:
    config: MergeConfig  # the config as the user gave it (the model card records it)
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
    # model index -> what the model is made from (the user's checkpoint and, when the merge aligned it
    # first, the alignment's settings): what statistics are cached by
    provenance: list[dict] = field(default_factory=list)
    vocab: Vocabulary | None = None  # the output's vocabulary, when the config builds one (see vocab.py)
    chat_template: str | None = None  # written into the output's tokenizer_config.json

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tasks)


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


def _value_at(value: Any, layer: int | None, depth: int) -> Any:
    """A gradient (list) is spread evenly over the layers; tensors outside the layers (embeddings, final
    norm, head) take its first value, as mergekit gives them."""
    if not isinstance(value, list):
        return value
    if len(value) == 1 or layer is None:
        return value[0]
    if depth == 1:  # a single layer sits at the gradient's end (mergekit's t = 1)
        return value[-1]
    if len(value) == depth:  # one value per layer: its own, exactly (the interpolation below may round)
        return float(value[layer])
    x = layer / max(depth - 1, 1) * (len(value) - 1)
    return float(np.interp(x, np.arange(len(value)), value))


def _param(value: ParamValue, name: str, layer: int | None, depth: int) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], Filtered):
        for f in value:
            if f.filter is None or f.filter in name:
                return _value_at(f.value, layer, depth)
        return None
    return _value_at(value, layer, depth)


def _check_params(method: Method, cfg: MergeConfig, entries: list[ModelEntry]) -> None:
    known = {**method.model_params, **method.global_params}
    if method.stats:
        known["data"] = None
    takes = ", ".join(sorted(known)) or "no parameters"
    shared = [("parameters", cfg.parameters)]  # settings for every model: the top level's, each slice's
    shared += [(f"parameters of slice {i}", sl.parameters) for i, sl in enumerate(cfg.slices or [])]
    own = [(f"parameters of {e.model}", e.parameters) for e in entries]
    for where, params in shared + own:
        for key in params:
            if key in method.inert:
                allowed, why = method.inert[key]
                bad = [v for v in _values(params[key]) if allowed is not ANY and v != allowed]
                if bad:
                    raise UserError(f"{where}: {key}: {bad[0]!r} is not supported for {method.name} ({why}); "
                                    f"only {allowed!r}")
                continue
            if key not in known and _ignored(method, key):
                continue
            if key not in known:
                raise UserError(f"{where}: merge_method {method.name} has no parameter {key!r} (it takes {takes})")
            if (where, params) in own and key in method.global_params and key not in method.model_params:
                raise UserError(f"{where}: {key!r} is a global parameter of {method.name}; set it under "
                                "the top-level 'parameters'")
            text = next((v for v in _values(params[key]) if isinstance(v, str)), None)
            if text is not None and key != "data" and not isinstance(known[key], str):
                raise UserError(f"{where}: parameter {key!r} takes a number, not {text!r}")
    for key, default in known.items():
        if default is REQUIRED and not any(key in p for _, p in shared):
            missing = [e.model for e in entries if key not in e.parameters]
            if key in method.global_params:
                missing = ["the top-level parameters"]
            if missing:
                raise UserError(f"merge_method {method.name} needs parameter {key!r} (missing for {missing[0]})")


def _ignored(method: Method, key: str) -> bool:
    """A parameter of another mergekit method given to this one: mergekit ignores it, and so do we."""
    known = {*method.model_params, *method.global_params, *method.inert}
    return method.name in MERGEKIT_METHODS and key in MERGEKIT_PARAMETERS and key not in known


def _inert_notes(method: Method, cfg: MergeConfig, entries: list[ModelEntry]) -> list[str]:
    given = set(cfg.parameters).union(*(e.parameters for e in entries), *(sl.parameters for sl in cfg.slices or []))
    return ([f"parameter {k!r} accepted and changes nothing: {method.inert[k][1]}" for k in sorted(given)
             if k in method.inert]
            + [f"parameter {k!r} ignored: {method.name} does not take it (mergekit ignores it too)"
               for k in sorted(given) if _ignored(method, k)])


def _values(value: ParamValue) -> list:
    """Every value a parameter's setting holds: a scalar, a gradient's entries, each filter's values."""
    if isinstance(value, list):
        return [v for x in value for v in (_values(x.value) if isinstance(x, Filtered) else _values(x))]
    return [value]


def resolve_name(ck: Checkpoint, name: str) -> str | None:
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
    params: dict = field(default_factory=dict)  # the slice's own parameters
    own_gradient: bool = False  # a slice spreads a gradient over its own layers (mergekit's rule)


def check_config(cfg: MergeConfig) -> Method:
    """What can be checked without opening a model: the method, its base and its parameters."""
    method = get_method(cfg.merge_method)
    if not _entries(cfg):
        raise UserError("models: no model to merge; list at least one")
    if method.base == "required" and cfg.base_model is None:
        raise UserError(f"merge_method {method.name} needs a base_model")
    _check_params(method, cfg, _entries(cfg))
    if cfg.chat_template not in (None, "auto"):
        chat_template(cfg.chat_template, [])  # a bad name or template, before any model is opened
    if method.base == "optional" and cfg.base_model is None and cfg.parameters.get("lambda", 1.0) != 1.0:
        # lambda scales a merge from its base (task arithmetic's convention): refused before any work
        raise UserError(f"merge_method {method.name}: lambda scales the merge from the base, which needs a base_model")
    return method


def _base_as_input(cfg: MergeConfig, method: Method) -> MergeConfig:
    """A method that has no use for a base merges the ``base_model`` as one more model (mergekit's rule:
    the base is always one of the inputs), unless ``models`` lists it already."""
    if method.base != "none" or cfg.base_model is None or cfg.models is None:
        return cfg
    if cfg.base_model in [e.model for e in cfg.models]:
        return cfg
    return cfg.model_copy(update={"models": [ModelEntry(model=cfg.base_model), *cfg.models]})


def make_plan(cfg: MergeConfig, *, config_dir: Path | None = None, truncate_vocab: bool = False,
              as_given: MergeConfig | None = None, names: list[str] | None = None,
              provenance: list[dict] | None = None, allow_crimes: bool = False) -> Plan:
    """Plan every output tensor of ``cfg`` from the headers of its models.

    ``allow_crimes``: models of different architectures are merged where their tensors' names and shapes
    agree (mergekit's flag of that name); by default they are refused.

    ``as_given``, ``names`` and ``provenance``: what the user wrote, when ``cfg`` names other checkpoints
    standing in for the user's models (e.g. aligned copies), for the model card, messages and caches.
    """
    method = check_config(cfg)
    cfg = _base_as_input(cfg, method)
    refs = cfg.model_names()
    models = [open_model(n, config_dir) for n in refs]
    if method.stats and any(isinstance(m, AdaptedCheckpoint) for m in models):
        raise UserError("a model+lora reference cannot be run through a model for statistics yet; "
                        "merge the adapter first (e.g. a linear merge of that model alone)")
    names = names or refs
    idx = {n: i for i, n in enumerate(refs)}
    if not allow_crimes:
        _check_family(models, names)
    entries = _entries(cfg)
    base = idx[cfg.base_model] if cfg.base_model else None
    uses_base = method.base != "none" and base is not None
    ref = base if base is not None else idx[entries[0].model]
    tok = _tokenizer_source(cfg, idx, ref)

    ref_ck = models[ref]
    out_dtype = DTYPES.get(cfg.out_dtype or cfg.dtype or "") or _model_dtype(ref_ck)
    out_names, out_config, notes = _outputs(models, names, ref)
    notes += _inert_notes(method, cfg, entries)
    layers, depth = _layer_plan(cfg, models, idx, out_names, out_config, base, uses_base)

    family = family_of(ref_ck.config)
    vocab = set(family.vocab_tensors)
    out_vocab = _vocabulary(cfg, models, refs, ref, vocab, notes)
    tasks, trunc_rows = [], None
    for out_n, layer, srcs, base_n, scope in layers:
        srcs = [(e, n) for e, n in srcs if not (uses_base and idx[e.model] == base)]
        params = _task_params(method, cfg, [e for e, _ in srcs], out_n, *(scope or (layer, depth, {})),
                              family.conv1d)
        sources = [(idx[e.model], _find(models[idx[e.model]], n, f"model {e.model}")) for e, n in srcs]
        base_src = (base, _find(models[base], base_n, f"base model {names[base]}")) if uses_base else None
        _check_count(method, len(sources))
        task, rows = _task(out_n, sources, base_src, params, models, names, ref, out_n in vocab, truncate_vocab,
                           out_dtype, out_vocab.size if out_vocab else None)
        if out_vocab is not None and out_n in vocab:
            task = _laid_out(task, out_vocab, cfg, models, refs, base)
        trunc_rows = rows or trunc_rows
        tasks.append(task)
    if out_vocab is not None:
        out_config["vocab_size"] = out_vocab.size
    elif trunc_rows is not None:
        out_config["vocab_size"] = trunc_rows
        notes.append(f"vocabulary truncated to the first {trunc_rows} rows")
    _set_dtype(out_config, out_dtype)
    data = _data_files(cfg, method, entries, idx, base if uses_base else None, config_dir)
    provenance = provenance or [{"model": str(ck.path.resolve())} for ck in models]
    template = None
    if cfg.chat_template is not None:
        found = input_templates([ck.path for ck in models]) if cfg.chat_template == "auto" else []
        template = chat_template(cfg.chat_template, found)
        if template is None:
            notes.append("chat_template: auto found no template among the models; the tokenizer's own is kept")
    return Plan(as_given or cfg, method, models, names, tasks, out_config, ref, tok, notes, data,
                config_dir=config_dir, provenance=provenance, vocab=out_vocab, chat_template=template)


def _vocabulary(cfg: MergeConfig, models: list[Checkpoint], refs: list[str], ref: int, vocab: set[str],
                notes: list[str]) -> Vocabulary | None:
    """The output's vocabulary, when the config's tokenizer settings build one (else None: the output's
    tokenizer is copied and every vocabulary tensor keeps its rows)."""
    spec = spec_of(cfg)
    if spec is None:
        return None
    if not vocab:
        raise UserError(f"tokenizer: no vocabulary tensors are known for model_type "
                        f"{models[ref].config.get('model_type')!r}; its vocabulary cannot be rebuilt")

    def rows(ck: Checkpoint) -> int | None:
        name = next((n for n in (resolve_name(ck, v) for v in sorted(vocab)) if n), None)
        return ck.shape(name)[0] if name else None

    out, more = plan_vocabulary(spec, [ck.path for ck in models], [ck.config for ck in models],
                                [rows(ck) for ck in models], refs, ref)
    notes += more
    padded = f", padded to {out.size} rows" if out.size > out.tokens else ""
    notes.append(f"vocabulary from {spec.source}: {out.tokens} tokens{padded}")
    return out


def _laid_out(task: TensorTask, vocab: Vocabulary, cfg: MergeConfig, models: list[Checkpoint], refs: list[str],
              base: int | None) -> TensorTask:
    """A vocabulary tensor's task with its rows laid out in the output vocabulary (unless they already are:
    every input has every token at its own id, and as many rows)."""
    inputs = list(task.sources) + ([task.base] if task.base else [])
    slots = list(inputs)
    if cfg.models is not None and base is not None and base not in {m for m, _ in inputs}:
        # mergekit's merge of `models` reads the base's tensor too: its rows fill those the others lack
        name = resolve_name(models[base], task.name)
        if name is not None:
            slots.append((base, name))
    rm = row_map(vocab, task.name, slots, len(inputs), base, [models[m].shape(n)[0] for m, n in slots], refs)
    identity = np.arange(vocab.size)
    if not rm.fills and all(np.array_equal(o, identity) for o in rm.own) and \
            all(models[m].shape(n)[0] == vocab.size for m, n in inputs):
        return task
    return replace(task, rows=rm)


def _entries(cfg: MergeConfig) -> list[ModelEntry]:
    """The config's model entries: its models, or every source of its slices."""
    if cfg.slices is not None:
        return [s for sl in cfg.slices for s in sl.sources]
    return list(cfg.models or [])


def _tokenizer_source(cfg: MergeConfig, idx: dict[str, int], ref: int) -> int:
    """The model whose tokenizer the output's is, or starts from (the reference for base and union)."""
    source = cfg.tokenizer.source if cfg.tokenizer is not None else cfg.tokenizer_source
    return idx.get(source, ref)


def _outputs(models: list[Checkpoint], names: list[str], ref: int) -> tuple[list[str], dict, list[str]]:
    """Which output tensors exist (the reference's; the head is untied unless every model ties it), the
    output config to start from, and notes for the user."""
    ref_ck = models[ref]
    for i, ck in enumerate(models):
        for n in ck.names:
            if resolve_name(ref_ck, n) is None:
                raise UserError(f"tensor {n!r} is in model {names[i]} but missing from {names[ref]}")
    out_names, out_config, notes = list(ref_ck.names), dict(ref_ck.config), []
    if family_of(ref_ck.config).tied and not all(ties_embeddings(ck.config) for ck in models):
        for inp, out in family_of(ref_ck.config).tied:
            if out not in out_names and inp in out_names:
                out_names.append(out)
                notes.append(f"{out} written untied: not every model ties it to {inp}")
        out_config["tie_word_embeddings"] = False
    return out_names, out_config, notes


# Where a tensor reads its parameter values: (position for a gradient, the gradient's length, the
# parameters of its slice); None for a plain merge (the layer index over the model's depth).
Scope = tuple["int | None", int, dict]
LayerPlan = list[tuple[str, "int | None", list[tuple[ModelEntry, str]], "str | None", "Scope | None"]]


def _layer_plan(cfg: MergeConfig, models: list[Checkpoint], idx: dict[str, int], out_names: list[str],
                out_config: dict, base: int | None, uses_base: bool) -> tuple[LayerPlan, int]:
    """Per output tensor: its name, layer, (entry, source tensor) pairs and base tensor; and the depth.
    A frankenmerge (slices, layer_pattern) re-layers ``out_config`` to its new depth."""
    if cfg.slices is None and cfg.layer_pattern is None:
        entries = list(cfg.models or [])
        plan = [(n, layer_index(n), [(e, n) for e in entries], n if uses_base else None, None) for n in out_names]
        return plan, num_layers(models[idx[entries[0].model] if base is None else base].config) or 0
    blocks = _blocks(cfg, models, idx)
    # Tensors outside the layers come from the base model when the method has no use for a base
    # (passthrough with a base_model). Else the embeddings come from the first block's models and what
    # follows the layers (final norm, head) from the last block's, as mergekit does: the final norm
    # belongs to the residual stream of the layers just before it.
    fam = family_of(models[0].config)
    embeds = {inp for inp, _ in fam.tied} | {v for v in fam.vocab_tensors if "embed" in v or "wte" in v}

    def block(n: str) -> _Block:
        return blocks[0 if n in embeds or "embed" in n or ".wpe." in n else -1]

    def outside(n: str) -> list[ModelEntry]:
        if base is not None and not uses_base:
            return [ModelEntry(model=cfg.base_model)]
        return [e for e, _ in block(n).sources]

    plan = [(n, None, [(e, n) for e in outside(n)], n if uses_base else None, (None, 1, block(n).params))
            for n in out_names if layer_index(n) is None]
    src_layers = []  # the source layer behind each output layer
    for b in blocks:
        e0, s0 = b.sources[0]
        template = models[idx[e0.model]]
        for k in range(b.length):
            for t in [t for t in template.names if layer_index(t) == s0 + k]:
                base_n = None
                if uses_base:
                    bs = [s for e, s in b.sources if idx[e.model] == base]
                    base_n = with_layer(t, (bs[0] if bs else s0) + k)
                scope = (k, b.length, b.params) if b.own_gradient else None
                plan.append((with_layer(t, b.out_start + k), b.out_start + k,
                             [(e, with_layer(t, s + k)) for e, s in b.sources], base_n, scope))
            src_layers.append(s0 + k)
    relayered = relayer_config(out_config, src_layers)
    out_config.clear()
    out_config.update(relayered)
    return plan, len(src_layers)


def _find(ck: Checkpoint, name: str, who: str) -> str:
    rn = resolve_name(ck, name)
    if rn is None:
        raise UserError(f"tensor {name!r} is missing from {who}")
    return rn


def _check_count(method: Method, n: int) -> None:
    if n < method.min_models or (method.max_models and n > method.max_models):
        want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                else f"at least {method.min_models}")
        raise UserError(f"merge_method {method.name} merges {want} model(s) besides the base; got {n}")


def _task(out_n: str, sources: list[tuple[int, str]], base_src: tuple[int, str] | None, params: dict,
          models: list[Checkpoint], names: list[str], ref: int, is_vocab: bool, truncate_vocab: bool,
          out_dtype: torch.dtype, vocab_rows: int | None = None) -> tuple[TensorTask, int | None]:
    """One output tensor's task, its shapes checked; and the vocabulary rows it was truncated to, if so.
    ``vocab_rows``: the rows of the output's vocabulary, which every input's vocabulary tensor is laid out in
    (see :mod:`vocab`): their own row counts may differ."""
    everyone = sources + ([base_src] if base_src else [])
    shapes = {(mi, models[mi].shape(n)) for mi, n in everyone}
    rows = None
    remapped = is_vocab and vocab_rows is not None
    if len({s[1:] if remapped else s for _, s in shapes}) > 1:
        pair = [(names[mi], list(s)) for mi, s in sorted(shapes)]
        if not (is_vocab and len({s[1:] for _, s in shapes}) == 1):
            raise UserError(f"tensor {out_n!r} has different shapes: " + ", ".join(f"{n} {s}" for n, s in pair))
        rows = models[ref].shape(resolve_name(models[ref], out_n) or out_n)[0]
        if not truncate_vocab:
            raise UserError(f"vocabulary sizes differ: tensor {out_n!r} has "
                            + ", ".join(f"{s[0]} rows in {n}" for n, s in pair)
                            + f"; pass --truncate-vocab to keep the first {rows} rows (the vocabulary of {names[ref]})")
        short = [n for n, s in pair if s[0] < rows]
        if short:
            raise UserError(f"--truncate-vocab: {short[0]} has fewer rows than {names[ref]} in tensor {out_n!r}; "
                            "cannot truncate up")
    shape0 = models[everyone[0][0]].shape(everyone[0][1])
    rows_out = vocab_rows if remapped else rows
    shape = ((rows_out,) + tuple(shape0[1:])) if rows_out else tuple(shape0)
    in_dtype = models[everyone[0][0]].dtype(everyone[0][1])
    copy = not in_dtype.is_floating_point
    mixed = [names[mi] for mi, n in everyone if models[mi].dtype(n).is_floating_point == copy]
    if mixed:
        kinds = ("an integer", "a floating-point") if copy else ("a floating-point", "an integer")
        raise UserError(f"tensor {out_n!r} is {kinds[0]} tensor in {names[everyone[0][0]]} but {kinds[1]} one in "
                        f"{mixed[0]}: it can be neither merged nor copied")
    task = TensorTask(out_n, tuple(sources), base_src, params, shape, in_dtype if copy else out_dtype, copy)
    return task, rows


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
                 layer: int | None, depth: int, slice_params: dict, conv1d: tuple[str, ...] = ()) -> dict[str, Any]:
    """Each parameter's value for tensor ``name``: from the first setting that has one for it (a model's
    own, its slice's, the top level: mergekit's precedence; a filter list without a matching entry has
    none), a gradient read at ``layer`` of ``depth``."""

    def value(key: str, settings: list[dict]) -> Any:
        for params in settings:
            if params.get(key) is not None:
                v = _param(params[key], name, layer, depth)
                if v is not None:
                    return v
        return None

    shared = [slice_params, cfg.parameters]
    out: dict[str, Any] = {}
    for key, default in method.model_params.items():
        if key != "data":
            out[key] = [default if (v := value(key, [e.parameters, *shared])) is None else v for e in entries]
    for key, default in method.global_params.items():
        if key == "layout" and "layout" not in cfg.parameters:
            out[key] = "conv1d" if name.endswith(conv1d) else "linear"
            continue
        v = value(key, shared)
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
            raise UserError(f"models differ in architecture: {names[0]} is {a0}, {n} is {arch(ck)} "
                            "(--allow-crimes merges them where their tensors agree)")


def _blocks(cfg: MergeConfig, models: list[Checkpoint], idx: dict[str, int]):
    if cfg.layer_pattern is not None:
        entries = list(cfg.models or [])
        depth = num_layers(models[idx[entries[0].model]].config)
        for e in entries:
            if num_layers(models[idx[e.model]].config) != depth:
                raise UserError("layer_pattern needs models of the same depth")
        pat = cfg.layer_pattern
        return [_Block(i, 1, ((entries[ord(pat[i % len(pat)]) - 65], i),)) for i in range(depth)]
    blocks, out = [], 0
    for sl in cfg.slices or []:
        for s in sl.sources:
            n = num_layers(models[idx[s.model]].config)
            if n is not None and s.layer_range[1] > n:
                raise UserError(f"layer_range {list(s.layer_range)} of {s.model}: it has only {n} layers")
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        blocks.append(_Block(out, length, tuple((s, s.layer_range[0]) for s in sl.sources), sl.parameters, True))
        out += length
    return blocks


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
