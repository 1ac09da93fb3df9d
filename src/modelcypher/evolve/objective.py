"""Objectives: what a candidate model scores, higher is better.

- ``loss: FILE``: minus the next-token loss (nats per token) on the text (:func:`modelcypher.measure.loss.lm_loss`);
- ``task: FILE``: exact-match accuracy of greedy decoding on a task file, JSON lines
  ``{"prompt": ..., "answer": ...}`` (optionally ``"stop"``, default a newline): the model continues each
  prompt and is right when what it writes up to the stop string is the answer;
- ``python: module:function``: ``function(model, tokenizer) -> number`` (the module is looked up beside
  the search file first); the model is a transformers model on the worker's device, in eval mode.

Several terms add up, each times its ``weight``.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.evolve.config import Term
from modelcypher.hf import context_length, load_tokenizer, read_text, token_ids
from modelcypher.measure.exact_match import Example, exact_match
from modelcypher.measure.loss import lm_loss

LOSS_CONTEXT = 1024  # tokens per window of a loss objective, at most


def read_tasks(path: Path) -> list[Example]:
    """A task file: one JSON object per line with ``prompt`` and ``answer`` (and optionally ``stop``)."""
    out = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ex = Example(**row)
            if not all(isinstance(v, str) for v in (ex.prompt, ex.answer, ex.stop)) or not ex.stop:
                raise TypeError("prompt, answer and stop must be strings, stop not empty")
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path}:{i}: expected {{\"prompt\": ..., \"answer\": ...}} ({e})") from None
        out.append(ex)
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def import_function(spec: str, config_dir: Path | None) -> Callable:
    """``module:function``, the module looked up beside the search file first."""
    module, name = spec.split(":")
    if config_dir is not None and str(config_dir.resolve()) not in sys.path:
        sys.path.insert(0, str(config_dir.resolve()))
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # a user's module may raise anything on import
        raise UserError(f"python objective {spec}: cannot import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"python objective {spec}: not a function")
    return fn


class Objective:
    """The weighted objective of a search, its data read once (on a worker)."""

    def __init__(self, terms: list[Term], config_dir: Path | None, tokenizer_dir: Path, config: dict):
        self.terms = terms
        self._tokenizer_dir = tokenizer_dir
        self._config_dir = config_dir
        self._block = context_length(config, LOSS_CONTEXT)
        self._tok = None
        self._data: list[object] = []
        for t in terms:
            if t.kind == "loss":
                path = resolve_path(t.loss, config_dir, what="objective text")
                self._data.append(token_ids(tokenizer_dir, read_text(path), t.max_tokens))
            elif t.kind == "task":
                self._data.append(read_tasks(resolve_path(t.task, config_dir, what="objective task file")))
            else:
                self._data.append(None)  # imported when first scored: a failure is the candidates' to report

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self._tokenizer_dir, "for the objective")
        return self._tok

    def score(self, model) -> list[float]:
        """Each term's fitness (not yet weighted)."""
        out = []
        for t, data in zip(self.terms, self._data, strict=True):
            if t.kind == "loss":
                out.append(-lm_loss(model, data, self._block))
            elif t.kind == "task":
                out.append(exact_match(model, self.tokenizer, data))
            else:
                value = import_function(t.python, self._config_dir)(model, self.tokenizer)
                try:
                    out.append(float(value))
                except (TypeError, ValueError):
                    raise UserError(f"python objective {t.python}: returned {type(value).__name__}, "
                                    "not a number") from None
        return out
