"""Proof that an aligned checkpoint computes the same function: compare logits on random inputs.

Both checkpoints are loaded into the real model class (``transformers`` for HF families, the zoo MLP
for ``modelcypher-mlp``) on CPU in float32, and fed the same random token ids (or, for the MLP, random
feature vectors). Logits must agree within ``atol + rtol * max|logits|``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modelcypher.errors import UserError

# The language-model class used for each family when the config names no architecture.
DEFAULT_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
}


class NotEquivalentError(UserError):
    """An aligned checkpoint does not compute the same function as the original."""


def build_model(config: dict, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The float32 CPU model of ``config`` holding ``state_dict`` (strict, apart from a tied head)."""
    if config.get("model_type") == "modelcypher-mlp":
        from modelcypher.zoo.mlp import mlp_from_config

        model = mlp_from_config(config)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
        return model.eval()

    import transformers

    model_type = config.get("model_type")
    if model_type not in DEFAULT_CLASS:
        raise UserError(f"cannot build model_type {model_type!r}; supported: {', '.join(DEFAULT_CLASS)}")
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    name = (config.get("architectures") or [DEFAULT_CLASS[model_type]])[0]
    model = getattr(transformers, name)(hf_config).float().eval()
    # Some checkpoints (the original gpt2) store the base model's tensors without its prefix.
    known, prefix = set(model.state_dict()), model.base_model_prefix + "."
    sd = {(k if k in known or prefix + k not in known else prefix + k): v.float() for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if hf_config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def random_inputs(config: dict, n_inputs: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if config.get("model_type") == "modelcypher-mlp":
        return torch.randn(n_inputs, config["sizes"][0], generator=g)
    vocab = config["vocab_size"]
    max_pos = config.get("max_position_embeddings") or config.get("n_positions") or seq_len
    return torch.randint(0, vocab, (n_inputs, min(seq_len, max_pos)), generator=g)


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def check_equivalent(
    config: dict,
    sd_before: Mapping[str, torch.Tensor],
    sd_after: Mapping[str, torch.Tensor],
    config_after: dict | None = None,
    *,
    n_inputs: int = 4,
    seq_len: int = 16,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Raise :class:`NotEquivalentError` unless both checkpoints give the same logits; return the max gap."""
    model_before = build_model(config, sd_before)
    model_after = build_model(config_after or config, sd_after)
    inputs = random_inputs(config, n_inputs, seq_len, seed)
    before, after = logits_of(model_before, inputs), logits_of(model_after, inputs)
    gap = float((before - after).abs().max())
    bound = atol + rtol * float(before.abs().max())
    if not gap <= bound:  # also catches NaN
        raise NotEquivalentError(
            f"aligned model is not equivalent: logits differ by up to {gap:.3g} (allowed {bound:.3g})"
        )
    return gap


def apply_verified(state_dict: Mapping[str, torch.Tensor], config: dict, alignment, **check) -> tuple[dict, dict]:
    """``transform.apply`` followed by :func:`check_equivalent`: what a writer should call."""
    from modelcypher.align.transform import apply

    sd, new_config = apply(state_dict, config, alignment)
    check_equivalent(config, state_dict, sd, new_config, **check)
    return sd, new_config
