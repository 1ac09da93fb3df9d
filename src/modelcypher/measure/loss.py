"""Language-model loss on held-out token streams."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out


def lm_loss(
    model,
    token_ids: torch.Tensor,
    block_size: int,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over a 1-D token stream.

    The stream is cut into consecutive windows of ``block_size + 1`` tokens that
    overlap by one token (window ``k`` starts at ``k * block_size``), so every
    token after the first is predicted exactly once, with the context available
    inside its window; a shorter last window takes the remainder.  The result is
    the sum of the per-token losses divided by ``len(token_ids) - 1``.
    Deterministic; no sampling.  ``model`` is an HF causal LM (anything whose
    ``model(input_ids=x).logits`` has shape ``(B, T, V)``) or a plain module
    returning such logits; it is run in eval mode under ``torch.no_grad`` and
    its train/eval mode is restored afterwards.  ``device`` defaults to the
    device of the model's parameters.
    """
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    n = ids.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens to measure a next-token loss")
    if block_size < 1 or batch_size < 1:
        raise ValueError("block_size and batch_size must be positive")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")

    if n >= block_size + 1:
        full = ids.unfold(0, block_size + 1, block_size)  # (n_windows, block_size + 1)
        tail_start = full.shape[0] * block_size
    else:
        full = ids.new_empty((0, block_size + 1))
        tail_start = 0
    tail = ids[tail_start:] if n - tail_start >= 2 else None

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad():
            chunks = list(full.split(batch_size)) + ([tail[None]] if tail is not None else [])
            for w in chunks:
                w = w.to(device)
                logits = _logits(model, w[:, :-1]).float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
                total += loss.double().cpu()
    finally:
        model.train(was_training)
    return float(total / (n - 1))
