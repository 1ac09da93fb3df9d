"""Many models and different widths (seed 004, "Multi-Model Merging" and the rectangular residual).

Three character-level GPT-2s of one shape that differ only in their seed, on the bundled Shakespeare
(contiguous 90/5/5 split, the barrier benchmark's), merged by a plain average of their weights:

- plain average (no alignment);
- pairwise to the first: the second and third weight-matched onto the first, then averaged;
- universe matching: every model weight-matched onto a shared universe built iteratively, then averaged;
- universe + learned: the universe's rotations refined on the loss of ``sum_k lambda_k T_k(theta_k)``,
  ``lambda ~ Dirichlet(alpha 1)``, once with alpha 0.1 (the paper's) and once with alpha 1, on text sampled
  from the three models, no training text (``--probes train``: the training split instead).

Each merged model's test loss against the parents' mean; the loss over the simplex of the three (a
triangle coloured by loss) for the plain and the universe-aligned models.

Then a width pair trained alike (widths 256 and 384, heads of one size, MLP 4x): the narrow model lifted
into the wide one's shape (a rectangular residual transform with orthonormal rows, scaled; zero-padded
MLP units and heads), its barrier with the wide model with and without weight matching after the lift,
against the same-width pair's vanilla barrier.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/universe.py [--train-only] [--threads N] [--steps N]

Trained checkpoints are cached under benchmarks/.cache/universe/. Results: benchmarks/results/universe.{json,md}
and universe_simplex.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from barrier import char_tokenizer as tokenizer  # noqa: E402  (the barrier benchmark's tokenizer, split and keys)
from barrier import recipe_key  # noqa: E402
from barrier import shakespeare_splits as splits  # noqa: E402

CACHE = HERE / ".cache" / "universe"
RESULTS = HERE / "results"
SEEDS = (0, 1, 2)
# What 2 CPU cores train in a few minutes per model (float32: zoo.gpt2.TrainConfig.bf16 says why).
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, n_inner=512, block_size=128, batch_size=32, steps=400, lr=3e-3,
              warmup_steps=30, min_lr_ratio=0.1, bf16=False)
# The width pair (the issue's 256 and 384): heads of one size (64), MLP 4x, otherwise the recipe above; the
# same-width pair is two narrow models of different seeds.
NARROW = dict(n_head=4, n_embd=256, n_inner=1024)
WIDE = dict(n_head=6, n_embd=384, n_inner=1536)
EVAL_TOKENS = 16384
SIMPLEX_STEPS = 6  # points per edge of the simplex grid, less one
# Learned refinement: Adam steps, step size, probe tokens, Dirichlet alpha (the paper's 0.1), and the probe
# text: "train" (the training split, the text the models were trained on) or "sampled" (from the models).
LEARN = dict(steps=300, lr=1e-3, tokens=32768, alpha=0.1, alphas=(0.1, 1.0), probes="sampled")


def learned_row(alpha: float) -> str:
    """The merges table's row of learned refinement with Dirichlet ``alpha`` (the default's row unmarked)."""
    return "universe + learned" + ("" if alpha == LEARN["alpha"] else f", alpha {alpha:g}")


def trained(recipe: dict, seed: int, text: tuple[str, str, str]) -> Path:
    """The cached checkpoint of ``recipe`` with ``seed``, trained first if needed."""
    from modelcypher.zoo import gpt2

    out = CACHE / f"gpt2-{recipe['n_embd']}-{recipe_key(recipe, seed)}-seed{seed}"
    if (out / "train.json").is_file():
        return out
    cfg = gpt2.TrainConfig(**recipe, seed=seed, eval_interval=max(25, recipe["steps"] // 10), eval_tokens=8192,
                           verbose=True)
    log: list[dict] = []
    print(f"training GPT-2 width {recipe['n_embd']} seed {seed}: {recipe}", flush=True)
    t0 = time.perf_counter()
    model = gpt2.train(text[0], text[1], cfg, tokenizer(), log=log)
    seconds = time.perf_counter() - t0
    gpt2.save(model, tokenizer(), out)
    (out / "train.json").write_text(json.dumps({"recipe": recipe, "seed": seed, "seconds": seconds, "log": log},
                                               indent=2) + "\n")
    return out


def simplex_grid(steps: int) -> list[tuple[float, float, float]]:
    return [(i / steps, j / steps, (steps - i - j) / steps) for i in range(steps + 1) for j in range(steps + 1 - i)]


def mixture(states: list[dict], weights) -> dict:
    return {k: sum(w * sd[k] for w, sd in zip(weights, states, strict=True)) if v.is_floating_point() else v
            for k, v in states[0].items()}


def merges(narrow: list[Path], text: tuple[str, str, str], device: str, learn: dict) -> dict:
    """The three models merged by a plain average, after pairwise alignment to the first, after universe
    matching, and after universe matching with learned refinement; losses at the centroid and over the
    simplex."""
    from modelcypher.align.pipeline import match, match_to_universe, spec_of
    from modelcypher.align.transform import Alignment, apply
    from modelcypher.checkpoint import Checkpoint
    from modelcypher.hf import causal_lm
    from modelcypher.measure.barrier import lm_loss_fn
    from modelcypher.options import AlignOptions
    from modelcypher.zoo.chartok import encode_ids

    cks = [Checkpoint(p) for p in narrow]
    spec = spec_of(cks[0])
    raws = [{n: ck.get(n) for n in ck.names} for ck in cks]
    ids = encode_ids(text[2], tokenizer())[:EVAL_TOKENS]  # the test split
    loss = lm_loss_fn(causal_lm(cks[0].config, raws[0])[0], ids, torch.device(device), batch_size=32)
    full = lambda sd_config: causal_lm(sd_config[1], sd_config[0])[1]  # noqa: E731
    opts = AlignOptions(method="weight", vo=True, qk=True)
    identity = Alignment({"residual": torch.eye(spec.residual.size, dtype=torch.float64)})  # folds the norms
    found: dict[str, tuple[list[Alignment] | None, dict]] = {"plain average": (None, {})}
    t0 = time.perf_counter()
    pairwise = [identity] + [match(ck, cks[0], spec, opts, torch.device(device))[0] for ck in cks[1:]]
    found["pairwise to the first"] = (pairwise, {"seconds": time.perf_counter() - t0})
    t0 = time.perf_counter()
    universe, facts = match_to_universe(cks, spec, opts, torch.device(device))
    found["universe"] = (universe, {**facts, "seconds": time.perf_counter() - t0})
    # Learned refinement starts from this very universe (not matched a second time), once per Dirichlet alpha.
    probe_text = text[0] if learn["probes"] == "train" else None  # the training split, or sampled text
    for alpha in learn["alphas"]:
        t0 = time.perf_counter()
        learned = opts.model_copy(update={"method": "learned", "steps": learn["steps"], "lr": learn["lr"],
                                          "probe_tokens": learn["tokens"], "alpha": alpha})
        refined, more = match_to_universe(cks, spec, learned, torch.device(device), probe_text, start=(universe, facts))
        found[learned_row(alpha)] = (refined, {**more, "alpha": alpha, "seconds": time.perf_counter() - t0})
    parents = [loss(full((sd, ck.config))) for sd, ck in zip(raws, cks, strict=True)]
    rows = {}
    for name, (aligned, facts) in found.items():
        states = ([full((sd, ck.config)) for sd, ck in zip(raws, cks, strict=True)] if aligned is None else
                  [full(apply(sd, ck.config, a)) for sd, ck, a in zip(raws, cks, aligned, strict=True)])
        centroid = loss(mixture(states, [1 / 3] * 3))
        grid = simplex_grid(SIMPLEX_STEPS) if name != "pairwise to the first" else []
        rows[name] = {"loss": centroid, "gap": centroid - sum(parents) / 3, **facts,
                      "simplex": [[*w, loss(mixture(states, w))] for w in grid]}
        print(f"{name:24s} merged loss {centroid:.4f} (parents' mean {sum(parents) / 3:.4f})", flush=True)
    return {"parents": parents, "eval_tokens": len(ids), "rows": rows}


def widths(narrow: list[Path], wide: Path, text: tuple[str, str, str], device: str) -> dict:
    """The width pair's barrier, the narrow model lifted with and without alignment, and the same-width
    pair's barrier raw and aligned, on the test split."""
    from modelcypher.measure.barrier import barrier_curve

    out = {}
    for name, a, b in (("width pair", wide, narrow[0]), ("same-width pair", narrow[1], narrow[0])):
        t0 = time.perf_counter()
        r = barrier_curve(a, b, text[2], align="weight", vo=True, qk=True, max_tokens=EVAL_TOKENS, device=device)
        out[name] = {"raw": r["raw"], "aligned": r["aligned"], "lambdas": r["lambdas"], "lifted": r.get("lifted"),
                     "seconds": time.perf_counter() - t0}
        print(f"{name}: raw {r['raw']['barrier']:.4f}, aligned {r['aligned']['barrier']:.4f}", flush=True)
    t0 = time.perf_counter()  # the width pair again, with learned matching on text sampled from the two models
    r = barrier_curve(wide, narrow[0], text[2], align="learned", steps=LEARN["steps"], lr=LEARN["lr"],
                      probe_tokens=LEARN["tokens"], max_tokens=EVAL_TOKENS, device=device)
    out["width pair, learned"] = {"raw": r["raw"], "aligned": r["aligned"], "lambdas": r["lambdas"],
                                  "lifted": r.get("lifted"), "steps": LEARN["steps"], "lr": LEARN["lr"],
                                  "tokens": LEARN["tokens"], "seconds": time.perf_counter() - t0}
    print(f"width pair, learned: aligned {r['aligned']['barrier']:.4f}", flush=True)
    return out


