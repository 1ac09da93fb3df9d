"""`modelcypher demo`: the main job on an embedded default, offline.

Pre-train a character-level GPT-2 on the bundled Shakespeare, fine-tune one copy on the comedies and
one on the tragedies, merge the two fine-tunes with several methods through the public `merge` API (the
same path as `modelcypher merge`), and print each model's held-out loss on each genre.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from modelcypher.api import merge
from modelcypher.zoo import chartok, gpt2, shakespeare

GENRES = ("comedy", "tragedy")
# Methods shown, with the parameters a user would start from: two fine-tunes of one base.
METHODS: dict[str, dict] = {
    "linear": {"models_params": {"weight": 0.5}},
    "slerp": {"global": {"t": 0.5}},
    "task_arithmetic": {"models_params": {"weight": 1.0}, "global": {"lambda": 0.7}},
    "ties": {"models_params": {"weight": 1.0, "density": 0.5}, "global": {"lambda": 1.0}},
    "dare_ties": {"models_params": {"weight": 1.0, "density": 0.5}},
    "breadcrumbs_ties": {"models_params": {"weight": 1.0, "density": 0.5, "gamma": 0.01}},
    "model_stock": {},
    "dfs": {},
}


def merge_config(method: str, base: Path, fts: list[Path]) -> dict:
    spec = METHODS[method]
    models = [{"model": str(p), "parameters": dict(spec.get("models_params", {}))} for p in fts]
    cfg = {"merge_method": method, "base_model": str(base), "models": models,
           "parameters": dict(spec.get("global", {})), "dtype": "float32"}
    if method == "slerp":  # slerp walks from the base to one model: here, comedy to tragedy
        cfg["base_model"] = str(fts[0])
        cfg["models"] = [{"model": str(fts[1])}]
    return cfg


def run_demo(workdir: str | Path | None = None, *, quick: bool = False, device: str = "auto",
             out=print) -> dict[str, dict[str, float]]:
    """Train (or reuse, when ``workdir`` already holds them), merge, evaluate; returns the loss table."""
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="modelcypher-demo-")
        workdir = tmp.name
    root = Path(workdir)
    base_cfg, ft_cfg, eval_tokens = gpt2.DEMO_BASE, gpt2.DEMO_FINETUNE, 65536
    if quick:
        base_cfg = base_cfg.with_(n_layer=2, n_embd=64, steps=60, batch_size=16)
        ft_cfg = ft_cfg.with_(steps=30, batch_size=16)
        eval_tokens = 8192
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    splits = {g: shakespeare.split_by_play(g) for g in GENRES}
    tests = {g: splits[g][2] for g in GENRES}

    def trained(name: str, make) -> Path:
        path = root / name
        if not (path / "config.json").is_file():
            t = time.perf_counter()
            out(f"training {name} ...", flush=True)
            gpt2.save(make(), tok, path)
            out(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
        return path

    all_train, all_val, _ = shakespeare.split_by_play()
    base = trained("base", lambda: gpt2.train(all_train, all_val, base_cfg, tok))
    base_model = None

    def finetune(genre: str):
        nonlocal base_model
        base_model = base_model or gpt2.load(base)[0]
        return gpt2.train(splits[genre][0], splits[genre][1], ft_cfg, tok, init=base_model)

    fts = [trained(f"ft-{g}", lambda g=g: finetune(g)) for g in GENRES]

    rows: dict[str, Path] = {"base": base, **{f"fine-tune {g}": p for g, p in zip(GENRES, fts, strict=True)}}
    for method in METHODS:
        dest = root / f"merged-{method}"
        if not (dest / "config.json").is_file():
            merge(merge_config(method, base, fts), dest, device=device)
        rows[f"merge: {method}"] = dest

    table: dict[str, dict[str, float]] = {}
    for name, path in rows.items():
        model = gpt2.load(path)[0]
        table[name] = {g: gpt2.eval_loss(model, tests[g], tok, max_tokens=eval_tokens) for g in GENRES}
    width = max(map(len, table)) + 2
    out("")
    out(f"Held-out loss (nats/char, lower is better) on {eval_tokens} characters of each genre")
    out(f"{'model':<{width}}" + "".join(f"{g:>10}" for g in GENRES) + f"{'mean':>10}")
    for name, losses in table.items():
        vals = [losses[g] for g in GENRES]
        out(f"{name:<{width}}" + "".join(f"{v:>10.4f}" for v in vals) + f"{sum(vals) / len(vals):>10.4f}")
    out(f"\nModels in {root if tmp is None else '(a temporary directory; pass --workdir to keep them)'}; "
        f"{time.perf_counter() - t0:.0f}s in all.")
    if tmp is not None:
        tmp.cleanup()
    return table
