"""``base+adapter`` references in a merge config: the adapter applied as the model is read."""

from __future__ import annotations

import shutil

import peft
import pytest
import torch
from peft_models import GPT2_LORA, LLAMA_LORA, make_adapter

import modelcypher
from checkpoints import load, state
from modelcypher.errors import UserError

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 77, 3]])


@pytest.mark.parametrize("family,lora", [("llama", LLAMA_LORA), ("gpt2", GPT2_LORA)])
def test_linear_merge_of_base_plus_lora_equals_merge_and_unload(tmp_path, family, lora):
    base_dir, adapter_dir, model = make_adapter(tmp_path, family, peft.LoraConfig(**lora))
    with torch.no_grad():
        want_logits = model(IDS).logits
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    ref = f"{base_dir}+{adapter_dir}"
    cfg = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}], "dtype": "float32"}
    modelcypher.merge(cfg, tmp_path / "out")
    got = state(tmp_path / "out")
    for name, t in got.items():
        torch.testing.assert_close(t, merged[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        logits = load(tmp_path / "out", family)(IDS).logits
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    assert f"`{ref}`" in (tmp_path / "out" / "README.md").read_text()  # the card names the reference as given


def test_base_plus_lora_as_base_model_and_in_slices(tmp_path):
    base_dir, adapter_dir, model = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    ref = f"{base_dir}+{adapter_dir}"
    # task arithmetic of the base with weight 0 over base+lora: the adapted model itself
    cfg = {"merge_method": "task_arithmetic", "base_model": ref, "dtype": "float32",
           "models": [{"model": str(base_dir), "parameters": {"weight": 0.0}}]}
    modelcypher.merge(cfg, tmp_path / "ta")
    # passthrough slices: layer 0 from base+lora, layers 1-2 from the base
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": ref, "layer_range": [0, 1]}]},
        {"sources": [{"model": str(base_dir), "layer_range": [1, 3]}]}]}
    modelcypher.merge(cfg, tmp_path / "pt")
    ta, pt, base = state(tmp_path / "ta"), state(tmp_path / "pt"), state(base_dir)
    for name in ta:
        torch.testing.assert_close(ta[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(pt[q0], merged[q0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pt[q1], base[q1], rtol=0, atol=0)


def test_directory_with_plus_in_its_name_is_a_model(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    plus = tmp_path / "a+b"
    shutil.copytree(base_dir, plus)
    plan = modelcypher.plan_merge({"merge_method": "linear", "models": [{"model": str(plus)}]})
    assert type(plan.models[0]).__name__ == "Checkpoint"
    plan = modelcypher.plan_merge({"merge_method": "linear", "models": [{"model": f"{plus}+{adapter_dir}"}]})
    assert type(plan.models[0]).__name__ == "AdaptedCheckpoint" and plan.models[0].path == plus


def test_bad_model_plus_lora_is_one_line_and_writes_nothing(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    for ref, words in [(f"{base_dir}+{tmp_path / 'missing'}", "no such local model"),
                       (f"{base_dir}+{base_dir}", "not a PEFT adapter")]:
        cfg = {"merge_method": "linear", "models": [{"model": ref}]}
        with pytest.raises(UserError, match=words) as e:
            modelcypher.merge(cfg, tmp_path / "out")
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()


def test_model_plus_lora_with_a_data_driven_method_is_refused(tmp_path):
    """Statistics run the model through transformers from its folder, which would miss the adapter."""
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    (tmp_path / "t.txt").write_text("some text " * 50)
    cfg = {"merge_method": "fisher", "parameters": {"data": str(tmp_path / "t.txt")},
           "models": [{"model": f"{base_dir}+{adapter_dir}"}, {"model": str(base_dir)}]}
    with pytest.raises(UserError, match="model\\+lora"):
        modelcypher.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
