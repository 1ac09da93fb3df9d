import pytest
import torch

from modelcypher.zoo import chartok, shakespeare, tasks


def test_generation_is_deterministic_and_seeded():
    for t in (*tasks.TASK_NAMES, *tasks.EXTRA_TASKS):
        a = tasks.make_splits(t, (50, 20, 20), seed=3)
        b = tasks.make_splits(t, (50, 20, 20), seed=3)
        assert a == b
        assert tasks.make_splits(t, (50, 20, 20), seed=4) != a


def test_splits_disjoint_sized_and_correct():
    for t in (*tasks.TASK_NAMES, *tasks.EXTRA_TASKS):
        splits = tasks.make_splits(t, (200, 50, 50))
        assert [len(s) for s in splits] == [200, 50, 50]
        inputs = [{e.input for e in s} for s in splits]
        assert sum(len(s) for s in inputs) == 300  # distinct within and across splits
        for e in (e for s in splits for e in s):
            assert e.answer == tasks.answer(t, e.input)


def test_vocabulary_and_format():
    vocab = set(shakespeare.vocab())
    for t in (*tasks.TASK_NAMES, *tasks.EXTRA_TASKS):
        ex = tasks.make_splits(t, (100, 10, 10))
        text = tasks.to_text([e for s in ex for e in s])
        assert set(text) <= vocab
        assert all(line.count("]") == 1 for line in text.splitlines())


def test_hand_examples():
    assert tasks.answer("rev", "plum") == "mulp"
    assert tasks.answer("sort", "plum") == "lmpu"
    assert tasks.answer("add", "47,8") == "55"
    assert tasks.answer("up", "plum") == "PLUM"
    assert tasks.answer("rot", "plum") == "qmvn"
    assert tasks.answer("rot", "zoo") == "app"
    assert tasks.answer("len", "plum") == "4"
    assert tasks.answer("copy", "plum") == "plum"
    e = tasks.Example("rev", "plum", "mulp")
    assert e.prompt == "rev[plum]" and e.line == "rev[plum]mulp\n"


def test_score_exact_match():
    ex = [tasks.Example("rev", "ab", "ba"), tasks.Example("rev", "abc", "cba"), tasks.Example("len", "ab", "2")]
    assert tasks.score(ex, ["ba", "cb", "2\nrev[x]"]) == pytest.approx(2 / 3)  # text after the newline ignored
    assert tasks.score(ex, ["ba ", "cba", "2"]) == pytest.approx(2 / 3)  # no stripping
    with pytest.raises(ValueError):
        tasks.score(ex, ["ba"])


class _Oracle(torch.nn.Module):
    """A fake LM that 'knows' the answers: next token = the answer character for this prompt."""

    def __init__(self, tok, examples):
        super().__init__()
        self.tok = tok
        self.config = type("C", (), {"n_positions": 64})()
        self.lines = [chartok.encode_ids("\n" + e.line, tok).tolist() for e in examples]

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for b, row in enumerate(input_ids.tolist()):
            for line in self.lines:
                if line[: len(row)] == row and len(line) > len(row):
                    logits[b, -1, line[len(row)]] = 1.0
        return type("O", (), {"logits": logits})()


def test_greedy_decoding_with_an_oracle():
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    ex = list(tasks.make_splits("rev", (0, 0, 12))[2]) + list(tasks.make_splits("len", (0, 0, 5))[2])
    model = _Oracle(tok, ex[:-3])  # the last three are unknown to it: it answers wrongly
    outs = tasks.greedy_answers(model, tok, ex, max_new=8, batch_size=4)
    assert outs[: len(ex) - 3] == [e.answer for e in ex[:-3]]
    assert tasks.accuracy(model, tok, ex, max_new=8) == pytest.approx((len(ex) - 3) / len(ex))
