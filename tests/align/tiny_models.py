"""Tiny random models of every supported family, built from transformers configs."""

from __future__ import annotations

import torch
import transformers

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 40


def hf_config(family: str, tie: bool = False, **overrides) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
        return cls(**{**common, **dict(intermediate_size=24, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=tie, head_dim=8), **overrides})
    if family == "gpt2":
        return transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie),
                                          **overrides})
    if family == "bert":
        return transformers.BertConfig(**common, intermediate_size=24, max_position_embeddings=32,
                                       tie_word_embeddings=tie, pad_token_id=0)
    raise ValueError(family)


MODEL_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}


def randomize(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Weights large enough that attention is far from uniform, norm gains away from one, biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.dim() == 1 and any(n in k for n in ("norm", "ln_", "LayerNorm")) and k.endswith("weight"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.dim() == 1:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.3 * torch.randn(v.shape, generator=g)
    return out


def tiny_model(family: str, tie: bool = False, seed: int = 0, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict as a checkpoint stores it: a tied head is left out)."""
    config = hf_config(family, tie, **overrides)
    model = getattr(transformers, MODEL_CLASS[family])(config)
    sd = randomize(model.state_dict(), seed)
    if tie:
        for head in model._tied_weights_keys:
            sd.pop(head)
    config = config.to_dict()
    config["architectures"] = [MODEL_CLASS[family]]
    return config, sd


def tiny_mlp(seed: int = 0, sizes=(64, 12, 10, 8, 10)) -> tuple[dict, dict[str, torch.Tensor]]:
    from modelcypher.zoo.mlp import MLP

    torch.manual_seed(seed)
    model = MLP(list(sizes))
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
