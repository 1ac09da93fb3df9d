"""A mergekit-yaml command line runs unchanged: positional OUT, its flags, its shard sizes, its config
dumps; the output carries the config as given (mergekit_config.yml)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from checkpoints import build, family_set, save, state
from cli_util import run_cli, write_config
from modelcypher.api import merge
from modelcypher.errors import UserError


def _ties(base, a, b) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.4, "density": 0.7}}],
            "parameters": {"normalize": True}, "dtype": "float32"}


def test_mergekit_yaml_command_line_runs_unchanged(tmp_path):
    base, a, b = family_set(tmp_path, "llama", 2)
    cfg = write_config(tmp_path / "m.yaml", _ties(base, a, b))
    r = run_cli("merge", cfg, tmp_path / "out", "--out-shard-size", "30K", "--lazy-unpickle", "--copy-tokenizer",
                "--write-model-card", "--allow-crimes", "-v", "--quiet", "--random-seed", "0", "--clone-tensors",
                "--lora-merge-cache", tmp_path / "cache", "--num-threads", "1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 30K is thirty thousand bytes, as in mergekit
    assert (out / "mergekit_config.yml").read_text() == cfg.read_text()  # the config as given, byte for byte
    assert (out / "README.md").is_file() and not (tmp_path / "cache").exists()
    merge(cfg, tmp_path / "api")
    so, sa = state(out), state(tmp_path / "api")
    assert set(so) == set(sa) and all(torch.equal(so[n], sa[n]) for n in so)


@pytest.mark.parametrize(("args", "message"), [
    (["--trust-remote-code"], "--trust-remote-code: code shipped with a model is never run"),
    (["--no-safe-serialization"], "--no-safe-serialization: pickled weights are never written"),
    (["--out-shard-size", "5G"], "size '5G': expected a number with a unit"),
    ([], "no output directory: modelcypher merge CONFIG OUT (or -o OUT)"),
    (["-o", "elsewhere"], "two outputs given"),
])
def test_flags_that_cannot_mean_anything_here_are_refused_in_one_line(tmp_path, args, message):
    base, a, b = family_set(tmp_path, "llama", 2)
    cfg = write_config(tmp_path / "m.yaml", _ties(base, a, b))
    out = [] if message.startswith("no output") else [tmp_path / "out"]
    r = run_cli("merge", cfg, *out, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_a_mergekit_model_dump_merges_like_its_yaml(tmp_path):
    from mergekit.config import MergeConfiguration

    base, a, b = family_set(tmp_path, "qwen2", 2)
    raw = _ties(base, a, b)
    dumped = MergeConfiguration.model_validate(raw).model_dump()
    assert dumped["tokenizer"] is None and dumped["modules"] is None  # every optional key, null
    merge(dumped, tmp_path / "dump")
    merge(raw, tmp_path / "yaml")
    sd, sy = state(tmp_path / "dump"), state(tmp_path / "yaml")
    assert set(sd) == set(sy) and all(torch.equal(sd[n], sy[n]) for n in sd)
    assert yaml.safe_load((tmp_path / "dump" / "mergekit_config.yml").read_text()) == dumped


def test_no_copy_tokenizer_and_no_model_card(tmp_path):
    base, a, b = family_set(tmp_path, "gpt2", 2)
    (base / "tokenizer_config.json").write_text("{}")
    merge(_ties(base, a, b), tmp_path / "with")
    merge(_ties(base, a, b), tmp_path / "without", copy_tokenizer=False, write_model_card=False)
    assert (tmp_path / "with" / "tokenizer_config.json").is_file() and (tmp_path / "with" / "README.md").is_file()
    assert not (tmp_path / "without" / "tokenizer_config.json").exists()
    assert not (tmp_path / "without" / "README.md").exists()


def test_allow_crimes_merges_architectures_whose_tensors_agree(tmp_path):
    llama = save(build("llama", seed=1, num_hidden_layers=2), tmp_path / "llama")
    mistral = save(build("mistral", seed=2), tmp_path / "mistral")
    cfg = {"merge_method": "linear", "models": [{"model": str(llama)}, {"model": str(mistral)}], "dtype": "float32"}
    with pytest.raises(UserError, match="differ in architecture.*--allow-crimes"):
        merge(cfg, tmp_path / "refused")
    merge(cfg, tmp_path / "out", allow_crimes=True)
    sl, sm, so = state(llama), state(mistral), state(tmp_path / "out")
    assert all(torch.allclose(so[n], (sl[n] + sm[n]) / 2) for n in so)


def test_keys_mergekit_ignores_are_accepted_with_a_note_and_change_nothing(tmp_path):
    from modelcypher.api import plan_merge

    base, a, b = family_set(tmp_path, "llama", 2)
    plain = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(a)},
             {"model": str(b), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    noisy = {**plain, "models": [{"model": str(a), "parameters": {"density": 0.3}}, plain["models"][1]],
             "parameters": {"rescale": True}}
    assert any("'density' accepted and changes nothing" in n for n in plan_merge(noisy).notes)
    merge(plain, tmp_path / "plain")
    merge(noisy, tmp_path / "noisy")
    sp, sn = state(tmp_path / "plain"), state(tmp_path / "noisy")
    assert all(torch.equal(sp[n], sn[n]) for n in sp)
    ties = _ties(base, a, b)
    plan_merge({**ties, "parameters": {"rescale": False}})
    with pytest.raises(UserError, match="rescale: True is not supported for ties"):
        plan_merge({**ties, "parameters": {"rescale": True}})
