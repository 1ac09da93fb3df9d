"""The output's tokenizer and vocabulary: mergekit's ``tokenizer_source``, ``tokenizer:`` section and
``chat_template``.

Planning (tokenizer files only, no tensor data) fixes the output vocabulary and, for every vocabulary
tensor, where each input's rows come from (a :class:`RowMap`). The runner then gathers those rows as it
reads each tensor (:func:`gather`), so the merge method sees every input laid out in the output's
vocabulary, and the writer saves the output's tokenizer beside the tensors.

The rules are mergekit's. The output vocabulary is the base's (``base``), a model's (its name), or the
``union``: the base's tokens keep their ids, the other models' tokens follow (their ordinary tokens,
then their added tokens, by model in config order, each by id). A model's tokens beyond its own
``vocab_size`` have no row and are left out of the base's and the union's vocabulary. Each input keeps its
own row for a token it has; a row it lacks (or that ``force`` overrides) is taken, for every input
alike, from the token's rule in ``tokens:``, else from the only model that has the token, else the base's
row, else the mean of the rows of the models that have it, else zeros. Rows padded on to a multiple
(``pad_to_multiple_of``) are each input's mean row over the real vocabulary (Hewitt 2021, "Initializing
new word embeddings for pretrained language models").
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelcypher.checkpoint.files import copy_side_files
from modelcypher.checkpoint.reader import TOKENIZER_FILES
from modelcypher.errors import UserError
from modelcypher.hf import load_tokenizer
from modelcypher.merging.config import MergeConfig, ModelTokenEmbedding, TokenizerConfig, ZeroEmbedding

TEMPLATES = Path(__file__).parent / "chat_templates"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


# ----------------------------------------------------------------------------- the plan's records


@dataclass(frozen=True)
class TokenRule:
    """A ``tokens:`` entry resolved: the row of ``model`` (its own row for the token when ``row`` is None)
    or zeros (``model`` None); ``force``: every input takes it, not only those without the token."""
    token: str
    force: bool
    model: int | None = None
    row: int | None = None
    default: bool = False  # no source given: the token is added, its rows follow the default rule


@dataclass(frozen=True)
class Vocabulary:
    """The output's vocabulary: its tokenizer (ids = rows), the rows of its vocabulary tensors, and for
    every model, its own row of each output token (-1: it has none)."""
    tokenizer: Any
    size: int  # len(tokens), padded up to the multiple asked for
    tokens: int  # the tokenizer's vocabulary size
    own: dict[int, np.ndarray]  # model index -> row per output id
    rules: dict[int, TokenRule]  # output id -> its rule from ``tokens:``
    unchanged: Path | None  # the output's tokenizer is this model folder's, as it is: its files are copied


@dataclass(frozen=True)
class RowMap:
    """How one vocabulary tensor's inputs are laid out in the output vocabulary.

    ``slots``: the (model, tensor) pairs read, the task's inputs first (in the runner's order), then any
    tensor the filled rows also read. ``own[i]``: input i's row for each output id, -1 where the row is
    filled from ``fills`` (output id -> (slot, row) pairs averaged; no pair: zeros). Rows from
    ``len(own[0])`` to ``size`` are each input's mean row.
    """
    slots: tuple[tuple[int, str], ...]
    own: tuple[np.ndarray, ...]
    fills: dict[int, tuple[tuple[int, int], ...]]
    size: int

    @property
    def tokens(self) -> int:
        return len(self.own[0])

    @cached_property
    def filled(self) -> np.ndarray:
        """The output ids of ``fills``, sorted."""
        return np.array(sorted(self.fills), dtype=np.int64)


def spec_of(cfg: MergeConfig) -> TokenizerConfig | None:
    """The config's tokenizer settings as one section; None when the output's tokenizer is a copy of the
    reference's files (neither key given, as in mergekit)."""
    if cfg.tokenizer is not None:
        if cfg.pad_to_multiple_of is not None:
            return cfg.tokenizer.model_copy(update={"pad_to_multiple_of": cfg.pad_to_multiple_of})
        return cfg.tokenizer
    if cfg.tokenizer_source is None and cfg.pad_to_multiple_of is None:
        return None
    return TokenizerConfig(source=cfg.tokenizer_source or "base", pad_to_multiple_of=cfg.pad_to_multiple_of)


