"""Pipelines (several YAML documents, later stages naming earlier ones): the same tensors as the stages
merged one by one and as mergekit-multi's; unchanged stages reused, changed ones and their dependants
merged again; a pipeline stopped part way leaves no output; mistakes in the file are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from checkpoints import build, finetune, save, state
from cli_util import run_cli
from modelcypher import api
from modelcypher.errors import UserError
from modelcypher.merging.pipeline import RECORD

multimerge = pytest.importorskip("mergekit.scripts.multimerge")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A folder holding base, a, b, c: tiny Llama models, the last three fine-tunes of the first."""
    root = tmp_path_factory.mktemp("pipeline")
    base = build("llama", num_hidden_layers=3)
    save(base, root / "base")
    for seed, name in enumerate("abc", 1):
        save(finetune(base, seed, 0.02), root / name)
    return root


# Three stages: two merges of fine-tunes, a TIES merge of their results over the base, and the output
# (unnamed, as mergekit-multi wants it) interpolating that towards model a.
STAGES = [
    {"name": "ab", "merge_method": "linear", "dtype": "float32",
     "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]},
    {"name": "bc", "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
     "models": [{"model": "b", "parameters": {"weight": 0.6}}, {"model": "c", "parameters": {"weight": 0.4}}]},
    {"name": "mix", "merge_method": "ties", "base_model": "base", "dtype": "float32",
     "models": [{"model": "ab", "parameters": {"weight": 1.0, "density": 0.6}},
                {"model": "bc", "parameters": {"weight": 0.5, "density": 0.6}}]},
    {"merge_method": "slerp", "base_model": "a", "dtype": "float32", "models": [{"model": "mix"}],
     "parameters": {"t": [0.2, 0.8], "DOT_THRESHOLD": 0.9995}},
]


MODELS = ("base", "a", "b", "c")


def located(docs: list[dict], models: Path) -> list[dict]:
    """``docs`` with the fixture's models named by their paths (stage names left as they are)."""
    def at(ref: str) -> str:
        return str(models / ref) if ref in MODELS else ref

    out = []
    for doc in docs:
        doc = {**doc, "models": [{**e, "model": at(e["model"])} for e in doc["models"]]}
        if "base_model" in doc:
            doc["base_model"] = at(doc["base_model"])
        out.append(doc)
    return out


def write_pipeline(path: Path, docs: list[dict], models: Path) -> Path:
    path.write_text(yaml.safe_dump_all(located(docs, models), sort_keys=False))
    return path


def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file of a folder as (inode, mtime_ns): a file written again gets new ones."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_pipeline_gives_the_tensors_of_its_stages_merged_by_hand(models, tmp_path):
    out = tmp_path / "out"
    plan = api.merge(write_pipeline(tmp_path / "p.yaml", STAGES, models), out, device="cpu")
    assert plan.method.name == "slerp"
    made: dict[str, str] = {}
    for doc in located(STAGES, models):  # each stage by itself, its stage inputs named by their folders
        doc = {**doc, "models": [{**e, "model": made.get(e["model"], e["model"])} for e in doc["models"]]}
        name = doc.pop("name", "final")
        api.merge(doc, tmp_path / "hand" / name, device="cpu")
        made[name] = str(tmp_path / "hand" / name)
    assert same(state(out), state(tmp_path / "hand" / "final"))
    for name in ("ab", "bc", "mix"):
        assert same(state(tmp_path / "out.pipeline" / name), state(tmp_path / "hand" / name))
    assert not same(state(out), state(tmp_path / "hand" / "mix"))  # the last stage does change the model


def test_a_pipeline_matches_mergekit_multi(models, tmp_path):
    config = write_pipeline(tmp_path / "p.yaml", STAGES, models)
    api.merge(config, tmp_path / "ours", device="cpu", intermediate_dir=tmp_path / "ours-stages")
    multimerge.main.main([str(config), "--intermediate-dir", str(tmp_path / "theirs-stages"), "--out-path",
                          str(tmp_path / "theirs"), "--no-copy-tokenizer", "--no-write-model-card", "--random-seed",
                          "0", "--quiet"], standalone_mode=False)
    pairs = [(tmp_path / "ours", tmp_path / "theirs")]
    pairs += [(tmp_path / "ours-stages" / n, tmp_path / "theirs-stages" / n) for n in ("ab", "bc", "mix")]
    for ours, theirs in pairs:
        a, b = state(ours), state(theirs)
        assert sorted(a) == sorted(b)
        for name, t in b.items():
            torch.testing.assert_close(a[name], t, rtol=1e-5, atol=2e-6 * float(t.abs().max()),
                                       msg=lambda m, n=name, o=ours.name: f"{o}/{n}: {m}")


def test_unchanged_stages_are_reused_and_a_changed_one_is_merged_again_with_its_dependants(models, tmp_path,
                                                                                         capsys):
    out, stages = tmp_path / "out", tmp_path / "out.pipeline"
    config = tmp_path / "p.yaml"

    def run(docs: list[dict], **kw) -> tuple[dict, list[str]]:
        capsys.readouterr()
        api.merge(write_pipeline(config, docs, models), out, device="cpu", **kw)
        return {n: files(stages / n) for n in ("ab", "bc", "mix")}, capsys.readouterr().out.splitlines()

    first, lines = run(STAGES)
    assert sum("merging into" in ln for ln in lines) == 4
    final = files(out)
    again, lines = run(STAGES, overwrite=True)
    assert again == first  # every stage's files untouched
    assert [ln.split(":")[0] for ln in lines if "reusing" in ln] == ["stage 'ab'", "stage 'bc'", "stage 'mix'"]
    assert files(out) != final  # the output is merged each time
    before = state(out)
    changed = [{**STAGES[0], "models": [{"model": "a", "parameters": {"weight": 0.2}},
                                       {"model": "b", "parameters": {"weight": 0.8}}]}, *STAGES[1:]]
    third, lines = run(changed, overwrite=True)
    assert third["bc"] == first["bc"]
    assert third["ab"]["model.safetensors"] != first["ab"]["model.safetensors"]
    assert third["mix"]["model.safetensors"] != first["mix"]["model.safetensors"]  # it reads ab
    assert [ln.split(":")[0] for ln in lines if "reusing" in ln] == ["stage 'bc'"]
    assert not same(state(out), before)
    (stages / "bc" / "model.safetensors").unlink()  # a stage folder damaged by hand is merged again
    fourth, lines = run(changed, overwrite=True)
    assert [ln.split(":")[0] for ln in lines if "reusing" in ln] == ["stage 'ab'"]
    assert fourth["ab"] == third["ab"] and fourth["mix"] != third["mix"]


def test_the_command_line_runs_a_pipeline_and_a_setting_that_matters_merges_again(models, tmp_path):
    config = write_pipeline(tmp_path / "p.yaml", STAGES, models)
    r = run_cli("merge", config, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    made = files(tmp_path / "out.pipeline" / "mix")
    r = run_cli("merge", config, tmp_path / "out")  # the output exists: refused before any stage runs
    assert r.returncode == 2 and "already exists" in r.stderr and "reusing" not in r.stdout
    api.merge(config, tmp_path / "out", device="cpu", overwrite=True)
    assert files(tmp_path / "out.pipeline" / "mix") == made
    api.merge(config, tmp_path / "out", device="cpu", overwrite=True, random_seed=1)  # a setting that matters
    assert files(tmp_path / "out.pipeline" / "mix") != made
    assert (tmp_path / "out.pipeline" / "mix" / RECORD).is_file()


def test_a_changed_input_model_merges_its_stages_again(tmp_path):
    base = build("llama", num_hidden_layers=2)
    for name, seed in [("base", 0), ("a", 1), ("b", 2)]:
        save(finetune(base, seed, 0.02) if seed else base, tmp_path / name)
    one = {"weight": 1.0}
    docs = [{"name": "s1", "merge_method": "linear", "models": [{"model": "a", "parameters": one},
                                                                 {"model": "b", "parameters": one}]},
            {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "s1", "parameters": one}]}]
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    api.merge(config, tmp_path / "out", device="cpu")
    first = state(tmp_path / "out.pipeline" / "s1")
    save(finetune(base, 5, 0.02), tmp_path / "b")  # b is a new model now
    api.merge(config, tmp_path / "out", device="cpu", overwrite=True)
    fresh = {n: (state(tmp_path / "a")[n] + state(tmp_path / "b")[n]) / 2 for n in first}
    merged = state(tmp_path / "out.pipeline" / "s1")
    assert not same(merged, first)
    for n in fresh:
        torch.testing.assert_close(merged[n], fresh[n])


