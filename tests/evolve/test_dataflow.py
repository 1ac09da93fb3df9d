"""The data-flow space: genomes decoded by hand, the scalings' fold checked through transformers, the
in-memory candidate equal to the merge of its recipe, a search on a real local Ray (a pool merge among
the models) whose best.yaml merges to the candidate, resume, bad input in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from checkpoints import build, family_set, save
from modelcypher.api import evolve, merge
from modelcypher.checkpoint import Checkpoint
from modelcypher.cli import main
from modelcypher.errors import UserError
from modelcypher.evolve.candidate import DataflowCandidates
from modelcypher.evolve.config import parse_search
from modelcypher.evolve.dataflow import build_dataflow, fold, write_pool_model
from modelcypher.evolve.objective import Objective
from modelcypher.evolve.search import optimizer
from modelcypher.evolve.worker import Evaluator
from modelcypher.hf import build_model

CPU = torch.device("cpu")

SEARCH = """
dataflow:
  models: [ft-a, ft-b]
  repeats: 2
objective: {loss: heldout.txt}
optimizer: {population: 4, generations: 2, seed: 0}
"""

POOLED = """
dataflow:
  models:
    - ft-a
    - ft-b
    - name: mix
      merge: {merge_method: linear, models: [{model: ft-a, parameters: {weight: 0.3}},
                                             {model: ft-b, parameters: {weight: 0.7}}]}
  scale: {min: 0.5, max: 1.5}
objective:
  - loss: heldout.txt
  - task: tasks.jsonl
    weight: 0.5
optimizer: {population: 4, generations: 2, seed: 0}
"""


def write(root: Path, name: str, text: str) -> Path:
    (root / name).write_text(text)
    return root / name


def space_of(root: Path, text: str, pool_at: Path | None = None):
    return build_dataflow(parse_search(write(root, "df.yaml", text)), root, pool_at or root / "pool")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names}


def test_fold_is_the_inverse_running_product():
    assert fold([2.0, 0.5, 4.0]) == [0.5, 1.0, 0.25]
    with pytest.raises(ValueError):
        fold([1.0, 0.0])


def test_slots_labels_and_the_start(zoo):
    """T = r x (layers of all models), model after model; the start is ft-a's first repetition."""
    space = space_of(zoo, SEARCH)
    assert [(s.model, s.layer, s.copy) for s in space.slots[:5]] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0),
                                                                     (1, 0, 0)]
    assert len(space.slots) == 2 * (4 + 4)
    labels = space.labels()
    assert labels[0] == "in: ft-a layer 0" and labels[9] == "in: ft-a layer 1 (copy 1)"
    assert labels[16] == "scale: ft-a layer 0" and len(labels) == 32
    # the start: ft-a's layers on, all else off, every scaling 1 (u = (1 - 0.5) / (2 - 0.5))
    assert space.mean().tolist() == [1.0] * 4 + [0.0] * 12 + [1 / 3] * 16


def test_a_genome_decodes_to_its_layers_in_pool_order_off_slots_dropped(zoo):
    space = space_of(zoo, SEARCH)
    on = {1: 2.0, 4: 0.5, 7: 1.0, 8: 4.0}  # slot -> scaling: ft-a 1, ft-b 0, ft-b 3, ft-a 0 (copy 1)
    values = [1.0 if t in on else 0.0 for t in range(16)] + [on.get(t, 9.0) for t in range(16)]
    assert space.describe(values) == [{"model": "ft-a", "layer": 1, "scale": 2.0},
                                      {"model": "ft-b", "layer": 0, "scale": 0.5},
                                      {"model": "ft-b", "layer": 3, "scale": 1.0},
                                      {"model": "ft-a", "layer": 0, "scale": 4.0}]
    rec = space.recipe(values)
    a, b = str((zoo / "ft-a").resolve()), str((zoo / "ft-b").resolve())
    writers = ["attn.c_proj.", "mlp.c_proj."]
    assert rec == {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {
            "scale": [{"filter": w, "value": 0.5} for w in writers]}}]},
        {"sources": [{"model": b, "layer_range": [0, 1]}]},  # 1 / (2 x 0.5): nothing to fold
        {"sources": [{"model": b, "layer_range": [3, 4]}]},
        {"sources": [{"model": a, "layer_range": [0, 1], "parameters": {
            "scale": [{"filter": w, "value": 0.25} for w in writers]}}]}]}
    capped = space_of(zoo, SEARCH.replace("repeats: 2", "repeats: 2\n  max_layers: 2"))
    assert [(d["model"], d["layer"]) for d in capped.describe(values)] == [("ft-a", 1), ("ft-b", 0)]
    with pytest.raises(UserError, match="the candidate includes no layer"):
        space.recipe([0.0] * 16 + [1.0] * 16)


