"""A data-free residual rotation from circuits every in-layer symmetry leaves alone (issue 24, item 3).

Weight matching's remaining barrier sits in the residual rotation (seed 004's analysis;
results/objective_gap.md). Here the rotation is estimated from quantities that no in-layer transform
changes: for every pair of weights that an MLP permutation, a V-O basis or a Q-K basis acts on from both
sides (``W_gate^T W_down^T``, the OV circuit ``W_V^T W_O^T``, the QK circuit ``W_Q^T W_K``), the
``d x d`` product ``C = X_s X_t^T`` of their residual-by-unit matrices, and each weight's Gram
``X_s X_s^T``. Under the residual rotation every one of them becomes ``Q^T C Q``, so the rotation is the
solution of a two-sided Procrustes problem, ``max_Q sum_c <Q^T C_B Q, C_A> + <Q, E_B^T E_A>`` (the
embeddings' one-sided term as in weight matching), solved by minorize-maximize steps
``Q <- polar(grad)`` (with the all-ones direction kept for LayerNorm), from the embeddings' Procrustes.
Then weight matching starts its descent from that rotation.

Measured on the width-128 pair of benchmarks/universe.py (seeds 0 and 1), its barrier on the test split:
weight matching as it is (permutations, orthogonal residual, V-O and Q-K bases) against the same started
from the circuit rotation, and the circuit rotation with weight matching's permutations and bases fitted
around it with the residual held fixed.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/circuits.py [--pair universe|quick|long|full]
    (results: benchmarks/results/circuits.json, circuits_<pair>.json for barrier.py's pairs; quoted in circuits.md)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import barrier as barrier_bench  # noqa: E402  (barrier.py's pairs, with --pair)
import universe as bench  # noqa: E402  (the models, their recipe and their cache)

RESULTS = HERE / "results"


def circuits(sd, spec) -> list[torch.Tensor]:
    """The ``d x d`` circuits of a folded state dict, in the residual's units (see the module docstring)."""
    from modelcypher.align.weight_matching import unit_rows

    res = {s.tensor: s for s in spec.residual.slots if s.role != "diag"}
    out = []
    for g in spec.groups:
        if g.kind not in ("perm", "vo", "qk"):
            continue
        xs = []
        for s in g.slots:
            w = sd[s.tensor]
            if w.dim() != 2 or s.tensor not in res:
                continue
            r = res[s.tensor]
            part = unit_rows(w.double(), s)  # [units, residual]
            xs.append(part if r.axis != s.axis else None)
        xs = [x.T for x in xs if x is not None]  # [residual, units]
        for i, x in enumerate(xs):
            out.append(x @ x.T)
            for y in xs[i + 1:]:
                if y.shape == x.shape:
                    out.append(x @ y.T)
    return out


def circuit_rotation(sd_b, sd_a, spec, q0: torch.Tensor, iters: int = 200) -> tuple[torch.Tensor, list[float]]:
    """``max_Q sum <Q^T C_B Q, C_A> + <Q, E_B^T E_A>`` by minorize-maximize from ``q0`` (``x -> x Q``)."""
    from modelcypher.align.solvers import procrustes, procrustes_fixing_ones
    from modelcypher.align.weight_matching import anchors, unit_rows

    cb, ca = circuits(sd_b, spec), circuits(sd_a, spec)
    scale = [1.0 / max(float(a.norm() * b.norm()), 1e-12) for a, b in zip(ca, cb, strict=True)]
    lin = torch.zeros_like(q0)
    anchored = anchors(spec)
    for s in spec.residual.slots:
        if (s.tensor, s.axis, s.space, s.start, s.stop) in anchored:
            xa, xb = unit_rows(sd_a[s.tensor].double(), s), unit_rows(sd_b[s.tensor].double(), s)
            lin += xb @ xa.T / float(xa.norm() * xb.norm())
    solve = procrustes_fixing_ones if spec.norm == "layernorm" else procrustes

    def objective(q):
        return math.fsum(w * float((q.T @ b @ q * a).sum()) for w, a, b in zip(scale, ca, cb, strict=True)) + float(
            (q * lin).sum())

    q, history = q0.double(), [objective(q0.double())]
    shift = 2.0 * sum(w * float(torch.linalg.matrix_norm(a, 2) * torch.linalg.matrix_norm(b, 2))
                      for w, a, b in zip(scale, ca, cb, strict=True))
    for _ in range(iters):
        grad = sum(w * (b @ q @ a.T + b.T @ q @ a) for w, a, b in zip(scale, ca, cb, strict=True)) + lin
        new = solve(grad + shift * q)  # the shift makes the minorizer valid for the indefinite terms
        history.append(objective(new))
        if history[-1] <= history[-2] + 1e-12 * abs(history[-2]):
            break
        q = new
    return q, history


