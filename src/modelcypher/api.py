"""The public Python API; the CLI is a thin layer over it.

A merge flows one way: parse the config -> align the models (when ``align:`` is set) -> plan once
(headers only) -> statistics (data-driven methods) -> stream every tensor to the writer -> rename.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from modelcypher.align.pipeline import align_checkpoint, align_universe
from modelcypher.align.prealign import prealign
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.checkpoint.writer import atomic_dir, parse_size
from modelcypher.errors import UserError
from modelcypher.hf import resolve_device
from modelcypher.measure.barrier import barrier_curve
from modelcypher.merging.config import MergeConfig, parse_config
from modelcypher.merging.plan import Plan, check_config, make_plan
from modelcypher.merging.run import execute
from modelcypher.merging.stats import collect

__all__ = ["align_checkpoint", "align_universe", "barrier_curve", "merge", "plan_merge"]


def _parse(config: str | Path | dict | MergeConfig) -> tuple[MergeConfig, Path | None]:
    config_dir = Path(config).parent if isinstance(config, (str, Path)) and Path(config).is_file() else None
    return (config if isinstance(config, MergeConfig) else parse_config(config)), config_dir


def plan_merge(config: str | Path | dict | MergeConfig, *, truncate_vocab: bool = False) -> Plan:
    """Validate a config and plan every output tensor, reading only checkpoint headers (an ``align:``
    section is not carried out: the plan is of the models as they are)."""
    cfg, config_dir = _parse(config)
    return make_plan(cfg, config_dir=config_dir, truncate_vocab=truncate_vocab)


def merge(config: str | Path | dict | MergeConfig, out: str | Path, *, device: str = "auto",
          max_shard_size: str | int = "5GB", random_seed: int = 0, allow_nonfinite: bool = False,
          truncate_vocab: bool = False, overwrite: bool = False, dry_run: bool = False,
          progress: bool = False) -> Plan:
    """Merge the models a mergekit-style config names and write a Hugging Face model directory.

    ``config`` is a YAML path, a YAML string, a dict or a parsed MergeConfig. Nothing is written when
    ``dry_run`` is set; otherwise ``out`` appears whole or not at all.
    """
    shard_bytes = parse_size(max_shard_size)
    dev = resolve_device(device)
    cfg, config_dir = _parse(config)
    out = Path(out)
    if cfg.align is None or dry_run:
        plan = make_plan(cfg, config_dir=config_dir, truncate_vocab=truncate_vocab)
        inputs = [(ck.path, name) for ck, name in zip(plan.models, plan.names, strict=True)]
    else:  # planned once, after alignment; what needs no model is checked before it
        check_config(cfg)
        inputs = [(resolve_path(n, config_dir), n) for n in cfg.model_names()]
    for path, name in inputs:
        if out.resolve() == path.resolve() or out.resolve().is_relative_to(path.resolve()):
            raise UserError(f"{out}: the output may not be inside the input model {name}")
    if dry_run:
        return plan
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if cfg.align is not None:
            # Aligned copies go into the temporary output directory, so an interrupted run leaves nothing.
            aligned, names, provenance = prealign(cfg, tmp / ".aligned", config_dir=config_dir, device=dev)
            plan = make_plan(aligned, truncate_vocab=truncate_vocab, config_dir=config_dir, as_given=cfg,
                             names=names, provenance=provenance)
        stats = collect(plan, out, dev) if plan.method.stats else None
        reports = execute(plan, tmp, device=dev, seed=random_seed, allow_nonfinite=allow_nonfinite,
                          max_shard_size=shard_bytes, progress=progress, stats=stats)
        shutil.rmtree(tmp / ".aligned", ignore_errors=True)
    return replace(plan, reports=reports)
