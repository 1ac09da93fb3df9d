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

from modelcypher import __version__
from modelcypher.checkpoint.safetensors_io import read_header, read_tensor
from modelcypher.errors import UserError

MAX_TOKENS = 32768  # statistics saturate long before this on the models we merge; bounds the cost
BATCH = 8


def _fingerprint(model_dir: Path) -> list:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _token_batches(model_dir: Path, data: Path, block: int) -> tuple[list[torch.Tensor], int]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:
        raise UserError(f"{model_dir}: no tokenizer files to read its data {data} with") from None
    ids = tok(data.read_text(errors="replace"), add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    n = len(ids) // block
    if n == 0:
        raise UserError(f"{data}: {len(ids)} tokens, fewer than one block of {block}; give more text")
    rows = torch.tensor(ids[: n * block]).reshape(n, block)
    return list(rows.split(BATCH)), n * block


def _compute(stat: str, model_dir: Path, data: Path, device: torch.device) -> tuple[dict, int, int]:
    from transformers import AutoModelForCausalLM

    from modelcypher.measure.stats import fisher_diagonal, input_grams

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError) as e:
        raise UserError(f"{model_dir}: statistics need a causal language model ({str(e).splitlines()[0]})") from None
    model = model.to(device).eval()
    cfg = model.config
    block = min(int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 256)), 256)
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


def collect(plan, out: Path, device: torch.device, log=print) -> Stats:
    """Compute (or reuse) every statistic the plan's method needs for every model with data."""
    from safetensors.torch import save_file

    cache = out.parent / f"{out.name}.stats"
    cache.mkdir(parents=True, exist_ok=True)
    stats = Stats()
    for mi, data in sorted(plan.data.items()):
        model_dir = plan.models[mi].path
        data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
        for stat in plan.method.stats:
            prov = {"statistic": stat, "model": str(model_dir.resolve()), "model_files": _fingerprint(model_dir),
                    "data": str(data.resolve()), "data_sha256": data_sha, "max_tokens": MAX_TOKENS,
                    "modelcypher": __version__}
            key = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:16]
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", model_dir.name)
            path = cache / f"{stat}-{stem}-{key}.safetensors"
            if not path.is_file():
                log(f"computing {stat} of {plan.names[mi]} on {data.name} ...")
                tensors, tokens, block = _compute(stat, model_dir, data, device)
                meta = {"provenance": json.dumps({**prov, "tokens": tokens, "block": block})}
                tmp = path.with_suffix(".tmp")
                save_file(tensors, str(tmp), metadata=meta)
                os.replace(tmp, path)
                path.with_suffix(".json").write_text(json.dumps({**prov, "tokens": tokens, "block": block}, indent=2))
            stats.add(stat, mi, path)
    return stats
