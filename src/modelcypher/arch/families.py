"""Model families as data: one record per family says everything the verbs need to know about it.

A :class:`Family` names its ``model_type`` values, its tensor layout (where the layers are, which
tensors run over the vocabulary, which head transformers ties to the embedding, which weights are
stored ``[in, out]``), its symmetry spec (``arch.symmetry``), the transformers class that holds it, and
the config keys two models must share to be aligned. Adding a family is one record here (or a
:func:`register` call from another package) plus, for alignment, one spec file in ``arch/symmetry/``.

Packages outside this one register their families through the ``modelcypher.families`` entry point
group (a module that calls :func:`register` when imported); the zoo's digits MLP does just that.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

from modelcypher.arch.symmetry import SymmetrySpec, bert, gpt2, llama
from modelcypher.errors import UserError

if TYPE_CHECKING:
    from torch import Generator, Tensor, nn

# `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`, `layers.3.`: the block index of a tensor.
LAYER_RE = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")

SpecBuilder = Callable[[dict, "set[str] | None"], SymmetrySpec]


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
    symmetry: SpecBuilder | None = None  # None: merged by tensor name, never aligned
    hf_class: str | None = None  # the transformers class when the config names no architecture
    # config keys that must agree for two models to be aligned (beyond equal tensor shapes)
    structure_keys: tuple[str, ...] = ()
    # a model class outside transformers: builds the empty model of a config ...
    build: Callable[[dict], nn.Module] | None = None
    # ... and the random inputs that test it (default: random token ids)
    random_inputs: Callable[[dict, int, int, Generator], Tensor] | None = None
    reads: Literal["tokens", "features"] = "tokens"  # what the model takes: text, or feature vectors
    # config keys that size the residual stream, the heads and the MLP (a narrower model lifted into a
    # wider one takes the wider one's)
    width_keys: tuple[str, ...] = ()
    # pre-norm layers only: the tensors (name substrings) through which a layer writes into the residual
    # stream; scaling them by c scales the layer's update by c (the data-flow search folds its input
    # scalings there). Empty where no such fold is exact (post-norms, (1 + w) norms) or not yet checked.
    residual_writers: tuple[str, ...] = ()


ATTENTION_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias",
                  "intermediate_size")
_LLAMA = dict(num_layers_key="num_hidden_layers", tied=(("model.embed_tokens.weight", "lm_head.weight"),),
              vocab_tensors=("model.embed_tokens.weight", "lm_head.weight"), tie_default=False,
              structure_keys=ATTENTION_KEYS,
              width_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"))
_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")
_BERT = dict(num_layers_key="num_hidden_layers",
             tied=(("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
                   ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight")),
             vocab_tensors=("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight",
                            "roberta.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                            "cls.predictions.bias", "cls.predictions.decoder.bias", "lm_head.decoder.weight",
                            "lm_head.bias", "lm_head.decoder.bias"),
             tie_default=True, structure_keys=ATTENTION_KEYS)

FAMILIES: list[Family] = [
    Family("llama", ("llama",), symmetry=llama.spec, hf_class="LlamaForCausalLM", residual_writers=_WRITERS, **_LLAMA),
    Family("mistral", ("mistral",), symmetry=llama.spec, hf_class="MistralForCausalLM", residual_writers=_WRITERS,
           **_LLAMA),
    Family("qwen2", ("qwen2",), symmetry=llama.spec, hf_class="Qwen2ForCausalLM", residual_writers=_WRITERS,
           **_LLAMA),
    Family("gpt2", ("gpt2",), "n_layer", (("transformer.wte.weight", "lm_head.weight"),),
           ("transformer.wte.weight", "lm_head.weight"), True,
           ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
           symmetry=gpt2.spec, hf_class="GPT2LMHeadModel", structure_keys=("n_head", "n_inner"),
           width_keys=("n_embd", "n_head", "n_inner"), residual_writers=("attn.c_proj.", "mlp.c_proj.")),
    Family("bert", ("bert",), symmetry=bert.spec, hf_class="BertForMaskedLM", **_BERT),
    # Merged by tensor name with the layout of their kin; no symmetry spec (yet).
    Family("llama-like", ("qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"), **_LLAMA),
    Family("roberta", ("roberta",), **_BERT),
]
# Families we cannot name still merge: tensors are matched by name, layers found by LAYER_RE.
GENERIC = Family("generic", (), **_LLAMA)
ENTRY_POINTS = "modelcypher.families"
_loaded_entry_points = False


def register(family: Family) -> Family:
    """Add a family (a model type already known is an error: one record per family)."""
    taken = {t for f in FAMILIES for t in f.model_types} & set(family.model_types)
    if taken:
        raise ValueError(f"model_type {sorted(taken)[0]!r} already has a family record")
    FAMILIES.append(family)
    return family


def _load_entry_points() -> None:
    """Import the modules other packages registered under ``modelcypher.families`` (once)."""
    global _loaded_entry_points
    if not _loaded_entry_points:
        _loaded_entry_points = True
        for ep in entry_points(group=ENTRY_POINTS):
            importlib.import_module(ep.value.split(":")[0])


def _find(model_type: Any) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of(config: dict) -> Family:
    model_type = config.get("model_type", "")
    fam = _find(model_type)
    if fam is None and model_type:
        _load_entry_points()
        fam = _find(model_type)
    return fam or GENERIC


def spec_for(config: dict, names: Iterable[str] | None = None) -> SymmetrySpec:
    """The symmetry spec of a checkpoint, from its HF config dict (and optionally its tensor names)."""
    fam = family_of(config)
    if fam.symmetry is None:
        _load_entry_points()
        supported = [t for f in FAMILIES if f.symmetry is not None for t in f.model_types]
        raise UserError(f"no symmetry spec for model_type {config.get('model_type')!r}; "
                        f"supported: {', '.join(supported)}")
    return fam.symmetry(config, None if names is None else set(names))


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


def relayer_config(config: dict, layers: list[int]) -> dict:
    """The config of a model made of ``layers`` of this one, in that order: the layer count, and every
    per-layer list in the config (e.g. Qwen2's ``layer_types``) re-indexed."""
    old = num_layers(config)
    out = dict(config)
    for key in (family_of(config).num_layers_key, "num_hidden_layers", "n_layer"):
        if key in out:
            out[key] = len(layers)
    for key, v in config.items():
        if isinstance(v, list) and old and len(v) == old and key != "architectures":
            out[key] = [v[i] for i in layers]
    return out


def ties_embeddings(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", family_of(config).tie_default))
