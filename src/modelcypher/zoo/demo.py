"""`modelcypher demo`: the main job on an embedded default, offline.

Pre-train a character-level GPT-2 on the bundled Shakespeare, fine-tune one copy on the comedies and
one on the tragedies, merge the two fine-tunes with several methods through the public `merge` API (the
same path as `modelcypher merge`), and print each model's held-out loss on each genre.

Then the geometry that only alignment sees: two small models trained from different seeds share no
basis, so the straight line between them climbs a loss barrier and their plain average is a poor model.
Data-free weight matching moves one onto the other (an exact symmetry: the same function), after which
the barrier falls and the merge (the same `merge` API with `align:`) keeps most of both; the barrier
curves go to ``barrier.png`` in the work directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from modelcypher.api import merge
from modelcypher.measure.barrier import barrier_curve, plot_barrier
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
# Two models of one recipe from different seeds (initialization and batch order), for the barrier.
SEED_PAIR = gpt2.TrainConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, steps=300, lr=3e-3,
                             warmup_steps=30)
PAIR_EVAL_TOKENS = 16384  # held-out characters for the pair's barrier and merges
ALIGN = {"method": "weight", "vo": True, "qk": True}  # data-free


def merge_config(method: str, base: Path, fts: list[Path]) -> dict:
    spec = METHODS[method]
    models = [{"model": str(p), "parameters": dict(spec.get("models_params", {}))} for p in fts]
    cfg = {"merge_method": method, "base_model": str(base), "models": models,
           "parameters": dict(spec.get("global", {})), "dtype": "float32"}
    if method == "slerp":  # slerp walks from the base to one model: here, comedy to tragedy
        cfg["base_model"] = str(fts[0])
        cfg["models"] = [{"model": str(fts[1])}]
    return cfg


def _trainer(root: Path, tok, out):
    """``trained(name, make)``: the model at ``root/name``, trained by ``make()`` and saved there first
    when it is not there yet."""
    def trained(name: str, make) -> Path:
        path = root / name
        if not (path / "config.json").is_file():
            t = time.perf_counter()
            out(f"training {name} ...", flush=True)
            gpt2.save(make(), tok, path)
            out(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
        return path

    return trained


def demo_models(root: Path, *, quick: bool = False, out=print) -> tuple[Path, list[Path]]:
    """The demo's base (all of Shakespeare) and its fine-tunes on each genre, trained into ``root`` (or
    reused from there): ``root/base``, ``root/ft-comedy``, ``root/ft-tragedy``."""
    base_cfg, ft_cfg = gpt2.DEMO_BASE, gpt2.DEMO_FINETUNE
    if quick:
        base_cfg = base_cfg.with_(n_layer=2, n_embd=64, steps=60, batch_size=16)
        ft_cfg = ft_cfg.with_(steps=30, batch_size=16)
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    trained = _trainer(root, tok, out)
    all_train, all_val, _ = shakespeare.split_by_play()
    base = trained("base", lambda: gpt2.train(all_train, all_val, base_cfg, tok))
    base_model = None

    def finetune(genre: str):
        nonlocal base_model
        base_model = base_model or gpt2.load(base)[0]
        train, val, _ = shakespeare.split_by_play(genre)
        return gpt2.train(train, val, ft_cfg, tok, init=base_model)

    return base, [trained(f"ft-{g}", lambda g=g: finetune(g)) for g in GENRES]


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
    eval_tokens = 8192 if quick else 65536
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    splits = {g: shakespeare.split_by_play(g) for g in GENRES}
    tests = {g: splits[g][2] for g in GENRES}
    trained = _trainer(root, tok, out)
    all_train, _, _ = shakespeare.split_by_play()
    base, fts = demo_models(root, quick=quick, out=out)

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
    geometry(root, trained, all_train, tests, tok, eval_tokens, quick, device, out)
    out(f"\nModels in {root if tmp is None else '(a temporary directory; pass --workdir to keep them)'}; "
        f"{time.perf_counter() - t0:.0f}s in all.")
    if tmp is not None:
        tmp.cleanup()
    return table


def geometry(root: Path, trained, train_text: str, tests: dict[str, str], tok, eval_tokens: int, quick: bool,
             device: str, out) -> None:
    """Two models from different seeds: the barrier raw and after data-free alignment, and the merge of
    the aligned pair against the plain average."""
    cfg = SEED_PAIR.with_(steps=20) if quick else SEED_PAIR
    pair = [trained(f"seed-{s}", lambda s=s: gpt2.train(train_text, None, cfg.with_(seed=s), tok)) for s in (1, 2)]
    heldout = "\n".join(tests.values())
    eval_tokens = min(eval_tokens, PAIR_EVAL_TOKENS)
    result = barrier_curve(pair[0], pair[1], heldout, max_tokens=eval_tokens, device=device, options=None,
                           align=ALIGN["method"], vo=ALIGN["vo"], qk=ALIGN["qk"])
    png = plot_barrier(result, root / "barrier.png", title="two char GPT-2s from different seeds")
    merged = {}
    for name, align in (("plain average", None), ("merge of the aligned pair", ALIGN)):
        dest = root / ("merged-seeds" if align is None else "merged-seeds-aligned")
        if not (dest / "config.json").is_file():
            cfg_merge = {"merge_method": "linear", "dtype": "float32",
                         "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in pair]}
            merge(cfg_merge if align is None else {**cfg_merge, "align": align}, dest, device=device)
        merged[name] = dest
    rows = {f"model seed {i + 1}": p for i, p in enumerate(pair)} | merged
    losses = {name: gpt2.eval_loss(gpt2.load(p)[0], heldout, tok, max_tokens=eval_tokens) for name, p in rows.items()}
    raw, aligned = result["raw"]["barrier"], result["aligned"]["barrier"]
    width = max(map(len, losses)) + 2
    out("")
    out(f"Two models trained from different seeds ({cfg.n_layer} x {cfg.n_embd}, {cfg.steps} steps each): "
        f"held-out loss (nats/char) on {result['tokens']} characters of both genres")
    for name, v in losses.items():
        out(f"{name:<{width}}{v:>10.4f}")
    share = f" ({aligned / raw:.0%} of raw)" if raw > 0 else ""
    out(f"loss barrier between them: raw {raw:.4f}, after data-free weight matching {aligned:.4f}{share}; "
        f"curves in {png.name}")
