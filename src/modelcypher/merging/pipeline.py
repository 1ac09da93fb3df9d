"""Pipelines: several merges in one YAML file, later ones reading earlier ones' results (mergekit-multi).

Each document of the file is a merge config. A document's ``name`` makes it a stage that the documents
may name as a model (``base_model``, ``models``, slice ``sources``, ``tokenizer_source``; ``NAME+adapter``
too). The unnamed document is the pipeline's output, written to ``OUT``; when every document is named,
the last one is. Every other stage is written to ``OUT.pipeline/<name>/`` with ``pipeline_stage.json``, a
record of what it was made from: its config, each input model's files (name, size, modification time),
each data file's bytes and the settings that change a result. A later run reuses a stage whose record
matches and merges again one that changed or whose inputs did; a stage merged again has new files, so the
stages reading it are merged again too.

Stages run one at a time, in the file's order except where a stage waits for the stages it names; the
output comes last. Each is written whole or not at all, so a pipeline stopped part way leaves the stages
it finished (a rerun reuses them) and nothing at ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from modelcypher import __version__
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.adapted import AdaptedCheckpoint
from modelcypher.checkpoint.files import fingerprint
from modelcypher.checkpoint.guard import check_output_dir
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.merging.config import MergeConfig, config_documents, renamed_tokenizer, validated
from modelcypher.merging.plan import Plan, open_model

RECORD = "pipeline_stage.json"
# A stage's name is a folder name: no separators, no leading dot (temporary names), no '+' (adapters).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the unnamed document, the pipeline's output
    config: MergeConfig  # as written: stages named, not yet replaced by their folders
    needs: tuple[str, ...]  # the stages it reads, in the order it names them
    document: int  # its place in the file, from 1
    source: str  # the file (or "config"), for messages

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else f"the unnamed stage (document {self.document})"


def stage_of(ref: str, names: set[str] | dict) -> str | None:
    """The stage a model reference reads: the stage itself (``NAME``) or its result with an adapter
    (``NAME+adapter``); None for a model folder."""
    head = ref.split("+", 1)[0]
    return head if head in names else None


def read_pipeline(source: str | Path) -> list[Stage] | None:
    """The stages of a config of several YAML documents (a file or text), in running order; None for
    a config of one document."""
    docs, where = config_documents(source)
    return pipeline_stages(docs, where) if len(docs) > 1 else None


def pipeline_stages(docs: list, where: str) -> list[Stage]:
    """The documents as stages in running order, after checking their names and what they read; any
    mistake is one line naming ``where`` and the document."""
    configs: list[MergeConfig] = []
    seen: dict[str | None, int] = {}
    for i, doc in enumerate(docs, 1):
        cfg = validated(MergeConfig, doc, f"{where}: document {i}", "merge_method and models")
        if cfg.name is not None and (not _NAME.fullmatch(cfg.name) or cfg.name.endswith(".stats")):
            raise UserError(f"{where}: document {i}: name {cfg.name!r} names the stage's folder: use letters, "
                            "digits, '_', '-' and '.' (not first), not ending in .stats")
        if cfg.name in seen:
            raise UserError(f"{where}: document {i}: " + (
                f"name {cfg.name!r} is taken by document {seen[cfg.name]}" if cfg.name else
                f"no name, like document {seen[None]}: only the pipeline's output may go without one"))
        seen[cfg.name] = i
        configs.append(cfg)
    names = {c.name for c in configs if c.name}
    stages = [Stage(c.name, c, tuple(dict.fromkeys(s for r in c.model_names() if (s := stage_of(r, names)))), i,
                    where) for i, c in enumerate(configs, 1)]
    final = next((s for s in stages if s.name is None), stages[-1])
    readers = [s for s in stages if final.name in s.needs]
    if readers:
        raise UserError(f"{where}: {final.label} is the pipeline's output (no document is unnamed, and it is the "
                        f"last) but {readers[0].label} reads it; put the output last, or leave its name out")
    return _running_order(stages, final, where)


def _running_order(stages: list[Stage], final: Stage, where: str) -> list[Stage]:
    """File order, each stage after the ones it reads, the output last; a cycle is one line naming it."""
    rest = [s for s in stages if s is not final] + [final]
    done: set[str] = set()
    order: list[Stage] = []
    while rest:
        ready = next((s for s in rest if set(s.needs) <= done), None)
        if ready is None:
            by_name = {s.name: s for s in rest}
            walk, stage = [], rest[0]
            while stage.name not in walk:  # every stage left waits on one left: follow them to a repeat
                walk.append(stage.name)
                stage = by_name[next(n for n in stage.needs if n not in done)]
            cycle = walk[walk.index(stage.name):] + [stage.name]
            raise UserError(f"{where}: the stages read each other in a cycle: " + " -> ".join(cycle))
        rest.remove(ready)
        order.append(ready)
        if ready.name:
            done.add(ready.name)
    return order


def model_inputs(stages: list[Stage], config_dir: Path | None) -> dict[str, list[Path]]:
    """Each model folder the stages read (not a stage): reference -> its folders (a model, and an
    adapter); all checked to open before any stage runs."""
    names = {s.name for s in stages if s.name}
    out: dict[str, list[Path]] = {}
    for st in stages:
        for ref in st.config.model_names():
            if ref in out:
                continue
            if (s := stage_of(ref, names)) is not None:
                if ref != s:  # NAME+adapter: the adapter must be there
                    out[ref] = [_adapter_path(ref, s, config_dir, st)]
                continue
            try:
                ck = open_model(ref, config_dir)
            except UserError as e:
                stages_here = f" (stages here: {', '.join(sorted(names))})" if names else ""
                raise UserError(f"{st.source}: {st.label}: {e}{stages_here}") from None
            out[ref] = [ck.base.path, ck.adapter.path] if isinstance(ck, AdaptedCheckpoint) else [ck.path]
    return out


def _adapter_path(ref: str, stage: str, config_dir: Path | None, st: Stage) -> Path:
    try:
        return resolve_path(ref[len(stage) + 1:], config_dir, what="adapter")
    except UserError as e:
        raise UserError(f"{st.source}: {st.label}: {e}") from None


def resolved(cfg: MergeConfig, made: dict[str, Path]) -> MergeConfig:
    """``cfg`` with each stage it names replaced by that stage's folder."""
    def swap(ref: str) -> str:
        s = stage_of(ref, made)
        return ref if s is None else str(made[s]) + ref[len(s):]

    data = cfg.model_dump(mode="json", exclude_none=True)
    if cfg.base_model:
        data["base_model"] = swap(cfg.base_model)
    for e in data.get("models") or []:
        e["model"] = swap(e["model"])
    for sl in data.get("slices") or []:
        for src in sl["sources"]:
            src["model"] = swap(src["model"])
    if cfg.tokenizer_source not in (None, "base"):
        data["tokenizer_source"] = swap(cfg.tokenizer_source)
    if cfg.tokenizer is not None:
        data["tokenizer"] = renamed_tokenizer(cfg.tokenizer, swap).model_dump(mode="json", exclude_none=True)
    return MergeConfig.model_validate(data)


