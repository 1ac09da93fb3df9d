"""Probe text sampled from the models themselves: learned matching without data.

Learned matching descends the midpoint's loss on text, and a user may have none at hand (the setting
of data-free alignment, e.g. federated merging). The two models carry their training distribution in
their weights, so text they generate stands in for it: equal shares of sequences sampled from each
model at temperature 1 with no truncation (the models' own distributions, not their most likely
strings), each started from the beginning-of-sequence token, or from a uniformly drawn token when the
config names none. Seeded: the same models and seed give the same probes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def sample_sequences(model: torch.nn.Module, n: int, length: int, *, start: int | None,
                     generator: torch.Generator, batch_size: int = 64) -> torch.Tensor:
    """``[n, length]`` token ids (CPU) sampled from the causal LM ``model``: token 0 is ``start`` (or a
    uniform draw from the vocabulary), each next one a draw from the model's softmax given the tokens
    before it (keys and values cached: one token per forward pass)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    out = []
    for b in range(0, n, batch_size):
        m = min(batch_size, n - b)
        first = (torch.full((m, 1), start, dtype=torch.long) if start is not None
                 else torch.randint(0, vocab, (m, 1), generator=generator))
        seq, past = [first], None
        for _ in range(length - 1):
            mask = torch.ones(m, len(seq), dtype=torch.long, device=device)  # no padding: every token counts
            step = model(input_ids=seq[-1].to(device), attention_mask=mask, past_key_values=past, use_cache=True)
            past = step.past_key_values
            probs = torch.softmax(step.logits[:, -1].float().cpu(), dim=-1)
            seq.append(torch.multinomial(probs, 1, generator=generator))
        out.append(torch.cat(seq, dim=1))
    return torch.cat(out)


def self_probes(models: Iterable[tuple[torch.nn.Module, int | None]], k: int, n: int, length: int,
                seed: int = 0) -> torch.Tensor:
    """``[n, length]`` probe sequences from ``k`` models given as (model, start token) pairs, an equal
    share (the first ones one more when ``k`` does not divide ``n``) from each, shuffled so that every
    batch mixes them. ``models`` may be a generator: each model is used, then let go, in turn."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([sample_sequences(m, n // k + (i < n % k), length, start=s, generator=g)
                      for i, (m, s) in enumerate(models)])
    return rows[torch.randperm(len(rows), generator=g)]
