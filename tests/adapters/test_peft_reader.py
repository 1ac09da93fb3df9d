"""The PEFT reader: an adapter saved by ``peft`` gives, per base tensor, exactly peft's merged weight."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft_models import GPT2_LORA, LLAMA_LORA, make_adapter

from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.adapted import AdaptedCheckpoint
from modelcypher.checkpoint.peft import LoraAdapter, lora_config, write_adapter
from modelcypher.errors import UserError


def _merged_state(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("family,lora", [
    ("llama", LLAMA_LORA),
    ("llama", {**LLAMA_LORA, "use_rslora": True}),
    ("gpt2", GPT2_LORA),
    ("gpt2", {**GPT2_LORA, "fan_in_fan_out": False}),  # peft decides the layout by the layer; so do we
])
def test_adapted_tensors_equal_merge_and_unload(tmp_path, family, lora):
    base_dir, adapter_dir, model = make_adapter(tmp_path, family, peft.LoraConfig(**lora))
    merged = _merged_state(model)
    base = Checkpoint(base_dir)
    ck = AdaptedCheckpoint(base_dir, adapter_dir)
    changed = 0
    for name in ck.names:
        got = ck.get(name).float()
        torch.testing.assert_close(got, merged[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(got, base.get(name).float())
    assert changed >= 6  # the adapter really moved the weights it names
    # a block of rows is computed from the factors' matching rows: the same as the whole tensor's rows
    for name in ck.adapter.factors:
        n = ck.shape(name)[0]
        rows = slice(1, max(2, n // 2))
        torch.testing.assert_close(ck.get(name, rows), ck.get(name)[rows], rtol=1e-6, atol=1e-7)


def test_rank_and_alpha_patterns_are_read_per_module(tmp_path):
    _, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    ad = LoraAdapter(adapter_dir)
    q1 = ad.factors["model.layers.1.self_attn.q_proj.weight"]
    assert ad.key_shape(q1.a)[0] == 2 and q1.scale == pytest.approx(8 / 2)
    assert ad.factors["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(3 / 4)
    assert ad.factors["model.embed_tokens.weight"].embedding
    assert "lm_head.weight" in ad.full


def test_legacy_bin_adapter_reads_like_safetensors(tmp_path):
    base_dir, adapter_dir, model = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    bin_dir = tmp_path / "bin-adapter"
    model.save_pretrained(bin_dir, safe_serialization=False)
    assert (bin_dir / "adapter_model.bin").is_file()
    a, b = AdaptedCheckpoint(base_dir, adapter_dir), AdaptedCheckpoint(base_dir, bin_dir)
    for name in a.names:
        torch.testing.assert_close(a.get(name), b.get(name), rtol=0, atol=0)


def test_written_adapter_loads_in_peft(tmp_path):
    """write_adapter's directory is what peft loads: the same update through PeftModel."""
    import transformers as tf

    from checkpoints import build, save

    base_dir = save(build("llama"), tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g)
    key = "model.layers.0.self_attn.q_proj"
    cfg = lora_config(target_modules=[key], r=3, lora_alpha=6)
    tensors = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    out = write_adapter(tmp_path / "ad", cfg, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                        tensors.__getitem__)
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), out)
    merged = model.merge_and_unload().state_dict()[f"{key}.weight"]
    want = Checkpoint(base_dir).get(f"{key}.weight") + 2.0 * b @ a
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def _edit_config(adapter_dir, **changes):
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,words", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"use_dora": True}, "DoRA"),
    ({"r": 3}, "do not fit rank 3"),
])
def test_bad_adapter_config_is_one_line(tmp_path, changes, words):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    _edit_config(adapter_dir, **changes)
    with pytest.raises(UserError, match=words) as e:
        AdaptedCheckpoint(base_dir, adapter_dir)
    assert "\n" not in str(e.value) and "adapter" in str(e.value)


def test_adapter_for_another_model_is_refused(tmp_path):
    """A key that names no base tensor, and factors whose shapes do not fit the base."""
    from checkpoints import build, save

    _, adapter_dir, _ = make_adapter(tmp_path, "llama", peft.LoraConfig(**LLAMA_LORA))
    gpt2 = save(build("gpt2"), tmp_path / "gpt2")
    with pytest.raises(UserError, match="does not have"):
        AdaptedCheckpoint(gpt2, adapter_dir)
    wide = save(build("llama", hidden_size=64, intermediate_size=64), tmp_path / "wide")
    with pytest.raises(UserError, match="shape"):
        AdaptedCheckpoint(wide, adapter_dir)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        LoraAdapter(gpt2)
