"""Refinement of a moved adapter in the one space two models of different tokenizers share exactly: the
next character.

At an anchor (a character offset where both tokenizers end a token, ``measure.anchors.token_segments``)
both models have read the same prefix, and each one's next-token distribution, summed over the tokens by
their first character, is a distribution over the next character (:func:`first_chars`). A's adapter moves
A's by ``log p_A+ - log p_A``; the target for B is B's own distribution moved alike,
``q ∝ p_B · p_A+ / p_A`` (where A's adapter changes nothing, B stays itself: the drift is A's adapter's, not
A's). The moved factors are the start; they are trained on the probe text to ``min KL(q || p_B+)`` (mean
over anchors, Adam), and kept only if they end with a lower loss than they started (a start already at
the target, as in the exact case, is left as it is).

Only the first character of B's next token is taught (what A's one pass says about every token of B's
vocabulary at once): the rest of a longer token is left to B. Every anchor of the probe text is used
(``--max-anchors`` thins the fits' anchors only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modelcypher.errors import UserError
from modelcypher.measure.anchors import SEGMENT_BATCH, Segment, token_offsets
from modelcypher.measure.drift import kl_rows
from modelcypher.transfer.spaces import updated

LR = 2e-3
BATCH = 16  # segments a step


def first_chars(tokenizer, alphabet: Mapping[str, int]) -> torch.Tensor:
    """``[vocab]``: each token's first character's index in ``alphabet``; ``len(alphabet)`` (the rest) for
    special tokens, byte pieces of a longer character and characters outside it. A SentencePiece word
    start (``▁``) is a space, which decoding one token alone drops."""
    special = set(tokenizer.all_special_ids)
    out = torch.full((len(tokenizer),), len(alphabet), dtype=torch.long)
    for t in range(len(tokenizer)):
        if t in special:
            continue
        s = tokenizer.decode([t])
        piece = tokenizer.convert_ids_to_tokens(t)
        if isinstance(piece, str) and piece.startswith("▁") and not s.startswith(" "):
            s = " " + s
        if s and s[0] in alphabet:
            out[t] = alphabet[s[0]]
    return out


def anchor_rows(tokenizer, segs: list[Segment], context: int) -> list[tuple[list[int], list[int]]]:
    """Per segment: its token ids (at most ``context``) and the index of the token ending at each anchor
    that has a next character."""
    rows = []
    for seg in segs:
        ids, offs = token_offsets(tokenizer, seg.text)
        end = {b: k for k, (a, b) in enumerate(offs[:context]) if b > a}
        rows.append((ids[:context], [end[c] for _, c in seg.spans if c < len(seg.text) and c in end]))
    return rows


def char_logprobs(model: torch.nn.Module, rows, fc: torch.Tensor, n_chars: int,
                  device: torch.device | str) -> torch.Tensor:
    """``[n, n_chars + 1]``: log-probabilities of the next character at the anchors of ``rows`` (a batch of
    :func:`anchor_rows`), in their order; differentiable."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    picks = []
    for r, (tok, pos) in enumerate(rows):
        ids[r, :len(tok)] = torch.tensor(tok, dtype=torch.long)
        picks += [(r, p) for p in pos]
    logits = model(input_ids=ids.to(device)).logits  # right padding: causal, real tokens never see it
    if not picks:
        return torch.zeros(0, n_chars + 1, device=logits.device)
    r_idx, p_idx = (torch.tensor(x, device=logits.device) for x in zip(*picks, strict=True))
    lp = torch.log_softmax(logits[r_idx, p_idx].float(), -1)  # [n, vocab]
    # A vocabulary padded past its tokenizer (as Qwen2's is) sends its extra rows to the rest
    cols = torch.full((lp.shape[1],), n_chars, dtype=torch.long)
    cols[:min(len(fc), len(cols))] = fc[:len(cols)]
    per_char = torch.zeros(lp.shape[0], n_chars + 1, device=lp.device).index_add(1, cols.to(lp.device), lp.exp())
    return per_char.clamp_min(1e-30).log()


@torch.no_grad()
def all_logprobs(model, rows, fc, n_chars, device, factors=None) -> torch.Tensor:
    with updated(model, factors or {}):
        return torch.cat([char_logprobs(model, rows[k:k + SEGMENT_BATCH], fc, n_chars, device).cpu()
                          for k in range(0, len(rows), SEGMENT_BATCH)])


def kl(q_log: torch.Tensor, p_log: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(q || p)`` over rows of log-probabilities."""
    return kl_rows(q_log, p_log).mean()


def refine(model, rows, fc, n_chars, device, target: torch.Tensor, factors: dict, steps: int,
           seed: int = 0) -> tuple[dict, dict]:
    """``factors`` (``name: (left, right)``) trained ``steps`` Adam steps to ``min KL(target || p_B+)`` over
    the anchors (``target``: log-probabilities, in the order of :func:`all_logprobs`); returned with the loss
    before and after, the start kept when training did not lower it."""
    starts = [0]
    for _, pos in rows:
        starts.append(starts[-1] + len(pos))
    before = float(kl(target, all_logprobs(model, rows, fc, n_chars, device, factors)))
    params = {n: (l.detach().float().to(device).requires_grad_(), r.detach().float().to(device).requires_grad_())
              for n, (l, r) in factors.items()}
    opt = torch.optim.Adam([t for pair in params.values() for t in pair], lr=LR)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        pick = torch.randperm(len(rows), generator=g)[:BATCH].tolist()
        batch = [rows[k] for k in pick]
        tgt = torch.cat([target[starts[k]:starts[k + 1]] for k in pick]).to(device)
        if not len(tgt):
            continue
        with updated(model, params):
            loss = kl(tgt, char_logprobs(model, batch, fc, n_chars, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {n: (l.detach().cpu().double(), r.detach().cpu().double()) for n, (l, r) in params.items()}
    after = float(kl(target, all_logprobs(model, rows, fc, n_chars, device, trained)))
    report = {"steps": steps, "kl_before": before, "kl_after": after, "kept": after < before}
    return (trained if after < before else factors), report


def refine_in_characters(sides, own: dict, factors: dict, segs: list[Segment], text: str, steps: int,
                         device) -> tuple[dict, dict]:
    """The moved ``factors`` (on ``sides[1]``, B) refined ``steps`` steps toward A's adapter (``own``, on
    ``sides[0]``) moving B's next characters as it moves A's, at the anchors of ``segs`` (token anchors)."""
    alphabet = {c: i for i, c in enumerate(sorted(set(text)))}
    fcs = [first_chars(s.tokenizer, alphabet) for s in sides]
    rows = [anchor_rows(s.tokenizer, segs, s.context) for s in sides]
    if [len(p) for _, p in rows[0]] != [len(p) for _, p in rows[1]]:  # token anchors end a token in both
        raise UserError("transfer --refine: the two tokenizers do not both end a token at every anchor")
    n = len(alphabet)
    base_a, with_a = (all_logprobs(sides[0].model, rows[0], fcs[0], n, device, f) for f in (None, own))
    base_b = all_logprobs(sides[1].model, rows[1], fcs[1], n, device)
    target = torch.log_softmax(base_b + with_a - base_a, 1)  # q ∝ p_B p_A+ / p_A
    out, report = refine(sides[1].model, rows[1], fcs[1], n, device, target, factors, steps)
    return out, report | {"anchors": len(target), "kl_base": float(kl(target, base_b))}
