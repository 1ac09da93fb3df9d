"""Models for the across-family tests: small Llama-style and GPT-2 models that read the zoo's
character-level Shakespeare tokenizer, and exact copies of them under hidden symmetries (a rotated
residual stream, permuted units and heads, a wider residual, another family's record)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from modelcypher.align.transform import apply, fold_norms, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.zoo import chartok, shakespeare

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokenizer():
    return chartok.build_char_tokenizer(shakespeare.vocab())


def probe_text(chars: int = 6000, genre: str = "comedy", start: int = 20000) -> str:
    return shakespeare.text(genre)[start:start + chars]


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def llama(path: Path, seed: int = 0, *, hidden: int = 32, layers: int = 3, inter: int = 64, heads: int = 4,
          kv: int = 2, family: str = "llama", init: float = 0.02) -> Path:
    """A Llama-style model with random norm gains (so that folding them is not a no-op)."""
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    cfg = cls[0](vocab_size=len(tokenizer()), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                 head_dim=hidden // heads, initializer_range=init, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape))
    return save(model, path)


def gpt2(path: Path, seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4) -> Path:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=len(tokenizer()), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128)
    return save(tf.GPT2LMHeadModel(cfg).eval(), path)


def load(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def with_state(model: torch.nn.Module, sd: dict, config: dict | None = None) -> torch.nn.Module:
    cfg = type(model.config).from_dict({**model.config.to_dict(), **(config or {})})
    out = type(model)(cfg).eval()
    out.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return out


def folded(src: Path, dst: Path) -> Path:
    """The same function with every norm gain folded into its readers."""
    model = load(src)
    sd, config = fold_norms(model.state_dict(), model.config.to_dict())
    return save(with_state(model, sd, config), dst)


def rotated(src: Path, dst: Path, seed: int = 1) -> Path:
    """The same function under a random element of the family's symmetry group (norms folded, the
    residual rotated, MLP units and heads permuted, value/output and query/key bases rotated)."""
    model = load(src)
    config = model.config.to_dict()
    sd, config = apply(model.state_dict(), config, random_alignment(spec_for(config), seed=seed))
    return save(with_state(model, sd, config), dst)


def as_qwen2(src: Path, dst: Path) -> Path:
    """A Llama checkpoint under Qwen2's record: the same weights, zero query/key/value biases."""
    model = load(src)
    c = model.config
    cfg = tf.Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False)
    out = tf.Qwen2ForCausalLM(cfg).eval()
    sd = dict(model.state_dict())
    for k, v in out.state_dict().items():
        if k.endswith("_proj.bias"):
            sd[k] = torch.zeros_like(v)
    out.load_state_dict(sd, strict=True)
    return save(out, dst)


def lora(base: Path, dst: Path, targets: list[str], r: int = 4, seed: int = 5, std: float = 0.3) -> Path:
    """A PEFT LoRA adapter for ``base`` with random (nonzero) factors."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                   fan_in_fan_out="c_attn" in targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(dst)
    return dst


def with_adapter(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base), adapter).eval()


def lifted(src: Path, dst: Path, width: int, seed: int = 2) -> Path:
    """A Llama checkpoint with folded norms (gains all ones) lifted to a wider residual stream: ``x -> x R``
    with ``R`` ``[d, width]`` of orthonormal rows; readers ``W R``, writers ``R^T W``, every norm gain
    ``sqrt(d / width)`` and epsilon ``eps d / width``, so that each RMSNorm sees the same normalized
    vector: the same function, exactly."""
    model = load(src)
    c = model.config
    d = c.hidden_size
    g = torch.Generator().manual_seed(seed)
    r = torch.linalg.qr(torch.randn(width, d, generator=g, dtype=torch.float64))[0].T  # [d, width]
    out = {}
    for k, v in model.state_dict().items():
        v = v.double()
        if k.endswith("norm.weight"):
            assert torch.allclose(v, torch.ones_like(v)), "fold the norms first"
            out[k] = torch.full((width,), (d / width) ** 0.5, dtype=torch.float64)
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            out[k] = r.T @ v
        elif v.dim() == 2 and v.shape[1] == d:  # embeddings, head, and every projection reading the residual
            out[k] = v @ r
        else:
            out[k] = v
    cfg = tf.LlamaConfig.from_dict({**c.to_dict(), "hidden_size": width, "head_dim": c.head_dim,
                                    "rms_norm_eps": c.rms_norm_eps * d / width})
    wide = tf.LlamaForCausalLM(cfg).eval()
    wide.load_state_dict({k: v.float() for k, v in out.items()}, strict=True)
    return save(wide, dst)
