"""The streaming runner: one output tensor at a time, read -> merge -> write.

Peak memory is the inputs of one tensor (in float32) plus its result, whatever the depth of the model.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
import yaml

from modelcypher.checkpoint.reader import GENERATION_FILES, TOKENIZER_FILES
from modelcypher.checkpoint.writer import ShardedWriter
from modelcypher.errors import UserError
from modelcypher.merging.plan import Plan, TensorTask


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None


def _load(plan: Plan, mi: int, name: str, rows: int | None, device: torch.device, check: bool) -> torch.Tensor:
    x = plan.models[mi].get(name)
    if rows is not None:
        x = x[:rows]
    x = x.to(device=device, dtype=torch.float32)
    if check and not torch.isfinite(x).all():
        raise UserError(f"tensor {name!r} of model {plan.names[mi]} contains NaN or Inf; "
                        "pass --allow-nonfinite to merge it anyway")
    return x


def compute(plan: Plan, task: TensorTask, device: torch.device, seed: int, allow_nonfinite: bool,
            stats=None, report: dict | None = None) -> torch.Tensor:
    if task.copy:
        mi, n = task.sources[0] if task.sources else task.base
        return plan.models[mi].get(n)
    check = not allow_nonfinite
    xs = [_load(plan, mi, n, task.rows, device, check) for mi, n in task.sources]
    base = _load(plan, *task.base, task.rows, device, check) if task.base else None
    kwargs = dict(task.params)
    if plan.method.random:
        # Seeded per tensor name: the result does not depend on the order tensors are visited in.
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(task.name.encode())) % 2**63)
        kwargs["rng"] = g
    for stat in plan.method.stats:
        kwargs[stat] = [stats.get(stat, mi, n, device) if stats else None for mi, n in task.sources]
        if task.base and stats and stats.get(stat, *task.base, device) is not None:
            kwargs[f"base_{stat}"] = stats.get(stat, *task.base, device)
    if plan.method.reports and report is not None:
        kwargs["report"] = report
    y = plan.method.fn(xs, base, **kwargs)
    if y.shape != task.shape:
        raise RuntimeError(f"{plan.method.name} returned shape {tuple(y.shape)} for {task.name}, want {task.shape}")
    return y.to(dtype=task.dtype, device="cpu")


def execute(plan: Plan, out_dir: Path, *, device: torch.device, seed: int = 0, allow_nonfinite: bool = False,
            max_shard_size: int = 5 * 10**9, progress: bool = False, stats=None) -> dict[str, dict]:
    """Write the merged model into ``out_dir`` (an empty directory); returns the methods' per-tensor reports."""
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.dtype) for t in plan.tasks], max_shard_size)
    by_name = {t.name: t for t in plan.tasks}
    order = writer.order
    if progress:
        from tqdm import tqdm

        order = tqdm(order, desc=f"merge ({plan.method.name})", unit="tensor", leave=False)
    reports: dict[str, dict] = {}
    for name in order:
        reports[name] = {}
        writer.write(name, compute(plan, by_name[name], device, seed, allow_nonfinite, stats, reports[name]))
    writer.finish()
    reports = {k: v for k, v in reports.items() if v}
    if reports:
        models = [plan.names[mi] for mi, _ in plan.tasks[0].sources] if plan.tasks else []
        (out_dir / "merge_report.json").write_text(json.dumps({"models": models, "tensors": reports}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    _copy_files(plan.models[plan.tokenizer_from].path, out_dir, TOKENIZER_FILES)
    _copy_files(plan.models[plan.reference].path, out_dir, GENERATION_FILES)
    (out_dir / "README.md").write_text(model_card(plan))
    return reports


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for n in names:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)


def model_card(plan: Plan) -> str:
    cfg = plan.config.model_dump(exclude_none=True, exclude_defaults=True)
    cfg["merge_method"] = plan.config.merge_method
    front = {"library_name": "transformers", "tags": ["merge", "modelcypher", plan.method.name],
             "base_model": plan.names}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {plan.config.name or 'Merged model'}", "",
        f"Made with ModelCypher's `{plan.method.name}` merge.", "",
        f"Method: {plan.method.paper}", "",
        "## Models", "",
        *[f"- `{n}`" + (" (base)" if plan.config.base_model == n else "") for n in plan.names], "",
    ]
    if plan.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in plan.notes], ""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