# ----------------------------------------------------------------------------- reading tokenizers


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / n).is_file() for n in TOKENIZER_FILES)


def vocab_rows(config: dict, rows: int | None) -> int:
    """How many vocabulary rows a model has: its config's ``vocab_size``, else its tensors' rows."""
    n = config.get("vocab_size")
    return int(n) if isinstance(n, int) and n > 0 else int(rows or 0)


def _tokens_below(tok: Any, size: int, where: Path) -> Any:
    """``tok`` without its tokens of id ``size`` and above: ids its model has no rows for (a model's
    embedding that stops short of its tokenizer). Edits the saved tokenizer.json and reloads it."""
    gone = {t for t, i in tok.get_vocab().items() if i >= size}
    if not gone:
        return tok
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{where}: its tokenizer has {len(gone)} tokens beyond vocab_size {size} and no "
                            "tokenizer.json to remove them from")
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model.get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            model["vocab"] = {t: i for t, i in vocab.items() if i < size}
        elif isinstance(vocab, list):  # Unigram: the id is the position
            model["vocab"] = vocab[:size]
        if "merges" in model:  # BPE: a merge may neither use nor make a token that is gone

            def keeps(m) -> bool:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                return a not in gone and b not in gone and a + b not in gone

            model["merges"] = [m for m in model["merges"] if keeps(m)]
        data["added_tokens"] = [a for a in data.get("added_tokens", []) if a["id"] < size]
        path.write_text(json.dumps(data), encoding="utf-8")
        cfg_path = Path(d) / "tokenizer_config.json"
        if cfg_path.is_file():
            tc = json.loads(cfg_path.read_text(encoding="utf-8"))
            if isinstance(tc.get("added_tokens_decoder"), dict):
                tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < size}
            cfg_path.write_text(json.dumps(tc), encoding="utf-8")
        return load_tokenizer(Path(d), "to merge vocabularies with")


def union(base: Any, others: list[tuple[Any, int]]) -> Any:
    """``base`` (changed in place) with every token of ``others`` (tokenizer, rows) it lacks: first their
    ordinary tokens, then their added tokens (special ones stay special), model by model, each by id."""
    have = set(base.get_vocab())
    added: dict[str, Any] = {}
    for tok, size in others:
        for i, a in sorted(tok.added_tokens_decoder.items()):
            if i < size:
                added.setdefault(a.content, a)
    ordinary: dict[str, None] = {}
    for tok, size in others:
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in have and t not in added:
                ordinary.setdefault(t)
    if ordinary:
        base.add_tokens(list(ordinary))
    new = [a for c, a in added.items() if c not in have]
    if new:
        base.add_tokens(new)
    return base


def own_rows(out: dict[str, int], vocab: dict[str, int], size: int) -> np.ndarray:
    """A model's row of each output id: its id of the same token, -1 when it has none below ``size``."""
    rows = np.full(len(out), -1, dtype=np.int64)
    for t, i in out.items():
        j = vocab.get(t)
        if j is not None and j < size:
            rows[i] = j
    return rows


