"""Data-driven methods end to end: statistics from each model's own text, cached with provenance."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from checkpoints import char_gpt2_set, state
from cli_util import run_cli, write_config
from modelcypher.merging.registry import get_method


@pytest.fixture(scope="module")
def char_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("char")
    paths = char_gpt2_set(root)
    return root, paths


def cfg_for(method, root, paths, **params):
    return {"merge_method": method, "base_model": str(paths[0]),
            "models": [{"model": str(paths[1]), "parameters": {"data": str(root / "comedy.txt")}},
                       {"model": str(paths[2]), "parameters": {"data": str(root / "tragedy.txt")}}],
            "parameters": params}


def test_regmean_uses_each_models_grams_in_the_right_layout(char_models, tmp_path):
    root, paths = char_models
    cfg = cfg_for("regmean", root, paths)
    cfg.pop("base_model")
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "out.stats"
    provs = [json.loads(p.read_text()) for p in sorted(cache.glob("gram-*.json"))]
    assert len(provs) == 2 and all(p["tokens"] >= 64 and len(p["data_sha256"]) == 64 for p in provs)
    from safetensors.torch import load_file

    grams = {json.loads(p.with_suffix(".json").read_text())["data"].endswith("comedy.txt"): load_file(p)
             for p in cache.glob("gram-*.safetensors")}
    s1, s2, so = state(paths[1]), state(paths[2]), state(tmp_path / "out")
    n = "transformer.h.1.mlp.c_fc.weight"  # Conv1D: [in, out]
    want = get_method("regmean").fn([s1[n], s2[n]], gram=[grams[True][n], grams[False][n]], layout="conv1d")
    torch.testing.assert_close(so[n], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(so[n], (s1[n] + s2[n]) / 2, atol=1e-4)  # not the plain average
    # Merging again into the same output reuses the cached statistics.
    before = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    r = run_cli("merge", tmp_path / "m.yaml", "-o", tmp_path / "out", "--overwrite")
    assert r.returncode == 0 and "computing" not in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_fisher_merge_loads_and_differs_from_average(char_models, tmp_path):
    root, paths = char_models
    cfg = cfg_for("fisher", root, paths)
    cfg.pop("base_model")
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert len(list((tmp_path / "out.stats").glob("fisher-*.safetensors"))) == 2


def test_null_space_reports_the_kept_share_per_layer(char_models, tmp_path):
    root, paths = char_models
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg_for("null_space", root, paths)), "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "kept share" in r.stdout and "layer   0" in r.stdout
    rep = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    kept = rep["tensors"]["transformer.h.0.mlp.c_fc.weight"]["kept"]
    assert len(kept) == 2 and all(0.0 <= k <= 1.0 for k in kept)


def test_missing_or_short_data_is_a_clear_error(char_models, tmp_path):
    root, paths = char_models
    cfg = cfg_for("regmean", root, paths)
    del cfg["models"][1]["parameters"]["data"]
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 2 and "needs data for model" in r.stderr and str(paths[2]) in r.stderr
    (root / "tiny.txt").write_text("To be")
    cfg = cfg_for("regmean", root, paths)
    cfg["models"][0]["parameters"]["data"] = str(root / "tiny.txt")
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 2 and "tiny.txt" in r.stderr and "give more text" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_lambda_through_the_cli_needs_a_base_and_scales_from_it(char_models, tmp_path, method):
    root, paths = char_models
    cfg = cfg_for(method, root, paths, **{"lambda": 2.0})
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    plain = cfg_for(method, root, paths)
    assert run_cli("merge", write_config(tmp_path / "p.yaml", plain), "-o", tmp_path / "plain").returncode == 0
    merged, one, base = state(tmp_path / "out"), state(tmp_path / "plain"), state(paths[0])
    for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        torch.testing.assert_close(merged[n], base[n] + 2.0 * (one[n] - base[n]), atol=1e-5, rtol=1e-5)
    del cfg["base_model"]
    r = run_cli("merge", write_config(tmp_path / "n.yaml", cfg), "-o", tmp_path / "none")
    assert r.returncode == 2 and "needs a base_model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_distill_fits_coefficients_once_and_merges_with_them(char_models, tmp_path):
    root, paths = char_models
    cfg = cfg_for("distill", root, paths, steps=5, sequences="lines")
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "fitting distill coefficients" in r.stdout
    from safetensors.torch import load_file

    cache = sorted((tmp_path / "out.stats").glob("distill-*.safetensors"))
    assert [p.name.split("-")[1] for p in cache] == ["1", "2"]  # the two fine-tunes, not the base
    coef = [load_file(p) for p in cache]
    sb, s1, s2, so = state(paths[0]), state(paths[1]), state(paths[2]), state(tmp_path / "out")
    n = "transformer.h.1.mlp.c_fc.weight"  # Conv1D [in, out]: a coefficient per output column
    assert coef[0][n].shape == (1, sb[n].shape[1])
    want = sb[n] + coef[0][n] * (s1[n] - sb[n]) + coef[1][n] * (s2[n] - sb[n])
    torch.testing.assert_close(so[n], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(coef[0][n], torch.ones_like(coef[0][n]))  # fitted, not the start
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    r = run_cli("merge", tmp_path / "m.yaml", "-o", tmp_path / "out", "--overwrite")
    assert r.returncode == 0 and "fitting" not in r.stdout  # the cached fit, same provenance
    cfg["parameters"]["sequences"] = "paragraphs"
    r = run_cli("merge", write_config(tmp_path / "bad.yaml", cfg), "-o", tmp_path / "bad")
    assert r.returncode == 2 and "sequences must be blocks or lines" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
