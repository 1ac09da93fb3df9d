"""Data-flow search on the demo's Shakespeare models.

    python benchmarks/evolve_dataflow.py                              # trains the demo's models once (cached)
    python benchmarks/evolve_dataflow.py --workdir DIR                # reuse `modelcypher demo --workdir DIR`
    python benchmarks/evolve_dataflow.py --population 8 --generations 6

What it does
------------
1. The demo's models (``modelcypher.zoo.demo.demo_models``: a 4 x 128 character GPT-2 on all of Shakespeare
   and its fine-tunes on the comedies and the tragedies), trained into the cache or read from ``--workdir``.
2. A data-flow search (``modelcypher.api.evolve``, Ray): the pool is both fine-tunes and their linear merge
   (weights 0.5, a pool entry given as a merge recipe: the paper's two spaces in sequence), ``--repeats``
   repetitions, at most ``--max-layers`` layers, input scalings in [0.5, 1.5], starting from ``--start``
   (default: the linear merge). Fitness: minus the mean next-token loss on held-out characters of each
   genre (validation).
3. The best recipe (``best.yaml``, a passthrough frankenmerge with the scalings folded in) is merged by
   ``modelcypher.api.merge`` and scored on the test split of each genre, beside the base, the fine-tunes
   and their linear merge (each also with its fitness, the search's own objective).

Results: ``results/evolve_dataflow.{json,md}`` and ``results/evolve_dataflow_fitness.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml  # noqa: E402

from modelcypher.api import evolve, merge  # noqa: E402
from modelcypher.checkpoint import Checkpoint  # noqa: E402
from modelcypher.evolve.config import parse_search  # noqa: E402
from modelcypher.evolve.objective import Objective  # noqa: E402
from modelcypher.zoo import chartok, gpt2, shakespeare  # noqa: E402
from modelcypher.zoo.demo import GENRES, demo_models  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "evolve_dataflow"
RESULTS = HERE / "results"


def losses(path: Path, texts: dict[str, str], tok, tokens: int) -> dict[str, float]:
    model = gpt2.load(path)[0]
    out = {g: gpt2.eval_loss(model, texts[g], tok, max_tokens=tokens) for g in GENRES}
    out["mean"] = sum(out[g] for g in GENRES) / len(GENRES)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=CACHE / "demo", help="the demo's models (trained there if absent)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-layers", type=int, default=8)
    p.add_argument("--sigma", type=float, default=0.3)
    p.add_argument("--start", default="linear", help="the pool model the search starts from")
    p.add_argument("--val-tokens", type=int, default=4096, help="held-out characters per genre in the fitness")
    p.add_argument("--test-tokens", type=int, default=65536)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    base, (comedy, tragedy) = demo_models(args.workdir)
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    splits = {g: shakespeare.split_by_play(g) for g in GENRES}
    work = CACHE / "search"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for g in GENRES:
        (work / f"val-{g}.txt").write_text(splits[g][1])
    spec = {
        "dataflow": {
            "models": [str(comedy), str(tragedy),
                       {"name": "linear", "merge": {"merge_method": "linear", "dtype": "float32", "models": [
                           {"model": str(comedy), "parameters": {"weight": 0.5}},
                           {"model": str(tragedy), "parameters": {"weight": 0.5}}]}}],
            "repeats": args.repeats, "max_layers": args.max_layers, "scale": {"min": 0.5, "max": 1.5},
            "start": {"comedy": str(comedy), "tragedy": str(tragedy)}.get(args.start, args.start),
        },
        "objective": [{"loss": f"val-{g}.txt", "max_tokens": args.val_tokens, "weight": 1 / len(GENRES)}
                      for g in GENRES],
        "optimizer": {"population": args.population, "generations": args.generations, "seed": 0,
                      "sigma": args.sigma},
    }
    search = work / "search.yaml"
    search.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    report = evolve(search, work / "out", workers=args.workers, progress=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - t0
    merge(work / "out" / "best.yaml", work / "best", device="cpu")

    tests = {g: splits[g][2] for g in GENRES}
    rows = {"base": base, "fine-tune comedy": comedy, "fine-tune tragedy": tragedy,
            "linear merge (pool entry)": work / "out" / "pool" / "linear", "data-flow best": work / "best"}
    table = {name: losses(path, tests, tok, args.test_tokens) for name, path in rows.items()}
    objective = Objective(parse_search(search).objective, work, comedy, Checkpoint(comedy).config)
    for name, path in rows.items():
        table[name]["fitness"] = sum(t.weight * x for t, x in zip(objective.terms, objective.score(
            gpt2.load(path)[0]), strict=True))
    start = report["generations"][0]
    result = {"settings": vars(args) | {"workdir": str(args.workdir)}, "seconds": seconds,
              "evaluations": report["evaluations"], "slots": len(report["best_values"]) // 2,
              "best_fitness": report["best_fitness"], "first_generation": start, "best_layers": report["best_layers"],
              "generations": report["generations"], "test_loss": table}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evolve_dataflow.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copy(work / "out" / "fitness.png", RESULTS / "evolve_dataflow_fitness.png")
    lines = [
        "# Data-flow search on the demo's Shakespeare models",
        "",
        f"Pool: the comedy and tragedy fine-tunes and their linear merge (4 layers each), {args.repeats} repeats "
        f"({result['slots']} slots), at most {args.max_layers} layers, scalings in [0.5, 1.5], from {args.start}; "
        f"CMA-ES with margin, "
        f"population {args.population}, {args.generations} generations ({report['evaluations']} candidates) in "
        f"{seconds:.0f} s with {args.workers} worker(s) on 2 shared CPU cores. Fitness: minus the mean loss on "
        f"{args.val_tokens} validation characters per genre; best {report['best_fitness']:.4f} (first generation's "
        f"best {start['best']:.4f}).",
        "",
        f"Models: the demo's (`demo_models`, trained bit for bit the same on CPU), from {args.workdir}.",
        "",
        "Best path: " + ", ".join(f"{d['model'].split('/')[-1]}.{d['layer']} x{d['scale']:.2f}"
                                  for d in report["best_layers"]),
        "",
        f"Fitness (validation, higher is better) and test loss (nats/char, {args.test_tokens} characters per "
        "genre, lower is better):",
        "",
        "| model | fitness | " + " | ".join(GENRES) + " | mean |",
        "|---|---|" + "---|" * (len(GENRES) + 1),
    ]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[g]:.4f}" for g in ("fitness", *GENRES, "mean")) + " |")
    (RESULTS / "evolve_dataflow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
