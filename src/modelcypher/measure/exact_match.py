"""Exact-match accuracy of greedy decoding: does the model, continuing a prompt greedily, write the answer
and then the stop string?

Decoding token by token costs one forward pass per answer token. Teacher forcing decides most examples in
one pass: feed ``prompt + answer + stop`` and read, at every position, the token greedy decoding would
write there. Where it is the answer's token all the way, greedy decoding writes exactly those tokens;
where it leaves them, the text written up to that token is known, and the verdict with it when that text
holds the stop, or already differs from the answer (with a stop of one character, none can begin unseen
inside it). Only the rest — text that may still read as the answer (another tokenization of it), a stop
of several characters, a sequence longer than the context — is decoded token by token. Both paths give
the verdict of decoding every example in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modelcypher.hf import context_length

CHUNK = 256  # examples per forward pass


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    stop: str = "\n"


def _hit(text: str, ex: Example) -> bool:
    """The verdict on a full greedy continuation: what precedes its first stop is the answer."""
    return text.split(ex.stop, 1)[0] == ex.answer


def _by_prompt_length(enc: list[list[int]], idx: Sequence[int]) -> list[list[int]]:
    """``idx`` grouped by prompt length (prompts of one length run together without padding), in chunks."""
    by_len: dict[int, list[int]] = {}
    for i in idx:
        by_len.setdefault(len(enc[i]), []).append(i)
    return [ids[s : s + CHUNK] for _, ids in sorted(by_len.items()) for s in range(0, len(ids), CHUNK)]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@torch.no_grad()
def greedy_verdicts(model, tokenizer, examples: Sequence[Example], idx: Sequence[int],
                    enc: list[list[int]], targets: list[list[int]]) -> dict[int, bool]:
    """The reference: decode ``idx`` token by token, as many tokens as the longest ``answer + stop`` of
    each chunk, and judge the text."""
    device = next(model.parameters()).device
    n_ctx = context_length(model.config, 1 << 30)
    out = {}
    for chunk in _by_prompt_length(enc, idx):
        ids = torch.tensor([enc[i] for i in chunk], device=device)
        new = []
        for _ in range(max(len(targets[i]) for i in chunk)):
            nxt = model(input_ids=ids[:, -n_ctx:], use_cache=False).logits[:, -1].argmax(-1)
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for row, i in zip(torch.stack(new, 1).tolist(), chunk, strict=True):
            out[i] = _hit(_decode(tokenizer, row), examples[i])
    return out


def exact_match(model, tokenizer, examples: Sequence[Example]) -> float:
    """Share of ``examples`` whose greedy continuation, cut at its first stop string, is the answer."""
    hits = verdicts(model, tokenizer, examples)
    return sum(hits) / len(hits) if hits else 0.0


@torch.no_grad()
def verdicts(model, tokenizer, examples: Sequence[Example]) -> list[bool]:
    """Per example, whether its greedy continuation, cut at its first stop string, is the answer."""
    device = next(model.parameters()).device
    n_ctx = context_length(model.config, 1 << 30)
    enc = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    targets = [tokenizer(e.answer + e.stop, add_special_tokens=False)["input_ids"] for e in examples]
    found: dict[int, bool] = {}
    undecided = [i for i, e in enumerate(examples) if not enc[i] or not targets[i]
                 or len(enc[i]) + len(targets[i]) - 1 > n_ctx]
    forced = sorted(set(range(len(examples))) - set(undecided))
    for chunk in _by_prompt_length(enc, forced):
        n = len(enc[chunk[0]])
        width = max(len(targets[i]) for i in chunk)
        # Right padding (any token) changes nothing before it in a causal model.
        rows = [enc[i] + targets[i][:-1] + [targets[i][0]] * (width - len(targets[i])) for i in chunk]
        greedy = model(input_ids=torch.tensor(rows, device=device), use_cache=False).logits[:, n - 1:].argmax(-1)
        for row, i in zip(greedy.tolist(), chunk, strict=True):
            t, ex = targets[i], examples[i]
            j = next((k for k in range(len(t)) if row[k] != t[k]), None)  # where greedy leaves the answer
            written = _decode(tokenizer, t if j is None else t[:j] + [row[j]])
            if ex.stop in written:  # what precedes the first stop is written already
                found[i] = _hit(written, ex)
            elif j is not None and len(ex.stop) == 1 and not (ex.answer + ex.stop).startswith(written):
                found[i] = False  # the text already differs from the answer, before any stop
            else:
                undecided.append(i)
    found.update(greedy_verdicts(model, tokenizer, examples, undecided, enc, targets))
    return [found[i] for i in range(len(examples))]
