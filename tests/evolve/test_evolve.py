"""The evolutionary search: candidates merged in memory equal the merge of their recipe, searches on a
real local Ray, resume after a kill, a dead worker retried, bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from modelcypher.api import evolve, merge
from modelcypher.checkpoint import Checkpoint
from modelcypher.cli import main
from modelcypher.errors import UserError
from modelcypher.evolve.config import parse_search
from modelcypher.evolve.objective import Objective
from modelcypher.evolve.search import optimizer
from modelcypher.evolve.space import build_space, recipe
from modelcypher.evolve.worker import Evaluator


def write_search(root: Path, name: str, text: str) -> Path:
    (root / name).write_text(text)
    return root / name


SEARCH = """
merge_method: task_arithmetic
base_model: base
models: [ft-a, ft-b]
search:
  weight: {min: 0.0, max: 1.5}
  lambda: {min: 0.5, max: 1.5}
  layer_granularity: 2
  filters: [attn]
objective:
  - loss: heldout.txt
  - task: tasks.jsonl
    weight: 0.5
optimizer: {population: 4, generations: 2, seed: 0}
"""

SPACES = {
    "task_arithmetic": SEARCH,
    "ties": SEARCH.replace("task_arithmetic", "ties").replace("lambda: {min: 0.5, max: 1.5}",
                                                              "density: {min: 0.1, max: 0.9}"),
    "dare_ties": SEARCH.replace("task_arithmetic", "dare_ties").replace("layer_granularity: 2", "layer_granularity: 3"),
    "fisher": SEARCH.replace("task_arithmetic", "fisher")
    .replace("models: [ft-a, ft-b]", "models: [ft-a, ft-b]\nparameters: {data: heldout.txt}"),
    "slerp": SEARCH.replace("task_arithmetic", "slerp").replace("models: [ft-a, ft-b]", "models: [ft-a]")
    .replace("weight: {min: 0.0, max: 1.5}", "t: {min: 0.0, max: 1.0}").replace("  lambda: {min: 0.5, max: 1.5}\n", ""),
}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names}


@pytest.mark.parametrize("method", sorted(SPACES))
def test_a_candidate_in_memory_equals_the_merge_of_its_recipe(zoo, tmp_path, method):
    """Same tensors, bit for bit: the recipe (per-layer lists under filters) plans to the values the
    candidate used, and the engine computes them the same way in memory and on disk (Fisher with its
    data statistics, computed once for the search)."""
    search = write_search(zoo, f"s-{method}.yaml", SPACES[method])
    cfg = parse_search(search)
    ev = Evaluator(cfg, zoo, "cpu", stats_at=tmp_path / "candidate")
    values = ev.space.values(np.random.default_rng(1).random(len(ev.space.genes)))
    assert len(set(values)) == len(values)  # every gene its own value: a mix-up would show
    rec = recipe(ev.space, cfg, values)
    (zoo / f"r-{method}.yaml").write_text(yaml.safe_dump(rec))
    merge(zoo / f"r-{method}.yaml", tmp_path / "merged")
    on_disk, in_memory = _tensors(tmp_path / "merged"), ev.state(values)
    assert on_disk.keys() == in_memory.keys()
    for n in on_disk:
        assert torch.equal(on_disk[n], in_memory[n]), n


def test_space_counts_genes_per_model_filter_and_group(zoo):
    cfg = parse_search(write_search(zoo, "s-count.yaml", SEARCH))
    space, _ = build_space(cfg, zoo)
    # weight: 2 models x (attn, rest) x 2 groups of 2 layers; lambda: (attn, rest) x 2 groups
    assert len(space.genes) == 2 * 2 * 2 + 2 * 2
    assert "weight (model ft-b, filter attn, layers 2-3)" in space.labels()
    assert "lambda (other tensors, layers 0-1)" in space.labels()


@pytest.fixture(scope="module")
def searched(zoo, local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "search"
    lines = []
    report = evolve(write_search(zoo, "s-main.yaml", SEARCH), out, workers=2, progress=lines.append)
    return out, report, lines


def test_search_writes_state_report_plot_and_best_recipe(searched):
    out, report, lines = searched
    assert {p.name for p in out.iterdir()} == {"state.json", "report.json", "fitness.png", "best.yaml"}
    assert [g["generation"] for g in report["generations"]] == [0, 1]
    state = json.loads((out / "state.json").read_text())
    fits = [c["fitness"] for g in state["generations"] for c in g["candidates"]]
    assert len(fits) == 8 and report["best_fitness"] == max(fits)
    assert report["generations"][1]["best_so_far"] == max(fits)
    assert lines[0].startswith("generation 1/2: best ") and lines[1].startswith("generation 2/2: best ")
    assert (out / "fitness.png").read_bytes()[:4] == b"\x89PNG"


def test_best_recipe_merged_by_the_cli_scores_the_best_fitness(searched, zoo, tmp_path):
    """``modelcypher merge best.yaml`` as it is: the model it writes, loaded by transformers and scored by
    the same objective, has the recorded best fitness exactly."""
    out, report, _ = searched
    assert main(["merge", str(out / "best.yaml"), "-o", str(tmp_path / "best"), "--device", "cpu"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best").eval()
    cfg = parse_search(zoo / "s-main.yaml")
    terms = Objective(cfg.objective, zoo, zoo / "base", Checkpoint(zoo / "base").config).score(model)
    assert terms == report["best_terms"]
    assert terms[0] + 0.5 * terms[1] == report["best_fitness"]


def test_resume_of_a_finished_search_changes_nothing(searched):
    out, report, _ = searched
    assert evolve(Path(json.loads((out / "state.json").read_text())["config_dir"]) / "s-main.yaml", out,
                  resume=True) == report


def test_resume_refuses_another_search_naming_the_difference(searched, zoo):
    out, _, _ = searched
    other = write_search(zoo, "s-other.yaml", SEARCH.replace("seed: 0", "seed: 1"))
    with pytest.raises(UserError, match=r"holds another search \(search.optimizer.seed: 0 there, 1 here\)"):
        evolve(other, out, resume=True)
    with pytest.raises(UserError, match="pass --resume to continue it"):
        evolve(other, out)


def test_separable_cma_searches_and_resumes_to_the_uninterrupted_result(zoo, local_ray, tmp_path):
    """``optimizer.method: sep_cma``: a search of one generation continued with ``--resume`` to two replays
    the first and reaches what a search of two generations reaches, candidate for candidate."""
    sep = SEARCH.replace("seed: 0}", "seed: 0, method: sep_cma}")
    whole = evolve(write_search(zoo, "s-sep.yaml", sep), tmp_path / "whole", workers=2)
    evolve(write_search(zoo, "s-sep.yaml", sep.replace("generations: 2", "generations: 1")), tmp_path / "cut")
    resumed = evolve(write_search(zoo, "s-sep.yaml", sep), tmp_path / "cut", resume=True)
    points = [[c["point"] for g in json.loads((tmp_path / d / "state.json").read_text())["generations"]
               for c in g["candidates"]] for d in ("whole", "cut")]
    assert points[0] == points[1] and len(points[0]) == 8
    plain = json.loads((tmp_path / "whole" / "state.json").read_text())
    assert resumed["best_fitness"] == whole["best_fitness"] and resumed["best_values"] == whole["best_values"]
    assert plain["identity"]["search"]["optimizer"]["method"] == "sep_cma"
    cfg = parse_search(zoo / "s-sep.yaml")
    assert type(optimizer(build_space(cfg, zoo)[0], cfg)).__name__ == "SepCMA"


def test_a_search_killed_after_a_generation_resumes_to_the_uninterrupted_result(zoo, local_ray, tmp_path,
                                                                                 killed_search):
    """A real run (its own process and embedded Ray) killed with SIGKILL once generation 1 is recorded,
    then resumed, reaches the best fitness and values of a run never interrupted, exactly."""
    search = write_search(zoo, "s-kill.yaml", SEARCH.replace("generations: 2", "generations: 3"))
    whole = evolve(search, tmp_path / "whole")
    killed_search(search, tmp_path / "cut", after="generation 1/3")
    cut = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert 1 <= len(cut["generations"]) < 3
    resumed = evolve(search, tmp_path / "cut", resume=True)
    assert resumed["best_fitness"] == whole["best_fitness"]
    assert resumed["best_values"] == whole["best_values"]
    assert resumed["generations"][-1]["best_so_far"] == whole["generations"][-1]["best_so_far"]
    # the number of generations is a budget, not the search: a finished search runs on when given more
    longer = evolve(write_search(zoo, "s-kill.yaml", SEARCH.replace("generations: 2", "generations: 4")),
                    tmp_path / "cut", resume=True)
    assert longer["generations"][:3] == resumed["generations"] and len(longer["generations"]) == 4


DIES_ONCE = '''
import os
from pathlib import Path

def score(model, tokenizer):
    mark = Path(__file__).with_name("died")
    if not mark.exists():
        mark.write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-evaluation
    return float(model.lm_head.weight.sum())
'''

FAILS_EVERY_OTHER = '''
import fcntl
from pathlib import Path

def score(model, tokenizer):
    path = Path(__file__).with_name("calls")
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("x")
        f.seek(0)
        n = len(f.read())
    if n % 2 == 0:
        raise RuntimeError("every other call fails")
    return float(model.lm_head.weight.sum())
'''


def test_a_worker_that_dies_mid_evaluation_is_retried_on_another(zoo, local_ray, tmp_path):
    (tmp_path / "dies_once.py").write_text(DIES_ONCE)
    (tmp_path / "base").symlink_to(zoo / "base")
    for m in ("ft-a", "ft-b"):
        (tmp_path / m).symlink_to(zoo / m)
    search = write_search(tmp_path, "s.yaml", SEARCH.replace(
        "  - loss: heldout.txt\n  - task: tasks.jsonl\n    weight: 0.5\n", "  python: dies_once:score\n")
        .replace("generations: 2", "generations: 1"))
    report = evolve(search, tmp_path / "out", workers=2)
    assert (tmp_path / "died").is_file()
    assert report["generations"][0]["worker_restarts"] == 1
    assert report["generations"][0]["failed"] == 0 and report["evaluations"] == 4


def test_an_objective_that_raises_fails_its_candidate_and_the_search_goes_on(zoo, local_ray, tmp_path):
    (tmp_path / "flaky.py").write_text(FAILS_EVERY_OTHER)
    for m in ("base", "ft-a", "ft-b"):
        (tmp_path / m).symlink_to(zoo / m)
    search = write_search(tmp_path, "s.yaml", SEARCH.replace(
        "  - loss: heldout.txt\n  - task: tasks.jsonl\n    weight: 0.5\n", "  python: flaky:score\n"))
    lines = []
    report = evolve(search, tmp_path / "out", progress=lines.append)
    assert sum(g["failed"] for g in report["generations"]) == 4 and report["evaluations"] == 8
    assert report["best_fitness"] is not None
    assert "failed (first: RuntimeError: every other call fails" in lines[0]


def test_an_objective_failing_for_every_candidate_stops_with_its_error(zoo, local_ray, tmp_path):
    search = write_search(zoo, "s-noimport.yaml", SEARCH.replace(
        "  - loss: heldout.txt\n  - task: tasks.jsonl\n    weight: 0.5\n", "  python: no_such_module:score\n"))
    with pytest.raises(UserError, match=r"every candidate of generation 0 failed; the first: python objective "
                                        r"no_such_module:score: cannot import \(ModuleNotFoundError"):
        evolve(search, tmp_path / "out")


LAMBDA = "lambda: {min: 0.5, max: 1.5}"
BAD = [
    ((("  weight: {min: 0.0, max: 1.5}\n  " + LAMBDA + "\n", ""),), "search: no parameter to search"),
    ((("task_arithmetic", "ties"), (LAMBDA, "density: {min: 0.0, max: 1.5}")),
     r"search.density: bounds \[0, 1.5\] leave its domain \[0, 1\]"),
    (((LAMBDA, "lambda: {min: 2, max: 1}"),), "search.lambda: bounds need finite min < max"),
    (((LAMBDA, "normalize: {min: 0, max: 1}"),), "search.normalize: not a real-valued parameter"),
    (((LAMBDA, "gamma: {min: 0, max: 1}"),), "merge_method task_arithmetic has no parameter 'gamma'"),
    ((("filters: [attn]", "filters: [attn, nowhere]"),), "filter 'nowhere' matches no tensor of the models"),
    ((("seed: 0}", "seed: 0, popsize: 3}"),), "optimizer.popsize: unknown key"),
    ((("seed: 0}", "seed: 0, method: bfgs}"),), "optimizer.method: Input should be 'cma' or 'sep_cma'"),
    ((("loss: heldout.txt", "loss: missing.txt"),), "objective text 'missing.txt': not found"),
    ((("models: [ft-a, ft-b]", "models: [ft-a, ft-b]\nparameters: {lambda: 1.0}"),), "search.lambda: also fixed"),
    ((("merge_method: task_arithmetic", "merge_method: distill"),), "distill fits its coefficients to data"),
]


@pytest.mark.parametrize("changes, message", BAD)
def test_bad_search_files_fail_in_one_line(zoo, tmp_path, changes, message):
    text = SEARCH
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(UserError, match=message) as e:
        evolve(write_search(zoo, "s-bad.yaml", text), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_ray_address_that_does_not_answer_is_named(zoo, tmp_path, capsys):
    search = write_search(zoo, "s-addr.yaml", SEARCH)
    assert main(["evolve", str(search), "-o", str(tmp_path / "out"), "--ray-address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelcypher: error: --ray-address 127.0.0.1:9: no Ray cluster answers there")
    assert err.count("\n") == 1


def test_a_value_per_layer_is_read_exactly_at_any_depth():
    """A recipe's per-layer lists must give each layer its own value bit for bit; interpolating at
    ``layer / (depth - 1) * (depth - 1)`` does not (1 / 49 * 49 < 1 in floating point)."""
    from modelcypher.merging.plan import _value_at

    for depth in (2, 3, 7, 50, 97):
        values = [float(v) for v in np.random.default_rng(depth).random(depth)]
        assert [_value_at(values, layer, depth) for layer in range(depth)] == values