def test_the_start_point_is_the_start_model_itself(zoo):
    """At the optimizer's mean the candidate is ft-b's own layers, unscaled: ft-b's tensors exactly."""
    space = space_of(zoo, SEARCH.replace("repeats: 2", "repeats: 2\n  start: ft-b"))
    x = space.mean()
    x[len(space.slots):] = (1.0 - 0.5) / 1.5
    _, state = DataflowCandidates(space, CPU).merged(space.values(x))
    want = tensors(zoo / "ft-b")
    assert state.keys() == want.keys()
    assert all(torch.equal(state[n], want[n]) for n in want)


def test_cmawm_asks_indicators_in_zero_one(zoo):
    cfg = parse_search(write(zoo, "df.yaml", SEARCH))
    space = build_dataflow(cfg, zoo, zoo / "pool")
    opt = optimizer(space, cfg)
    x_eval, x_tell = opt.ask()
    t = len(space.slots)
    assert set(x_eval[:t].tolist()) <= {0.0, 1.0} and not np.array_equal(x_eval[:t], x_tell[:t])
    assert np.array_equal(x_eval[t:], x_tell[t:]) and ((x_eval[t:] >= 0) & (x_eval[t:] <= 1)).all()


def mixed(t: int) -> list[float]:
    """A genome of ``t`` slots: two in three included, scalings on both sides of 1."""
    return [float(i % 3 != 1) for i in range(t)] + [(0.55, 1.9, 0.8, 1.4, 0.6)[i % 5] for i in range(t)]


def _norms(module):
    return [m for m in module.modules() if hasattr(m, "variance_epsilon") or isinstance(m, torch.nn.LayerNorm)]


def _times_eps(norm, factor: float) -> None:
    if hasattr(norm, "variance_epsilon"):
        norm.variance_epsilon *= factor
    else:
        norm.eps *= factor


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_folded_model_is_the_scaled_forward(tmp_path, family):
    """The folded candidate (scalings in its residual writers), loaded by transformers, gives the logits
    of the unscaled stack run with each layer's input multiplied by its scaling, when layer k's norms
    take eps P_k^2 (the fold's exact statement); with the models' own eps the gap is small, while the
    scalings themselves move the logits by far more."""
    paths = family_set(tmp_path, family, n=1)
    space = space_of(tmp_path, SEARCH.replace("ft-a", paths[0].name).replace("ft-b", paths[1].name))
    t = len(space.slots)
    values = mixed(t)
    cands = DataflowCandidates(space, CPU)
    folded = build_model(*cands.merged(values)).eval()
    plain = build_model(*cands.merged(values[:t] + [1.0] * t)).eval()
    scales = [s for _, s in space.path(values)]
    assert len(scales) >= 3 and min(scales) < 0.9 and max(scales) > 1.2

    blocks = plain.transformer.h if family == "gpt2" else plain.model.layers
    final = plain.transformer.ln_f if family == "gpt2" else plain.model.norm

    def scaled(s):
        def hook(_, args, kwargs):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}
        return hook

    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unscaled = plain(ids).logits
        for block, s in zip(blocks, scales, strict=True):
            block.register_forward_pre_hook(scaled(s), with_kwargs=True)
        want_folded = folded(ids).logits
        own_eps = plain(ids).logits
        P = [1 / c for c in fold(scales)]
        for block, p in zip(blocks, P, strict=True):
            for norm in _norms(block):
                _times_eps(norm, p * p)
        _times_eps(final, P[-1] ** 2)
        exact_eps = plain(ids).logits
    torch.testing.assert_close(want_folded, exact_eps, rtol=1e-5, atol=1e-5)
    gap = (want_folded - own_eps).abs().max()
    assert gap < 0.05 * (unscaled - own_eps).abs().max()