def test_a_pipeline_stopped_part_way_leaves_no_output_and_keeps_its_finished_stages(models, tmp_path):
    docs = [STAGES[0], {"merge_method": "linear", "models": [{"model": "ab", "parameters": {"weight": float("nan")}},
                                                              {"model": "c", "parameters": {"weight": 1.0}}]}]
    config = write_pipeline(tmp_path / "p.yaml", docs, models)
    with pytest.raises(UserError, match="NaN|Inf|finite"):
        api.merge(config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "modelcypher" in p.name] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pipeline", "p.yaml"]
    assert sorted(p.name for p in (tmp_path / "out.pipeline").iterdir() if not p.name.startswith(".")) == ["ab"]
    assert (tmp_path / "out.pipeline" / "ab" / RECORD).is_file()


def test_a_dry_run_plans_the_stages_it_can_and_writes_nothing(models, tmp_path):
    config = write_pipeline(tmp_path / "p.yaml", STAGES, models)
    with pytest.raises(UserError, match="a pipeline: .* dry_run=True"):
        api.plan_merge(config)
    plan = api.merge(config, tmp_path / "out", device="cpu", dry_run=True)
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]
    assert any("stage 'mix' not planned" in n for n in plan.notes)
    api.merge(config, tmp_path / "out", device="cpu")
    plan = api.merge(config, tmp_path / "out2", device="cpu", dry_run=True, intermediate_dir=tmp_path / "out.pipeline")
    assert plan.method.name == "slerp" and not [n for n in plan.notes if "not planned" in n]


