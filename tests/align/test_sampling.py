"""Probes sampled from the models: each token drawn from the model's own next-token distribution."""

from __future__ import annotations

import torch
from tiny_models import VOCAB, tiny_model

from modelcypher.align.equivalence import build_model
from modelcypher.align.sampling import sample_sequences, self_probes


def peaked_gpt2(seed: int) -> torch.nn.Module:
    config, sd = tiny_model("gpt2", tie=True, seed=seed)
    sd = {k: v * 3 if k == "transformer.wte.weight" else v for k, v in sd.items()}  # far from uniform
    return build_model(config, sd)


def test_the_first_drawn_token_follows_the_models_distribution():
    model = peaked_gpt2(0)
    n = 6000
    rows = sample_sequences(model, n, 2, start=5, generator=torch.Generator().manual_seed(0), batch_size=1000)
    assert rows.shape == (n, 2) and bool((rows[:, 0] == 5).all())
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([[5]])).logits[0, -1].double(), -1)
    assert float(p.max()) > 0.2  # a distribution a bad sampler would miss
    freq = torch.bincount(rows[:, 1], minlength=VOCAB).double() / n
    assert float((freq - p).abs().max()) < 5 * float((p * (1 - p) / n).sqrt().max())


def test_later_tokens_condition_on_the_sampled_prefix():
    """With the cache, position 2 is drawn given positions 0 and 1: compare with a full forward pass."""
    model = peaked_gpt2(1)
    n = 6000
    rows = sample_sequences(model, n, 3, start=7, generator=torch.Generator().manual_seed(1), batch_size=n)
    prefix = torch.mode(rows[:, 1]).values  # the most frequent second token
    third = rows[rows[:, 1] == prefix, 2]
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([[7, int(prefix)]])).logits[0, -1].double(), -1)
    freq = torch.bincount(third, minlength=VOCAB).double() / len(third)
    assert len(third) > 1000
    assert float((freq - p).abs().max()) < 5 * float((p * (1 - p) / len(third)).sqrt().max())


def test_probes_share_the_models_equally_are_seeded_and_mixed():
    a, b = peaked_gpt2(0), peaked_gpt2(1)
    rows = self_probes([(a, None), (b, None)], 2, 9, 6, seed=3)
    again = self_probes(iter([(a, None), (b, None)]), 2, 9, 6, seed=3)
    assert rows.shape == (9, 6) and torch.equal(rows, again)
    assert int(rows.min()) >= 0 and int(rows.max()) < VOCAB
    g = torch.Generator().manual_seed(3)
    first = sample_sequences(a, 5, 6, start=None, generator=g)  # the shares: 5 from a, then 4 from b
    second = sample_sequences(b, 4, 6, start=None, generator=g)
    unshuffled = torch.cat([first, second])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, unshuffled.tolist()))
    assert not torch.equal(rows, unshuffled)
    assert not torch.equal(rows, self_probes([(a, None), (b, None)], 2, 9, 6, seed=4))
