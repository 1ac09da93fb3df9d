"""Real, tiny Hugging Face checkpoints built in the tests: random init from transformers configs,
saved through save_pretrained (sharded, bf16 when asked), and 'fine-tunes' that move every weight."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: tf.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": lambda: tf.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True),
    "gpt2": lambda: tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bert": lambda: tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64),
}
MODEL_CLASS = {"bert": tf.BertForMaskedLM}


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    cls = MODEL_CLASS.get(family, tf.AutoModelForCausalLM)
    model = cls.from_config(cfg) if cls is tf.AutoModelForCausalLM else cls(cfg)
    return model.eval()


def save(model: torch.nn.Module, path: Path, *, dtype: torch.dtype = torch.float32,
         shard: str | None = None, safe: bool = True) -> Path:
    model = model.to(dtype)
    if not safe:  # the legacy pickle format, which transformers no longer writes itself
        model.config.save_pretrained(path)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
              or not model.config.tie_word_embeddings}
        torch.save(sd, path / "pytorch_model.bin")
        return path
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return path


def finetune(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A stand-in fine-tune: every parameter moved by seeded Gaussian noise (a dense task vector)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return out


def family_set(tmp: Path, family: str, n: int = 2, *, dtype=torch.float32, shard: str | None = None,
               **overrides) -> list[Path]:
    """base + n fine-tunes of it, saved under tmp; returns their paths (base first)."""
    base = build(family, **overrides)
    paths = [save(base, tmp / f"{family}-base", dtype=dtype, shard=shard)]
    for i in range(n):
        paths.append(save(finetune(base, seed=100 + i), tmp / f"{family}-ft{i}", dtype=dtype, shard=shard))
    return paths


def state(path: Path) -> dict[str, torch.Tensor]:
    from modelcypher.checkpoint import Checkpoint

    ck = Checkpoint(path)
    return {n: ck.get(n).float() for n in ck.names}


def load(path: Path, family: str) -> torch.nn.Module:
    cls = MODEL_CLASS.get(family, tf.AutoModelForCausalLM)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def char_gpt2_set(root: Path) -> list[Path]:
    """A character-level GPT-2 base and two 'fine-tunes' with the Shakespeare tokenizer, plus the texts
    ``comedy.txt`` and ``tragedy.txt`` (6000 characters each) for the data-driven methods; base first."""
    import transformers as tf

    from modelcypher.zoo import chartok, shakespeare

    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    paths = []
    for i, m in enumerate([base, finetune(base, 1, 0.05), finetune(base, 2, 0.05)]):
        m.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
        paths.append(root / f"m{i}")
    for genre in ("comedy", "tragedy"):
        (root / f"{genre}.txt").write_text(shakespeare.text(genre)[:6000])
    return paths


def word_tokenizer(tokens: list[str], added: list[str] = (), bpe: bool = False, **kwargs) -> tf.PreTrainedTokenizerFast:
    """A real word-level tokenizer (whitespace split) over ``tokens`` (id = position; the first three are
    <unk>, <s>, </s>), then ``added`` as added tokens; ``bpe``: a BPE model without merges instead (what
    mergekit's tests use)."""
    import tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    model = tokenizers.models.BPE(vocab, [], unk_token="<unk>") if bpe else \
        tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     **kwargs)
    tok.add_tokens(list(added))
    return tok


def base_tokens(n: int) -> list[str]:
    """The vocabulary of mergekit's tokenizer tests: <unk>, <s>, </s>, then _tok_3 ... _tok_{n-1}."""
    return ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, n)]
