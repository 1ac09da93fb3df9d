"""Evolutionary merge search on the multi-task zoo of ``benchmarks/multitask.py``.

    python benchmarks/evolve.py                          # the search, then the scaling runs
    python benchmarks/evolve.py --part search --generations 30 --workers 2
    python benchmarks/evolve.py --part scaling
    python benchmarks/evolve.py --part search --optimizer sep_cma --generations 60 --population 16 \
        --filters ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc           # a weight per model, layer and tensor
    python benchmarks/evolve.py --part ceiling                           # what gradient reaches in those spaces

What it does
------------
1. Reuses the models of ``multitask.py`` (its cache, the same keys: the instructed 4x128 base and the six
   ``full`` fine-tunes; built there the first time).
2. The search (``modelcypher.api.evolve``, Ray workers): task arithmetic with one ``weight`` per model per
   layer (``layer_granularity: 1``; 6 models x 4 layers = 24 values; tensors before the layers take the
   first layer's weight, the final norm the last layer's) in [0, 2], CMA-ES from the centre (every weight 1:
   task arithmetic at lambda 1, the multi-task table's choice), ``--population`` per generation. Fitness:
   the normalized average on the validation split, as a weighted objective over six task files (one per
   task, its 200 validation examples, weight 1 / (6 x that task's fine-tune accuracy on validation)).
3. The best recipe (``best.yaml``) is merged by ``modelcypher.api.merge`` and scored once on the test split;
   normalized as in the multi-task table (test accuracy / the task's own fine-tune's test accuracy).
   The table's rows for TIES and distilled coefficients are quoted from ``results/multitask.json``, and
   TIES at its chosen setting is merged again here, to show the models are the table's.
4. Scaling: the same small search (validation subset, 8 candidates x 2 generations) with 1 and 2 Ray
   workers (wall time, actor start-up apart), and the same candidates scored by a plain loop in this
   process (one :class:`modelcypher.evolve.worker.Evaluator`): the per-candidate overhead of Ray.
5. The ceiling of the spaces searched (``--part ceiling``): the same coefficients fitted by gradient on the
   answers of the training split (:func:`fit_coefficients`), merged from their recipe and scored on test;
   and, beyond any search, one coefficient per model and output unit.

Each space searched keeps its own entry in the results (a space searched again replaces its entry).
Results: ``results/evolve.{json,md}`` and ``results/evolve_fitness*.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask as mt  # noqa: E402

from modelcypher.api import evolve, merge  # noqa: E402
from modelcypher.evolve.config import parse_search  # noqa: E402
from modelcypher.evolve.space import build_space, recipe, template  # noqa: E402
from modelcypher.evolve.worker import Evaluator  # noqa: E402
from modelcypher.merging.statistics import linear_layouts, unit_axis  # noqa: E402
from modelcypher.zoo import gpt2, tasks  # noqa: E402

WORK = mt.CACHE / "evolve"
RESULTS = mt.RESULTS


def task_file(data: dict, task: str, split: int, n: int | None = None) -> Path:
    path = WORK / f"{['train', 'val', 'test'][split]}-{task}{'' if n is None else f'-{n}'}.jsonl"
    rows = data[task][split][:n]
    path.write_text("".join(json.dumps({"prompt": tasks.END + e.prompt, "answer": e.answer}) + "\n" for e in rows))
    return path


def search_file(name: str, base: Path, fts: dict[str, Path], own_val: dict[str, float], data: dict,
                population: int, generations: int, sigma: float, n: int | None = None, method: str = "task_arithmetic",
                granularity: int = 1, filters: tuple[str, ...] = (), optimizer: str = "cma") -> Path:
    """The search file: ``method``'s per-model ``weight`` per layer group (and tensor filter) in [0, 2] (centre:
    every weight 1); TIES also searches its global ``lambda`` in [1, 3] (centre 2, the table's choice) at the
    table's density 0.5."""
    space = {"weight": {"min": 0.0, "max": 2.0}, "layer_granularity": granularity}
    fixed = {}
    if method == "ties":
        space["lambda"] = {"min": 1.0, "max": 3.0}
        fixed = {"density": 0.5}
    if filters:
        space["filters"] = list(filters)
    spec = {
        "merge_method": method, "base_model": str(base), "models": [str(p) for p in fts.values()],
        "dtype": "float32", **({"parameters": fixed} if fixed else {}),
        "search": space,
        "objective": [{"task": task_file(data, t, 1, n).name, "weight": 1 / (len(fts) * own_val[t])} for t in fts],
        "optimizer": {"population": population, "generations": generations, "seed": 0, "sigma": sigma,
                      **({"method": optimizer} if optimizer != "cma" else {})},
    }
    path = WORK / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_score(config: Path | dict, out: Path, tok, data: dict, own_test: dict[str, float]) -> dict:
    merge(config, out, device="cpu", overwrite=True)
    model = gpt2.load(out)[0]
    acc = mt.evaluate(model, tok, data, 2)
    return {"test": acc, "test_avg": mt._mean(acc), "test_norm": mt.normalized(acc, own_test)}


def run_search(args, base, fts, own_val, own_test, tok, data, log) -> dict:
    search = search_file("search.yaml", base, fts, own_val, data, args.population, args.generations, args.sigma,
                         method=args.method, granularity=args.granularity,
                         filters=tuple(f for f in args.filters.split(",") if f), optimizer=args.optimizer)
    out = WORK / "search"
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    report = evolve(search, out, workers=args.workers, resume=args.resume, progress=log)
    # the recorded generations and actor start-ups (a resumed search's wall time is spread over its runs)
    wall = report["seconds"] + sum(report["startup_seconds"])
    best = test_score(out / "best.yaml", WORK / "best-merged", tok, data, own_test)
    genes = len(report["best_values"])
    plot = "evolve_fitness.png" if genes == 72 else f"evolve_fitness_{genes}.png"  # 72: the first space measured
    shutil.copyfile(out / "fitness.png", RESULTS / plot)
    start = report["generations"][0]
    log(f"best validation fitness {report['best_fitness']:.4f}; test normalized {best['test_norm']:.4f}")
    return {"search": yaml.safe_load(search.read_text()), "report": report, "wall_seconds": wall, "best": best,
            "plot": plot, "workers": args.workers,
            "first_generation": start, "recipe": yaml.safe_load((out / "best.yaml").read_text())}


def fit_coefficients(search: Path, data: dict, tok, steps: int, per_unit: bool = False, lr: float = 0.02,
                     batch: int = 64, seed: int = 0, log=print) -> dict:
    """What a search of ``search``'s space could reach at best: its genes (task arithmetic's ``weight``,
    one per model, layer group and filter, as the search reads them, from its own plan) fitted by
    gradient, by Adam on the answers' cross-entropy over every task's training examples (2000 per task, far
    more than the search's fitness sees, and a smooth loss instead of exact match), kept within the
    bounds. ``per_unit``: one coefficient per model and output unit instead (the distilled coefficients'
    resolution, without bounds), beyond any search. Returns the genes' values and their merge config (None
    per unit), how many coefficients were fitted, the base model holding the fitted merge, and the last 20
    steps' mean loss."""
    cfg = parse_search(search)
    space, _ = build_space(cfg, search.parent)
    if cfg.merge_method != "task_arithmetic" or {g.param for g in space.genes} != {"weight"}:
        raise SystemExit("fit_coefficients: task arithmetic with searched weights only")
    plan, slots = template(space, cfg, search.parent)
    model = gpt2.load(cfg.base_model)[0]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    order = [plan.names.index(e.model) for e in cfg.models]
    tvs = [{n: p.detach() - base[n] for n, p in gpt2.load(e.model)[0].named_parameters()} for e in cfg.models]
    lo = torch.tensor([g.lo for g in space.genes])
    hi = torch.tensor([g.hi for g in space.genes])
    genes = ((lo + hi) / 2).requires_grad_()  # the search's start: the centre of the bounds
    reads = {}  # tensor -> the gene of each model (in cfg.models' order)
    for task, slot in zip(plan.tasks, slots, strict=True):
        if not task.copy and task.name in base:
            by_model = dict(zip((m for m, _ in task.sources), slot["weight"], strict=True))
            reads[task.name] = [by_model[m] for m in order]
    if per_unit:
        layouts = linear_layouts(model)
        units = [{n: torch.ones([s if a == unit_axis(n, tuple(b.shape), layouts) else 1
                                 for a, s in enumerate(b.shape)], requires_grad=True) for n, b in base.items()}
                 for _ in tvs]
        params = [c for u in units for c in u.values()]

        def coef(i, n):
            return units[i][n]
    else:
        params = [genes]

        def coef(i, n):
            return genes[reads[n][i]] if n in reads else 0.0

    def merged():
        return {n: b + sum(coef(i, n) * tv[n] for i, tv in enumerate(tvs)) for n, b in base.items()}

    enc = {t: mt.encode_examples(data[t][0], tok) for t in tasks.TASK_NAMES}
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for step in range(steps):
        w, loss = merged(), 0.0
        for ids, mask in enc.values():
            pick = torch.randint(len(ids), (batch,), generator=g)
            logits = torch.func.functional_call(model, w, (ids[pick],)).logits[:, :-1]
            m = mask[pick][:, 1:]
            loss = loss + nn.functional.cross_entropy(logits[m], ids[pick][:, 1:][m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            genes.copy_(torch.maximum(torch.minimum(genes, hi), lo))
        losses.append(float(loss.detach()) / len(enc))
        if step % 50 == 0:
            log(f"  fit step {step}: answer loss {losses[-1]:.4f}")
    with torch.no_grad():
        w = merged()
        for n, p in model.named_parameters():
            p.copy_(w[n])
    values = None if per_unit else genes.detach().tolist()
    return {"values": values, "recipe": None if per_unit else recipe(space, cfg, values),
            "coefficients": sum(p.numel() for p in params), "model": model,
            "answer_loss": sum(losses[-20:]) / len(losses[-20:])}


TENSOR_FILTERS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc")  # the rest: mlp.c_proj (+ ln_f)


def run_ceiling(base, fts, own_val, own_test, tok, data, log, steps: int = 300) -> dict:
    """The ceiling of the spaces searched: each space's genes fitted by gradient (:func:`fit_coefficients`),
    merged by ``modelcypher.api.merge`` from their recipe and scored on the test split; then per output
    unit, scored on the fitted model itself."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # one process: every core (the search's workers take one each)
    out = {}
    spaces = {"per model, layer and filter": ("attn", "mlp"), "per model, layer and tensor": TENSOR_FILTERS}
    for label, filters in spaces.items():
        search = search_file(f"ceiling-{len(filters)}.yaml", base, fts, own_val, data, 8, 1, 0.2, filters=filters)
        t0 = time.perf_counter()
        fit = fit_coefficients(search, data, tok, steps, log=log)
        scored = test_score(fit["recipe"], WORK / "ceiling-merged", tok, data, own_test)
        out[label] = {"coefficients": fit["coefficients"], "filters": list(filters), "answer_loss": fit["answer_loss"],
                      "values": fit["values"], "seconds": time.perf_counter() - t0, **scored}
        log(f"ceiling {label}: {fit['coefficients']} genes, test normalized {scored['test_norm']:.4f}")
    t0 = time.perf_counter()
    fit = fit_coefficients(search, data, tok, steps, per_unit=True, log=log)
    acc = mt.evaluate(fit["model"], tok, data, 2)
    out["per model and output unit"] = {"coefficients": fit["coefficients"], "answer_loss": fit["answer_loss"],
                              "seconds": time.perf_counter() - t0, "test": acc, "test_avg": mt._mean(acc),
                              "test_norm": mt.normalized(acc, own_test)}
    log(f"ceiling per unit: test normalized {out['per model and output unit']['test_norm']:.4f}")
    return out


def run_reference(method: str, base, fts, own_test, tok, data) -> dict:
    """``method`` at the multi-task table's chosen setting, merged again on these models (distill with
    each model's training text, as the table does)."""
    recorded = json.loads((RESULTS / "multitask.json").read_text())["variants"]["full"]["methods"]
    point = recorded[method]["params"]
    data_files = {}
    for t in fts:
        data_files[t] = mt.CACHE / "data" / f"{t}_train{mt.DATA_EXAMPLES}.txt"
        data_files[t].parent.mkdir(parents=True, exist_ok=True)
        data_files[t].write_text(tasks.to_text(data[t][0][: mt.DATA_EXAMPLES]))
    cfg = mt.merge_config(method, point, base, fts, data_files)
    t0 = time.perf_counter()
    scored = test_score(cfg, WORK / f"{method}-merged", tok, data, own_test)
    return {"params": point, **scored, "seconds": time.perf_counter() - t0}


def run_scaling(base, fts, own_val, data, log, n: int = 50, repeats: int = 2) -> dict:
    """Wall times of the same small search with 1 and 2 workers and of a plain loop over its candidates,
    interleaved ``repeats`` times (the machine is shared: the spread shows how much that moves them), and
    Ray's overhead per candidate measured inside each run: the generation's wall time on 1 worker minus
    the time the actor spent scoring its candidates."""
    search = search_file("scaling.yaml", base, fts, own_val, data, 8, 2, 0.25, n)
    runs = []
    for rep in range(repeats):
        for workers in (1, 2):
            out = WORK / f"scaling-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            report = evolve(search, out, workers=workers)
            state = json.loads((out / "state.json").read_text())
            inside = sum(c["seconds"] for g in state["generations"] for c in g["candidates"])
            runs.append({"kind": f"{workers} worker(s)", "workers": workers, "repeat": rep, "load_before": load,
                         "wall_seconds": time.perf_counter() - t0, "startup_seconds": report["startup_seconds"][0],
                         "search_seconds": report["seconds"], "scoring_seconds": inside,
                         "candidates": report["evaluations"]})
            log(f"  {runs[-1]}")
        values = [c["values"] for g in state["generations"] for c in g["candidates"]]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        ev = Evaluator(parse_search(search), WORK, "cpu", len(os.sched_getaffinity(0)))
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        fits = [ev.evaluate(v).fitness for v in values]
        loop = time.perf_counter() - t0
        same = fits == [c["fitness"] for g in state["generations"] for c in g["candidates"]]
        runs.append({"kind": "in-process loop", "workers": 0, "repeat": rep, "load_before": load,
                     "wall_seconds": setup + loop, "startup_seconds": setup, "search_seconds": loop,
                     "scoring_seconds": loop, "candidates": len(values), "same_fitness_as_ray": same})
        log(f"  {runs[-1]}")
    one = [r for r in runs if r["workers"] == 1]
    overhead = [(r["search_seconds"] - r["scoring_seconds"]) / r["candidates"] for r in one]
    return {"runs": runs, "overhead_per_candidate": overhead, "validation_examples_per_task": n}


def describe(search: dict) -> str:
    """A search's method and space, in words."""
    space = search["search"]
    per = "layer" if space.get("layer_granularity", 1) == 1 else f"group of {space['layer_granularity']} layers"
    return (f"{mt.METHOD_NAMES[search['merge_method']]} (`weight` per model per {per}"
            + (f" and tensor filter ({', '.join(space['filters'])}, rest)" if space.get("filters") else "")
            + " in [0, 2]"
            + (f", `lambda` in [{space['lambda']['min']:g}, {space['lambda']['max']:g}]" if "lambda" in space else "")
            + "".join(f", {k} {v}" for k, v in search.get("parameters", {}).items()) + ")")


def write(res: dict) -> None:
    (RESULTS / "evolve.json").write_text(json.dumps(res, indent=1) + "\n")
    rec = json.loads((RESULTS / "multitask.json").read_text())["variants"]["full"]
    lines = ["# Evolutionary merge search on the multi-task zoo", "",
             "Produced by `python benchmarks/evolve.py` (see its docstring). Models: the instructed 4x128 base and the "
             "six `full` fine-tunes of `benchmarks/multitask.py` (its cache). Exact-match accuracy (%) on the test "
             "split; normalized = mean over tasks of merged / own fine-tune accuracy (test).", "",
             f"Machine: {res['machine']}. The machine was shared with other work while this ran: wall times are "
             "upper bounds of what the search needs alone.", ""]
    names = list(tasks.TASK_NAMES)
    searches = res.get("searches", [])
    if searches:
        head = ["Model", *names, "Avg", "Norm. avg", "Source"]
        lines += ["## Evolved recipes vs the table's best", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def row(label, acc, norm, src):
            lines.append(f"| {label} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in names)
                         + f" | {100 * sum(acc.values()) / len(acc):.1f} | {100 * norm:.1f} | {src} |")

        row("Individual fine-tunes (each on its own task)", res["own_test"], 1.0, "measured here")
        for s in searches:
            row(f"Evolved {describe(s['search'])}", s["best"]["test"], s["best"]["test_norm"], "measured here")
        for m in ("distill", "ties", "task_arithmetic"):
            r = rec["methods"][m]
            row(mt.METHOD_NAMES[m] + f" ({mt.fmt_point(r['params'])})", r["test"], r["test_norm"],
                "results/multitask.json")
        for m, r in res.get("references", {}).items():
            row(f"{mt.METHOD_NAMES[m]} ({mt.fmt_point(r['params'])}), merged again", r["test"], r["test_norm"],
                "measured here")
        lines += ["", "Rows from `results/multitask.json` are that run's models: the fine-tunes trained here from the "
                  "same seeds differ slightly (own test accuracy within 1 point per task), so the rows merged again "
                  "here are the like-for-like comparison.", ""]
        for s in searches:
            rep, opt = s["report"], s["search"]["optimizer"]
            g0 = rep["generations"][0]
            kind = "separable CMA-ES" if opt.get("method") == "sep_cma" else "CMA-ES"
            lines += [f"Search of {describe(s['search'])}: {len(rep['best_values'])} values, {kind} population "
                      f"{opt['population']}, {opt['generations']} generations ({rep['evaluations']} candidates), "
                      f"sigma {opt['sigma']}, seed {opt['seed']}, {s.get('workers', res['workers'])} Ray workers. "
                      "Fitness = normalized average on the validation split (200 examples per task). First "
                      f"generation: best {g0['best']:.4f}, median {g0['median']:.4f}; best overall "
                      f"{rep['best_fitness']:.4f}. Wall time {s['wall_seconds'] / 60:.1f} min (actor start-up "
                      f"{sum(rep['startup_seconds']):.0f} s).", "",
                      f"![fitness per generation]({s.get('plot', 'evolve_fitness.png')})", ""]
    if "ceiling" in res:
        head = ["Space", "Coefficients", *names, "Avg", "Norm. avg", "Answer loss (train)"]
        lines += ["## What the space allows: coefficients fitted by gradient", "",
                  "Each space's coefficients fitted by gradient instead of searched (`fit_coefficients`): Adam on "
                  "the answers' cross-entropy over all 2000 training examples per task (64 per task per step, 300 "
                  "steps, lr 0.02), task arithmetic's `weight` kept within the search's bounds [0, 2], started "
                  "where the search starts (every weight 1). This sees 10x the search's examples through a smooth "
                  "loss, so no search of the same space is expected to beat it by much: it is the space's ceiling "
                  "(as far as 300 Adam steps find it; their last 20 batches' mean loss is in the last column). "
                  "The two spaces are merged from their recipes by `modelcypher merge` and scored on the test split; "
                  "the last row, one coefficient per model and output unit (the distilled coefficients' resolution, "
                  "unbounded, fitted on labelled answers), is beyond what a search can handle and scored on the fitted "
                  "model.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, r in res["ceiling"].items():
            what = label + (f" ({', '.join(r['filters'])}, rest)" if r.get("filters") else "")
            lines.append(f"| {what} | {r['coefficients']} | " + " | ".join(f"{100 * r['test'][t]:.1f}" for t in names)
                         + f" | {100 * r['test_avg']:.1f} | {100 * r['test_norm']:.1f} | {r['answer_loss']:.4f} |")
        lines.append("")
    if "scaling" in res:
        sc = res["scaling"]
        lines += ["## Scaling and overhead", "",
                  f"The same search (task arithmetic as above, {sc['validation_examples_per_task']} validation "
                  "examples per task, population 8, 2 generations: 16 candidates), with 1 and 2 Ray workers, and "
                  "its candidates scored again by a plain loop in one process (2 threads, as the single worker). "
                  "Runs interleaved; the load average before each run shows how busy the shared machine was.", "",
                  "| Run | Load before | Wall (s) | Start-up (s) | Search (s) | Per candidate (s) |",
                  "|---|---|---|---|---|---|"]
        for r in sc["runs"]:
            lines.append(f"| {r['kind']} (#{r['repeat'] + 1}) | {r['load_before']:.1f} | {r['wall_seconds']:.1f} | "
                         f"{r['startup_seconds']:.1f} | {r['search_seconds']:.1f} | "
                         f"{r['search_seconds'] / r['candidates']:.2f} |")
        same = all(r.get("same_fitness_as_ray", True) for r in sc["runs"])
        lines += ["", "Ray's overhead per candidate, measured inside each 1-worker run (generation wall time minus "
                  "the actor's scoring time, per candidate): "
                  + ", ".join(f"{1000 * o:.0f} ms" for o in sc["overhead_per_candidate"])
                  + f". The loop's fitness values equal the search's: {same}.", ""]
    (RESULTS / "evolve.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("all", "search", "references", "scaling", "ceiling"))
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--method", default="task_arithmetic", choices=("task_arithmetic", "ties"))
    ap.add_argument("--granularity", type=int, default=1, help="layers per group")
    ap.add_argument("--filters", default="", help="comma-separated tensor filters, each its own weights")
    ap.add_argument("--optimizer", default="cma", choices=("cma", "sep_cma"))
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    WORK.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, flush=True)

    tok, data = mt.tokenizer(), mt.splits()
    base = mt.get_base(tok, data, mt.INSTRUCT, mt.BASE, log=log)
    fts = {t: mt.get_finetune("full", mt.VARIANTS["full"], t, base, data, tok, log) for t in tasks.TASK_NAMES}
    own_val, own_test = {}, {}
    for t, p in fts.items():
        m = gpt2.load(p)[0]
        own_val[t] = tasks.accuracy(m, tok, data[t][1], max_new=mt.MAX_NEW)
        own_test[t] = tasks.accuracy(m, tok, data[t][2], max_new=mt.MAX_NEW)
    log(f"own fine-tunes: val {own_val}, test {own_test}")
    path = RESULTS / "evolve.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "search" in res:  # the results' earlier form: one search
        res["searches"] = [res.pop("search")]
    res.update({"own_val": own_val, "own_test": own_test, "workers": args.workers,
                "machine": f"{len(os.sched_getaffinity(0))} CPU cores (shared), torch {torch.__version__}"})
    if args.part in ("all", "search"):
        new = run_search(args, base, fts, own_val, own_test, tok, data, log)
        # one entry per space searched (a space searched again replaces its entry)
        res["searches"] = [s for s in res.get("searches", []) if describe(s["search"]) != describe(new["search"])]
        res["searches"].append(new)
        write(res)
    if args.part in ("all", "search", "references"):
        res["references"] = {m: run_reference(m, base, fts, own_test, tok, data)
                             for m in ("task_arithmetic", "ties", "distill")}
        write(res)
    if args.part in ("all", "ceiling"):
        res["ceiling"] = run_ceiling(base, fts, own_val, own_test, tok, data, log)
        write(res)
    if args.part in ("all", "scaling"):
        res["scaling"] = run_scaling(base, fts, own_val, data, log)
    write(res)
    print((RESULTS / "evolve.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
