"""The search loop: CMA-ES (the ``cmaes`` library) over the unit cube of the parameter space, or CMA-ES
with margin (``cmaes.CMAwM``, mixed integer) over the data-flow space's indicators and scalings, one
generation at a time, every candidate scored on Ray actors; after each generation the state, the
report, the fitness plot and the best recipe so far are written into the search directory.

The state holds every candidate (its point and values) with its fitness, and the optimizer's mean and
step size. Resuming rebuilds the optimizer by replaying the recorded generations (the same seed asks
the same points, checked point by point, and is told the recorded fitness), so a resumed search
reaches what an uninterrupted one reaches, and no state file is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from modelcypher.checkpoint.guard import check_output_folder
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.evolve.config import SearchConfig, parse_search
from modelcypher.evolve.dataflow import POOL, DataflowSpace, build_dataflow, write_pool_model
from modelcypher.evolve.objective import Objective
from modelcypher.evolve.space import Space, build_space, recipe, template
from modelcypher.evolve.worker import Pool, Result, check_address, data_statistics, ray_session
from modelcypher.hf import resolve_device
from modelcypher.measure.plot import pyplot
from modelcypher.merging.plan import Plan

STATE, REPORT, BEST, PLOT = "state.json", "report.json", "best.yaml", "fitness.png"


def optimizer(space: Space | DataflowSpace, cfg: SearchConfig):
    """The parameter space: CMA-ES (or separable CMA-ES) on the unit cube, from its centre. The data-flow
    space: CMA-ES with margin, indicators on {0, 1} and scalings on [0, 1] of their bounds, from the start
    model. Either with the search's population, step and seed."""
    from cmaes import CMA, CMAwM, SepCMA  # imports scipy.stats, over a second: only the verb that searches pays it

    o = cfg.optimizer
    if isinstance(space, DataflowSpace):
        steps = space.steps()
        return CMAwM(mean=space.mean(), sigma=o.sigma, bounds=np.array([[0.0, 1.0]] * len(steps)), steps=steps,
                     seed=o.seed, population_size=o.population)
    n = len(space.genes)
    cma = SepCMA if o.method == "sep_cma" else CMA
    return cma(mean=np.full(n, 0.5), sigma=o.sigma, bounds=np.array([[0.0, 1.0]] * n), seed=o.seed,
               population_size=o.population)


def _ask(opt) -> tuple[np.ndarray, np.ndarray]:
    """The next point as (what is evaluated, what the optimizer is told): CMA-ES with margin evaluates
    its integer coordinates rounded and learns from the raw ones; plain CMA-ES uses one point for both."""
    x = opt.ask()
    return x if isinstance(x, tuple) else (x, x)


def _sigma(opt) -> float:
    return float(getattr(opt, "_cma", opt)._sigma)


def _write_json(path: Path, data: Any) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first key at which two JSON values differ, as ``key: a there, b here``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where or 'search'}: {json.dumps(a)} there, {json.dumps(b)} here"


def _penalty(results: list[Result]) -> float:
    """The value CMA-ES is told for a failed candidate: worse than every candidate that was scored
    (only the ranking matters to it)."""
    ok = [-r.fitness for r in results if r.fitness is not None]
    return max(ok) + 1.0 + abs(max(ok)) if ok else 1.0


def _without_budget(identity: Any) -> Any:
    """The identity of a search, its number of generations aside: a resumed search may run longer or
    stop sooner (the generations it records do not depend on how many follow)."""
    if not isinstance(identity, dict):
        return identity
    out = json.loads(json.dumps(identity))
    out.get("search", {}).get("optimizer", {}).pop("generations", None)
    return out


def _load_state(out: Path, identity: dict) -> dict:
    path = out / STATE
    if not path.is_file():
        raise UserError(f"{out}: no search to resume (no {STATE})")
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    diff = _difference(_without_budget(state.get("identity")), _without_budget(identity))
    if diff:
        raise UserError(f"--resume: {out} holds another search ({diff})")
    return state


