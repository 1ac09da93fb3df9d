"""Evaluating candidates: an :class:`Evaluator` loads the models once and scores candidates merged in
memory; on Ray, one evaluator per actor (a GPU each when the cluster has GPUs), and :meth:`Pool.evaluate_all`
hands a generation's candidates to whichever actor is free, retrying on another the candidate whose
actor died."""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcypher.errors import UserError
from modelcypher.evolve.candidate import DataflowCandidates, ParameterCandidates
from modelcypher.evolve.config import SearchConfig
from modelcypher.evolve.dataflow import build_dataflow
from modelcypher.evolve.objective import Objective
from modelcypher.evolve.space import build_space, template
from modelcypher.hf import build_model, resolve_device
from modelcypher.merging.stats import collect

OBJECT_STORE_BYTES = 200 * 2**20  # candidates and results are a few numbers: a small store is plenty
RETRIES = 3  # a candidate whose actor died this many times is scored as failed


@dataclass
class Result:
    fitness: float | None  # the weighted sum, None when the candidate failed
    terms: list[float] | None
    error: str | None
    seconds: float


class Evaluator:
    """Scores candidates of one search: holds the models on ``device`` (and, in the parameter space,
    plans once), reads the objective's data once. ``pool_at``: where a data-flow search wrote its
    pool's merges."""

    def __init__(self, cfg: SearchConfig, config_dir: Path | None, device: str = "auto", threads: int | None = None,
                 stats_at: Path | None = None, pool_at: Path | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        if cfg.dataflow is not None:
            if pool_at is None:
                raise UserError("a data-flow search's evaluator needs the folder of its pool's merges")
            self.space = build_dataflow(cfg, config_dir, pool_at)
            self.candidates = DataflowCandidates(self.space, self.device)
            tok_dir, config = self.space.reference.tokenizer, self.space.reference.config
        else:
            self.space, _ = build_space(cfg, config_dir)
            plan, slots = template(self.space, cfg, config_dir)
            # A method's data statistics do not depend on the searched values: computed once (cached in
            # ``stats_at``.stats, where the search computes them before starting its workers).
            stats = data_statistics(plan, stats_at, self.device) if plan.method.stats else None
            self.candidates = ParameterCandidates(plan, slots, self.device, stats)
            tok_dir, config = plan.models[plan.tokenizer_from].path, plan.out_config
        self.objective = Objective(cfg.objective, config_dir, tok_dir, config)
        self.weights = [t.weight for t in cfg.objective]

    def state(self, values: list[float]) -> dict[str, torch.Tensor]:
        return self.candidates.merged(values)[1]

    def model(self, values: list[float]) -> torch.nn.Module:
        config, state = self.candidates.merged(values)
        return build_model(config, state).to(self.device).eval()

    def evaluate(self, values: list[float]) -> Result:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                terms = self.objective.score(self.model(values))
        except Exception as e:  # a candidate fails with its error; the search decides what follows
            msg = str(e)
            if not isinstance(e, UserError):  # where it was raised: the user's function, or ours
                at = traceback.extract_tb(e.__traceback__)[-1]
                msg = f"{type(e).__name__}: {e} (at {Path(at.filename).name}:{at.lineno})"
            return Result(None, None, msg, time.perf_counter() - t0)
        fitness = sum(w * x for w, x in zip(self.weights, terms, strict=True))
        return Result(fitness, terms, None, time.perf_counter() - t0)

    def pid(self) -> int:
        return os.getpid()


def data_statistics(plan, stats_at: Path | None, device: torch.device):
    """The data statistics of ``plan``'s method, computed or read from their cache beside ``stats_at``."""
    if stats_at is None:
        raise UserError(f"merge_method {plan.method.name} needs data statistics: give the evaluator a cache place")
    return collect(plan, stats_at, device, log=lambda _: None)


def check_address(address: str | None) -> None:
    """A HOST:PORT that does not accept a connection fails at once (Ray would wait minutes)."""
    if address in (None, "auto"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as e:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({e})") from None


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[None]:
    """Ray for the search: the cluster at ``address`` (``auto`` or HOST:PORT), else an embedded local
    one sized for ``workers`` actors (no dashboard, a small object store); reused when this process
    already runs one. What is started here is shut down here."""
    import ray  # a second to import: only the verb that searches pays it

    check_address(address)
    if ray.is_initialized():
        yield
        return
    if address is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus = max(workers, cores)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            raise UserError(f"--ray-address {address}: cannot join ({str(e).splitlines()[0]})") from None
    try:
        yield
    finally:
        ray.shutdown()


class Pool:
    """``workers`` evaluator actors (a GPU each when the cluster has them, else a CPU each)."""

    def __init__(self, cfg: SearchConfig, config_dir: Path | None, workers: int, stats_at: Path | None = None,
                 pool_at: Path | None = None):
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        self._threads = max(1, int(cpus // max(workers, 1))) if not gpus else None
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        self._cls = ray.remote(Evaluator).options(**opts)
        self._args = (cfg, config_dir, "auto", self._threads, stats_at, pool_at)
        self.actors = [self._start() for _ in range(workers)]
        self.restarts = 0
        ray.get([a.pid.remote() for a in self.actors])  # every actor has loaded the models

    def _start(self):
        return self._cls.remote(*self._args)

    def evaluate_all(self, candidates: list[list[float]]) -> list[Result]:
        """Every candidate's result, in order. A candidate whose actor dies goes back to the queue for
        another actor, and a fresh actor replaces the dead one."""
        import ray
        from ray.exceptions import RayActorError

        results: list[Result | None] = [None] * len(candidates)
        queue, idle, pending = deque(range(len(candidates))), list(self.actors), {}
        deaths = [0] * len(candidates)
        while queue or pending:
            while queue and idle:
                actor, i = idle.pop(0), queue.popleft()
                pending[actor.evaluate.remote(candidates[i])] = (actor, i)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
                idle.append(actor)
            except RayActorError as e:
                deaths[i] += 1
                self.restarts += 1
                fresh = self._start()
                self.actors[self.actors.index(actor)] = fresh
                idle.append(fresh)
                if deaths[i] < RETRIES:
                    queue.appendleft(i)
                else:
                    results[i] = Result(None, None, f"its worker died {RETRIES} times ({str(e).splitlines()[0]})", 0.0)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
