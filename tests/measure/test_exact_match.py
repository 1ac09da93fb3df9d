"""Exact match by teacher forcing gives, example by example, the verdict of decoding token by token."""

from __future__ import annotations

import pytest
import tokenizers
import torch
import transformers as tf

from modelcypher.measure.exact_match import Example, greedy_verdicts, verdicts
from modelcypher.zoo import chartok, gpt2, shakespeare

TEXT = shakespeare.text()[:20000]


def char_model():
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    torch.manual_seed(0)
    model = gpt2.make_model(gpt2.TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), tok).eval()
    return model, tok


def bpe_model():
    """A byte-level BPE trained on Shakespeare (merges, so one text has several tokenizations), and a
    random GPT-2 over it."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe)
    torch.manual_seed(1)
    config = tf.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                           bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config).eval(), tok


def examples_from(model, tok, n: int = 48) -> list[Example]:
    """Hits and near misses: each prompt's answer is cut from the model's own greedy continuation, at a
    stop of one or two characters it writes; half the answers are then changed in one character, some
    at their end, and a few prompts are long enough to leave the context."""
    out = []
    for k in range(n):
        start = 97 * k
        prompt = TEXT[start:start + 5 + k % 7]
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            written = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        text = tok.decode(written.tolist(), clean_up_tokenization_spaces=False)
        # the stop: the first character (or two) the continuation writes that it has not written before
        cut = next((c for c in range(1 + k % 3, len(text) - 2) if text[c] not in text[:c]), len(text) - 2)
        stop = text[cut:cut + 1 + (k % 5 == 0)]
        answer = text[:cut]
        if k % 2:
            pos = (k // 2) % len(answer)
            answer = answer[:pos] + ("x" if answer[pos] != "x" else "y") + answer[pos + 1:]
        if k % 11 == 3:
            prompt = TEXT[:200] + prompt  # longer than the context of 64
        out.append(Example(prompt, answer, stop))
    return out


@pytest.mark.parametrize("make", [char_model, bpe_model], ids=["char", "bpe"])
def test_teacher_forcing_gives_the_verdicts_of_decoding(make):
    model, tok = make()
    exs = examples_from(model, tok)
    enc = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in exs]
    targets = [tok(e.answer + e.stop, add_special_tokens=False)["input_ids"] for e in exs]
    reference = greedy_verdicts(model, tok, exs, range(len(exs)), enc, targets)
    fast = verdicts(model, tok, exs)
    assert fast == [reference[i] for i in range(len(exs))]
    assert 0 < sum(fast) < len(fast)  # both kinds of verdict are exercised


def test_one_forward_pass_per_prompt_length_when_teacher_forcing_decides():
    model, tok = char_model()
    exs = [e for e in examples_from(model, tok) if len(e.stop) == 1 and len(e.prompt) < 50]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    verdicts(model, tok, exs)
    assert len(calls) == len({len(e.prompt) for e in exs})