def _replay(opt, state: dict, out: Path) -> None:
    """Bring ``opt`` to where the recorded generations left it."""
    for g, gen in enumerate(state["generations"]):
        xs = [_ask(opt)[1] for _ in gen["candidates"]]
        for x, c in zip(xs, gen["candidates"], strict=True):
            if x.tolist() != c["point"]:
                raise UserError(f"--resume: generation {g} in {out / STATE} does not replay (another version "
                                "of the optimizer?); start a new search")
        opt.tell([(x, c["value"]) for x, c in zip(xs, gen["candidates"], strict=True)])


def best_candidate(state: dict) -> dict | None:
    """The candidate of highest fitness (the first one on ties)."""
    best = None
    for gen in state["generations"]:
        for c in gen["candidates"]:
            if c["fitness"] is not None and (best is None or c["fitness"] > best["fitness"]):
                best = c
    return best


def plot_fitness(report: dict, path: Path) -> None:
    plt = pyplot()
    gens = report["generations"]
    x = [g["generation"] for g in gens]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [g["best"] for g in gens], "o-", label="best of the generation")
    ax.plot(x, [g["median"] for g in gens], "s--", label="median")
    ax.plot(x, [g["best_so_far"] for g in gens], "k:", label="best so far")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (higher is better)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _outputs(out: Path, state: dict, space: Space | DataflowSpace, cfg: SearchConfig) -> dict:
    """report.json, fitness.png and best.yaml from the state."""
    gens, best_so_far = [], -math.inf
    for g, gen in enumerate(state["generations"]):
        fit = [c["fitness"] for c in gen["candidates"] if c["fitness"] is not None]
        best_so_far = max([best_so_far, *fit])
        gens.append({"generation": g, "best": max(fit), "median": statistics.median(fit), "best_so_far": best_so_far,
                     "failed": len(gen["candidates"]) - len(fit), "worker_restarts": gen["worker_restarts"],
                     "seconds": gen["seconds"]})
    best = best_candidate(state)
    report = {"generations": gens, "best_fitness": best["fitness"] if best else None,
              "best_terms": best["terms"] if best else None,
              "best_values": dict(zip(space.labels(), best["values"], strict=True)) if best else None,
              "objective": [t.model_dump(exclude_none=True) for t in cfg.objective],
              "evaluations": sum(len(g["candidates"]) for g in state["generations"]),
              "seconds": sum(g["seconds"] for g in state["generations"]),
              "startup_seconds": state.get("startup_seconds", [])}
    if isinstance(space, DataflowSpace):
        report["best_layers"] = space.describe(best["values"]) if best else None
    _write_json(out / REPORT, report)
    if gens:
        plot_fitness(report, out / PLOT)
    if best:
        rec = _recipe(space, cfg, best["values"], state["config_dir"])
        tmp = out / f".{BEST}.tmp"
        tmp.write_text(f"# fitness {best['fitness']!r}: the best candidate of the search in this directory\n"
                       + yaml.safe_dump(rec, sort_keys=False))
        os.replace(tmp, out / BEST)
    return report


def _abs(ref: str, config_dir: str | None) -> Path:
    return resolve_path(ref, Path(config_dir) if config_dir else None).resolve()


def _recipe(space: Space | DataflowSpace, cfg: SearchConfig, values: list[float], config_dir: str | None) -> dict:
    """A candidate's merge config with absolute paths: it merges from wherever it is run."""
    if isinstance(space, DataflowSpace):
        return space.recipe(values)  # its paths are absolute already
    rec = recipe(space, cfg, values)
    for e in rec["models"]:
        e["model"] = str(_abs(e["model"], config_dir))
    if "base_model" in rec:
        rec["base_model"] = str(_abs(rec["base_model"], config_dir))
    return rec


def _prepare(cfg: SearchConfig, config_dir: Path, pool_at: Path) -> tuple[Space | DataflowSpace, dict, Plan | None]:
    """The space, the search's identity (what a resumed search must match) and the parameter space's
    plan (None for the data-flow space); every mistake in the models and the objective surfaces here,
    before Ray starts or anything is written."""
    if cfg.dataflow is not None:
        space = build_dataflow(cfg, config_dir, pool_at)
        Objective(cfg.objective, config_dir, space.reference.tokenizer, space.reference.config)
        merges = [{"name": pm.name, "recipe": pm.recipe, "recipe_dir": str(pm.recipe_dir)}
                  for pm in space.pool if pm.recipe is not None]
        identity = {"search": cfg.model_dump(mode="json"), "genes": space.labels(), "pool_merges": merges}
        return space, identity, None
    space, _ = build_space(cfg, config_dir)
    plan, _ = template(space, cfg, config_dir)
    Objective(cfg.objective, config_dir, plan.models[plan.tokenizer_from].path, plan.out_config)
    return space, {"search": cfg.model_dump(mode="json"), "genes": space.labels()}, plan


