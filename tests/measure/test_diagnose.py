"""`modelcypher diagnose`: the pre-merge interference report, on tiny real Llama checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from checkpoints import build, save
from cli_util import run_cli, write_config
from modelcypher.cli import main
from modelcypher.measure.diagnose import diagnose_config, render_table
from modelcypher.measure.interference import effective_rank, topk_energy

LAYERS = 2


def _delta(model: torch.nn.Module, seed: int, scale: float, rank: int | None = None) -> dict[str, torch.Tensor]:
    """A seeded task vector for every parameter: rank-`rank` for 2-D weights when given, else dense."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if p.dim() == 2 and rank is not None:
            a = torch.randn(p.shape[0], rank, generator=g)
            b = torch.randn(rank, p.shape[1], generator=g)
            out[n] = scale * (a @ b) / rank
        else:
            out[n] = scale * torch.randn(p.shape, generator=g)
    return out


def _moved(model: torch.nn.Module, delta: dict[str, torch.Tensor], sign: float = 1.0) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.add_(sign * delta[n])
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base; a = base + δ, b = base + δ, c = base − δ (δ rank 2 per weight); f0, f1 = base + small dense
    noise (fine-tunes); u = an independently initialised model of the same architecture."""
    tmp = tmp_path_factory.mktemp("diag")
    base = build("llama", seed=0, num_hidden_layers=LAYERS)
    delta = _delta(base, seed=7, scale=0.003, rank=2)
    paths = {"base": save(base, tmp / "base")}
    paths["a"] = save(_moved(base, delta), tmp / "a")
    paths["b"] = save(_moved(base, delta), tmp / "b")
    paths["c"] = save(_moved(base, delta, -1.0), tmp / "c")
    paths["f0"] = save(_moved(base, _delta(base, seed=11, scale=0.002)), tmp / "f0")
    paths["f1"] = save(_moved(base, _delta(base, seed=12, scale=0.002)), tmp / "f1")
    paths["u"] = save(build("llama", seed=1, num_hidden_layers=LAYERS), tmp / "u")
    return tmp, paths, delta


def _cfg(tmp, paths, names, method="ties", base=True):
    cfg = {"merge_method": method, "models": [{"model": str(paths[n])} for n in names]}
    if method == "ties":
        cfg["parameters"] = {"density": 0.5}
    if base:
        cfg["base_model"] = str(paths["base"])
    return write_config(tmp / f"{'-'.join(names)}-{method}-{base}.yaml", cfg)


def test_constructed_task_vectors_cli(zoo, tmp_path):
    tmp, paths, delta = zoo
    cfg = _cfg(tmp, paths, ["a", "b", "c"])
    out_json, plots = tmp_path / "r.json", tmp_path / "plots"
    r = run_cli("diagnose", cfg, "--json", out_json, "--plot", plots, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "recommendation:" in r.stdout and "overall" in r.stdout and "layer 1" in r.stdout
    assert "warning" not in r.stderr
    rep = json.loads(out_json.read_text())

    assert [g["group"] for g in rep["groups"]] == [f"layer {i}" for i in range(LAYERS)] + ["embeddings/head"]
    over = rep["overall"]
    # identical deltas: cosine 1; a delta and its negation: cosine -1; mean off-diagonal (1 - 1 - 1) / 3
    assert over["pair_cosine"]["a | b"] == pytest.approx(1.0, abs=1e-5)
    assert over["pair_cosine"]["a | c"] == pytest.approx(-1.0, abs=1e-5)
    assert over["pair_cosine"]["b | c"] == pytest.approx(-1.0, abs=1e-5)
    assert over["cosine"] == pytest.approx(-1 / 3, abs=1e-5)
    # a and c disagree on the sign of every moved coordinate; chance for 3 tasks is 1 - 2^-2
    assert over["sign_conflict"] == pytest.approx(1.0)
    assert over["sign_conflict_chance"] == pytest.approx(0.75)
    # same (or negated) rank-2 matrices span the same singular subspaces
    for key in ("a | b", "a | c", "b | c"):
        assert over["pair_overlap"][key] == pytest.approx(1.0, abs=1e-6)
    # rank 2 with k >= 2 everywhere: all the energy in the top k
    assert over["topk_energy"] == pytest.approx(1.0, abs=1e-6)

    # per 2-D weight, the figures agree with the pure functions on the hand-made delta
    names = {t["name"] for t in rep["tensors"]}
    assert "lm_head.weight" in names and "model.layers.0.self_attn.k_proj.weight" in names
    params_2d, weighted = 0, 0.0
    for t in rep["tensors"]:
        d = delta[t["name"]].double()
        m, n = d.shape
        k = max(1, min(m, n) // 3)
        assert t["exact_svd"] and t["k"] == k and t["shape"] == [m, n]
        er = effective_rank(d) / min(m, n)
        assert t["effective_rank_ratio"] == pytest.approx(er, rel=1e-4)
        assert t["topk_energy"] == pytest.approx(topk_energy(d, k), abs=1e-6)
        assert t["cosine"] == pytest.approx(-1 / 3, abs=1e-5)
        params_2d += m * n
        weighted += m * n * er
    # overall: the parameter-weighted mean over the 2-D weights
    assert over["params_2d"] == params_2d
    assert over["effective_rank_ratio"] == pytest.approx(weighted / params_2d, rel=1e-4)

    # per model: a fine-tune (cosine ~1), with the task-vector norm we put in
    # (over the weight matrices: 1-D norm gains are left out of the fine-tune check)
    base = build("llama", seed=0, num_hidden_layers=LAYERS)
    b_sq = sum(float(p.detach().double().pow(2).sum()) for p in base.parameters() if p.dim() == 2)
    d_sq = sum(float(d.double().pow(2).sum()) for d in delta.values() if d.dim() == 2)
    for m in ("a", "b", "c"):
        fig = rep["per_model"][m]
        assert fig["looks_like_finetune"] and fig["weight_cosine"] > 0.99
        assert fig["task_norm_ratio"] == pytest.approx((d_sq / b_sq) ** 0.5, rel=1e-3)
    assert rep["warnings"] == []
    assert rep["recommendation"]["method"] in {"linear", "tsv", "wudi", "task_arithmetic"}
    assert rep["recommendation"]["reason"]

    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["cosine.png", "finetune_check.png", "rank_energy.png", "subspace_overlap.png", "summary.png"]
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_identical_deltas_in_process(zoo):
    tmp, paths, _ = zoo
    rep = diagnose_config(_cfg(tmp, paths, ["a", "b"]), top_k=2, device="cpu")
    over = rep["overall"]
    assert over["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert over["sign_conflict"] == 0.0 and over["sign_conflict_chance"] == pytest.approx(0.5)
    assert over["subspace_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert rep["recommendation"]["method"] == "linear"  # nearly parallel task vectors
    assert all(t["k"] == 2 for t in rep["tensors"])
    table = render_table(rep)
    assert "recommendation: linear" in table and "overall" in table


def test_randomized_svd_path(zoo):
    """Above the exact-SVD size the spectrum comes from torch.svd_lowrank; a rank-2 delta is caught whole."""
    tmp, paths, delta = zoo
    cfg = _cfg(tmp, paths, ["a", "c"])
    exact = diagnose_config(cfg, top_k=4, device="cpu")
    approx = diagnose_config(cfg, top_k=4, device="cpu", svd_exact_max_dim=8)
    assert not any(t["exact_svd"] for t in approx["tensors"])
    assert any("randomized SVD" in n for n in approx["notes"])
    for key in ("effective_rank_ratio", "topk_energy", "subspace_overlap"):
        assert approx["overall"][key] == pytest.approx(exact["overall"][key], abs=1e-3)
    assert approx["overall"]["sign_conflict"] == 1.0


def test_unrelated_model_warns(zoo, tmp_path, capsys):
    tmp, paths, _ = zoo
    cfg = _cfg(tmp, paths, ["f0", "f1", "u"])
    out_json = tmp_path / "r.json"
    assert main(["diagnose", str(cfg), "--json", str(out_json), "--device", "cpu"]) == 0  # in-process: fast
    r = capsys.readouterr()
    rep = json.loads(out_json.read_text())
    f0, u = rep["per_model"]["f0"], rep["per_model"]["u"]
    assert f0["looks_like_finetune"] and f0["weight_cosine"] > 0.98 and f0["task_norm_ratio"] < 0.2
    assert rep["per_model"]["f1"]["looks_like_finetune"]
    # independent init: weights orthogonal-ish, |u - base| ~ sqrt(2) |base|
    assert not u["looks_like_finetune"]
    assert abs(u["weight_cosine"]) < 0.2 and 1.2 < u["task_norm_ratio"] < 1.6
    assert len(rep["warnings"]) == 1
    w = rep["warnings"][0]
    assert "model u does not look like a fine-tune of base base" in w
    assert f"weight cosine {u['weight_cosine']:.2f}" in w and f"{u['task_norm_ratio']:.2f}x" in w
    assert "modelcypher: warning: model u does not look like a fine-tune" in r.err
    assert "warning: model u" in r.out  # in the table too
    # two independent dense noise task vectors: cosine ~0, sign conflicts at chance
    assert abs(rep["overall"]["pair_cosine"]["f0 | f1"]) < 0.1


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_no_base_model_is_a_user_error(zoo, capsys, method):
    tmp, paths, _ = zoo
    assert main(["diagnose", str(_cfg(tmp, paths, ["a", "b"], method=method, base=False))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcypher: error:"), lines
    assert "base_model" in lines[0] and "task vectors" in lines[0]