def _data_files(cfg: MergeConfig) -> list[str]:
    """Every text file the config names (the data-driven methods' ``data``, an ``align:`` probe text)."""
    entries = cfg.models or [s for sl in cfg.slices or [] for s in sl.sources]
    settings = [cfg.parameters, *(sl.parameters for sl in cfg.slices or []), *(e.parameters for e in entries)]
    refs = [p["data"] for p in settings if isinstance(p.get("data"), str)]
    return refs + ([cfg.align.data] if cfg.align is not None and cfg.align.data else [])


def stage_record(st: Stage, made: dict[str, Path], inputs: dict[str, list[Path]], config_dir: Path | None,
                 settings: dict) -> dict:
    """What a stage's result is made from: a stage whose record is unchanged would be merged the same."""
    models = {}
    for ref in st.config.model_names():
        s = stage_of(ref, made)
        folders = ([made[s]] if s else []) + inputs.get(ref, [])
        models[ref] = [[str(p.resolve()), fingerprint(p)] for p in folders]
    data = {}
    for ref in _data_files(st.config):
        try:
            data[ref] = hashlib.sha256(resolve_path(ref, config_dir, what="data file").read_bytes()).hexdigest()
        except (UserError, OSError):
            data[ref] = None  # the merge itself says what is wrong with it
    return {"modelcypher": __version__, "config": st.config.model_dump(mode="json", exclude_none=True),
            "models": models, "data": data, "settings": settings}


def _record_text(record: dict) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def _current(folder: Path, record: dict) -> bool:
    """Whether ``folder`` holds the stage ``record`` describes, still readable as a model (its files'
    headers intact)."""
    try:
        if (folder / RECORD).read_text(encoding="utf-8") != _record_text(record):
            return False
        Checkpoint(folder)
    except (OSError, UnicodeDecodeError, UserError):
        return False
    return True


MergeOne = Callable[..., Plan]  # (config, out, *, overwrite, dry_run, extra_files) -> Plan


def run_pipeline(stages: list[Stage], out: Path, merge_one: MergeOne, *, config_dir: Path | None,
                 settings: dict, overwrite: bool = False, dry_run: bool = False, cache: Path | None = None,
                 log: Callable[[str], None] = print) -> Plan:
    """Run ``stages`` (from :func:`read_pipeline`) by ``merge_one`` (a single merge, the same as a
    one-document config's): the output to ``out``, the others to ``cache`` (default ``OUT.pipeline``),
    reused when their record matches. Returns the output's plan. A dry run plans the stages whose inputs
    exist (notes name the others) and writes nothing."""
    out = Path(out)
    cache = Path(cache) if cache is not None else out.parent / f"{out.name}.pipeline"
    inputs = model_inputs(stages, config_dir)
    folders = [p for ps in inputs.values() for p in ps]
    if not dry_run:  # before any stage runs
        check_output_dir(out, folders, overwrite=overwrite)
        check_output_dir(cache, folders, overwrite=True)
    final = stages[-1]
    made: dict[str, Path] = {}
    plans: list[Plan] = []
    notes: list[str] = []
    for st in stages:
        waiting = [n for n in st.needs if n not in made]
        if waiting:  # a dry run makes nothing
            notes.append(f"{st.label} not planned: it reads stage {waiting[0]!r}, not made yet")
            continue
        cfg = resolved(st.config, made)
        if st is final:  # the output is merged each time, like a single config
            dest, may_replace, extra = out, overwrite, {}
        else:
            dest, may_replace = cache / st.name, True  # a stage folder is ours to replace
            record = stage_record(st, made, inputs, config_dir, settings)
            if _current(dest, record):
                log(f"{st.label}: unchanged, reusing {dest}")
                made[st.name] = dest
                continue
            extra = {RECORD: _record_text(record)}
        if not dry_run:
            log(f"{st.label}: merging into {dest}")
        plans.append(merge_one(cfg, dest, overwrite=may_replace, dry_run=dry_run, extra_files=extra))
        if not dry_run and st.name:
            made[st.name] = dest
    return replace(plans[-1], notes=[*plans[-1].notes, *notes])
