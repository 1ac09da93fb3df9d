"""Anchors two models share although their tokenizers differ: spans of characters of the probe text.

The text is cut into segments short enough for both models' contexts; every whitespace-separated word of
a segment is an anchor. Each model reads each segment with its own tokenizer; a span's representation in
a layer is the mean of the hidden states of the tokens whose characters overlap it (offsets from the
tokenizer), so a character-level model and a BPE model pool different tokens over the same text.
Mean-pooling is linear, so a linear relation between two models' token states holds for the pooled
anchors too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import torch

from modelcypher.errors import UserError

SEGMENT_BATCH = 16
WORD = re.compile(r"\S+")


def default_probes() -> str:
    """The probe corpus that ships with the package (``measure/data/PROBES.md`` says what is in it)."""
    return resources.files("modelcypher.measure").joinpath("data/probes.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Segment:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges [start, end) of the anchors inside ``text``


def segments(text: str, max_chars: int, *, lines: bool = False) -> list[Segment]:
    """``text`` cut at whitespace into pieces of at most ``max_chars`` characters, each with its words.
    A word longer than ``max_chars`` is cut.

    ``lines``: each non-blank line is a piece of its own, read between its line breaks (``"\n" + line +
    "\n"``: the last character read is the line's end), as a text of one example per line is trained and
    asked, each example alone; a line longer than ``max_chars`` is cut as above."""
    if lines:
        out = []
        for line in filter(str.strip, text.split("\n")):
            framed = "\n" + line + "\n"
            out += ([Segment(framed, tuple(m.span() for m in WORD.finditer(framed)))] if len(framed) <= max_chars
                    else segments(line, max_chars))
        return out
    out, words, start = [], [], None
    for m in WORD.finditer(text):
        s, e = m.start(), min(m.end(), m.start() + max_chars)
        if start is not None and e - start > max_chars:
            out.append(Segment(text[start:words[-1][1]], tuple((a - start, b - start) for a, b in words)))
            start, words = None, []
        if start is None:
            start = s
        words.append((s, e))
    if words:
        out.append(Segment(text[start:words[-1][1]], tuple((a - start, b - start) for a, b in words)))
    return out


def token_segments(segs: list[Segment], tokenizers) -> list[Segment]:
    """The same text, anchored where every tokenizer ends a token: one anchor per character offset ``c``
    that ends a token of each tokenizer, as the one-character span ``[c - 1, c)``. The token holding that
    character ends at ``c`` in every model, so its hidden state has read exactly ``text[:c]`` in each: the
    anchors compare models on identical prefixes, token by token (every character for two character-level
    models, every BPE token against a character model)."""
    out = []
    for seg in segs:
        ends = None
        for tok in tokenizers:
            _, offs = token_offsets(tok, seg.text)
            e = {b for a, b in offs if b > a}
            ends = e if ends is None else ends & e
        out.append(Segment(seg.text, tuple((c - 1, c) for c in sorted(ends or ()) if c > 0)))
    return out


def pooling_weights(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...], length: int) -> torch.Tensor:
    """``[n_spans, length]``: row ``i`` averages the tokens whose characters overlap span ``i`` (zero rows
    for spans no token covers, e.g. cut off by the context)."""
    w = torch.zeros(len(spans), length, dtype=torch.float64)
    for t, (a, b) in enumerate(offsets[:length]):
        if b <= a:
            continue
        for i, (s, e) in enumerate(spans):
            if a < e and b > s:
                w[i, t] = 1.0
    return w / w.sum(1, keepdim=True).clamp_min(1.0)


@dataclass
class Pooled:
    """Per layer ``[n, d]`` pooled hidden states (index 0: embeddings, as transformers counts them), the
    pooled activations of hooked modules by key, and which anchors every token stream covered."""

    states: list[torch.Tensor]
    hooked: dict[str, torch.Tensor]
    covered: torch.Tensor


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s token ids and each token's character range ``(start, end)`` (a fast tokenizer's offsets)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise UserError(f"the tokenizer {type(tokenizer).__name__} gives no character offsets (a fast tokenizer, "
                        "tokenizer.json, is needed to pool over shared text spans)") from None
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


@torch.no_grad()
def pool(model: torch.nn.Module, tokenizer, segs: list[Segment], context: int,
         hooks: Mapping[str, tuple[torch.nn.Module, str]] | None = None,
         device: torch.device | str = "cpu") -> Pooled:
    """Run every segment through ``model`` and pool its hidden states (and the ``input`` or ``output`` of
    every hooked module, keyed as given) over the segments' spans. Each result is filled in place, one
    ``[n_spans, d]`` tensor per layer and hook (no per-segment pieces joined at the end: half the peak)."""
    hooks = dict(hooks or {})
    n = sum(len(s.spans) for s in segs)
    states: list[torch.Tensor] = []
    hooked: dict[str, torch.Tensor] = {}
    covered = torch.zeros(n, dtype=torch.bool)
    current: dict[str, torch.Tensor] = {}
    handles = []
    for key, (module, where) in hooks.items():
        def grab(mod, args, out, key=key, where=where):
            current[key] = (args[0] if where == "input" else out).detach()
        handles.append(module.register_forward_hook(grab))

    def put(store: torch.Tensor | None, at: int, rows: torch.Tensor) -> torch.Tensor:
        if store is None:
            store = torch.zeros(n, rows.shape[1], dtype=torch.float64)
        store[at:at + len(rows)] = rows
        return store

    at = 0
    try:
        for k in range(0, len(segs), SEGMENT_BATCH):
            batch = segs[k:k + SEGMENT_BATCH]
            encoded = [token_offsets(tokenizer, s.text) for s in batch]
            length = min(context, max(len(ids) for ids, _ in encoded))
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            weights = []
            for r, ((tok, offs), seg) in enumerate(zip(encoded, batch, strict=True)):
                tok = tok[:length]
                ids[r, :len(tok)] = torch.tensor(tok, dtype=torch.long)
                weights.append(pooling_weights(offs[:len(tok)], seg.spans, length))
            # Right padding needs no attention mask: a causal model's real tokens never see later pads.
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            if not states:
                states = [None] * len(out.hidden_states)
            for r, w in enumerate(weights):
                covered[at:at + len(w)] = w.sum(1) > 0
                for i, h in enumerate(out.hidden_states):
                    states[i] = put(states[i], at, w @ h[r].double().cpu())
                for key in hooks:
                    hooked[key] = put(hooked.get(key), at, w @ current[key][r].double().cpu())
                at += len(w)
    finally:
        for h in handles:
            h.remove()
    return Pooled(states, hooked, covered)
