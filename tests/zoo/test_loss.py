import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from modelcypher.measure.loss import lm_loss


class Bigram(torch.nn.Module):
    """Context-free model: logits at t depend on token t only."""

    def __init__(self, v):
        super().__init__()
        self.table = torch.nn.Embedding(v, v)

    def forward(self, x):
        return self.table(x)


def test_context_free_model_matches_single_cross_entropy():
    torch.manual_seed(0)
    m = Bigram(11)
    ids = torch.randint(0, 11, (103,))
    expected = F.cross_entropy(m(ids[:-1]), ids[1:]).item()
    for block, batch in [(4, 3), (10, 1), (16, 64), (500, 2)]:
        assert lm_loss(m, ids, block, batch) == pytest.approx(expected, rel=1e-6)


def test_gpt2_matches_hand_computed_windows():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 13, (23,))
    block = 5
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):  # windows [0:6], [5:11], [10:16], [15:21], [20:23]
            w = ids[start : start + block + 1]
            logits = model.eval()(input_ids=w[None, :-1]).logits[0]
            total += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += len(w) - 1
    model.train()
    assert count == len(ids) - 1
    got = lm_loss(model, ids, block_size=block, batch_size=2)
    assert got == pytest.approx(total / count, rel=1e-6)
    assert model.training  # mode restored
    assert lm_loss(model, ids, block, 1) == pytest.approx(got, rel=1e-6)


def test_rejects_too_short():
    with pytest.raises(ValueError):
        lm_loss(Bigram(3), torch.tensor([1]), 4, 1)
