"""Different widths: a narrower model lifted into a wider one's shape computes exactly its own function."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_pipeline import TEXT, logits, save_dir, state, zoo_gpt2
from tiny_models import tiny_model

from cli_util import run_cli, write_config
from modelcypher.align.equivalence import check_equivalent
from modelcypher.align.lift import check_widths, isometry, lift_config, lift_state
from modelcypher.align.pipeline import align_checkpoint, lift_checkpoint
from modelcypher.align.transform import apply, fold, fold_norms, materialize_tied, random_alignment
from modelcypher.api import merge
from modelcypher.arch.families import spec_for
from modelcypher.errors import UserError
from modelcypher.measure.barrier import barrier_curve

WIDE = {"gpt2": dict(n_embd=48, n_head=6),
        "llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=40),
        "qwen2": dict(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, intermediate_size=40)}


@pytest.mark.parametrize("layernorm", [False, True])
def test_the_residual_map_is_a_scaled_isometry_fixing_the_ones_direction_for_layernorm(layernorm):
    t = isometry(6, 10, layernorm)
    torch.testing.assert_close(t @ t.T, (10 / 6) * torch.eye(6, dtype=t.dtype))
    if layernorm:
        torch.testing.assert_close(torch.ones(6, dtype=t.dtype) @ t, torch.ones(10, dtype=t.dtype))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lift_computes_the_narrow_models_function_through_transformers(family):
    # RMSNorm (Llama, Qwen2: gains away from one, GQA with more KV heads or larger groups in the wide
    # model) and LayerNorm (GPT-2: gains and biases) with tied embeddings; epsilon kept as it is.
    config_n, sd_n = tiny_model(family, tie=True)
    config_w, sd_w = tiny_model(family, tie=True, seed=1, **WIDE[family])
    spec_n = spec_for(config_n, sd_n)
    assert check_widths(spec_n, spec_for(config_w, sd_w), "narrow", "wide")
    config_l = {**lift_config(config_n, config_w), "tie_word_embeddings": False}
    folded = fold(materialize_tied(dict(sd_n), spec_n)[0], spec_n)
    lifted = lift_state(folded, spec_n, spec_for(config_l))
    wide_shapes = {k: v.shape for k, v in fold_norms(sd_w, config_w)[0].items()}
    assert {k: v.shape for k, v in lifted.items()} == wide_shapes
    gap = check_equivalent(config_n, sd_n, lifted, config_l, atol=1e-5, rtol=1e-5, n_inputs=4, seq_len=20)
    assert gap < 1e-4


def json_config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def narrow_and_wide(tmp_path, planted: bool):
    """A narrow and a wide zoo GPT-2 (with tokenizers); ``planted``: the wide one is the narrow one
    lifted and moved by a random symmetry, so alignment must find it exactly."""
    narrow = zoo_gpt2(tmp_path / "narrow", seed=0, n_embd=32, n_head=4)
    wide = zoo_gpt2(tmp_path / "wide", seed=1, n_embd=48, n_head=6)
    if planted:
        lift_checkpoint(narrow, wide, tmp_path / "lifted")
        sd, config = state(tmp_path / "lifted"), json_config(tmp_path / "lifted")
        hidden = random_alignment(spec_for(config, sd), kinds=("perm", "heads", "residual"), seed=5)
        moved, config = apply(sd, config, hidden)
        wide = save_dir(tmp_path / "planted", config, moved, tokenizer_from=narrow)
    return narrow, wide


def test_align_lifts_a_narrow_model_onto_a_wide_one_exactly(tmp_path):
    narrow, wide = narrow_and_wide(tmp_path, planted=True)
    r = run_cli("align", narrow, "--to", wide, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    config = json_config(tmp_path / "out")
    assert (config["n_embd"], config["n_head"]) == (48, 6)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(narrow), atol=1e-4, rtol=1e-4)
    out, target = state(tmp_path / "out"), state(wide)
    for k in target:  # found the hidden lift: the same weights as the wide model
        torch.testing.assert_close(out[k], target[k], atol=1e-4, rtol=0, msg=k)


def test_alignment_after_the_lift_brings_independent_models_closer(tmp_path):
    narrow, wide = narrow_and_wide(tmp_path, planted=False)
    report = align_checkpoint(narrow, wide, tmp_path / "out")
    assert report["lifted"] == {"from": 32, "to": 48} and report["max_logit_gap"] < 1e-3
    lift_checkpoint(narrow, wide, tmp_path / "lifted")
    target = fold_norms(state(wide), json_config(wide))[0]
    inner = lambda sd: math.fsum(float((sd[k].double() * target[k].double()).sum()) for k in target)  # noqa: E731
    assert inner(state(tmp_path / "out")) > inner(state(tmp_path / "lifted"))


def test_barrier_and_merge_work_on_a_width_pair(tmp_path):
    narrow, wide = narrow_and_wide(tmp_path, planted=True)
    result = barrier_curve(wide, narrow, TEXT, align="weight", max_tokens=400)
    assert result["lifted"] == {"from": 32, "to": 48}
    spread = lambda c: max(c["loss"]) - min(c["loss"])  # noqa: E731
    assert spread(result["aligned"]) < 1e-4 < spread(result["raw"])  # the planted lift is found: a flat line
    # both ends are the two models' own losses
    assert abs(result["raw"]["loss"][-1] - result["aligned"]["loss"][-1]) < 1e-4
    cfg = {"merge_method": "linear", "dtype": "float32", "align": {"method": "weight"},
           "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (wide, narrow)]}
    merge(write_config(tmp_path / "m.yaml", cfg), tmp_path / "merged", device="cpu")
    assert json_config(tmp_path / "merged")["n_embd"] == 48
    torch.testing.assert_close(logits(tmp_path / "merged"), logits(narrow), atol=1e-3, rtol=1e-3)


def test_a_wider_model_into_a_narrower_one_is_one_line(tmp_path):
    narrow = zoo_gpt2(tmp_path / "narrow", n_embd=32, n_head=4)
    wide = zoo_gpt2(tmp_path / "wide", seed=1, n_embd=48, n_head=6)
    other_heads = zoo_gpt2(tmp_path / "heads", seed=1, n_embd=48, n_head=4)
    for b, a, says in ((wide, narrow, "never the reverse"), (narrow, other_heads, "head size")):
        r = run_cli("align", b, "--to", a, "-o", tmp_path / "out")
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "out").exists()
    cfg = {"merge_method": "linear", "dtype": "float32", "align": {"method": "weight"},
           "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (narrow, wide)]}
    with pytest.raises(UserError, match="make the wider one the reference"):
        merge(cfg, tmp_path / "merged", device="cpu")
    assert not (tmp_path / "merged").exists()