def test_all_stages_named_the_last_is_the_output(models, tmp_path):
    docs = [STAGES[0], {**STAGES[1], "name": "final", "models": [{"model": "ab", "parameters": {"weight": 0.5}},
                                                                  {"model": "c", "parameters": {"weight": 0.5}}]}]
    api.merge(write_pipeline(tmp_path / "p.yaml", docs, models), tmp_path / "out", device="cpu")
    assert sorted(p.name for p in (tmp_path / "out.pipeline").iterdir()) == ["ab"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_single_document_is_a_plain_merge(models, tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({**located(STAGES, models)[0], "name": "solo"}))
    api.merge(config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out.pipeline").exists()
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == config.read_text()


@pytest.mark.parametrize("docs,match", [
    ([STAGES[0], {**STAGES[1], "name": "ab"}], "document 2: name 'ab' is taken by document 1"),
    ([STAGES[0], {**STAGES[3], "models": [{"model": "abx"}]}], "the unnamed stage (document 2): model 'abx'"),
    ([{**STAGES[0], "models": [{"model": "last"}]}, {**STAGES[1], "name": "mid", "models": [{"model": "ab"}]},
      {**STAGES[0], "name": "last", "models": [{"model": "mid"}]}, {**STAGES[3], "models": [{"model": "last"}]}],
     "the stages read each other in a cycle: ab -> last -> mid -> ab"),
    ([{**STAGES[0], "models": [{"model": "ab"}]}, {**STAGES[3], "models": [{"model": "ab"}]}], "cycle: ab -> ab"),
    ([{k: v for k, v in STAGES[0].items() if k != "name"}, STAGES[3]], "document 2: no name, like document 1"),
    ([{**STAGES[0], "name": "../up"}, STAGES[3]], "name '../up' names the stage's folder"),
    ([STAGES[0], {**STAGES[3], "colour": 1}], "document 2: colour: unknown key"),
    ([STAGES[0], {**STAGES[0], "name": "reads", "models": [{"model": "fin"}]},
      {**STAGES[1], "name": "fin", "models": [{"model": "ab"}]}],
     "stage 'fin' is the pipeline's output (no document is unnamed, and it is the last) but stage 'reads' reads it"),
])
def test_pipeline_mistakes_are_one_line_naming_the_file(models, tmp_path, docs, match):
    config = write_pipeline(tmp_path / "p.yaml", docs, models)
    r = run_cli("merge", config, tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"modelcypher: error: {config}"), r.stderr
    assert match in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pipeline").exists()
