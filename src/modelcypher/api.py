"""The public Python API; the CLI is a thin layer over it."""

from __future__ import annotations

from pathlib import Path

from modelcypher.adapters.extract import ExtractReport
from modelcypher.adapters.extract import extract_lora as _extract_lora
from modelcypher.checkpoint.writer import atomic_dir, parse_size
from modelcypher.errors import UserError
from modelcypher.merging.config import MergeConfig, parse_config
from modelcypher.merging.plan import Plan, make_plan
from modelcypher.merging.run import execute, resolve_device


def plan_merge(config: str | Path | dict | MergeConfig, *, truncate_vocab: bool = False) -> Plan:
    """Validate a config and plan every output tensor, reading only checkpoint headers."""
    config_dir = Path(config).parent if isinstance(config, (str, Path)) and Path(config).is_file() else None
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
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
    plan = plan_merge(config, truncate_vocab=truncate_vocab)
    out = Path(out)
    for ck, name in zip(plan.models, plan.names, strict=True):
        if out.resolve() == ck.path.resolve() or out.resolve().is_relative_to(ck.path.resolve()):
            raise UserError(f"{out}: the output may not be inside the input model {name}")
    if dry_run:
        return plan
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if plan.config.align is not None:
            # Align every model onto the reference first (into the temporary output directory, so an
            # interrupted run leaves nothing), then merge the aligned copies.
            from modelcypher.align.pipeline import align_for_merge

            original = plan
            plan = make_plan(align_for_merge(plan, tmp / ".aligned", device=dev), truncate_vocab=truncate_vocab,
                             config_dir=original.config_dir)
            plan.config, plan.names = original.config, original.names  # the card names what the user gave
        stats = None
        if plan.method.stats:  # after alignment: statistics describe the models as they are merged
            from modelcypher.merging.stats import collect

            stats = collect(plan, out, dev)
        plan.reports = execute(plan, tmp, device=dev, seed=random_seed, allow_nonfinite=allow_nonfinite,
                               max_shard_size=shard_bytes, progress=progress, stats=stats)
        if (tmp / ".aligned").exists():
            import shutil

            shutil.rmtree(tmp / ".aligned")
    return plan


def extract_lora(finetune: str | Path, base: str | Path, out: str | Path, *, rank: int = 32,
                 sv_epsilon: float = 0.0, embed_lora: bool = False, overwrite: bool = False,
                 log=None) -> ExtractReport:
    """Write a PEFT LoRA adapter to ``out`` that turns ``base`` into ``finetune``, by truncated SVD of
    each weight's update (rank ``rank``, fewer where singular values fall to ``sv_epsilon`` times the
    largest); embeddings and the head kept whole unless ``embed_lora``. Returns the per-module ranks
    and the share of each update's energy kept (also written to the adapter's extract_report.json)."""
    return _extract_lora(finetune, base, out, rank=rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora,
                         overwrite=overwrite, log=log)