def test_a_folded_recipe_merges_the_same_in_mergekit(tmp_path):
    """best.yaml is a mergekit config too: mergekit 0.1.5's passthrough with ``scale`` on filters writes
    the same tensors."""
    mk_config, mk_merge = pytest.importorskip("mergekit.config"), pytest.importorskip("mergekit.merge")
    paths = family_set(tmp_path, "llama", n=1)
    space = space_of(tmp_path, SEARCH.replace("ft-a", paths[0].name).replace("ft-b", paths[1].name))
    rec = space.recipe(mixed(len(space.slots)))
    assert any("parameters" in sl["sources"][0] for sl in rec["slices"])
    merge(rec, tmp_path / "ours", device="cpu")
    options = mk_merge.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(rec), str(tmp_path / "theirs"), options)
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_a_pool_merge_is_written_as_modelcypher_merge_writes_it(zoo, tmp_path):
    """A pool entry given as a merge config file: its relative paths resolve beside the file, and the
    search's copy of it has the tensors of ``modelcypher merge`` of that file."""
    (tmp_path / "recipes").mkdir()
    for m in ("ft-a", "ft-b"):
        (tmp_path / m).symlink_to(zoo / m)
    rec = write(tmp_path / "recipes", "ta.yaml", "merge_method: task_arithmetic\nbase_model: ../ft-a\n"
                "models: [{model: ../ft-b, parameters: {weight: 0.6}}]\n")
    space = space_of(tmp_path, SEARCH.replace("[ft-a, ft-b]", "[ft-a, {merge: recipes/ta.yaml, name: ta}]"),
                     tmp_path / "out" / "pool")
    pm = space.pool[1]
    assert pm.name == "ta" and pm.layers == 4 and pm.path == (tmp_path / "out" / "pool" / "ta").resolve()
    assert space.labels()[4] == "in: ta layer 0"
    write_pool_model(pm, CPU)
    merge(rec, tmp_path / "direct", device="cpu")
    got, want = tensors(pm.path), tensors(tmp_path / "direct")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


