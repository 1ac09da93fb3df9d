"""What every verb needs from transformers: a model built from a checkpoint's config and tensors, its
tokenizer, its text, its context length, and the device to run on.

This is the floor under ``merging``, ``align`` and ``measure``: each of them builds models and reads
text through these functions, never on its own. Which class holds a family comes from its record
(``arch.families``); a family outside transformers brings its own ``build``.

transformers itself is imported on first use, here only: a merge of tensors never needs it, and
importing it would double the start-up time of every command that merges.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modelcypher.arch.families import FAMILIES, family_of
from modelcypher.checkpoint.reader import TOKENIZER_FILES, Checkpoint
from modelcypher.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; anything else is one line."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None


def context_length(config: Mapping[str, Any] | Any, cap: int) -> int:
    """The model's context (from a config dict or a transformers config), at most ``cap`` tokens."""
    def get(key: str):
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    n = get("max_position_embeddings") or get("n_positions") or cap
    return min(int(n), cap)


# ----------------------------------------------------------------------------- models


def _empty_model(config: dict) -> torch.nn.Module:
    """The float32 model of ``config`` with random weights, in eval mode."""
    fam = family_of(config)
    if fam.build is not None:
        return fam.build(config).float().eval()
    import transformers

    model_type = config.get("model_type")
    try:
        hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    except KeyError:
        raise UserError(f"cannot build model_type {model_type!r}: transformers does not know it; supported: "
                        f"{', '.join(_buildable())}") from None
    name = (config.get("architectures") or [fam.hf_class])[0]
    if name is None:  # a family without a record: any causal LM transformers knows
        try:
            return transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
        except ValueError as e:
            raise UserError(f"cannot build model_type {model_type!r} as a causal language model "
                            f"({str(e).splitlines()[0]}); supported: {', '.join(_buildable())}") from None
    cls = getattr(transformers, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise UserError(f"config.json: architectures names {name!r}, which transformers does not have")
    return cls(hf_config).float().eval()


def _buildable() -> list[str]:
    return [t for f in FAMILIES if f.hf_class or f.build for t in f.model_types] + ["any causal LM transformers has"]


def build_model(config: dict, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The float32 CPU model of ``config`` holding ``state_dict`` (strict, apart from a tied head)."""
    model = _empty_model(config)
    # Some checkpoints (the original gpt2) store the base model's tensors without its prefix.
    known = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    sd = {(k if k in known or prefix + k not in known else prefix + k): v.float() for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint does not fit {type(model).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model


def causal_lm(config: dict, sd: Mapping[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A float32 causal LM of ``config`` holding ``sd``, and its full state dict (a tied head spelled out)."""
    model = build_model(config, sd)
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise UserError(f"next-token loss needs a causal LM; {config.get('model_type')} is not one")
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def untied_model(model: torch.nn.Module) -> torch.nn.Module:
    """An empty model of the same class with the output head untied, to hold any interpolation."""
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = False
    return type(model)(cfg).float().eval()


def load_causal_lm(model_dir: Path, device: torch.device, who: str = "statistics need",
                   cap: int = 256) -> tuple[torch.nn.Module, int]:
    """The float32 causal LM saved at ``model_dir`` on ``device`` (eval mode), and its text block length:
    its context, at most ``cap`` tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Our reader first: every file inside the folder, headers valid, every weight finite (one line if not).
    ck = Checkpoint(model_dir)
    for name in ck.names:
        ck.get(name)
    hf_logging.disable_progress_bar()  # a refusal or a report is the only thing a verb prints
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError) as e:
        raise UserError(f"{model_dir}: {who} a causal language model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), context_length(model.config, cap)


# ----------------------------------------------------------------------------- text


def load_tokenizer(model_dir: Path, purpose: str = "to read the text with"):
    """The tokenizer saved with a model (local files only)."""
    model_dir = Path(model_dir)
    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...) {purpose}")
    import transformers

    cls = transformers.AutoTokenizer
    # A generic tokenizer.json saved with the model is what it reads, but AutoTokenizer swaps in the model
    # type's own class (for qwen2 one that drops whitespace), so a generic saved class is loaded as itself.
    saved = model_dir / "tokenizer_config.json"
    if saved.is_file() and (model_dir / "tokenizer.json").is_file():
        try:
            name = json.loads(saved.read_text()).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            name = None
        if name in ("TokenizersBackend", "PreTrainedTokenizerFast") and hasattr(transformers, name):
            cls = getattr(transformers, name)
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise UserError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read as UTF-8 text ({e})") from None


def token_ids(model_dir: Path, text: str, max_tokens: int) -> torch.Tensor:
    """``text`` in the tokens of the model's tokenizer, at most ``max_tokens`` of them (1-D long)."""
    tok = load_tokenizer(model_dir)
    ids = tok(text[: 8 * max_tokens], add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