def run_search(search_file: str | Path, out: str | Path, *, workers: int = 1, ray_address: str | None = None,
               resume: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Search the space of ``search_file``; the state, ``report.json``, ``fitness.png`` and ``best.yaml``
    go into ``out``. Returns the report."""
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")
    search_file, out = Path(search_file), Path(out)
    cfg = parse_search(search_file)
    check_output_folder(out, [search_file])  # not a file, not inside a model folder, creatable
    config_dir = search_file.parent
    pool_at = out.resolve() / POOL
    space, identity, plan = _prepare(cfg, config_dir, pool_at)
    check_address(ray_address)
    if resume:
        state = _load_state(out, identity)
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            hint = "; pass --resume to continue it" if (out / STATE).is_file() else ""
            raise UserError(f"{out}: exists and is not empty{hint}")
        out.mkdir(parents=True, exist_ok=True)
        state = {"identity": identity, "config_dir": str(config_dir.resolve()), "generations": []}
        _write_json(out / STATE, state)
    say = progress or (lambda s: None)
    stats_at = out / "data"  # a method's data statistics, cached in DIR/data.stats
    if plan is not None and plan.method.stats:
        data_statistics(plan, stats_at, resolve_device("auto"))  # once, here, before the workers read them
    for pm in space.pool if isinstance(space, DataflowSpace) else ():
        if pm.recipe is not None and not pm.path.exists():  # merged once, kept for resuming and best.yaml
            say(f"merging pool model {pm.name} into {pm.path}")
            write_pool_model(pm, resolve_device("auto"))
    opt = optimizer(space, cfg)
    _replay(opt, state, out)
    total = cfg.optimizer.generations
    state["identity"] = identity  # the budget as last given
    if len(state["generations"]) < total:
        with ray_session(ray_address, workers):
            t0 = time.perf_counter()
            pool = Pool(cfg, config_dir, workers, stats_at, pool_at)
            state.setdefault("startup_seconds", []).append(time.perf_counter() - t0)
            try:
                for g in range(len(state["generations"]), total):
                    t0, restarts = time.perf_counter(), pool.restarts
                    asked = [_ask(opt) for _ in range(opt.population_size)]
                    results = pool.evaluate_all([space.values(x) for x, _ in asked])
                    if all(r.fitness is None for r in results):
                        raise UserError(f"every candidate of generation {g} failed; the first: {results[0].error}")
                    bad = _penalty(results)
                    values = [bad if r.fitness is None else -r.fitness for r in results]
                    opt.tell([(x, v) for (_, x), v in zip(asked, values, strict=True)])
                    candidates = [{"point": x.tolist(), "values": space.values(x_eval), "fitness": r.fitness,
                                   "value": v, "terms": r.terms, "error": r.error, "seconds": r.seconds}
                                  for (x_eval, x), r, v in zip(asked, results, values, strict=True)]
                    state["generations"].append({
                        "seconds": time.perf_counter() - t0, "mean": opt.mean.tolist(), "sigma": _sigma(opt),
                        "worker_restarts": pool.restarts - restarts, "candidates": candidates})
                    _write_json(out / STATE, state)
                    report = _outputs(out, state, space, cfg)
                    row = report["generations"][-1]
                    first = next((r.error for r in results if r.error), None)
                    failed = f", {row['failed']} failed (first: {first})" if row["failed"] else ""
                    say(f"generation {g + 1}/{total}: best {row['best']:.6g}, median {row['median']:.6g}, "
                        f"best so far {row['best_so_far']:.6g}{failed} ({row['seconds']:.1f}s)")
            finally:
                pool.close()
    return _outputs(out, state, space, cfg)
