"""Small character-level GPT-2 models trained from scratch on CPU.

Models are plain ``transformers.GPT2LMHeadModel`` instances with a
:mod:`~modelcypher.zoo.chartok` tokenizer; :func:`save` writes a normal HF
directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
load offline::

    from modelcypher.zoo import shakespeare, chartok, gpt2
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    train, val, _ = shakespeare.split_by_play()
    base = gpt2.train(train, val, gpt2.DEMO_BASE, tok)
    c_train, c_val, _ = shakespeare.split_by_play("comedy")
    comic = gpt2.train(c_train, c_val, gpt2.DEMO_FINETUNE, tok, init=base)
    gpt2.save(comic, tok, "zoo/comedy")

Training is reproducible bit for bit on CPU: parameters are initialized after
``torch.manual_seed(cfg.seed)`` and batches are drawn from a separate
``torch.Generator`` seeded with ``cfg.seed``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from modelcypher.measure.loss import lm_loss
from modelcypher.zoo.chartok import encode_ids


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and optimization settings for :func:`train`.

    When fine-tuning (``init`` given to :func:`train`) the architecture fields
    (``n_layer`` ... ``block_size``) are ignored: the model keeps its own.
    """

    # architecture
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    block_size: int = 128  # context length (GPT2Config.n_positions)
    dropout: float = 0.0
    # optimization: AdamW, linear warmup then cosine decay to min_lr_ratio * lr
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # applied to matrices only (not biases, LayerNorm)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    bf16: bool = False  # bf16 autocast for forward/backward: faster on CPUs with bf16 units (avx512_bf16),
    # many times slower on those without (AVX2 only), so recipes meant for any CPU leave it off
    # monitoring
    eval_interval: int = 0  # steps between progress reports; 0 = none
    eval_tokens: int = 32768  # val tokens used for each progress report
    verbose: bool = False  # print progress reports

    def with_(self, **changes) -> TrainConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


# Demo recipe, 4x128, context 128, float32 (bf16 autocast: see TrainConfig.bf16). The base sees
#   800 steps x 16 x 128 = 1.6M tokens, each fine-tune 100 steps on its genre, so that each fine-tune
#   beats the base on its own genre and loses to it on the other one (the README's table). Longer
#   fine-tunes do not keep that: a base this small and this briefly trained still gains on both genres
#   from any more text.
DEMO_BASE = TrainConfig(
    n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16,
    steps=800, lr=3e-3, warmup_steps=50, seed=0,
)  # fmt: skip
DEMO_FINETUNE = TrainConfig(
    n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16,
    steps=100, lr=3e-3, warmup_steps=10, seed=1,
)  # fmt: skip


def make_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialized GPT-2 for ``tokenizer`` (uses the global torch RNG)."""
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train(
    text_train: str,
    text_val: str | None,
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerFast,
    init: GPT2LMHeadModel | None = None,
    log: list[dict] | None = None,
    device: str | torch.device = "cpu",
) -> GPT2LMHeadModel:
    """Train a character-level GPT-2 on ``text_train`` and return it (on CPU, in eval mode).

    ``init``: an existing model to fine-tune (it is copied, not modified; its
    architecture and context length are used).  ``text_val`` is only used for
    progress reports (every ``cfg.eval_interval`` steps and at the end, when
    ``eval_interval > 0``); each report is appended to ``log`` if a list is
    given, and printed when ``cfg.verbose``.  ``device``: where to train (e.g. ``"cuda"``); batches are
    drawn on the CPU from the seeded generator, so every device sees the same batches.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    if init is None:
        model = make_model(cfg, tokenizer)
    else:
        model = copy.deepcopy(init).cpu()
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"init has vocab {model.config.vocab_size}, tokenizer has {len(tokenizer)}")
    block = model.config.n_positions
    data = encode_ids(text_train, tokenizer)
    if data.numel() < block + 2:
        raise ValueError(f"training text too short ({data.numel()} tokens) for block size {block}")
    val = encode_ids(text_val, tokenizer)[: cfg.eval_tokens] if text_val else None

    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(block + 1)
    model.to(device)
    opt = _optimizer(model, cfg)
    model.train()
    vocab = model.config.vocab_size
    seen_loss, seen_steps, t_train, t_mark = 0.0, 0, 0.0, time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, data.numel() - block, (cfg.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets].to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        seen_loss += loss.detach()  # no per-step sync with an accelerator
        seen_steps += 1

        last = step == cfg.steps - 1
        if cfg.eval_interval > 0 and ((step + 1) % cfg.eval_interval == 0 or last):
            now = time.perf_counter()
            t_train += now - t_mark
            record = {
                "step": step + 1,
                "train_loss": float(seen_loss) / seen_steps,
                "val_loss": lm_loss(model, val, block, cfg.batch_size) if val is not None else None,
                "tokens_per_s": seen_steps * cfg.batch_size * block / max(now - t_mark, 1e-9),
                "train_seconds": t_train,
                "lr": _lr_at(step, cfg),
            }
            if log is not None:
                log.append(record)
            if cfg.verbose:
                v = f"{record['val_loss']:.4f}" if record["val_loss"] is not None else "-"
                print(
                    f"step {record['step']:>6}  train {record['train_loss']:.4f}  val {v}  "
                    f"{record['tokens_per_s']:,.0f} tok/s  {t_train:.1f}s",
                    flush=True,
                )
            seen_loss, seen_steps, t_mark = 0.0, 0, time.perf_counter()
    return model.cpu().eval()


def eval_loss(
    model: GPT2LMHeadModel,
    text: str,
    tokenizer: PreTrainedTokenizerFast,
    block_size: int | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
) -> float:
    """Mean next-character cross-entropy (nats) on ``text``; see :func:`modelcypher.measure.loss.lm_loss`.

    ``block_size`` defaults to the model's context length; ``max_tokens``
    keeps only the first that many tokens of ``text``.
    """
    ids = encode_ids(text, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return lm_loss(model, ids, block_size or model.config.n_positions, batch_size)


def save(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a normal HF directory (safetensors) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = model.config.n_positions
    tokenizer.save_pretrained(out)
    # Name the generic fast class so transformers 4.x (which lacks TokenizersBackend) loads it too.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


def load(path: str | Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Load a directory written by :func:`save` (offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@torch.no_grad()
def sample(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str = "\n",
    n_chars: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``n_chars`` sampled characters (seeded; prompt not included)."""
    gen = torch.Generator().manual_seed(seed)
    block = model.config.n_positions
    ids = encode_ids(prompt, tokenizer)[None]
    model.eval()
    out: list[int] = []
    for _ in range(n_chars):
        logits = model(input_ids=ids[:, -block:], use_cache=False).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)