def plan_vocabulary(spec: TokenizerConfig, paths: list[Path], configs: list[dict],
                    rows: list[int | None], names: list[str], ref: int) -> tuple[Vocabulary, list[str]]:
    """The output vocabulary for ``spec``: ``paths``/``configs``/``rows`` per model (``rows``: its first
    vocabulary tensor's rows), ``names`` as the config writes them, ``ref`` the base (or first) model.
    Returns it and notes for the user."""
    notes: list[str] = []
    sizes = [vocab_rows(c, r) for c, r in zip(configs, rows, strict=True)]
    if not has_tokenizer(paths[ref]):
        raise UserError(f"tokenizer: model {names[ref]} has no tokenizer files to build the vocabulary from")

    def base_tokenizer() -> tuple[Any, bool]:
        """The base's tokenizer, cut to its rows; and whether it is whole (nothing cut)."""
        whole = load_tokenizer(paths[ref], "to merge vocabularies with")
        tok = _tokens_below(whole, sizes[ref], paths[ref])
        return tok, tok is whole

    toks: dict[int, Any] = {}
    for i, p in enumerate(paths):
        if i == ref:
            toks[i] = base_tokenizer()[0]
        elif has_tokenizer(p):
            toks[i] = load_tokenizer(p, "to merge vocabularies with")
        else:  # mergekit's assumption too: a model without a tokenizer has the base's
            notes.append(f"model {names[i]} has no tokenizer: read as having {names[ref]}'s vocabulary")
    vocabs = {i: t.get_vocab() for i, t in toks.items()}
    vocabs.update({i: vocabs[ref] for i in range(len(paths)) if i not in vocabs})

    idx = {n: i for i, n in enumerate(names)}
    unchanged = None
    if spec.source == "union":
        out = union(base_tokenizer()[0], [(toks[i], sizes[i]) for i in sorted(toks) if i != ref])
    elif spec.source == "base":
        out, whole = base_tokenizer()
        unchanged = paths[ref] if whole else None
    else:
        src = idx[spec.source]
        if src not in toks:
            raise UserError(f"tokenizer source {spec.source}: the model has no tokenizer files")
        out, unchanged = load_tokenizer(paths[src], "to merge vocabularies with"), paths[src]
    tokens = spec.tokens or {}
    extra = [t for t in tokens if t not in out.get_vocab()]
    if extra:
        out.add_tokens(extra)
        unchanged = None
    vocab = out.get_vocab()
    n = len(vocab)
    if max(vocab.values(), default=-1) != n - 1:
        raise UserError(f"tokenizer: the output vocabulary's ids are not 0..{n - 1} (the tokenizer of "
                        f"{names[ref]} leaves gaps); it cannot index the embedding's rows")
    size = n if not spec.pad_to_multiple_of else -(-n // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    own = {i: own_rows(vocab, vocabs[i], sizes[i]) for i in range(len(paths))}
    rules = {vocab[t]: _rule(t, r, idx, vocabs) for t, r in tokens.items()}
    return Vocabulary(out, size, n, own, rules, unchanged), notes


def _rule(token: str, entry, idx: dict[str, int], vocabs: dict[int, dict[str, int]]) -> TokenRule:
    src = entry.source
    if src is None:
        return TokenRule(token, entry.force, default=True)
    if isinstance(src, ZeroEmbedding):
        return TokenRule(token, entry.force)
    if isinstance(src, ModelTokenEmbedding):
        m = idx[src.model]
        if src.token is not None:
            if src.token not in vocabs[m]:
                raise UserError(f"tokenizer.tokens.{token}.source: token {src.token!r} is not in the vocabulary "
                                f"of {src.model}")
            return TokenRule(token, entry.force, m, vocabs[m][src.token])
        return TokenRule(token, entry.force, m, src.token_id)
    return TokenRule(token, entry.force, idx[src])


# ----------------------------------------------------------------------------- one tensor's rows


def row_map(vocab: Vocabulary, tensor: str, slots: list[tuple[int, str]], inputs: int, base: int | None,
            slot_rows: list[int], names: list[str]) -> RowMap:
    """The :class:`RowMap` of vocabulary tensor ``tensor``: ``slots`` the (model, tensor) pairs it can
    read, its ``inputs`` first (the models that count as having a token), ``base`` the config's base
    model (its row wins when several models have a token), ``slot_rows`` each slot's rows."""
    first: dict[int, int] = {}
    for s, (m, _) in enumerate(slots):
        first.setdefault(m, s)
    models = [m for m in first if first[m] < inputs or m == base]  # mergekit's: the tensor's models
    own = np.stack([vocab.own[m] for m in models])
    present = own >= 0
    count = present.sum(axis=0)
    forced = np.zeros(vocab.tokens, dtype=bool)
    for t, r in vocab.rules.items():
        forced[t] = r.force
    fills: dict[int, tuple[tuple[int, int], ...]] = {}
    for t in np.nonzero((count < len(models)) | forced)[0].tolist():
        rule = vocab.rules.get(t)
        if rule is not None and not rule.default:
            fills[t] = _from_rule(rule, t, vocab, first, tensor, slot_rows, names)
        elif count[t] == 0:
            fills[t] = ()
        elif count[t] == 1:
            k = int(np.argmax(present[:, t]))
            fills[t] = ((first[models[k]], int(own[k, t])),)
        elif base in models and present[models.index(base), t]:
            fills[t] = ((first[base], int(own[models.index(base), t])),)
        else:
            fills[t] = tuple((first[m], int(own[k, t])) for k, m in enumerate(models) if present[k, t])
    per_input = []
    for m, _ in slots[:inputs]:
        rows = vocab.own[m].copy()
        rows[forced] = -1
        per_input.append(rows)
    for s, rows in enumerate(per_input):
        if rows.max(initial=-1) >= slot_rows[s]:
            raise UserError(f"tensor {tensor!r} of {names[slots[s][0]]} has {slot_rows[s]} rows but its "
                            f"tokenizer has ids up to {int(rows.max())}")
    return RowMap(tuple(slots), tuple(per_input), fills, vocab.size)


def _from_rule(rule: TokenRule, t: int, vocab: Vocabulary, first: dict[int, int], tensor: str,
               slot_rows: list[int], names: list[str]) -> tuple[tuple[int, int], ...]:
    token = rule.token
    if rule.model is None:
        return ()
    if rule.model not in first:
        raise UserError(f"tokenizer.tokens.{token}: model {names[rule.model]} has no {tensor!r} in this merge")
    s = first[rule.model]
    row = rule.row if rule.row is not None else int(vocab.own[rule.model][t])
    if row < 0:
        raise UserError(f"tokenizer.tokens.{token}.source: {names[rule.model]} has no token {token!r}")
    if row >= slot_rows[s]:
        raise UserError(f"tokenizer.tokens.{token}.source: token_id {row} is beyond the {slot_rows[s]} rows of "
                        f"{tensor!r} in {names[rule.model]}")
    return ((s, row),)


Read = Callable[[int, slice], torch.Tensor]  # (slot, rows) -> those rows of the slot's tensor, as stored


def gather(rm: RowMap, read: Read, rows: slice, means: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Rows ``rows`` of every input laid out in the output vocabulary, in the inputs' common dtype (as
    stored, promoted where they differ). Only the rows a block needs are read (see :func:`_read_rows`), so
    memory follows the block, not the vocabulary; ``means`` gives the padding rows (see :func:`pad_means`)."""
    a, b = rows.start, rows.stop
    e = max(a, min(b, rm.tokens))  # rows [a, e) are real tokens, [e, b) padding
    fill_ids = rm.filled[np.searchsorted(rm.filled, a):np.searchsorted(rm.filled, e)]
    # every (fill, slot, row) a fill averages over
    triples = np.array([(k, s, r) for k, t in enumerate(fill_ids.tolist()) for s, r in rm.fills[t]],
                       dtype=np.int64).reshape(-1, 3)
    want: dict[int, list[np.ndarray]] = {}
    for i, own in enumerate(rm.own):
        sel = own[a:e]
        want.setdefault(i, []).append(sel[sel >= 0])
    for s in np.unique(triples[:, 1]).tolist():
        want.setdefault(s, []).append(triples[triples[:, 1] == s, 2])
    got = {}
    for s, parts in want.items():
        need = np.unique(np.concatenate(parts))
        if len(need):
            got[s] = (need, _read_rows(read, s, need))
    tensors = [g for _, g in got.values()]
    dtype = tensors[0].dtype if tensors else means[0].dtype
    for g in tensors[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    rest = tuple(tensors[0].shape[1:]) if tensors else tuple(means[0].shape)

    def rows_of(s: int, r: np.ndarray) -> torch.Tensor:
        need, g = got[s]
        return g[torch.from_numpy(np.searchsorted(need, r))].to(dtype)

    # a fill is the mean of its rows, summed in float32 (a single row passes through exactly; none: zeros)
    acc = torch.zeros((len(fill_ids), *rest), dtype=torch.float32)
    for s in np.unique(triples[:, 1]).tolist():
        pick = triples[:, 1] == s
        acc.index_add_(0, torch.from_numpy(triples[pick, 0]), rows_of(s, triples[pick, 2]).to(torch.float32))
    count = torch.from_numpy(np.bincount(triples[:, 0], minlength=len(fill_ids))).clamp(min=1)
    filled = (acc / count.view(-1, *[1] * len(rest))).to(dtype)
    out = []
    for i, own in enumerate(rm.own):
        x = torch.empty((b - a, *rest), dtype=dtype)
        sel = own[a:e]
        mine = np.nonzero(sel >= 0)[0]
        if len(mine):
            x[torch.from_numpy(mine)] = rows_of(i, sel[mine])
        other = np.nonzero(sel < 0)[0]
        if len(other):
            x[torch.from_numpy(other)] = filled[torch.from_numpy(np.searchsorted(fill_ids, other + a))]
        if b > e:
            x[e - a:] = means[i]
        out.append(x)
    return out


# Rows at most this far apart are read as one span (the rows between read and dropped): far fewer reads
# where a model lacks scattered tokens, for a few rows more.
READ_GAP = 64


def _read_rows(read: Read, slot: int, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` (sorted, distinct) of a slot's tensor, read in spans of nearby rows."""
    breaks = np.nonzero(np.diff(rows) > READ_GAP)[0] + 1
    parts = []
    for r in np.split(rows, breaks):
        span = read(slot, slice(int(r[0]), int(r[-1]) + 1))
        parts.append(span if len(span) == len(r) else span[torch.from_numpy(r - r[0])])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def pad_means(rm: RowMap, read: Read, step: int) -> list[torch.Tensor]:
    """Each input's mean row over the output's real vocabulary (its rows laid out as :func:`gather` does),
    for the rows that pad it to a multiple; summed in float64 over blocks of ``step`` rows."""
    sums = None
    for a in range(0, rm.tokens, step):
        block = gather(rm, read, slice(a, min(rm.tokens, a + step)))
        part = [x.to(torch.float64).sum(0) for x in block]
        sums = part if sums is None else [s + p for s, p in zip(sums, part, strict=True)]
        dtype = block[0].dtype
    return [(s / rm.tokens).to(dtype) for s in sums]


# ----------------------------------------------------------------------------- chat templates


def chat_template(value: str, found: list[str | None]) -> str | None:
    """The template ``value`` names: ``auto`` (the most common of the inputs' templates, ``found`` in
    config order, the earliest of equals; None when none has one), one of :func:`template_names`, or a
    Jinja template given literally."""
    if value == "auto":
        counts = Counter(t.strip() for t in found if t)
        return counts.most_common(1)[0][0] if counts else None
    named = TEMPLATES / f"{value}.jinja"
    if "{" not in value and "\n" not in value and len(value) < 256:
        if value in template_names():
            return named.read_text(encoding="utf-8")
        raise UserError(f"chat_template: {value!r} is not a template name ({', '.join(template_names())}), "
                        "'auto', or a Jinja template")
    if len(value) < 20:
        raise UserError(f"chat_template: {value!r} is too short to be a Jinja template")
    return value


def template_of(tok: Any) -> str | None:
    t = tok.chat_template
    if isinstance(t, dict):  # several named templates: the default one
        t = t.get("default")
    return t if isinstance(t, str) else None


def input_templates(paths: list[Path]) -> list[str | None]:
    """Each model's chat template (None: no tokenizer, or no template)."""
    return [template_of(load_tokenizer(p)) if has_tokenizer(p) else None for p in paths]


# ----------------------------------------------------------------------------- writing


def write_tokenizer(out_dir: Path, vocab: Vocabulary | None, source: Path, template: str | None,
                    copy: bool = True) -> None:
    """The output's tokenizer in ``out_dir``: the built one saved (always: its ids are the rows), or the
    files of the model it is unchanged from (``source`` when none is built) copied unless ``copy`` is
    off; then ``template`` set as ``chat_template`` in tokenizer_config.json (template files removed: they
    would override it)."""
    if vocab is not None and vocab.unchanged is None:
        vocab.tokenizer.save_pretrained(str(out_dir))
    elif copy or vocab is not None:
        copy_side_files(vocab.unchanged if vocab else source, out_dir, TOKENIZER_FILES)
    cfg_path = out_dir / "tokenizer_config.json"
    if template is None or not cfg_path.is_file():
        return
    tc = json.loads(cfg_path.read_text(encoding="utf-8"))
    tc["chat_template"] = template
    cfg_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for n in ("chat_template.jinja", "chat_template.json"):
        (out_dir / n).unlink(missing_ok=True)