def plot_simplex(result: dict, png: Path) -> None:
    from modelcypher.measure.plot import pyplot

    plt = pyplot()
    rows = result["merges"]["rows"]
    names = [n for n in rows if n != "pairwise to the first"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8), squeeze=False)
    values = [p[3] for n in names for p in rows[n]["simplex"]]
    lo, hi = min(values), max(values)
    for ax, name in zip(axes[0], names, strict=True):
        pts = rows[name]["simplex"]
        x = [w1 + w2 / 2 for _, w1, w2, _ in pts]  # model 1 at (0, 0), model 2 at (1, 0), model 3 on top
        y = [w2 * 3**0.5 / 2 for _, w1, w2, _ in pts]
        levels = [lo + (hi - lo) * k / 24 for k in range(25)]  # one scale for every triangle
        sc = ax.tricontourf(x, y, [p[3] for p in pts], levels=levels, cmap="viridis")
        ax.scatter(x, y, s=6, c="k")
        ax.set_title(f"{name}\ncentroid {rows[name]['loss']:.3f}", fontsize="small")
        ax.set_aspect("equal")
        ax.axis("off")
    fig.colorbar(sc, ax=list(axes[0]), shrink=0.8, label="test loss (nats/char)")
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    learn = {**LEARN, **result.get("learned", {})}  # the settings the recorded run used
    r = result["recipe"]
    m = result.get("merges") or {"parents": [float("nan")] * 3, "eval_tokens": EVAL_TOKENS, "rows": {}}
    w = result.get("widths") or {}
    mean = sum(m["parents"]) / 3
    lines = ["# Many models and different widths (seed 004, multi-model merging and rectangular residuals)", "",
             f"Char-level GPT-2s, {r['n_layer']} layers, {r['n_head']} heads, width {r['n_embd']}, MLP {r['n_inner']}, "
             f"context {r['block_size']}, {r['steps']} steps of {r['batch_size']}x{r['block_size']} tokens on the "
             f"bundled Shakespeare (contiguous 90/5/5 split), float32, seeds {SEEDS}; losses on {m['eval_tokens']} "
             f"test characters. Run: {result['machine']['platform']}, {result['machine']['threads']} thread(s) on "
             f"{result['machine']['cpus']} shared cores; seconds of measuring: "
             f"{', '.join(f'{k[8:]} {v:.0f}' for k, v in result.items() if k.startswith('seconds_'))}.", "",
             f"Parents' test losses: {', '.join(f'{x:.4f}' for x in m['parents'])} (mean {mean:.4f}).", "",
             "| merge of the three (equal weights) | loss | over the parents' mean |", "|---|---|---|"]
    for name, row in m["rows"].items():
        lines.append(f"| {name} | {row['loss']:.4f} | {row['gap']:+.4f} |")
    if not m["rows"]:
        lines.append("| (not measured yet) | | |")
    u = m["rows"].get("universe", {"rounds": 0, "movement": [], "simplex": []})
    ul = m["rows"].get("universe + learned", {})
    learned_rows = {n: r for n, r in m["rows"].items() if n.startswith("universe + learned")}
    lines += ["", f"Alignment: weight matching with permutations, orthogonal residual (LayerNorm-aware), V-O and Q-K "
              f"bases. Universe matching: {u['rounds']} rounds, the universe's relative movement per round "
              f"{', '.join(f'{x:.2g}' for x in u['movement'])}. Learned refinement: {learn['steps']} Adam steps "
              f"(lr {learn['lr']:g}) on Dirichlet(alpha x (1, 1, 1)) mixtures of the three, once with alpha "
              f"{learn['alpha']:g} (the paper's and the default: draws near the corners and edges) and once with "
              "alpha 1 (uniform over the triangle), on "
              f"{ul.get('tokens', learn['tokens'])} tokens of "
              f"{'the training split' if ul.get('probes') == 'text' else 'text sampled from the models'}.", "",
              "Simplex (`universe_simplex.png`): the loss at "
              f"{len(u['simplex'])} points of the triangle of the three models, plain and universe-aligned.", ""]
    if u["movement"]:
        converged = u["movement"][-1] <= 1e-4
        lines += [f"Universe matching {'converged' if converged else 'did not converge'} (tolerance 1e-4 on the "
                  f"universe's movement) {'in' if converged else 'within the cap of'} {u['rounds']} rounds"
                  + ("" if converged else ": between independently trained models the permutations of a round "
                     "still move (the movement is not monotone), and the rounds stop at the cap") + "."]
    lines += [""]
    for name, row in learned_rows.items():
        if "mixture_loss" in row:
            lines += [f"- {name}: mixture loss on its probe text {row['mixture_loss'][0]:.4f} -> "
                      f"{row['mixture_loss'][1]:.4f} over {row['steps']} steps ({row['seconds']:.0f} s)."]
    for other in m.get("other_runs", []):  # the same refinement with another number of steps, kept by hand
        lines += [f"- with {other['steps']} steps instead: "
                  + ", ".join(f"{n} {g:+.4f}" for n, g in other["gaps"].items()) + " over the parents' mean."]
    best = min(learned_rows, key=lambda n: learned_rows[n]["gap"], default=None)
    goal = learned_rows[best]["gap"] if best else float("nan")
    lines += ["", f"Goal (universe + learned within 0.1 nats of the parents' mean): "
              f"{'met' if goal <= 0.1 else 'not met'} ({goal:+.3f}, {best}).", "",
              "| pair | barrier without alignment | after weight matching |", "|---|---|---|"]
    for name, row in w.items():
        raw = "lifted, unaligned" if row.get("lifted") else "raw"
        if "learned" not in name:
            lines.append(f"| {name} | {row['raw']['barrier']:.4f} ({raw}) | {row['aligned']['barrier']:.4f} |")
    if not w:
        return "\n".join([*lines, "| (not measured yet) | | |", ""])
    nw, ww = result.get("narrow", NARROW), result.get("wide", WIDE)
    wp, sp = w["width pair"], w["same-width pair"]
    ratio = wp["aligned"]["barrier"] / sp["raw"]["barrier"] if sp["raw"]["barrier"] > 0 else float("nan")
    learned = w.get("width pair, learned")
    lines += ["", f"Width pair: the width-{nw['n_embd']} model (seed {SEEDS[0]}; {nw['n_head']} heads, MLP "
              f"{nw['n_inner']}) lifted into the width-{ww['n_embd']} model's shape (seed {SEEDS[1]}; {ww['n_head']} "
              f"heads of the same size, MLP {ww['n_inner']}), both otherwise the recipe above: residual x -> x T with "
              f"T = sqrt({ww['n_embd']}/{nw['n_embd']}) times a matrix with orthonormal rows fixing the all-ones "
              "direction, zero MLP units and heads; then weight matching onto the wide model. The same-width pair: "
              f"the width-{nw['n_embd']} models of seeds {SEEDS[0]} and {SEEDS[1]}. After weight matching the width "
              f"pair's barrier is {ratio:.0%} of the same-width pair's vanilla barrier."]
    if learned:
        lr_ratio = learned["aligned"]["barrier"] / sp["raw"]["barrier"]
        lines += ["", f"With learned matching after the lift (the rotations refined on the midpoint's loss, "
                  f"{learned['steps']} steps on {learned['tokens']} tokens sampled from the two models) the width "
                  f"pair's barrier is {learned['aligned']['barrier']:.4f}, {lr_ratio:.0%} of the same-width vanilla "
                  "barrier."]
        ratio = min(ratio, lr_ratio)
    lines += ["", f"Goal (the width pair's barrier after the lift and alignment under 25% of the same-width pair's "
              f"vanilla barrier): {'met' if ratio < 0.25 else 'not met'} ({ratio:.0%}).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-only", action="store_true", help="train (or find cached) models and stop")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, help="override the recipe's training steps")
    ap.add_argument("--learn-steps", type=int, help="override learned refinement's Adam steps")
    ap.add_argument("--learn-lr", type=float, help="override learned refinement's step size")
    ap.add_argument("--probes", choices=("train", "sampled"), help="learned refinement's probe text")
    ap.add_argument("--alphas", help="comma-separated Dirichlet alphas of learned refinement (default 0.1,1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json")
    ap.add_argument("--only", choices=("merges", "widths"), help="measure only this part; keep the other from "
                    "results/universe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps:
        RECIPE["steps"] = args.steps
    if args.render:
        result = json.loads((RESULTS / "universe.json").read_text())
        if "merges" in result:
            plot_simplex(result, RESULTS / "universe_simplex.png")
        (RESULTS / "universe.md").write_text(markdown(result))
        return
    text = splits()
    narrow = [trained(RECIPE, s, text) for s in SEEDS]
    pair = [] if args.only == "merges" else [trained({**RECIPE, **NARROW}, s, text) for s in SEEDS[:2]]
    wide = None if args.only == "merges" else trained({**RECIPE, **WIDE}, SEEDS[1], text)
    if args.train_only:
        print("trained:", *map(str, narrow + pair + [wide]))
        return
    t0 = time.perf_counter()
    LEARN.update(steps=args.learn_steps or LEARN["steps"], lr=args.learn_lr or LEARN["lr"],
                 probes=args.probes or LEARN["probes"],
                 alphas=tuple(float(a) for a in args.alphas.split(",")) if args.alphas else LEARN["alphas"])
    parts = {}
    if args.only != "widths":
        parts["merges"] = merges(narrow, text, args.device, LEARN)
    if args.only != "merges":
        parts["widths"] = widths(pair, wide, text, args.device)
    old = RESULTS / "universe.json"
    result = json.loads(old.read_text()) if args.only and old.is_file() else {}  # the other part, kept
    result.update({"recipe": RECIPE, "narrow": NARROW, "wide": WIDE, "seeds": SEEDS, "learned": LEARN, **parts,
                   "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform()}})
    result[f"seconds_{args.only or 'all'}"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "universe.json").write_text(json.dumps(result, indent=2) + "\n")
    if "merges" in result:
        plot_simplex(result, RESULTS / "universe_simplex.png")
    (RESULTS / "universe.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
