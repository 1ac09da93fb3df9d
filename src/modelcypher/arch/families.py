"""Model families as data: where the layers are, which tensors are indexed by the vocabulary, and which
output head transformers ties to the input embedding.

Only what the merge engine needs lives here; symmetry groups for alignment live in ``arch.symmetry``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`, `layers.3.`: the block index of a tensor.
LAYER_RE = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    num_layers_key: str
    # (input embedding, output head) pairs that transformers ties when tie_word_embeddings is set
    tied: tuple[tuple[str, str], ...]
    # tensors whose first axis runs over the vocabulary
    vocab_tensors: tuple[str, ...]
    tie_default: bool
    # weights stored [in, out] (GPT-2's Conv1D), by name suffix; every other matrix is [out, in]
    conv1d: tuple[str, ...] = ()


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"),
           "num_hidden_layers", (("model.embed_tokens.weight", "lm_head.weight"),),
           ("model.embed_tokens.weight", "lm_head.weight"), False),
    Family("gpt2", ("gpt2",), "n_layer", (("transformer.wte.weight", "lm_head.weight"),),
           ("transformer.wte.weight", "lm_head.weight"), True,
           ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")),
    Family("bert", ("bert", "roberta"), "num_hidden_layers",
           (("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
            ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight")),
           ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
            "cls.predictions.bias", "cls.predictions.decoder.bias", "lm_head.decoder.weight",
            "lm_head.bias", "lm_head.decoder.bias"), True),
    Family("modelcypher-mlp", ("modelcypher-mlp",), "num_hidden_layers", (), (), False),
)
# Families we cannot name still merge: tensors are matched by name, layers found by LAYER_RE.
GENERIC = Family("generic", (), "num_hidden_layers", (("model.embed_tokens.weight", "lm_head.weight"),),
                 ("model.embed_tokens.weight", "lm_head.weight"), False)


def family_of(config: dict) -> Family:
    mt = config.get("model_type", "")
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    return GENERIC


def num_layers(config: dict) -> int | None:
    for key in (family_of(config).num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def with_layer(name: str, index: int) -> str:
    """The same tensor name in another layer (only the first block index is replaced)."""
    return LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.{index}.", name, count=1)


def ties_embeddings(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", family_of(config).tie_default))
