"""The public Python API; the CLI is a thin layer over it.

A merge flows one way: parse the config -> align the models (when ``align:`` is set) -> plan once
(headers only) -> statistics (data-driven methods) -> stream every tensor to the writer -> rename.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import yaml

from modelcypher.adapters.extract import ExtractReport
from modelcypher.adapters.extract import extract_lora as _extract_lora
from modelcypher.align.pipeline import align_checkpoint, align_universe
from modelcypher.align.prealign import prealign
from modelcypher.checkpoint.guard import atomic_dir, check_output_dir
from modelcypher.checkpoint.writer import parse_size
from modelcypher.errors import UserError
from modelcypher.evolve.search import run_search
from modelcypher.hf import resolve_device
from modelcypher.measure.barrier import barrier_curve
from modelcypher.measure.compare import compare_models
from modelcypher.merging.config import MergeConfig, config_path, parse_config
from modelcypher.merging.pipeline import read_pipeline, run_pipeline
from modelcypher.merging.plan import Plan, check_config, make_plan, open_model
from modelcypher.merging.run import execute
from modelcypher.merging.stats import collect
from modelcypher.transfer.move import transfer_adapter

__all__ = ["align_checkpoint", "align_universe", "barrier_curve", "compare_models", "evolve", "extract_lora", "merge",
           "plan_merge", "transfer_adapter"]


def _parse(config: str | Path | dict | MergeConfig) -> tuple[MergeConfig, Path | None]:
    config_dir = Path(config).parent if isinstance(config, (str, Path)) and Path(config).is_file() else None
    return (config if isinstance(config, MergeConfig) else parse_config(config)), config_dir


def _as_given(config: str | Path | dict | MergeConfig, cfg: MergeConfig) -> str:
    """The config's text as the user gave it (a file's own bytes), else its YAML."""
    if isinstance(config, Path) or (isinstance(config, str) and Path(config).is_file()):
        return Path(config).read_text(encoding="utf-8")
    if isinstance(config, str):
        return config if config.endswith("\n") else config + "\n"
    data = config if isinstance(config, dict) else cfg.model_dump(exclude_none=True, exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False)


def plan_merge(config: str | Path | dict | MergeConfig, *, truncate_vocab: bool = False) -> Plan:
    """Validate a config and plan every output tensor, reading only checkpoint headers (an ``align:``
    section is not carried out: the plan is of the models as they are)."""
    if isinstance(config, (str, Path)) and read_pipeline(config) is not None:
        where = config_path(config) or "config"
        raise UserError(f"{where}: several documents, a pipeline: its later stages read models not made yet; "
                        "plan it with merge(config, out, dry_run=True)")
    cfg, config_dir = _parse(config)
    return make_plan(cfg, config_dir=config_dir, truncate_vocab=truncate_vocab)


def merge(config: str | Path | dict | MergeConfig, out: str | Path, *, device: str = "auto",
          max_shard_size: str | int = "5GB", random_seed: int = 0, allow_nonfinite: bool = False,
          truncate_vocab: bool = False, overwrite: bool = False, dry_run: bool = False,
          progress: bool = False, allow_crimes: bool = False, copy_tokenizer: bool = True,
          write_model_card: bool = True, intermediate_dir: str | Path | None = None) -> Plan:
    """Merge the models a mergekit-style config names and write a Hugging Face model directory.

    ``config`` is a YAML path, a YAML string, a dict (mergekit's ``MergeConfiguration.model_dump()``
    too) or a parsed MergeConfig. Nothing is written when ``dry_run`` is set; otherwise ``out`` appears
    whole or not at all, with ``mergekit_config.yml`` (the config as given), the tokenizer and a model card.
    ``allow_crimes`` merges models whose architectures differ when their tensors match (as mergekit's flag).

    A YAML file or string of several documents is a pipeline (mergekit-multi's format, see
    :mod:`modelcypher.merging.pipeline`): its stages are merged in turn into ``intermediate_dir`` (default
    ``OUT.pipeline``), reused while unchanged, and its output into ``out``; the output's plan is returned.
    """
    shard_bytes = parse_size(max_shard_size)
    dev = resolve_device(device)
    one = partial(_merge_one, device=dev, shard_bytes=shard_bytes, seed=random_seed, allow_nonfinite=allow_nonfinite,
                  truncate_vocab=truncate_vocab, progress=progress, allow_crimes=allow_crimes,
                  copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    stages = read_pipeline(config) if isinstance(config, (str, Path)) else None
    if stages is not None:
        path = config_path(config)
        config_dir = path.parent if path is not None else None
        settings = {"random_seed": random_seed, "allow_nonfinite": allow_nonfinite, "truncate_vocab": truncate_vocab,
                    "allow_crimes": allow_crimes, "copy_tokenizer": copy_tokenizer}
        return run_pipeline(stages, Path(out), partial(one, config_dir=config_dir, given=None), config_dir=config_dir,
                            settings=settings, overwrite=overwrite, dry_run=dry_run, cache=intermediate_dir)
    cfg, config_dir = _parse(config)
    return one(cfg, Path(out), config_dir=config_dir, given=_as_given(config, cfg), overwrite=overwrite,
               dry_run=dry_run)


def _merge_one(cfg: MergeConfig, out: Path, *, config_dir: Path | None, given: str | None, device: torch.device,
               shard_bytes: int, seed: int, allow_nonfinite: bool, truncate_vocab: bool, overwrite: bool,
               dry_run: bool, progress: bool, allow_crimes: bool, copy_tokenizer: bool, write_model_card: bool,
               extra_files: dict[str, str] | None = None) -> Plan:
    """One merge (a config, or a pipeline's stage): ``given`` is the config's text for mergekit_config.yml
    (None: ``cfg`` as YAML); ``extra_files`` (name -> text) go into the output with it."""
    if cfg.align is None or dry_run:
        plan = make_plan(cfg, config_dir=config_dir, truncate_vocab=truncate_vocab, allow_crimes=allow_crimes)
        inputs = [(ck.path, name) for ck, name in zip(plan.models, plan.names, strict=True)]
    else:  # planned once, after alignment; what needs no model is checked before it
        check_config(cfg)
        inputs = [(open_model(n, config_dir).path, n) for n in cfg.model_names()]
    if dry_run:
        return plan
    paths = [path for path, _ in inputs]
    check_output_dir(out, paths, overwrite=overwrite)
    with atomic_dir(out, overwrite=overwrite, inputs=paths) as tmp:
        if cfg.align is not None:
            # Aligned copies go into the temporary output directory, so an interrupted run leaves nothing.
            aligned, names, provenance = prealign(cfg, tmp / ".aligned", config_dir=config_dir, device=device)
            plan = make_plan(aligned, truncate_vocab=truncate_vocab, config_dir=config_dir, as_given=cfg,
                             names=names, provenance=provenance, allow_crimes=allow_crimes)
        stats = collect(plan, out, device) if plan.method.stats else None
        reports = execute(plan, tmp, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
                          max_shard_size=shard_bytes, progress=progress, stats=stats, copy_tokenizer=copy_tokenizer,
                          write_model_card=write_model_card)
        shutil.rmtree(tmp / ".aligned", ignore_errors=True)
        # hubs read it to show the recipe
        (tmp / "mergekit_config.yml").write_text(given if given is not None else _as_given(cfg, cfg))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return replace(plan, reports=reports)


def extract_lora(finetune: str | Path, base: str | Path, out: str | Path, *, rank: int = 32,
                 sv_epsilon: float = 0.0, embed_lora: bool = False, overwrite: bool = False,
                 log=None) -> ExtractReport:
    """Write a PEFT LoRA adapter to ``out`` that turns ``base`` into ``finetune``, by truncated SVD of
    each weight's update (rank ``rank``, fewer where singular values fall to ``sv_epsilon`` times the
    largest); embeddings and the head kept whole unless ``embed_lora``. Returns the per-module ranks
    and the share of each update's energy kept (also written to the adapter's extract_report.json)."""
    return _extract_lora(finetune, base, out, rank=rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora,
                         overwrite=overwrite, log=log)


def evolve(search_file: str | Path, out: str | Path, *, workers: int = 1, ray_address: str | None = None,
           resume: bool = False, progress=None) -> dict:
    """Search a merge method's parameters by CMA-ES, or a path of layers through a pool of models (the
    data-flow space) by CMA-ES with margin, on Ray actors (``search_file``: models, space, objective,
    optimizer). ``out`` receives the state (after every generation), ``report.json``,
    ``fitness.png`` and ``best.yaml``, a merge config of the best candidate. ``ray_address``: ``auto`` or
    HOST:PORT of a running cluster (default: an embedded local Ray); ``resume`` continues the search in
    ``out``; ``progress`` is called with a line per generation. Returns the report."""
    return run_search(search_file, out, workers=workers, ray_address=ray_address, resume=resume, progress=progress)
