"""Data statistics for the data-driven methods (Fisher diagonals, input Grams).

Each model's statistic is computed once from its own text (`parameters: {data: path}`) with its own
tokenizer, cached next to the output in `<output>.stats/` with its provenance (model files, data hash,
token count), reused when the provenance matches, and read back one tensor at a time during the merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelcypher import __version__
from modelcypher.checkpoint.files import fingerprint
from modelcypher.checkpoint.safetensors_io import read_header, read_tensor
from modelcypher.errors import UserError
from modelcypher.hf import load_causal_lm, load_tokenizer
from modelcypher.merging.statistics import distilled_coefficients, fisher_diagonal, input_grams

MAX_TOKENS = 32768  # statistics saturate long before this on the models we merge; bounds the cost
BATCH = 8


def _origin(plan, mi: int) -> list:
    """What model ``mi`` is made from, for cache keys: the user's checkpoint (path and files) and, when
    the merge aligned it first, the alignment's settings and reference; never a temporary copy's path."""
    prov = plan.provenance[mi]
    extra = [prov["align"], prov["onto"]] if "align" in prov else []
    return [prov["model"], fingerprint(Path(prov["model"])), *extra]


def _token_batches(model_dir: Path, data: Path, block: int, lines: bool = False) -> tuple[list, int]:
    """Batches of ``BATCH`` rows: blocks of ``block`` tokens of the whole text, or (``lines``) one row per
    non-empty line, each with the line break before it as in the file, cut at ``block`` tokens and padded
    (then each row is ``{input_ids, attention_mask}``)."""
    tok = load_tokenizer(model_dir, f"to read its data {data} with")
    text = data.read_text(errors="replace")
    if lines:
        rows, total, out = [], 0, []
        for ln in text.splitlines():
            if total >= MAX_TOKENS:
                break
            if ln.strip():
                rows.append(tok("\n" + ln, add_special_tokens=False)["input_ids"][:block])
                total += len(rows[-1])
        for i in range(0, len(rows), BATCH):
            part = rows[i : i + BATCH]
            width = max(len(r) for r in part)
            ids = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.bool)
            for j, r in enumerate(part):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), True
            out.append({"input_ids": ids, "attention_mask": mask})
        if not out:
            raise UserError(f"{data}: no lines of text; give some")
        return out, total
    ids = tok(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    n = len(ids) // block
    if n == 0:
        raise UserError(f"{data}: {len(ids)} tokens, fewer than one block of {block}; give more text")
    rows = torch.tensor(ids[: n * block]).reshape(n, block)
    return list(rows.split(BATCH)), n * block


def _compute(stat: str, model_dir: Path, data: Path, device: torch.device) -> tuple[dict, int, int]:
    model, block = load_causal_lm(model_dir, device)
    batches, tokens = _token_batches(model_dir, data, block)
    fn = {"fisher": fisher_diagonal, "gram": input_grams}[stat]
    out = fn(model, batches)
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}, tokens, block  # tied names: own copies


class Stats:
    """Cached statistics, one safetensors file per (statistic, model), read lazily."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, int], dict] = {}

    def add(self, stat: str, model: int, path: Path) -> None:
        self._files[(stat, model)] = read_header(path)[0]

    def get(self, stat: str, model: int, name: str, device: torch.device) -> torch.Tensor | None:
        infos = self._files.get((stat, model))
        if infos is None or name not in infos:
            return None
        return read_tensor(infos[name]).to(device)


JOINT = {"distill"}  # statistics fitted for all models at once (one file per model, one provenance)


def _save(tensors: dict, path: Path, prov: dict) -> None:
    """One statistic into the cache, made on its first write (an interrupted pass leaves no empty cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"provenance": json.dumps(prov)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    path.with_suffix(".json").write_text(json.dumps(prov, indent=2))


def _base_index(plan) -> int:
    base = next((t.base for t in plan.tasks if t.base), None)
    if base is None:
        raise UserError(f"merge_method {plan.method.name} needs a base_model")
    return base[0]


def _distill(plan, base_i: int, device: torch.device, params: dict, log) -> tuple[list[dict], int]:
    """``distilled_coefficients`` of the plan's models (not the base) on their own text, in the base's module."""
    if params["sequences"] not in ("blocks", "lines"):
        raise UserError(f"merge_method {plan.method.name}: sequences must be blocks or lines, "
                        f"not {params['sequences']!r}")
    model, block = load_causal_lm(plan.models[base_i].path, device, "distill needs")
    base = {n: p.detach().float() for n, p in model.named_parameters()}
    others = [mi for mi in sorted(plan.data) if mi != base_i]
    task_vectors, batches, tokens = [], [], 0
    for mi in others:
        ft, _ = load_causal_lm(plan.models[mi].path, device, "distill needs")
        theta = dict(ft.named_parameters())
        if theta.keys() != base.keys():
            raise UserError(f"distill: {plan.names[mi]} has other parameters than the base "
                            f"({sorted(theta.keys() ^ base.keys())[:3]})")
        task_vectors.append({n: theta[n].detach().float() - base[n] for n in base})
        del ft, theta
        b, n = _token_batches(plan.models[mi].path, plan.data[mi], block, params["sequences"] == "lines")
        batches.append(b)
        tokens += n
    coef = distilled_coefficients(model, base, task_vectors, batches, log=log,
                                  **{k: v for k, v in params.items() if k != "sequences"})
    return [{n: c.cpu() for n, c in per.items()} for per in coef], tokens


def collect(plan, out: Path, device: torch.device, log=print) -> Stats:
    """Compute (or reuse) every statistic the plan's method needs for every model with data."""
    cache = out.parent / f"{out.name}.stats"
    stats = Stats()
    for stat in set(plan.method.stats) & JOINT:
        base_i = _base_index(plan)
        params = {k: plan.config.parameters.get(k, v) for k, v in plan.method.global_params.items()}
        prov = {"statistic": stat, "params": params, "modelcypher": __version__, "max_tokens": MAX_TOKENS,
                "base": _origin(plan, base_i),
                "models": [(*_origin(plan, mi), str(d.resolve()), hashlib.sha256(d.read_bytes()).hexdigest())
                           for mi, d in sorted(plan.data.items()) if mi != base_i]}
        key = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:16]
        paths = {mi: cache / f"{stat}-{mi}-{key}.safetensors" for mi in sorted(plan.data) if mi != base_i}
        if not all(p.is_file() for p in paths.values()):
            log(f"fitting {stat} coefficients on the models' own text ...")
            coef, tokens = _distill(plan, base_i, device, params, log)
            for (mi, path), c in zip(paths.items(), coef, strict=True):
                _save(c, path, {**prov, "model_index": mi, "tokens": tokens})
        for mi, path in paths.items():
            stats.add(stat, mi, path)
    for mi, data in sorted(plan.data.items()):
        model_dir = plan.models[mi].path
        data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
        for stat in [s for s in plan.method.stats if s not in JOINT]:
            model, files, *aligned = _origin(plan, mi)
            prov = {"statistic": stat, "model": model, "model_files": files, **({"align": aligned} if aligned else {}),
                    "data": str(data.resolve()), "data_sha256": data_sha, "max_tokens": MAX_TOKENS,
                    "modelcypher": __version__}
            key = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:16]
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model).name)
            path = cache / f"{stat}-{stem}-{key}.safetensors"
            if not path.is_file():
                log(f"computing {stat} of {plan.names[mi]} on {data.name} ...")
                tensors, tokens, block = _compute(stat, model_dir, data, device)
                _save(tensors, path, {**prov, "tokens": tokens, "block": block})
            stats.add(stat, mi, path)
    return stats
