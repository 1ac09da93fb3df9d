"""Loss barriers between independently trained models, raw and aligned (seed 004, Table 1, scaled to a CPU).

Protocol: two models that differ only in their seed (initialization and batch order), the loss on
held-out data along the straight line between them at 11 values of lambda, and the barrier
``max_lambda [L(mix) - ((1 - lambda) L_A + lambda L_B)]`` (SYMMETRIES.md section 5) for:

- vanilla averaging (no alignment);
- activation matching (correlations on training text; the residual by Procrustes where exact);
- weight matching with permutations only (MLP units, heads, and the residual as a permutation);
- weight matching with permutations and an orthogonal residual (norms folded; LayerNorm-aware), and
  with each head's V-O and Q-K bases on top;
- learned matching: the rotations of the last refined on the midpoint's loss, on training text, or on
  text sampled from the two models (no data at all).

Pairs: a character-level GPT-2 (6 layers, 4 heads, width 256, MLP 1024, context 128) on the bundled
Shakespeare with a contiguous 90/5/5 split, and a 3-hidden-layer ReLU MLP on scikit-learn's digits.
Trained checkpoints are cached under benchmarks/.cache/barrier/ (keyed by the training recipe; training
is reproducible from the seed). Results: benchmarks/results/barrier.{json,md} and barrier_gpt2.png (the quick
recipe), barrier_<recipe>.* for another.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/barrier.py [--recipe full|quick] [--device cuda] [--train-only]
                                                         [--skip-gpt2] [--skip-mlp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
CACHE = HERE / ".cache" / "barrier"
RESULTS = HERE / "results"
SEEDS = (0, 1)
# "full": trained to convergence and beyond, like the paper's 100 epochs (~30 passes over the 4.4M
# training characters: 8000 steps of 128x128; minutes on a GPU, ~10 hours on 2 CPU cores);
# "long": what 2 quiet CPU cores train in ~25 minutes per model (~2.3 passes over the training text);
# "quick": what 2 CPU cores train in ~11-15 minutes per model (about half an epoch, far from converged), in
# float32 so that any CPU trains it (zoo.gpt2.TrainConfig.bf16 says why).
GPT2_RECIPES = {
    "full": dict(n_layer=6, n_head=4, n_embd=256, n_inner=1024, block_size=128, batch_size=128,
                 steps=8000, lr=2e-3, warmup_steps=200, min_lr_ratio=0.1, dropout=0.1, bf16=True),
    "long": dict(n_layer=6, n_head=4, n_embd=256, n_inner=1024, block_size=128, batch_size=64,
                 steps=1200, lr=2e-3, warmup_steps=60, min_lr_ratio=0.1, bf16=True),
    "quick": dict(n_layer=6, n_head=4, n_embd=256, n_inner=1024, block_size=128, batch_size=32,
                  steps=500, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, bf16=False),
}
GPT2_RECIPE = dict(GPT2_RECIPES["quick"])
MLP_RECIPE = dict(hidden=(512, 512, 512), epochs=30, batch_size=64, lr=1e-3)
TRAIN_CHARS = 4_360_951  # characters in the 90% training split of the bundled Shakespeare
EVAL_TOKENS = 16384  # held-out (test split) tokens per loss
PROBE_TOKENS = 16384  # training tokens for activation matching
LEARN = dict(steps=1000, lr=1e-3, tokens=131072)  # learned matching: Adam steps, step size, training tokens
RESTARTS = 4  # weight matching: descents from this many visiting orders, the best objective kept
SAMPLED = "learned matching on text sampled from the two models (no data)"


def recipe_key(recipe: dict, seed: int) -> str:
    return hashlib.sha256(json.dumps([recipe, seed], sort_keys=True).encode()).hexdigest()[:10]


def shakespeare_splits() -> tuple[str, str, str]:
    from modelcypher.zoo import shakespeare

    return shakespeare.split(shakespeare.text(), (0.9, 0.05, 0.05))


def char_tokenizer():
    from modelcypher.zoo import chartok, shakespeare

    return chartok.build_char_tokenizer(shakespeare.vocab())


def use_recipe(name: str) -> None:
    """Make ``name`` (a key of GPT2_RECIPES) the recipe that the GPT-2 pair is trained and cached by."""
    GPT2_RECIPE.clear()
    GPT2_RECIPE.update(GPT2_RECIPES[name])


def gpt2_dir(seed: int) -> Path:
    """Where the GPT-2 of the current recipe and this seed is cached."""
    return CACHE / f"gpt2-{recipe_key(GPT2_RECIPE, seed)}-seed{seed}"


def trained_gpt2(seed: int, splits: tuple[str, str, str], device: str = "cpu") -> Path:
    """The cached checkpoint of the GPT-2 recipe with this seed, trained first if needed."""
    from modelcypher.zoo import gpt2

    out = gpt2_dir(seed)
    if (out / "train.json").is_file():
        return out
    cfg = gpt2.TrainConfig(**GPT2_RECIPE, seed=seed, eval_interval=max(25, GPT2_RECIPE["steps"] // 20),
                           eval_tokens=8192, verbose=True)
    log: list[dict] = []
    print(f"training GPT-2 seed {seed} on {device}: {GPT2_RECIPE}", flush=True)
    t0 = time.perf_counter()
    model = gpt2.train(splits[0], splits[1], cfg, char_tokenizer(), log=log, device=device)
    seconds = time.perf_counter() - t0
    gpt2.save(model, char_tokenizer(), out)
    (out / "train.json").write_text(json.dumps({"recipe": GPT2_RECIPE, "seed": seed, "seconds": seconds,
                                                "device": device, "log": log}, indent=2) + "\n")
    return out


def trained_mlp(seed: int) -> Path:
    from modelcypher.zoo.mlp import load_digits_split, save_mlp, train_mlp

    out = CACHE / f"mlp-{recipe_key(MLP_RECIPE, seed)}-seed{seed}"
    if (out / "train.json").is_file():
        return out
    t0 = time.perf_counter()
    model = train_mlp(seed, data=load_digits_split(), **MLP_RECIPE)
    save_mlp(model, out)
    (out / "train.json").write_text(json.dumps({"recipe": MLP_RECIPE, "seed": seed,
                                                "seconds": time.perf_counter() - t0}) + "\n")
    return out


def aligned_states(method: str, residual: str, ck_a, ck_b, train_text: str | None = None, bases: str = "",
                   device: str = "cpu"):
    """(A, B aligned onto A) as state dicts in one parameterization, and facts about the matching."""
    from modelcypher.align import apply_verified, fold_norms
    from modelcypher.align.pipeline import match, spec_of
    from modelcypher.options import AlignOptions

    raw_a = {n: ck_a.get(n) for n in ck_a.names}
    raw_b = {n: ck_b.get(n) for n in ck_b.names}
    t0 = time.perf_counter()
    opts = AlignOptions(method=method, residual=residual, max_sweeps=20, seed=0, vo="vo" in bases,
                        qk="qk" in bases, restarts=RESTARTS, steps=LEARN["steps"], lr=LEARN["lr"],
                        probe_tokens=LEARN["tokens"] if method == "learned" else PROBE_TOKENS)
    found, facts = match(ck_b, ck_a, spec_of(ck_a), opts, torch.device(device), train_text)
    facts["seconds"] = time.perf_counter() - t0
    aligned_b, config_b = apply_verified(raw_b, ck_b.config, found)
    if facts["residual"] == "orthogonal":
        raw_a, config_a = fold_norms(raw_a, ck_a.config)
    else:
        config_a = ck_a.config
    return (config_a, raw_a), (config_b, aligned_b), facts


# The rows of the table: (name, matching method or None, residual, in-head bases, probe text: "train" for
# the training split, None for text sampled from the two models; short name for the plot). Learned
# matching starts from weight matching with both bases and refines them with the residual.
ROWS = [
    ("vanilla averaging", None, None, "", "train", "vanilla"),
    ("activation matching (permutations)", "activation", "permutation", "", "train", "AM perm"),
    ("activation matching (permutations + orthogonal residual)", "activation", "orthogonal", "", "train",
     "AM perm+orth"),
    ("weight matching (permutations only)", "weight", "permutation", "", "train", "WM perm"),
    ("weight matching (permutations + orthogonal residual)", "weight", "orthogonal", "", "train", "WM perm+orth"),
    ("weight matching (permutations + orthogonal residual + V-O bases)", "weight", "orthogonal", "vo", "train",
     "WM perm+orth+VO"),
    ("weight matching (permutations + orthogonal residual + V-O and Q-K bases)", "weight", "orthogonal", "vo,qk",
     "train", "WM perm+orth+VO+QK"),
    ("learned matching (rotations refined from weight matching)", "learned", "orthogonal", "vo,qk", "train",
     "learned"),
    (SAMPLED, "learned", "orthogonal", "vo,qk", None, "learned (sampled)"),
]
RESULT = "barrier"  # file stem of the results: barrier for the quick recipe, barrier_<recipe> otherwise


def gpt2_table(dirs: list[Path], splits: tuple[str, str, str], device: str = "cpu",
               keep: dict | None = None, only: tuple[str, ...] = (), on_row=None) -> dict:
    """The GPT-2 rows; those in ``keep`` (name -> row of an earlier run on the same models) are reused, and
    with ``only`` (name prefixes) no other row is computed. ``on_row(table)`` is called after each row, so
    that a run stopped early keeps what it measured."""
    from modelcypher.checkpoint import Checkpoint
    from modelcypher.hf import causal_lm
    from modelcypher.measure.barrier import barrier_states, lm_loss_fn
    from modelcypher.zoo.chartok import encode_ids

    ck_a, ck_b = (Checkpoint(d) for d in dirs)
    tok = char_tokenizer()
    ids = encode_ids(splits[2], tok)[:EVAL_TOKENS]  # the test split
    probe = splits[0]  # training text: the alignment never sees held-out text
    template, _ = causal_lm(ck_a.config, {n: ck_a.get(n) for n in ck_a.names})
    loss = lm_loss_fn(template, ids, torch.device(device), batch_size=32)
    train = [json.loads((d / "train.json").read_text()) for d in dirs]
    rows = {}
    table = {"models": [d.name for d in dirs], "eval_tokens": len(ids), "probe_chars": PROBE_TOKENS,
             "learned": LEARN, "restarts": RESTARTS,
             "val_loss": [t["log"][-1]["val_loss"] for t in train],
             "train_seconds": [t["seconds"] for t in train], "train_device": [t.get("device", "cpu") for t in train],
             "rows": rows}
    for name, method, residual, bases, text, _ in ROWS:
        if keep and name in keep:
            rows[name] = keep[name]
            continue
        if only and not name.startswith(only):
            continue
        t0 = time.perf_counter()
        if method is None:
            pair = [(ck.config, {n: ck.get(n) for n in ck.names}) for ck in (ck_a, ck_b)]
            facts = {}
        else:
            *pair, facts = aligned_states(method, residual, ck_a, ck_b, probe if text else None, bases, device)
        sd_a, sd_b = (causal_lm(cfg, sd)[1] for cfg, sd in pair)
        rows[name] = {**barrier_states(sd_a, sd_b, loss, 11), **facts, "wall_seconds": time.perf_counter() - t0}
        rows[name]["device"] = device
        print(f"gpt2  {name:66s} barrier {rows[name]['barrier']:.4f}", flush=True)
        if on_row:
            on_row(table)
    return table


def mlp_table(dirs: list[Path]) -> dict:
    from modelcypher.align.activation_matching import match_activations
    from modelcypher.align.transform import apply
    from modelcypher.align.weight_matching import match_weights
    from modelcypher.arch.families import spec_for
    from modelcypher.measure.barrier import barrier_states
    from modelcypher.zoo.mlp import evaluate, load_digits_split, load_mlp, mlp_from_config

    data = load_digits_split()
    a, b = (load_mlp(d) for d in dirs)
    spec = spec_for(a.config)
    sd_a, sd_b = a.state_dict(), b.state_dict()

    def loss(sd):
        model = mlp_from_config(a.config)
        model.load_state_dict(sd)
        return evaluate(model, data.x_test, data.y_test)[0]

    found = {
        "activation matching (permutations)": match_activations(b, a, spec, data.x_train.split(256)),
        "weight matching (permutations only)": match_weights(sd_b, sd_a, spec),
    }
    rows = {"vanilla averaging": barrier_states(sd_a, sd_b, loss, 11)}
    for name, alignment in found.items():
        rows[name] = barrier_states(sd_a, apply(sd_b, b.config, alignment)[0], loss, 11)
    for name, r in rows.items():
        print(f"mlp   {name:66s} barrier {r['barrier']:.4f}", flush=True)
    return {"models": [str(d) for d in dirs], "sizes": a.config["sizes"],
            "test_accuracy": [evaluate(m, data.x_test, data.y_test)[1] for m in (a, b)], "rows": rows}


PAPER = {  # seed 004, Table 1, Tiny Shakespeare (BPE GPT-2), mean over pairs
    "vanilla averaging": 2.02, "activation matching (permutations)": 1.43,
    "weight matching (permutations + orthogonal residual + V-O and Q-K bases)": 0.34,  # QK/OV circuits + O
    "learned matching (rotations refined from weight matching)": 0.02,  # the paper also learns permutations
}


def markdown(result: dict) -> str:
    g, m = result.get("gpt2"), result.get("mlp")
    names = [r[0] for r in ROWS]
    lines = ["# Loss barriers, raw and aligned (seed 004, Table 1 protocol on CPU-sized models)", ""]
    r = result["recipes"]["gpt2"]
    tokens = r["steps"] * r["batch_size"] * r["block_size"]
    epochs = tokens / TRAIN_CHARS
    if g:
        devices = g.get("train_device", ["cpu"])
        lines += [f"GPT-2: char-level, 6 layers, 4 heads, width 256, MLP 1024, context 128, Shakespeare contiguous "
                  f"90/5/5, seeds {SEEDS}, {r['steps']} steps of {r['batch_size']}x{r['block_size']} tokens "
                  f"({tokens / 1e6:.0f}M tokens, {epochs:.1f} passes over the training split; dropout "
                  f"{r.get('dropout', 0.0)}, {'bf16 autocast' if r.get('bf16') else 'float32'}, "
                  f"trained on {', '.join(sorted(set(devices)))}); "
                  f"val loss reached "
                  f"{', '.join(f'{v:.3f}' for v in g['val_loss'])} nats/char; barrier on {g['eval_tokens']} "
                  f"test tokens; activation probes: {g['probe_chars']} training characters; weight matching: "
                  f"best objective of {g.get('restarts', 1)} descents (visiting orders), the residual started "
                  "from the embeddings' Procrustes."]
        if "learned" in g:
            lr = g["learned"]
            lines += ["", f"Learned matching: weight matching (permutations, orthogonal residual, V-O and Q-K bases), "
                      f"then the residual rotation and the V-O and Q-K bases refined by {lr['steps']} Adam steps "
                      f"(lr {lr['lr']:g}) "
                      f"on the loss of the midpoint (lambda ~ U(0.4, 0.6)) over {lr['tokens']} training "
                      "characters in batches of 8x128; permutations kept. On sampled text: the same, on as many "
                      "tokens sampled from the two models (half each, temperature 1; no training text)."]
    if m:
        lines += ["", f"MLP: {m['sizes']} ReLU on scikit-learn digits, seeds {SEEDS}, test accuracy "
                  f"{', '.join(f'{x:.3f}' for x in m['test_accuracy'])}; barrier in test cross-entropy."]
    head = ["method"] + (["GPT-2 barrier", "/ vanilla", "paper (Tiny Shakespeare)"] if g else [])
    head += ["MLP barrier", "/ vanilla"] if m else []
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        cells = [n]
        for t in (g, m):
            if t is None:
                continue
            r = t["rows"].get(n)
            v = t["rows"]["vanilla averaging"]["barrier"]
            cells += [f"{r['barrier']:.3f}", f"{r['barrier'] / v:.0%}"] if r else ["n/a", ""]
            if t is g:
                cells.append(f"{PAPER[n]:.2f}" if n in PAPER else "")
        lines.append("| " + " | ".join(cells) + " |")
    if g:
        wm_name, wm = min(((n, r["barrier"]) for n, r in g["rows"].items() if n.startswith("weight matching")),
                          key=lambda x: x[1])
        vanilla = g["rows"]["vanilla averaging"]["barrier"]
        ratio = wm / vanilla
        paper = PAPER[ROWS[6][0]] / PAPER["vanilla averaging"]
        lines += ["", f"Goal: weight matching within the paper's ratio ({paper:.0%} of vanilla) on the GPT-2 pair: "
                  f"{'met' if ratio <= paper else 'not met'} ({ratio:.1%}, {wm_name[len('weight matching ('):-1]}). "
                  f"These models saw {epochs:.1f} passes over "
                  "the training text; the paper trains 100 epochs of Tiny Shakespeare."]
        learned = g["rows"].get("learned matching (rotations refined from weight matching)")
        if learned:
            lines += ["", f"Learned matching, which trains the rotations on training text (never on the test "
                      f"text the barrier is measured on), brings it to {learned['barrier'] / vanilla:.1%} of vanilla."]
        sampled = g["rows"].get(SAMPLED)
        if sampled:
            lines += ["", f"Without any data, learned matching on text the two models generate brings it to "
                      f"{sampled['barrier'] / vanilla:.1%} of vanilla."]
    if g and any(r.get("device", "cpu") != "cpu" for r in g["rows"].values()):
        where = ", ".join(f"{n} on {r.get('device', 'cpu')}" for n, r in g["rows"].items())
        lines += ["", f"Measured (each row's alignment and losses): {where}."]
    lines += ["", "Barrier = max over 11 lambdas of L(mix) - ((1-lambda) L_A + lambda L_B) (SYMMETRIES.md 5). "
              "The MLP has no residual stream: its only symmetries are the hidden-unit permutations.", ""]
    return "\n".join(lines)


def write_report(result: dict) -> None:
    """<RESULT>.md from the result, and the GPT-2 curves as <RESULT>_gpt2.png."""
    (RESULTS / f"{RESULT}.md").write_text(markdown(result))
    if "gpt2" in result:
        from modelcypher.measure.barrier import plot_barrier

        rows = result["gpt2"]["rows"]
        curves = {short: rows[n] for n, *_, short in ROWS if n in rows}
        plot_barrier({"lambdas": next(iter(rows.values()))["lambdas"], **curves},
                     RESULTS / f"{RESULT}_gpt2.png", title="char-level GPT-2 on Shakespeare: two seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-only", action="store_true", help="train (or find cached) models and stop")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--skip-mlp", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--recipe", choices=tuple(GPT2_RECIPES), default="quick",
                    help="GPT-2 training recipe: quick (minutes on a CPU) or full (converged; use a GPU)")
    ap.add_argument("--gpt2-steps", type=int, help="override the recipe's training steps per GPT-2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to train the GPT-2s and measure losses (default: cuda when available)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="with --train-only: which seeds to train")
    ap.add_argument("--only", help="compute only the GPT-2 rows whose names start with these comma-separated "
                    "prefixes (e.g. learned); keep the others, and the MLP table, from results/barrier.json "
                    "when it holds them")
    ap.add_argument("--resume", action="store_true", help="compute only the GPT-2 rows missing from "
                    "results/barrier.json (a run stopped early); keep the rest, and the MLP table")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args()
    use_recipe(args.recipe)
    global RESULT
    RESULT = "barrier" if args.recipe == "quick" else f"barrier_{args.recipe}"
    if args.gpt2_steps:
        GPT2_RECIPE["steps"] = args.gpt2_steps
    if args.render:
        write_report(json.loads((RESULTS / f"{RESULT}.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    splits = shakespeare_splits()
    seeds = [int(x) for x in args.seeds.split(",")] if args.train_only else SEEDS
    gpt2_dirs = [] if args.skip_gpt2 else [trained_gpt2(s, splits, args.device) for s in seeds]
    mlp_dirs = [] if args.skip_mlp else [trained_mlp(s) for s in SEEDS]
    if args.train_only:
        print("trained:", *map(str, gpt2_dirs + mlp_dirs))
        return
    t0 = time.perf_counter()
    result = {"recipes": {"gpt2": GPT2_RECIPE, "mlp": MLP_RECIPE}, "seeds": SEEDS,
              "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform()}}
    keep, only = None, tuple(args.only.split(",")) if args.only else ()
    previous_file = RESULTS / f"{RESULT}.json"
    if (only or args.resume) and previous_file.is_file():
        previous = json.loads(previous_file.read_text())
        models = [Path(m).name for m in previous.get("gpt2", {}).get("models", [])]
        if models != [d.name for d in gpt2_dirs] or previous["recipes"]["gpt2"] != GPT2_RECIPE:
            raise SystemExit(f"results/{RESULT}.json was measured on other models; run without --only/--resume")
        keep = {n: r for n, r in previous["gpt2"]["rows"].items() if not (only and n.startswith(only))}
        if previous.get("mlp"):
            result["mlp"] = previous["mlp"]
            mlp_dirs = []
    RESULTS.mkdir(exist_ok=True)

    def save(table=None) -> None:
        if table is not None:
            result["gpt2"] = table
        result["seconds"] = time.perf_counter() - t0
        previous_file.write_text(json.dumps(result, indent=2) + "\n")

    if mlp_dirs:
        result["mlp"] = mlp_table(mlp_dirs)
    if gpt2_dirs:
        save(gpt2_table(gpt2_dirs, splits, args.device, keep, only, on_row=save))
    save()
    write_report(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
