"""Proof that an aligned checkpoint computes the same function: compare logits on random inputs.

Both checkpoints are loaded into the real model class (``hf.build_model``: transformers, or the class a
family record brings) on CPU in float32, and fed the same random token ids (or the inputs the family
record draws, e.g. feature vectors). Logits must agree within ``atol + rtol * max|logits|``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modelcypher.align.transform import apply
from modelcypher.arch.families import family_of
from modelcypher.errors import UserError
from modelcypher.hf import build_model, context_length


class NotEquivalentError(UserError):
    """An aligned checkpoint does not compute the same function as the original."""


def random_inputs(config: dict, n_inputs: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    own = family_of(config).random_inputs
    if own is not None:
        return own(config, n_inputs, seq_len, g)
    return torch.randint(0, config["vocab_size"], (n_inputs, context_length(config, seq_len)), generator=g)


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
    sd, new_config = apply(state_dict, config, alignment)
    check_equivalent(config, state_dict, sd, new_config, **check)
    return sd, new_config