def barrier(ck_a, ck_b, alignment, loss) -> float:
    from modelcypher.align import apply_verified, fold_norms
    from modelcypher.hf import causal_lm
    from modelcypher.measure.barrier import barrier_states

    raw_a = {n: ck_a.get(n) for n in ck_a.names}
    raw_b = {n: ck_b.get(n) for n in ck_b.names}
    b, config_b = apply_verified(raw_b, ck_b.config, alignment)
    a, config_a = fold_norms(raw_a, ck_a.config)
    return barrier_states(causal_lm(config_a, a)[1], causal_lm(config_b, b)[1], loss, 11)


def main() -> None:
    from modelcypher.align.pipeline import CheckpointView, spec_of
    from modelcypher.align.transform import Alignment
    from modelcypher.align.weight_matching import Matcher, anchors, descend, heads_with_bases, identity, match_weights
    from modelcypher.checkpoint import Checkpoint
    from modelcypher.hf import causal_lm
    from modelcypher.measure.barrier import lm_loss_fn
    from modelcypher.zoo.chartok import encode_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=("universe", *barrier_bench.GPT2_RECIPES), default="universe",
                    help="universe: the width-128 pair of universe.py; quick, long or full: barrier.py's pair of "
                    "that recipe (trained there first; cached)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.pair == "universe":
        text = bench.splits()
        dirs = [bench.trained(bench.RECIPE, s, text) for s in bench.SEEDS[:2]]
        tok, n_eval, stem = bench.tokenizer(), bench.EVAL_TOKENS, "circuits"
    else:
        text = barrier_bench.shakespeare_splits()
        barrier_bench.use_recipe(args.pair)
        dirs = [barrier_bench.gpt2_dir(s) for s in barrier_bench.SEEDS]
        if not all((d / "train.json").is_file() for d in dirs):
            raise SystemExit(f"train the {args.pair} pair first: python benchmarks/barrier.py --recipe {args.pair} "
                             "--train-only")
        tok, n_eval, stem = barrier_bench.char_tokenizer(), barrier_bench.EVAL_TOKENS, f"circuits_{args.pair}"
    ck_a, ck_b = (Checkpoint(d) for d in dirs)
    spec = spec_of(ck_a)
    a, b = ({n: v for n, v in CheckpointView(ck, spec, folded=True).items()} for ck in (ck_a, ck_b))
    ids = encode_ids(text[2], tok)[:n_eval]
    loss = lm_loss_fn(causal_lm(ck_a.config, {n: ck_a.get(n) for n in ck_a.names})[0], ids, torch.device("cpu"))
    rows = {}

    def record(name: str, row: dict) -> None:
        rows[name] = row
        print(f"{name:60s} barrier {row['barrier']:.4f} objective {row['objective']:.6g}", flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.json").write_text(json.dumps({"models": [str(d) for d in dirs], "rows": rows},
                                                          indent=2) + "\n")

    t0 = time.perf_counter()
    wm = match_weights(b, a, spec, residual="orthogonal", vo=True, qk=True, prepared=True)
    record("weight matching", {**barrier(ck_a, ck_b, wm, loss), "objective": wm.history[-1],
                               "seconds": time.perf_counter() - t0})
    t0 = time.perf_counter()
    r = next(i for i, g in enumerate(spec.groups) if g.kind == "residual")
    q0 = Matcher(a, b, spec, {}).solve(r, "orthogonal", only=anchors(spec))  # the embeddings' Procrustes
    q, history = circuit_rotation(b, a, spec, q0)
    circ = match_weights(b, a, spec, residual="orthogonal", vo=True, qk=True, prepared=True, init={"residual": q})
    record("weight matching from the circuit rotation", {**barrier(ck_a, ck_b, circ, loss),
                                                         "objective": circ.history[-1],
                                                         "circuit_objective": [history[0], history[-1]],
                                                         "circuit_steps": len(history) - 1,
                                                         "seconds": time.perf_counter() - t0})
    # the circuit rotation held fixed: permutations and bases fitted around it
    matcher = Matcher(a, b, spec, {"residual": q, **{g.name: identity(g, "orthogonal") for g in spec.groups
                                                     if g.kind in ("perm", "heads", "vo", "qk")}})
    coords = [(i,) for i, g in enumerate(spec.groups) if g.kind == "perm"] + heads_with_bases(spec, {"vo", "qk"})
    hist = [matcher.objective()]
    descend(matcher, coords, "orthogonal", 20, random.Random(0), hist)
    fixed = Alignment(dict(matcher.transforms), hist)
    record("circuit rotation, permutations and bases fitted around it", {**barrier(ck_a, ck_b, fixed, loss),
                                                                         "objective": hist[-1]})


if __name__ == "__main__":
    main()
