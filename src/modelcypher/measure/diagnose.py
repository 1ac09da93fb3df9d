"""``modelcypher diagnose config.yaml``: how much the task vectors of a merge config interfere, before merging.

The config is planned as for a merge (headers only), then read tensor by tensor: for each output tensor
only the base's and each model's copy of it are in memory (on the chosen device). Per tensor, the task
vectors ``τ_i = x_i − base`` give the figures of :mod:`modelcypher.measure.interference`; they are then
aggregated per layer (``layer_index``; tensors outside the layers form one group, ``embeddings/head``) and
overall:

- **cosine** (pairwise and mean off-diagonal) and **sign conflict** (TIES, no trimming) are *exact over
  all floating-point coordinates of the group*, as if the group's task vectors were flattened into one
  vector: dot products and conflict counts are summed, not averaged.
- **effective rank / min(m, n)**, **top-k energy** and **subspace overlap** (mean of the left and right
  top-k singular subspaces' overlap, with its chance level k/dim) are defined per 2-D weight and
  aggregated as *parameter-weighted means* over the group's 2-D weights (weights of more than two
  dimensions are read as ``[shape[0], -1]``; 1-D tensors have no spectrum and count only in the exact
  figures).

``k`` is TSV's per-task budget ``max(1, min(m, n) // T)`` unless ``top_k`` is given.

SVD cost. A weight whose smaller side is at most ``svd_exact_max_dim`` (default 512) gets an exact SVD
in float64. A larger one gets a randomized SVD (``torch.svd_lowrank``, two power iterations, 16 extra
columns, fixed seed) of rank ``q = min(k, 256) + 16``: subspace overlap is then measured at
``k' = min(k, 256)`` (its chance level likewise), and the spectrum beyond the top ``q`` singular values is
modelled as flat, holding exactly the remaining squared Frobenius norm. A flat tail has the largest
entropy and the smallest top-k share a tail of that energy can have, so for those weights the effective
rank is an upper estimate and the top-k energy a lower estimate (the report marks them ``randomized``).
The cost per weight is then ``O(m·n·q)`` instead of ``O(m·n·min(m, n))``.

Per model (over the weights of two or more dimensions, whole model and per group): the cosine between the
model's weights and the base's, ``‖τ‖ / ‖base‖`` and ``‖x‖ / ‖base‖``. 1-D tensors are left out of these:
norm gains start at one in every model, so two unrelated models agree on them and, in a small model,
they would mask the difference. A fine-tune has weight cosine ≈ 1 and a task vector
much smaller than the base; an independently initialised model of the same shape has cosine ≈ 0 and
``‖τ‖ / ‖base‖ ≈ √2``. A model whose weight cosine is below ``FINETUNE_MIN_COSINE`` (0.5) or whose task
vector is larger than the base itself (``FINETUNE_MAX_TASK_NORM`` 1.0: with equal norms, that is cosine
0.5 again) does not look like a fine-tune of the base, and the report warns with the figures; its
"task vector" is mostly the difference of two unrelated models and no task-arithmetic merge makes sense.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcypher.arch.families import layer_index
from modelcypher.errors import UserError
from modelcypher.hf import resolve_device
from modelcypher.measure.interference import NEGLIGIBLE, overlap_excess, recommend
from modelcypher.measure.plot import pyplot, save_png
from modelcypher.merging.config import parse_config
from modelcypher.merging.plan import Plan, make_plan, resolve_name

EXACT_SVD_MAX_DIM = 512  # exact SVD when min(m, n) <= this, randomized above
RANDOMIZED_MAX_K = 256  # largest k measured on a randomized SVD
OVERSAMPLE = 16
POWER_ITERS = 2
FINETUNE_MIN_COSINE = 0.5  # weight cosine with the base below this: not a fine-tune
FINETUNE_MAX_TASK_NORM = 1.0  # ‖τ‖ / ‖base‖ above this: not a fine-tune
OTHER_GROUP = "embeddings/head"
AGGREGATION = ("cosine and sign_conflict: exact over all floating-point coordinates of the group (summed dot "
               "products and conflict counts); effective_rank_ratio, topk_energy, subspace_overlap: "
               "parameter-weighted means over the group's 2-D weights")


# ---------------------------------------------------------------------------------------------------------
# per-tensor spectra


@dataclass
class _Spectrum:
    s: torch.Tensor  # singular values known (all of them when exact, the top q when randomized)
    u: torch.Tensor  # top-k left singular vectors (numerical rank capped)
    v: torch.Tensor  # top-k right singular vectors
    total_sq: float  # ‖τ‖_F²
    dim: int  # min(m, n)
    exact: bool

    def _tail(self) -> tuple[int, float]:
        """Number of unknown singular values and the (flat) value each is modelled with."""
        n_tail = self.dim - self.s.numel()
        rest = max(0.0, self.total_sq - float(self.s.pow(2).sum()))
        return (n_tail, math.sqrt(rest / n_tail)) if n_tail > 0 and rest > 0 else (0, 0.0)

    def effective_rank(self) -> float:
        n_tail, t = self._tail()
        s = self.s[self.s > 0].double()
        total = float(s.sum()) + n_tail * t
        if total <= 0:
            return 0.0
        p = s / total
        h = -float((p * p.log()).sum())
        if n_tail:
            pt = t / total
            h -= n_tail * pt * math.log(pt)
        return math.exp(h)

    def topk_energy(self, k: int) -> float:
        if self.total_sq <= 0:
            return 0.0
        n_tail, t = self._tail()
        known = float(self.s[:k].double().pow(2).sum())
        extra = max(0, min(k - self.s.numel(), n_tail)) * t * t
        return min(1.0, (known + extra) / self.total_sq)


def _spectrum(tau: torch.Tensor, k: int, exact_max_dim: int) -> _Spectrum:
    m, n = tau.shape
    d = min(m, n)
    total_sq = float(tau.double().pow(2).sum()) if tau.device.type == "cpu" else float(tau.pow(2).sum())
    if d <= exact_max_dim:
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        v, exact = vh.T, True
    else:
        q = min(d, min(k, RANDOMIZED_MAX_K) + OVERSAMPLE)
        u, s, v = torch.svd_lowrank(tau.float(), q=q, niter=POWER_ITERS)
        exact = False
    # a singular subspace is only defined where the singular values are not (numerically) zero
    rank = int((s > NEGLIGIBLE * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    kk = min(k, rank)
    return _Spectrum(s.cpu(), u[:, :kk], v[:, :kk], total_sq, d, exact)


def _overlap(qa: torch.Tensor, qb: torch.Tensor) -> float:
    kk = min(qa.shape[1], qb.shape[1])
    return float((qa.T @ qb.to(qa.dtype)).pow(2).sum()) / kk if kk else 0.0


# ---------------------------------------------------------------------------------------------------------
# accumulation


@dataclass
class _Acc:
    """Running sums for one group (or the whole model)."""
    params: int = 0
    params_2d: int = 0
    n_tensors: int = 0
    dots: dict[tuple[int, int], float] = field(default_factory=dict)  # <τ_i, τ_j>, i <= j
    conflict: float = 0.0
    live: float = 0.0
    chance_live: float = 0.0
    w: dict[str, float] = field(default_factory=dict)  # parameter-weighted sums of 2-D figures
    w_pair_overlap: dict[tuple[int, int], float] = field(default_factory=dict)
    w_pair: dict[tuple[int, int], int] = field(default_factory=dict)
    w_model: dict[tuple[int, str], float] = field(default_factory=dict)
    w_model_n: dict[int, int] = field(default_factory=dict)
    base_sq: float = 0.0
    x_sq: dict[int, float] = field(default_factory=dict)
    xb: dict[int, float] = field(default_factory=dict)
    t_sq: dict[int, float] = field(default_factory=dict)

    def add_exact(self, mis: list[int], taus: list[torch.Tensor], base_sq: float, x_sq: list[float],
                  xb: list[float]) -> None:
        numel = taus[0].numel()
        self.params += numel
        self.n_tensors += 1
        if taus[0].dim() >= 2:  # the fine-tune check reads the weight matrices only
            self.base_sq += base_sq
            for a, mi in enumerate(mis):
                self.x_sq[mi] = self.x_sq.get(mi, 0.0) + x_sq[a]
                self.xb[mi] = self.xb.get(mi, 0.0) + xb[a]
                self.t_sq[mi] = self.t_sq.get(mi, 0.0) + _dot(taus[a], taus[a])
        for a, mi in enumerate(mis):
            for b in range(a, len(mis)):
                key = (min(mi, mis[b]), max(mi, mis[b]))
                self.dots[key] = self.dots.get(key, 0.0) + _dot(taus[a], taus[b])
        if len(taus) >= 2:
            flat = [t.reshape(-1) for t in taus]
            pos = torch.zeros(numel, dtype=torch.bool, device=flat[0].device)
            neg = torch.zeros_like(pos)
            for t in flat:
                pos |= t > 0
                neg |= t < 0
            live = float((pos | neg).sum())
            self.conflict += float((pos & neg).sum())
            self.live += live
            self.chance_live += live * (1.0 - 2.0 ** (1 - len(taus)))

    def add_2d(self, numel: int, figures: dict[str, float], pair_overlap: dict[tuple[int, int], float],
               per_model: dict[int, dict[str, float]]) -> None:
        self.params_2d += numel
        for key, val in figures.items():
            self.w[key] = self.w.get(key, 0.0) + numel * val
        for key, val in pair_overlap.items():
            self.w_pair_overlap[key] = self.w_pair_overlap.get(key, 0.0) + numel * val
            self.w_pair[key] = self.w_pair.get(key, 0) + numel
        for mi, figs in per_model.items():
            self.w_model_n[mi] = self.w_model_n.get(mi, 0) + numel
            for key, val in figs.items():
                self.w_model[mi, key] = self.w_model.get((mi, key), 0.0) + numel * val

    def result(self, labels: dict[int, str]) -> dict[str, Any]:
        mis = sorted(labels)
        pair_cos = {}
        for i in mis:
            for j in mis:
                if i < j and (i, j) in self.dots:
                    ni, nj = self.dots.get((i, i), 0.0), self.dots.get((j, j), 0.0)
                    den = math.sqrt(ni * nj)
                    pair_cos[f"{labels[i]} | {labels[j]}"] = self.dots[i, j] / den if den > 0 else 0.0
        out: dict[str, Any] = {"params": self.params, "params_2d": self.params_2d, "n_tensors": self.n_tensors,
                               "cosine": _mean(pair_cos.values()),
                               "sign_conflict": self.conflict / self.live if self.live else None,
                               "sign_conflict_chance": self.chance_live / self.live if self.live else None}
        for key in ("effective_rank_ratio", "topk_energy", "subspace_overlap", "subspace_overlap_chance"):
            out[key] = self.w[key] / self.params_2d if self.params_2d and key in self.w else None
        out["pair_cosine"] = pair_cos
        out["pair_overlap"] = {f"{labels[i]} | {labels[j]}": v / self.w_pair[i, j]
                               for (i, j), v in sorted(self.w_pair_overlap.items())}
        per_model = {}
        for mi in mis:
            if mi not in self.x_sq:
                continue
            tn, xn, bn = self.t_sq[mi], self.x_sq[mi], self.base_sq
            fig = {"weight_cosine": self.xb[mi] / math.sqrt(xn * bn) if xn > 0 and bn > 0 else 0.0,
                   "task_norm_ratio": math.sqrt(tn / bn) if bn > 0 else math.inf,
                   "weight_norm_ratio": math.sqrt(xn / bn) if bn > 0 else math.inf}
            n2 = self.w_model_n.get(mi, 0)
            for key in ("effective_rank_ratio", "topk_energy"):
                fig[key] = self.w_model[mi, key] / n2 if n2 else None
            per_model[labels[mi]] = fig
        out["per_model"] = per_model
        return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _labels(names: list[str]) -> list[str]:
    short = [Path(n).name or n for n in names]
    return short if len(set(short)) == len(short) else list(names)


# ---------------------------------------------------------------------------------------------------------
# the diagnosis


def diagnose_config(config: str | Path | dict, *, top_k: int | None = None, device: str = "auto",
                    svd_exact_max_dim: int = EXACT_SVD_MAX_DIM) -> dict[str, Any]:
    """Diagnose the task vectors of a merge config (it needs a ``base_model``); a JSON-ready report.

    Keys: ``base``, ``models`` (config names), ``labels`` (short names used in rows and pair keys),
    ``method`` (the config's), ``device``, ``top_k``, ``aggregation``, ``thresholds``, ``per_model`` (whole
    model: weight cosine with the base, task-vector and weight norms relative to the base's,
    ``looks_like_finetune``), ``groups`` (one per layer, then ``embeddings/head``), ``overall``,
    ``tensors`` (per 2-D weight), ``recommendation`` (``method``, ``reason``), ``warnings``, ``notes``.
    """
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    dev = resolve_device(device)
    plan, base_i, model_is = _plan(config)
    all_labels = _labels(plan.names)
    labels = {mi: all_labels[mi] for mi in model_is}

    overall, groups, tensors, notes = _Acc(), {}, [], []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        pairs, skipped = _task_vector_pairs(plan, base_i)
        for task, sources, base_src in pairs:
            group, exact, two_d = _tensor_figures(plan, task, sources, base_src, dev, top_k, svd_exact_max_dim)
            for acc in (overall, groups.setdefault(group, _Acc())):
                acc.add_exact(*exact)
                if two_d is not None:
                    acc.add_2d(*two_d["add"])
            if two_d is not None:
                row = two_d["row"]
                row["per_model"] = {labels[mi]: v for mi, v in row["per_model"].items()}
                tensors.append(row)
    if skipped:
        notes.append(f"{len(skipped)} tensor(s) without a counterpart in the base were skipped "
                     f"(first: {skipped[0]})")
    if any(not t["exact_svd"] for t in tensors):
        notes.append(f"weights with min(m, n) > {svd_exact_max_dim} used a randomized SVD (k capped at "
                     f"{RANDOMIZED_MAX_K}, flat tail): their effective rank is an upper and top-k energy a "
                     "lower estimate")

    def order(g: str) -> tuple:
        return (1, 0) if g == OTHER_GROUP else (0, int(g.split()[-1]))

    group_rows = [{"group": g, "layer": None if g == OTHER_GROUP else int(g.split()[-1]), **groups[g].result(labels)}
                  for g in sorted(groups, key=order)]
    over = overall.result(labels)
    per_model, warnings = _fine_tune_checks(over, group_rows, labels, all_labels[base_i])
    rec = _recommendation(over, per_model)
    if rec[0] != plan.method.name:
        notes.append(f"the config asks for {plan.method.name}; the figures favour {rec[0]}")
    notes.append("no probe data is collected by diagnose, so the data-driven methods (regmean, null_space) "
                 "are not considered")
    cfg = plan.config
    return {
        "config": str(config) if isinstance(config, (str, Path)) else None,
        "base": cfg.base_model,
        "models": [plan.names[mi] for mi in model_is],
        "labels": {plan.names[mi]: labels[mi] for mi in model_is} | {cfg.base_model: all_labels[base_i]},
        "method": plan.method.name,
        "device": str(dev),
        "top_k": top_k,
        "aggregation": AGGREGATION,
        "thresholds": {"finetune_min_cosine": FINETUNE_MIN_COSINE,
                       "finetune_max_task_norm": FINETUNE_MAX_TASK_NORM,
                       "svd_exact_max_dim": svd_exact_max_dim, "randomized_max_k": RANDOMIZED_MAX_K},
        "per_model": per_model,
        "groups": group_rows,
        "overall": over,
        "tensors": tensors,
        "recommendation": {"method": rec[0], "reason": rec[1]},
        "warnings": warnings,
        "notes": notes,
    }


def _plan(config: str | Path | dict) -> tuple[Plan, int, list[int]]:
    """The config planned as for a merge; the base's index and the other models' indices."""
    cfg = parse_config(config)
    if not cfg.base_model:  # before planning, which may ask for a base in its own words
        raise UserError("diagnose needs a base_model in the config: task vectors are the models minus the base")
    config_dir = Path(config).parent if isinstance(config, (str, Path)) and Path(config).is_file() else None
    plan = make_plan(cfg, config_dir=config_dir)
    base_i = plan.names.index(cfg.base_model)
    model_is = sorted({mi for t in plan.tasks for mi, _ in t.sources if mi != base_i})
    if not model_is:
        raise UserError("diagnose needs at least one model besides the base_model")
    return plan, base_i, model_is


def _task_vector_pairs(plan: Plan, base_i: int) -> tuple[list[tuple], list[str]]:
    """Per merged tensor: ``(task, the models' sources, the base's source)``, each tensor once (a tied
    head reads the embedding); and the names of tensors the base has no counterpart of."""
    pairs, seen, skipped = [], set(), []
    for task in plan.tasks:
        if task.copy:
            continue
        sources = [(mi, n) for mi, n in task.sources if mi != base_i]
        base_src = task.base
        if base_src is None:  # a method that takes no base: the base's tensor of the same name
            rn = resolve_name(plan.models[base_i], task.name)
            base_src = (base_i, rn) if rn is not None else None
        if base_src is None or not sources:
            skipped.append(task.name)
            continue
        key = (base_src, tuple(sources), task.shape)
        if key not in seen:
            seen.add(key)
            pairs.append((task, sources, base_src))
    return pairs, skipped


def _fine_tune_checks(over: dict, group_rows: list[dict], labels: dict[int, str],
                      base_label: str) -> tuple[dict, list[str]]:
    """Per model, whether it looks like a fine-tune of the base (overall and per group), with warnings."""
    warnings: list[str] = []
    per_model = {}
    for label in labels.values():
        fig = dict(over["per_model"][label])
        ok = fig["weight_cosine"] >= FINETUNE_MIN_COSINE and fig["task_norm_ratio"] <= FINETUNE_MAX_TASK_NORM
        fig["looks_like_finetune"] = ok
        per_model[label] = fig
        if not ok:
            warnings.append(f"model {label} does not look like a fine-tune of base {base_label}: weight "
                            f"cosine {fig['weight_cosine']:.2f}, task-vector norm {fig['task_norm_ratio']:.2f}x "
                            f"the base's (weight norm {fig['weight_norm_ratio']:.2f}x); a fine-tune has cosine "
                            f"near 1 and a small task vector, so its task vector is mostly noise")
            continue
        bad = [r["group"] for r in group_rows if label in r["per_model"]
               and (r["per_model"][label]["weight_cosine"] < FINETUNE_MIN_COSINE
                    or r["per_model"][label]["task_norm_ratio"] > FINETUNE_MAX_TASK_NORM)]
        if bad:
            warnings.append(f"model {label} looks like a fine-tune of base {base_label} overall, but not "
                            f"in {', '.join(bad)} (weight cosine < {FINETUNE_MIN_COSINE} or task-vector "
                            f"norm > {FINETUNE_MAX_TASK_NORM}x the base's there)")
    return per_model, warnings


def _recommendation(over: dict, per_model: dict) -> tuple[str, str]:
    if len(per_model) < 2:
        return ("task_arithmetic", "only one task vector: there is nothing for it to interfere with, so any "
                "method reduces to scaling it")
    rec = recommend({k: v for k, v in over.items() if isinstance(v, float)})
    if any(not f["looks_like_finetune"] for f in per_model.values()):
        rec = (rec[0], rec[1] + "; but see the warnings: not every model is a fine-tune of the base, "
               "so the figures describe unrelated weights")
    return rec


def _tensor_figures(plan: Plan, task, sources: list[tuple[int, str]], base_src: tuple[int, str],
                    dev: torch.device, top_k: int | None, exact_max_dim: int) -> tuple[str, tuple, dict | None]:
    """One tensor's figures: its group, the arguments of ``_Acc.add_exact``, and for a weight of two or
    more dimensions ``{"add": arguments of _Acc.add_2d, "row": its row of the report}`` (else None)."""
    def load(mi: int, name: str) -> torch.Tensor:
        x = plan.models[mi].get(name, slice(0, task.shape[0]) if task.shape else None)  # vocabulary cut
        return x.to(device=dev, dtype=torch.float32)

    base = load(*base_src)
    base_sq = _dot(base, base)
    mis, taus, x_sq, xb = [], [], [], []
    for mi, name in sources:
        x = load(mi, name)
        if x.shape != base.shape:
            raise UserError(f"tensor {name!r} of {plan.names[mi]} has shape {list(x.shape)} but the base's "
                            f"{base_src[1]!r} has {list(base.shape)}")
        x_sq.append(_dot(x, x))
        xb.append(_dot(x, base))
        mis.append(mi)
        taus.append(x.sub_(base))  # τ in place: the model's copy is not needed any more
    del base
    layer = layer_index(task.name)
    group = OTHER_GROUP if layer is None else f"layer {layer}"
    exact = (mis, taus, base_sq, x_sq, xb)
    if taus[0].dim() < 2:
        return group, exact, None
    mats = [t.reshape(t.shape[0], -1) for t in taus]
    m, n = mats[0].shape
    t_count = len(mats)
    k = max(1, min(m, n) // t_count) if top_k is None else top_k
    specs = [_spectrum(x, k, exact_max_dim) for x in mats]
    k_used = k if specs[0].exact else min(k, RANDOMIZED_MAX_K)
    per_model = {mi: {"effective_rank_ratio": sp.effective_rank() / sp.dim, "topk_energy": sp.topk_energy(k)}
                 for mi, sp in zip(mis, specs, strict=True)}
    figs = {"effective_rank_ratio": _mean(p["effective_rank_ratio"] for p in per_model.values()),
            "topk_energy": _mean(p["topk_energy"] for p in per_model.values())}
    pair_overlap = {}
    for a in range(t_count):
        for b in range(a + 1, t_count):
            key = (min(mis[a], mis[b]), max(mis[a], mis[b]))
            pair_overlap[key] = 0.5 * (_overlap(specs[a].u, specs[b].u) + _overlap(specs[a].v, specs[b].v))
    if pair_overlap:
        figs["subspace_overlap"] = _mean(pair_overlap.values())
        figs["subspace_overlap_chance"] = 0.5 * (min(k_used, m) / m + min(k_used, n) / n)
    row = {"name": task.name, "group": group, "shape": [m, n], "k": k_used, "exact_svd": specs[0].exact, **figs}
    if t_count >= 2:
        cos = [_dot(taus[a], taus[b]) / math.sqrt(_dot(taus[a], taus[a]) * _dot(taus[b], taus[b]) or 1.0)
               for a in range(t_count) for b in range(a + 1, t_count)]
        row["cosine"] = _mean(cos)
    row["per_model"] = per_model
    return group, exact, {"add": (m * n, figs, pair_overlap, per_model), "row": row}


# ---------------------------------------------------------------------------------------------------------
# output


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render_table(report: dict[str, Any]) -> str:
    """The report as a terminal table: one row per group, the overall row, per-model figures, the
    recommendation, warnings and notes."""
    head = ["group", "params", "cosine", "sign-conf", "erank/d", "top-k E", "overlap", "(chance)", "excess"]
    rows = []
    for r in report["groups"] + [dict(report["overall"], group="overall")]:
        ov, ch = r["subspace_overlap"], r["subspace_overlap_chance"]
        rows.append([r["group"], f"{r['params']:,}", _f(r["cosine"]), _f(r["sign_conflict"]),
                     _f(r["effective_rank_ratio"]), _f(r["topk_energy"]), _f(ov), _f(ch),
                     _f(None if ov is None or ch is None else overlap_excess(ov, ch))])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                               strict=True)))

    base_label = report["labels"].get(report["base"], report["base"])
    k = report["top_k"] if report["top_k"] is not None else "TSV budget min(m,n)//T"
    chance = report["overall"]["sign_conflict_chance"]
    out = [f"task vectors against base {base_label} (config method: {report['method']}, k = {k}, "
           f"device {report['device']})",
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    out.append(f"sign-conf chance level {_f(chance, '.2f')}; erank/d = effective rank / min(m, n); "
               "overall = exact cosine/sign conflict, parameter-weighted means of the rest")
    out.append("")
    mhead = ["model", "weight cos", "|tau|/|base|", "|x|/|base|", "erank/d", "top-k E", "fine-tune?"]
    mrows = [[lab, _f(f["weight_cosine"], ".4f"), _f(f["task_norm_ratio"]), _f(f["weight_norm_ratio"]),
              _f(f["effective_rank_ratio"]), _f(f["topk_energy"]), "yes" if f["looks_like_finetune"] else "NO"]
             for lab, f in report["per_model"].items()]
    mw = [max(len(x) for x in col) for col in zip(mhead, *mrows, strict=True)]
    for cells in [mhead, ["-" * w for w in mw]] + mrows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, mw,
                                                                                                  strict=True))))
    out.append("")
    rec = report["recommendation"]
    out.append(f"recommendation: {rec['method']} ({rec['reason']})")
    out += [f"warning: {w}" for w in report["warnings"]]
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)


def plot_heatmaps(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """PNG heatmaps into ``out_dir`` (created): per group × model pair the task-vector cosine and the
    subspace overlap, per group × model the effective rank and top-k energy, per group × model the
    fine-tune check (weight cosine, task-vector norm), and per group × figure a summary. Returns the paths."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = report["groups"]
    ylabels = [g["group"] for g in groups]
    models = list(report["per_model"])
    pairs = sorted({p for g in groups for p in g["pair_cosine"]})
    written = []

    def heat(ax, data, xlabels, title, vmin=None, vmax=None, cmap="viridis"):
        arr = np.array([[np.nan if v is None else v for v in row] for row in data], dtype=float)
        im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
        ax.set_title(title, fontsize=9)
        if arr.size <= 400:
            for (i, j), v in np.ndenumerate(arr):
                if not np.isnan(v):
                    light = cmap == "coolwarm" or im.norm(v) > 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="k" if light else "w")
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        written.append(save_png(fig, path))

    height = max(3.0, 0.3 * len(groups) + 1.5)
    if pairs:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(pairs) + 2), height))
        heat(ax, [[g["pair_cosine"].get(p) for p in pairs] for g in groups], pairs,
             "task-vector cosine", -1, 1, "coolwarm")
        save(fig, "cosine.png")
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(pairs) + 2), height))
        ch = report["overall"]["subspace_overlap_chance"]
        heat(ax, [[g["pair_overlap"].get(p) for p in pairs] for g in groups], pairs,
             f"subspace overlap (overall chance {_f(ch, '.2f')})", 0, 1)
        save(fig, "subspace_overlap.png")
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 2.4 * len(models) + 4), height))
    for ax, key, title in zip(axes, ("effective_rank_ratio", "topk_energy"),
                              ("effective rank / min(m, n)", "top-k energy"), strict=True):
        heat(ax, [[g["per_model"].get(m, {}).get(key) for m in models] for g in groups], models, title, 0, 1)
    save(fig, "rank_energy.png")
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 2.4 * len(models) + 4), height))
    heat(axes[0], [[g["per_model"].get(m, {}).get("weight_cosine") for m in models] for g in groups], models,
         "weight cosine with the base", 0, 1)
    heat(axes[1], [[g["per_model"].get(m, {}).get("task_norm_ratio") for m in models] for g in groups], models,
         "|task vector| / |base|", 0, 1.5, "magma")
    save(fig, "finetune_check.png")
    keys = ["cosine", "sign_conflict", "effective_rank_ratio", "topk_energy", "subspace_overlap"]
    fig, ax = plt.subplots(figsize=(7.0, height))
    heat(ax, [[g[k] for k in keys] for g in groups], keys, "per-group figures", 0, 1)
    save(fig, "summary.png")
    return written


__all__ = ["diagnose_config", "plot_heatmaps", "render_table"]
