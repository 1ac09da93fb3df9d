"""Adapters made by the real ``peft`` library on tiny models, with non-zero random factors."""

from __future__ import annotations

from pathlib import Path

import peft
import torch

from checkpoints import build, save


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """peft starts B (or an embedding's A) at zero, an adapter that changes nothing: give every
    factor and every module to save random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_adapter(tmp: Path, family: str, lora: peft.LoraConfig, seed: int = 1) -> tuple[Path, Path, torch.nn.Module]:
    """(base dir, adapter dir, the PeftModel): the base saved first, then the adapter peft writes."""
    base = build(family)
    base_dir = save(base, tmp / f"{family}-base")
    model = peft.get_peft_model(build(family), lora)
    randomize_lora(model, seed)
    model.eval()
    adapter_dir = tmp / f"{family}-adapter"
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


LLAMA_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  modules_to_save=["lm_head"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                  alpha_pattern={"v_proj": 3})
GPT2_LORA = dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                 use_rslora=True)
