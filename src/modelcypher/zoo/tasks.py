"""Small text tasks with exact answers, for character-level language models.

Every example is one line ``NAME[INPUT]ANSWER`` followed by a newline, e.g. ``rev[stone]enots``.
A model is asked the prompt ``NAME[INPUT]`` (preceded by a newline, the start of a line) and
scored by exact match of what it writes after the ``]`` up to the next newline.  The brackets are
used because the bundled Shakespeare vocabulary (:func:`modelcypher.zoo.shakespeare.vocab`) has no
``=``, ``+`` or ``>``; every character of every example is in that vocabulary.

Tasks (:data:`TASKS`); inputs are random lowercase strings drawn from a seed:

========  =============================================  ======================
name      answer                                         example
========  =============================================  ======================
``rev``   the word reversed (3-5 letters)                ``rev[plum]mulp``
``sort``  its letters in alphabetical order (3-5)        ``sort[plum]lmpu``
``up``    the word in capitals (3-7)                     ``up[plum]PLUM``
``rot``   every letter shifted by one, z -> a (3-7)      ``rot[plum]qmvn``
``len``   the number of letters (1-9)                    ``len[plum]4``
``copy``  the word itself (3-7)                          ``copy[plum]plum``
========  =============================================  ======================

Two-digit addition (``add[47,38]85``) is also defined (:data:`EXTRA_TASKS`) but left out of the
default set: a 4x128 model fine-tuned for a few hundred steps stays below 5 % on it, and the
benchmark needs tasks each fine-tune masters (merged accuracy is normalized by it).

:func:`make_splits` draws distinct inputs and cuts them
into disjoint train/validation/test sets, the same for the same seed on any machine (only
:class:`random.Random` is used).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modelcypher.zoo.chartok import encode_ids

OPEN, CLOSE, END = "[", "]", "\n"
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    task: str
    input: str
    answer: str

    @property
    def prompt(self) -> str:
        """What the model is given: ``NAME[INPUT]`` (without the leading newline)."""
        return f"{self.task}{OPEN}{self.input}{CLOSE}"

    @property
    def line(self) -> str:
        """The full training line, newline included."""
        return f"{self.prompt}{self.answer}{END}"


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _rot1(w: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _add_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)},{rng.randint(0, 99)}"


def _add_answer(x: str) -> str:
    a, b = x.split(",")
    return str(int(a) + int(b))


# name -> (input generator, answer function)
TASKS: dict[str, tuple[Callable[[random.Random], str], Callable[[str], str]]] = {
    "rev": (lambda rng: _word(rng, 3, 5), lambda w: w[::-1]),
    "sort": (lambda rng: _word(rng, 3, 5), lambda w: "".join(sorted(w))),
    "up": (_word, str.upper),
    "rot": (_word, _rot1),
    "len": (lambda rng: _word(rng, 1, 9), lambda w: str(len(w))),
    "copy": (_word, lambda w: w),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)  # the default benchmark set
EXTRA_TASKS: dict[str, tuple[Callable[[random.Random], str], Callable[[str], str]]] = {
    "add": (_add_input, _add_answer),
}
_ALL = {**TASKS, **EXTRA_TASKS}


def answer(task: str, inp: str) -> str:
    """The exact answer of ``task`` on input ``inp``."""
    return _ALL[task][1](inp)


def make_splits(
    task: str, sizes: Sequence[int] = (2000, 300, 300), seed: int = 0
) -> tuple[list[Example], ...]:
    """Disjoint splits (e.g. train, val, test) of ``task`` with distinct inputs, deterministic in ``seed``.

    Raises ``ValueError`` if the task has too few distinct inputs for the sizes asked.
    """
    if task not in _ALL:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(_ALL)}")
    gen, ans = _ALL[task]
    rng = random.Random(f"{task}:{seed}")
    total = sum(sizes)
    seen: set[str] = set()
    inputs: list[str] = []
    tries = 0
    while len(inputs) < total:
        tries += 1
        if tries > 50 * total + 1000:
            raise ValueError(f"task {task!r}: could not draw {total} distinct inputs")
        x = gen(rng)
        if x not in seen:
            seen.add(x)
            inputs.append(x)
    out, start = [], 0
    for n in sizes:
        out.append([Example(task, x, ans(x)) for x in inputs[start : start + n]])
        start += n
    return tuple(out)


def to_text(examples: Sequence[Example]) -> str:
    """The examples as training text: one line each, every line ending in a newline."""
    return "".join(e.line for e in examples)


def score(examples: Sequence[Example], outputs: Sequence[str]) -> float:
    """Exact-match accuracy of ``outputs`` (what the model wrote after ``]``, up to the newline).

    Anything from the first newline of an output on is ignored; nothing else is stripped.
    """
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} examples but {len(outputs)} outputs")
    if not examples:
        return 0.0
    hits = sum(e.answer == o.split(END, 1)[0] for e, o in zip(examples, outputs, strict=True))
    return hits / len(examples)


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: Sequence[Example], max_new: int = 16,
                   batch_size: int = 512) -> list[str]:
    """Greedy completions of each example's prompt (after a newline), up to a newline or ``max_new`` chars.

    Prompts of equal length are decoded together, so no padding is involved and the result does not
    depend on the batch composition beyond float round-off.
    """
    nl = int(encode_ids(END, tokenizer)[0])
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # decode where the model is
    prompts = [END + e.prompt for e in examples]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    outs: list[str] = [""] * len(prompts)
    block = model.config.n_positions
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.stack([encode_ids(prompts[i], tokenizer) for i in chunk]).to(device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            new = []
            for _ in range(max_new):
                logits = model(input_ids=ids[:, -block:], use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1)
                new.append(nxt)
                done |= nxt == nl
                if bool(done.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            gen = torch.stack(new, dim=1).cpu()
            for row, i in enumerate(chunk):
                outs[i] = "".join(id_to_tok[t] for t in gen[row].tolist()).split(END, 1)[0]
    return outs


def accuracy(model, tokenizer, examples: Sequence[Example], max_new: int = 16) -> float:
    """Exact-match accuracy of greedy decoding on ``examples``."""
    return score(examples, greedy_answers(model, tokenizer, examples, max_new))