@pytest.fixture(scope="module")
def searched(zoo, local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataflow") / "search"
    lines = []
    report = evolve(write(zoo, "df-main.yaml", POOLED), out, workers=2, progress=lines.append)
    return out, report, lines


def test_search_writes_its_outputs_and_the_pool_merge(searched, zoo, tmp_path):
    out, report, lines = searched
    assert {p.name for p in out.iterdir()} == {"state.json", "report.json", "fitness.png", "best.yaml", "pool"}
    assert lines[0].startswith("merging pool model mix") and lines[1].startswith("generation 1/2: best ")
    state = json.loads((out / "state.json").read_text())
    fits = [c["fitness"] for g in state["generations"] for c in g["candidates"]]
    assert len(fits) == 8 and report["best_fitness"] == max(fits)
    best = next(c for g in state["generations"] for c in g["candidates"] if c["fitness"] == max(fits))
    assert set(best["values"][:12]) <= {0.0, 1.0}  # 3 models x 4 layers, indicators evaluated as 0 or 1
    on = [i for i in range(12) if best["values"][i] == 1.0]
    assert report["best_layers"] == [{"model": ("ft-a", "ft-b", "mix")[i // 4], "layer": i % 4,
                                      "scale": best["values"][12 + i]} for i in on]
    assert list(report["best_values"]) == [f"in: {m} layer {i}" for m in ("ft-a", "ft-b", "mix") for i in range(4)] \
        + [f"scale: {m} layer {i}" for m in ("ft-a", "ft-b", "mix") for i in range(4)]
    mixed = merge({"merge_method": "linear", "models": [
        {"model": str(zoo / "ft-a"), "parameters": {"weight": 0.3}},
        {"model": str(zoo / "ft-b"), "parameters": {"weight": 0.7}}]}, tmp_path / "mix", device="cpu")
    assert mixed.method.name == "linear"
    got, want = tensors(out / "pool" / "mix"), tensors(tmp_path / "mix")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_best_yaml_merges_to_the_candidate_and_scores_its_fitness(searched, zoo, tmp_path):
    """``modelcypher merge best.yaml`` as it is writes the in-memory candidate's tensors bit for bit, and
    transformers' model of it scores the recorded best fitness exactly."""
    out, report, _ = searched
    assert main(["merge", str(out / "best.yaml"), "-o", str(tmp_path / "best"), "--device", "cpu"]) == 0
    rec = yaml.safe_load((out / "best.yaml").read_text())
    assert rec["merge_method"] == "passthrough" and len(rec["slices"]) == len(report["best_layers"])
    cfg = parse_search(zoo / "df-main.yaml")
    ev = Evaluator(cfg, zoo, "cpu", pool_at=out / "pool")
    in_memory, on_disk = ev.state(list(report["best_values"].values())), tensors(tmp_path / "best")
    assert in_memory.keys() == on_disk.keys()
    assert all(torch.equal(in_memory[n], on_disk[n]) for n in on_disk)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best").eval()
    terms = Objective(cfg.objective, zoo, zoo / "ft-a", Checkpoint(zoo / "ft-a").config).score(model)
    assert terms == report["best_terms"] and terms[0] + 0.5 * terms[1] == report["best_fitness"]


def test_a_search_stopped_after_a_generation_resumes_to_the_uninterrupted_result(searched, zoo, tmp_path):
    out, report, _ = searched
    first = evolve(write(zoo, "df-main.yaml", POOLED.replace("generations: 2", "generations: 1")), tmp_path / "cut",
                   workers=2)
    assert len(first["generations"]) == 1
    resumed = evolve(write(zoo, "df-main.yaml", POOLED), tmp_path / "cut", workers=2, resume=True)
    assert resumed["best_fitness"] == report["best_fitness"] and resumed["best_values"] == report["best_values"]
    a, b = (json.loads((d / "state.json").read_text()) for d in (out, tmp_path / "cut"))
    assert [[c["point"] for c in g["candidates"]] for g in a["generations"]] == \
        [[c["point"] for c in g["candidates"]] for g in b["generations"]]
    assert (tmp_path / "cut" / "best.yaml").read_text() == (out / "best.yaml").read_text()
    other = write(zoo, "df-other.yaml", POOLED.replace("weight: 0.3", "weight: 0.4"))
    with pytest.raises(UserError, match=r"holds another search \(pool_merges\[0\].recipe.models\[0\]"
                                        r".parameters.weight: 0.3 there, 0.4 here\)"):
        evolve(other, out, resume=True)


def test_a_dataflow_search_killed_mid_run_resumes_to_the_uninterrupted_result(zoo, local_ray, tmp_path,
                                                                              killed_search):
    """A real run (its own process and embedded Ray) killed with SIGKILL once generation 1 is recorded,
    then resumed, reaches the best fitness, values and recipe of a run never interrupted."""
    search = write(zoo, "df-kill.yaml", SEARCH.replace("generations: 2", "generations: 3"))
    whole = evolve(search, tmp_path / "whole", workers=2)
    killed_search(search, tmp_path / "cut", after="generation 1/3")
    cut = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert 1 <= len(cut["generations"]) < 3
    resumed = evolve(search, tmp_path / "cut", workers=2, resume=True)
    assert resumed["best_fitness"] == whole["best_fitness"] and resumed["best_values"] == whole["best_values"]
    assert (tmp_path / "cut" / "best.yaml").read_text() == (tmp_path / "whole" / "best.yaml").read_text()


BAD = [
    (("repeats: 2", "repeats: 2\n  layers: 3"), "dataflow.layers: unknown key"),
    (("repeats: 2", "repeats: 0"), "dataflow.repeats: Input should be greater than or equal to 1"),
    (("repeats: 2", "repeats: 2\n  scale: {min: 0, max: 2}"), "dataflow.scale: min 0: input scalings must be positive"),
    (("repeats: 2", "repeats: 2\n  scale: {min: 2, max: 1}"), "bounds need finite min < max"),
    (("repeats: 2", "repeats: 2\n  start: ft-c"), "dataflow: start: 'ft-c' is not one of the models"),
    (("[ft-a, ft-b]", "[ft-a, ft-a]"), "'ft-a' listed twice"),
    (("[ft-a, ft-b]", "[ft-a, nowhere]"), "model 'nowhere': no such local model directory"),
    (("[ft-a, ft-b]", "[ft-a, {merge: {merge_method: linear}, name: m}]"),
     r"dataflow.models\[1\]: give exactly one of 'models', 'slices' or 'modules'"),
    (("[ft-a, ft-b]", "[ft-a, {merge: {merge_method: linear, models: [ft-a]}, name: ../up}]"),
     r"name '../up': letters, digits"),
    (("[ft-a, ft-b]", "[ft-a, {merge: missing.yaml}]"), "merge config 'missing.yaml': not found"),
    (("dataflow:", "merge_method: linear\ndataflow:"), "merge_method: belongs to a parameter-space search"),
    (("dataflow:\n  models: [ft-a, ft-b]\n  repeats: 2\n", ""), "merge_method: missing key"),
    (("seed: 0", "seed: 0, method: sep_cma"), "optimizer.method: sep_cma searches the parameter space only"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_dataflow_search_files_fail_in_one_line(zoo, tmp_path, change, message):
    assert change[0] in SEARCH
    with pytest.raises(UserError, match=message) as e:
        evolve(write(zoo, "df-bad.yaml", SEARCH.replace(*change)), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_models_that_do_not_stack_are_refused_in_one_line(zoo, tmp_path, capsys):
    save(build("gpt2"), tmp_path / "wide")
    save(build("bert"), tmp_path / "bert")
    for m in ("ft-a", "heldout.txt"):
        (tmp_path / m).symlink_to(zoo / m)
    wide = write(tmp_path, "w.yaml", SEARCH.replace("ft-b", "wide"))
    capsys.readouterr()
    assert main(["evolve", str(wide), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"modelcypher: error: dataflow.models: tensor '\S+' is \[\d+(, \d+)*\] in wide but "
                        r"\[\d+(, \d+)*\] in ft-a; layers stack only across models of one width\n", err), err
    with pytest.raises(UserError, match="model_type 'bert': its layers' input scalings do not fold"):
        evolve(write(tmp_path, "b.yaml", SEARCH.replace("[ft-a, ft-b]", "[bert]")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
