"""Aligning checkpoints on disk: ``modelcypher align`` and the ``align:`` section of a merge config.

Data flows one way: read both checkpoints lazily, check they are one family and shape, match (weights or
activations), apply the transforms tensor by tensor into a temporary directory, prove the written model
computes B's function, and only then move it into place.

Memory: weight matching and writing read each tensor from disk when it is needed (``CheckpointView``),
so neither model is ever held whole; the equivalence check runs on a few layers at a time (every layer
shares the residual transform with the embeddings and the head, so a model made of any subset of the
layers must be equivalent too). Activation matching runs both models, so it holds them (in float32).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from modelcypher.align.activation_matching import match_activations
from modelcypher.align.equivalence import check_equivalent
from modelcypher.align.learned_matching import match_learned, refine_universe
from modelcypher.align.lift import check_widths, lift_config, lift_tensor, lifted_shape, segments
from modelcypher.align.sampling import self_probes
from modelcypher.align.transform import (
    Alignment,
    fold,
    group_ops,
    is_perm,
    settle_tie,
    slots_by_tensor,
    transform_tensor,
    validate,
    working_dtype,
)
from modelcypher.align.universe import match_universe
from modelcypher.align.weight_matching import match_weights, resolve_residual
from modelcypher.arch.families import family_of, layer_index, num_layers, relayer_config, spec_for, with_layer
from modelcypher.arch.symmetry import NormFold, SymmetrySpec
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.files import copy_side_files
from modelcypher.checkpoint.guard import atomic_dir, check_output_dir
from modelcypher.checkpoint.reader import GENERATION_FILES, TOKENIZER_FILES
from modelcypher.checkpoint.writer import ShardedWriter
from modelcypher.errors import UserError
from modelcypher.hf import build_model, context_length, read_text, resolve_device, token_ids
from modelcypher.options import AlignOptions

MIN_PROBE_TOKENS = 512
PROBE_CONTEXT = 256  # probe sequences are the model's context, at most this long
PROBE_BATCH = 8  # probe sequences per batch (activation statistics, learned matching's steps)
CHECK_PARAMS = 64_000_000  # parameters per equivalence-check chunk (besides embeddings and head)
CHECK_VOCAB_ROWS = 4096  # vocabulary rows per check chunk; chunks take turns over the vocabulary
# Logit tolerance (atol, rtol relative to the largest logit) of the equivalence check, by the storage
# dtype: a permutation is exact in any dtype; a rotation rounds every weight back to its dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
             torch.bfloat16: (3e-2, 3e-2)}


# ----------------------------------------------------------------------------- reading


class CheckpointView(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, read from disk on every access and never kept.

    With a ``spec``, a tied output head appears under its own name (read from the embedding), and with
    ``folded`` every norm gain is folded into its readers on the fly (``transform.fold``, one norm at a
    time): the state that matching and writing an orthogonal residual work in.
    """

    def __init__(self, ck: Checkpoint, spec: SymmetrySpec | None = None, *, folded: bool = False):
        self.ck, self.spec = ck, spec
        self.alias: dict[str, str] = {}
        self.names = list(ck.names)
        if spec is not None and spec.embedding_head is not None:
            embed, head = spec.embedding_head
            if head not in ck and embed in ck:
                self.alias[head] = embed
                self.names.append(head)
        self.folds: dict[str, list[NormFold]] = {}
        if folded:
            for f in spec.folds:
                for n in fold_tensors(f):
                    self.folds.setdefault(n, []).append(f)
        self._last: tuple[tuple[NormFold, ...], dict[str, torch.Tensor]] | None = None

    def raw(self, name: str) -> torch.Tensor:
        return self.ck.get(self.alias.get(name, name))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.folds:
            if name not in self.alias and name not in self.ck:
                raise KeyError(name)
            return self.raw(name)
        folds = tuple(self.folds[name])
        if self._last is None or self._last[0] != folds:  # readers of one norm are read one after another
            sub = {n: self.raw(n) for f in folds for n in fold_tensors(f)}
            self._last = (folds, fold(sub, replace(self.spec, folds=folds)))
        return self._last[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.alias or name in self.ck


def fold_tensors(f: NormFold) -> list[str]:
    names = [f.weight, *(r.tensor for r in f.readers)]
    names += [n for n in (f.bias, *f.reader_biases) if n is not None]
    return list(dict.fromkeys(names))


def spec_of(ck: Checkpoint) -> SymmetrySpec:
    try:
        return spec_for(ck.config, ck.names)
    except UserError as e:
        raise UserError(f"{ck.path}: {e}") from None
    except (KeyError, TypeError) as e:
        raise UserError(f"{ck.path}: config.json lacks {e} for its {ck.config.get('model_type')} spec") from None


def check_pair(ck_a: Checkpoint, ck_b: Checkpoint) -> None:
    """One family, one structure, the same tensors with the same shapes; else name the first difference."""
    ta, tb = ck_a.config.get("model_type"), ck_b.config.get("model_type")
    if ta != tb:
        raise UserError(f"models differ in family: {ck_a.path} is {ta}, {ck_b.path} is {tb}")
    for key in family_of(ck_a.config).structure_keys:
        if ck_a.config.get(key) != ck_b.config.get(key):
            raise UserError(f"models differ in config {key!r}: {ck_a.config.get(key)} in {ck_a.path}, "
                            f"{ck_b.config.get(key)} in {ck_b.path}")
    for n in ck_a.names:
        if n in ck_b and ck_a.shape(n) != ck_b.shape(n):
            raise UserError(f"models differ in shape at tensor {n!r}: {list(ck_a.shape(n))} in {ck_a.path}, "
                            f"{list(ck_b.shape(n))} in {ck_b.path}")
    heads = {out for _, out in family_of(ck_a.config).tied}
    for x, y in ((ck_a, ck_b), (ck_b, ck_a)):
        for n in x.names:
            if n not in y and n not in heads:
                raise UserError(f"tensor {n!r} is in {x.path} but not in {y.path}")


# ----------------------------------------------------------------------------- probe text


def probe_batches(ids: torch.Tensor, seq_len: int, batch_size: int = PROBE_BATCH) -> list[torch.Tensor]:
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len) if len(ids) >= seq_len else ids[None]
    return list(rows.split(batch_size))


def sampled_probes(cks: tuple[Checkpoint, ...], max_tokens: int, seed: int,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Probe sequences of the context length (at most 256), about ``max_tokens`` tokens in all, sampled
    from the models in equal shares (:mod:`.sampling`), each built in turn (float32, on ``device``)."""
    length = context_length(cks[0].config, PROBE_CONTEXT)

    def models():
        for ck in cks:
            bos = ck.config.get("bos_token_id")
            model = build_model(ck.config, {n: ck.get(n) for n in ck.names}).to(device)
            yield model, bos if isinstance(bos, int) else None

    return self_probes(models(), len(cks), max(1, max_tokens // length), length, seed)


def probe_units(spec: SymmetrySpec) -> int:
    """The widest unit space activation matching correlates."""
    return max((g.heads.n_heads * g.heads.head_dim if g.kind == "heads" else g.size)
               for g in spec.groups if g.probes)


# ----------------------------------------------------------------------------- matching


def match_by_weights(ck_b: Checkpoint, ck_a: Checkpoint, spec: SymmetrySpec, opts: AlignOptions,
                     device: torch.device, text: str | None = None) -> tuple[Alignment, dict]:
    """Git Re-Basin weight matching, reading each tensor from disk when it is needed."""
    residual = resolve_residual(spec, opts.residual)
    views = [CheckpointView(ck, spec, folded=residual == "orthogonal") for ck in (ck_b, ck_a)]
    found = match_weights(*views, spec, residual=residual, vo=opts.vo, qk=opts.qk, max_sweeps=opts.max_sweeps,
                          seed=opts.seed, restarts=opts.restarts, prepared=True)
    return found, {"residual": residual, "objective": found.history, "sweeps": len(found.history) - 1}


def match_by_activations(ck_b: Checkpoint, ck_a: Checkpoint, spec: SymmetrySpec, opts: AlignOptions,
                         device: torch.device, text: str | None = None) -> tuple[Alignment, dict]:
    """The same solves from activation statistics of both models on probe text."""
    residual = resolve_residual(spec, opts.residual)
    ids = probe_ids(ck_a, spec, opts, text)
    batches = probe_batches(ids, context_length(ck_a.config, PROBE_CONTEXT))
    models = [build_model(ck.config, {n: ck.get(n) for n in ck.names}) for ck in (ck_b, ck_a)]
    model_spec = spec_for(ck_b.config, models[0].state_dict().keys())  # probes name modules
    found = match_activations(*models, model_spec, batches, device, residual=residual)
    return found, {"residual": residual, "tokens": len(ids)}


def learning_batches(cks: tuple[Checkpoint, ...], spec: SymmetrySpec, opts: AlignOptions, device: torch.device,
                     text: str | None) -> tuple[list[torch.Tensor], int, str]:
    """Learned matching's batches: the probe text (``text``, else the file ``opts.data``) or, without one,
    text sampled from the models; with the token count and what they are."""
    if opts.data is None and text is None:
        rows = sampled_probes(cks, opts.probe_tokens, opts.seed, device)
        count = "two" if len(cks) == 2 else str(len(cks))
        return list(rows.split(PROBE_BATCH)), rows.numel(), f"text sampled from the {count} models"
    ids = probe_ids(cks[0], spec, opts, text)
    return probe_batches(ids, context_length(cks[0].config, PROBE_CONTEXT)), len(ids), "text"


def learned_residual(spec: SymmetrySpec, opts: AlignOptions) -> str:
    residual = resolve_residual(spec, opts.residual)
    if residual != "orthogonal":
        raise UserError(f"learned matching refines an orthogonal residual, which {spec.family} "
                        f"{'does not admit' if not spec.residual_orthogonal_ok else 'was not given'} "
                        f"(--residual {opts.residual}): use --method weight")
    return residual


def match_by_learning(ck_b: Checkpoint, ck_a: Checkpoint, spec: SymmetrySpec, opts: AlignOptions,
                      device: torch.device, text: str | None = None) -> tuple[Alignment, dict]:
    """Weight matching with every basis, then the rotations refined by Adam on the midpoint's loss, on
    the probe text or, without one, on text sampled from the two models."""
    learned_residual(spec, opts)
    batches, tokens, probes = learning_batches((ck_a, ck_b), spec, opts, device, text)
    init, facts = match_by_weights(ck_b, ck_a, spec, opts.model_copy(update={"vo": True, "qk": True}), device)
    sd_b, sd_a = ({n: ck.get(n) for n in ck.names} for ck in (ck_b, ck_a))
    found, losses = match_learned(sd_b, sd_a, ck_b.config, init, batches, steps=opts.steps, lr=opts.lr,
                                  seed=opts.seed, device=device)
    return found, {**facts, "tokens": tokens, "probes": probes, "steps": opts.steps,
                   "midpoint_loss": [losses[0], losses[-1]]}


# One signature for every matcher: (B, A, spec, options, device, probe text or None) -> (Alignment, facts).
MATCHERS = {"weight": match_by_weights, "activation": match_by_activations, "learned": match_by_learning}


def match(ck_b: Checkpoint, ck_a: Checkpoint, spec: SymmetrySpec, opts: AlignOptions,
          device: torch.device, text: str | None = None) -> tuple[Alignment, dict]:
    """Transforms bringing B onto A, and facts for the report. Activation and learned matching read their
    probe text from the file ``opts.data``, or take it as ``text``."""
    if opts.method != "weight" and family_of(ck_a.config).reads != "tokens":
        raise UserError(f"{opts.method} matching of a {spec.family} model needs feature vectors, not text: use "
                        "--method weight, or modelcypher.align in Python")
    return MATCHERS[opts.method](ck_b, ck_a, spec, opts, device, text)


def match_to_universe(cks: list[Checkpoint], spec: SymmetrySpec, opts: AlignOptions, device: torch.device,
                      text: str | None = None,
                      start: tuple[list[Alignment], dict] | None = None) -> tuple[list[Alignment], dict]:
    """Every model's transform onto the universe of all of them (``align.universe``): weight matching,
    and for ``learned`` (with every basis) the rotations then refined on the loss of Dirichlet mixtures.

    ``start``: a weight-matched universe of these models and its facts, as this function returned it for
    method ``weight`` with the value/output and query/key bases; ``learned`` refines it instead of
    matching again (one weight universe, refined several ways)."""
    if opts.method == "activation":
        raise UserError("universe matching is weight or learned matching: use --method weight or learned")
    if start is not None and opts.method != "learned":
        raise UserError("a starting universe is refined by learned matching only: use --method learned")
    if start is None:
        residual = learned_residual(spec, opts) if opts.method == "learned" else resolve_residual(spec, opts.residual)
        bases = opts.method == "learned"
        views = [CheckpointView(ck, spec, folded=residual == "orthogonal") for ck in cks]
        found = match_universe(views, spec, residual=residual, vo=opts.vo or bases, qk=opts.qk or bases,
                               max_sweeps=opts.max_sweeps, restarts=opts.restarts, seed=opts.seed,
                               max_rounds=opts.rounds, prepared=True)
        start = found.alignments, {"residual": residual, "rounds": len(found.movement), "movement": found.movement}
    alignments, facts = start
    if opts.method != "learned":
        return alignments, facts
    batches, tokens, probes = learning_batches(tuple(cks), spec, opts, device, text)
    states = [{n: ck.get(n) for n in ck.names} for ck in cks]
    alignments, losses = refine_universe(states, cks[0].config, alignments, batches, alpha=opts.alpha,
                                         steps=opts.steps, lr=opts.lr, seed=opts.seed, device=device)
    return alignments, {**facts, "tokens": tokens, "probes": probes, "steps": opts.steps,
                        "mixture_loss": [losses[0], losses[-1]]}


def probe_ids(ck_a: Checkpoint, spec: SymmetrySpec, opts: AlignOptions, text: str | None) -> torch.Tensor:
    """The probe text in A's tokens; too little of it is a user error that says how much is needed."""
    method, data = opts.method, opts.data
    if text is None:
        if not data:
            raise UserError(f"{method} matching needs probe text: pass --data text.txt")
        text = read_text(data)
    ids = token_ids(ck_a.path, text, opts.probe_tokens)
    widest = probe_units(spec)
    need = max(MIN_PROBE_TOKENS, 2 * widest)
    if len(ids) < need:
        raise UserError(f"{data or 'probe text'}: too short for {method} matching: {len(ids)} tokens with the "
                        f"tokenizer of {ck_a.path}, need at least {need} (twice the widest unit space, "
                        f"{widest}, and no fewer than {MIN_PROBE_TOKENS})")
    return ids


# ----------------------------------------------------------------------------- writing and checking


def write_transformed(ck: Checkpoint, spec: SymmetrySpec, alignment: Alignment, out_dir: Path,
                      max_shard_size: int = 5 * 10**9) -> dict:
    """``transform.apply`` streamed: each tensor read, (folded,) transformed and written in its dtype.

    Returns the written config (the head untied where folding made it differ from the embedding).
    """
    spec = replace(spec, tied=spec_of(ck).tied)  # the pair's spec; whether the head is tied is ck's own
    validate(spec, alignment.transforms)
    q = alignment.transforms.get(spec.residual.name) if spec.residual is not None else None
    view = CheckpointView(ck, spec, folded=q is not None and not is_perm(q))
    dtypes = {working_dtype(ck.dtype(n)) for n in ck.names if ck.dtype(n).is_floating_point}
    dtype = torch.float32 if dtypes == {torch.float32} else torch.float64
    by_tensor, ops = slots_by_tensor(spec), group_ops(spec, alignment.transforms, dtype)

    def aligned(name: str) -> torch.Tensor:
        return transform_tensor(view[name], by_tensor.get(name, []), ops)

    names, config, source = list(ck.names), dict(ck.config), {}
    if spec.tied:
        embed, head = spec.embedding_head
        kept, config = settle_tie({embed: aligned(embed), head: aligned(head)}, config, spec, head in ck)
        if head in kept and head not in names:
            names.append(head)  # folding untied it
        elif head in kept:
            source[head] = embed  # still tied: the stored head repeats the embedding exactly
    entries = [(n, tuple(view.ck.shape(view.alias.get(n, n))), view.ck.dtype(view.alias.get(n, n)))
               for n in names]
    writer = ShardedWriter(out_dir, entries, max_shard_size)
    for name in writer.order:
        writer.write(name, aligned(source.get(name, name)).contiguous())
    writer.finish()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def tolerance(ck: Checkpoint) -> tuple[float, float]:
    dtypes = {ck.dtype(n) for n in ck.names if ck.dtype(n).is_floating_point}
    return max((TOLERANCE.get(d, TOLERANCE[torch.float32]) for d in dtypes), default=TOLERANCE[torch.float32])


def check_chunks(ck: Checkpoint) -> list[list[int] | None]:
    """Groups of consecutive layers of about ``CHECK_PARAMS`` parameters; ``[None]``: the whole model."""
    depth = num_layers(ck.config)
    if not depth:
        return [None]
    sizes = [0] * depth
    for n in ck.names:
        i = layer_index(n)
        if i is not None and i < depth:
            sizes[i] += math.prod(ck.shape(n))
    if sum(sizes) <= CHECK_PARAMS:
        return [None]
    chunks: list[list[int]] = [[]]
    total = 0
    for i, s in enumerate(sizes):
        if chunks[-1] and total + s > CHECK_PARAMS:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += s
    return chunks


def sub_model(ck: Checkpoint, config: dict, layers: list[int] | None, rows: slice | None,
              vocab_names: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The model made of some layers (renumbered from 0) and some vocabulary rows of a checkpoint."""
    config = dict(config)
    sd = {}
    for n in ck.names:
        i = layer_index(n)
        if layers is not None and i is not None:
            if i in layers:
                sd[with_layer(n, layers.index(i))] = ck.get(n)
            continue
        vocab_rows = rows is not None and n in vocab_names and ck.shape(n)[0] == config["vocab_size"]
        sd[n] = ck.get(n, rows if vocab_rows else None)  # only the rows: a slice would keep the whole
    if layers is not None:
        config = relayer_config(config, layers)
    if rows is not None:
        config["vocab_size"] = rows.stop - rows.start
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(config.get(key), int) and config[key] >= config["vocab_size"]:
                config[key] = None
    return config, sd


def verify(ck_before: Checkpoint, ck_after: Checkpoint, spec: SymmetrySpec, *, n_inputs: int = 2,
           seq_len: int = 16, seed: int = 0) -> float:
    """Raise ``NotEquivalentError`` unless both checkpoints give the same logits; return the largest gap.

    Large models are checked a few layers at a time, each chunk with a slice of the vocabulary.
    """
    atol, rtol = tolerance(ck_before)
    vocab = ck_before.config.get("vocab_size")
    vocab_names = set(family_of(ck_before.config).vocab_tensors) | set(spec.embedding_head or ())
    gap = 0.0
    for k, layers in enumerate(check_chunks(ck_before)):
        rows = None
        if layers is not None and isinstance(vocab, int) and vocab > CHECK_VOCAB_ROWS:
            start = (k * CHECK_VOCAB_ROWS) % (vocab - CHECK_VOCAB_ROWS + 1)
            rows = slice(start, start + CHECK_VOCAB_ROWS)
        cfg_b, sd_b = sub_model(ck_before, ck_before.config, layers, rows, vocab_names)
        cfg_a, sd_a = sub_model(ck_after, ck_after.config, layers, rows, vocab_names)
        gap = max(gap, check_equivalent(cfg_b, sd_b, sd_a, cfg_a, n_inputs=n_inputs, seq_len=seq_len,
                                        atol=atol, rtol=rtol, seed=seed + k))
        del sd_a, sd_b
    return gap


def copy_files(src: Path, dst: Path) -> None:
    copy_side_files(src, dst, TOKENIZER_FILES + GENERATION_FILES)


def write_verified(ck: Checkpoint, spec: SymmetrySpec, alignment: Alignment, out: Path, *,
                   overwrite: bool = False, original: Checkpoint | None = None) -> tuple[float, dict]:
    """Write ``ck`` transformed by ``alignment`` to ``out`` (atomically), only if it proves equivalent
    (to ``ck``, and to ``original`` when given: the narrow model ``ck`` was lifted from).

    Returns the largest logit gap and the seconds spent writing and checking.
    """
    with atomic_dir(out, overwrite=overwrite, inputs=[ck.path]) as tmp:
        t0 = time.perf_counter()
        write_transformed(ck, spec, alignment, tmp)
        t1 = time.perf_counter()
        gap = verify(ck, Checkpoint(tmp), spec)
        if original is not None:
            gap = max(gap, verify(original, Checkpoint(tmp), spec_of(original)))
        copy_files((original or ck).path, tmp)
        t2 = time.perf_counter()
    return gap, {"write": t1 - t0, "check": t2 - t1}


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    check_output_dir(out, inputs, overwrite=overwrite)


# ----------------------------------------------------------------------------- different widths


def needs_lift(ck_b: Checkpoint, ck_a: Checkpoint) -> bool:
    """Whether B is a narrower model of A's family (a wider B, or other differences, are one line)."""
    if ck_b.config.get("model_type") != ck_a.config.get("model_type") or family_of(ck_a.config).symmetry is None:
        return False
    return check_widths(spec_of(ck_b), spec_of(ck_a), str(ck_b.path), str(ck_a.path))


def write_lifted(ck: Checkpoint, config_wide: dict, out_dir: Path, max_shard_size: int = 5 * 10**9) -> float:
    """Write ``ck`` lifted into the widths of ``config_wide`` (``align.lift``: norms folded, residual
    ``x -> x T``, zero MLP units and heads) to ``out_dir``, streamed tensor by tensor, and check it computes
    ``ck``'s function; returns the largest logit gap."""
    spec = spec_of(ck)
    config = lift_config(ck.config, config_wide)
    config["tie_word_embeddings"] = False  # the lifted head is (d/D) head T, the embedding E T
    view = CheckpointView(ck, spec, folded=True)
    names = list(view)
    shapes = {n: tuple(ck.shape(view.alias.get(n, n))) for n in names}
    plans, lengths = segments(spec, spec_for(config, names), shapes)
    entries = [(n, lifted_shape(shapes[n], lengths.get(n, {})), ck.dtype(view.alias.get(n, n))) for n in names]
    writer = ShardedWriter(out_dir, entries, max_shard_size)
    for name in writer.order:
        writer.write(name, lift_tensor(view[name], name, plans.get(name, {}), lengths.get(name, {})).contiguous())
    writer.finish()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_files(ck.path, out_dir)
    return verify(ck, Checkpoint(out_dir), spec)


@contextmanager
def lifted(ck_b: Checkpoint, ck_a: Checkpoint, near: Path | None = None) -> Iterator[Checkpoint]:
    """``ck_b``, or, when it is narrower than ``ck_a``, ``ck_b`` lifted into ``ck_a``'s widths in a
    temporary directory (next to ``near`` when given), removed afterwards."""
    if not needs_lift(ck_b, ck_a):
        yield ck_b
        return
    if near is not None:
        near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lift-", dir=near) as tmp:
        write_lifted(ck_b, ck_a.config, Path(tmp))
        yield Checkpoint(tmp)


def lift_checkpoint(narrow: str | Path, wide: str | Path, out: str | Path, *, overwrite: bool = False) -> float:
    """Write ``narrow`` lifted into ``wide``'s widths, unaligned (``align.lift``); returns the logit gap."""
    ck_n, ck_w = Checkpoint(narrow), Checkpoint(wide)
    out = Path(out)
    check_output(out, [ck_n.path, ck_w.path], overwrite)
    if not needs_lift(ck_n, ck_w):
        raise UserError(f"{ck_n.path} is not narrower than {ck_w.path}: nothing to lift")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        return write_lifted(ck_n, ck_w.config, tmp)


# ----------------------------------------------------------------------------- entry points


def align_checkpoint(model_b: str | Path, model_a: str | Path, out: str | Path,
                     options: AlignOptions | None = None, *, device: str | torch.device = "cpu",
                     overwrite: bool = False, **settings) -> dict:
    """Align checkpoint B onto A and write the aligned B to ``out``, a checkpoint of B's family computing
    B's function (checked on random inputs before anything is moved into place). ``options``, or its
    fields as keywords (``method="learned", steps=100``), say how.

    Returns a report: the objective per sweep (weight matching), seconds, and the largest logit gap.
    """
    opts = options_of(options, settings)
    if opts.universe:
        raise UserError("universe matching aligns several models onto their universe: use align_universe "
                        "(modelcypher align M1 M2 M3 --universe -o DIR), not --to")
    t0 = time.perf_counter()
    out = Path(out)
    ck_b0, ck_a = Checkpoint(model_b), Checkpoint(model_a)
    check_output(out, [ck_a.path, ck_b0.path], overwrite)
    device = resolve_device(device)
    with lifted(ck_b0, ck_a, out.parent) as ck_b:  # a narrower B is lifted into A's widths first
        spec = spec_of(ck_a)
        check_pair(ck_a, ck_b)
        alignment, facts = match(ck_b, ck_a, spec, opts, device)
        t1 = time.perf_counter()
        gap, seconds = write_verified(ck_b, spec, alignment, out, overwrite=overwrite,
                                      original=None if ck_b is ck_b0 else ck_b0)
    if ck_b is not ck_b0:
        facts["lifted"] = {"from": spec_of(ck_b0).residual.size, "to": spec.residual.size}
    return {
        "model_a": str(ck_a.path), "model_b": str(ck_b0.path), "output": str(out), "family": spec.family,
        "method": opts.method, "device": str(device), **facts, "max_logit_gap": gap,
        "seconds": {"match": t1 - t0, **seconds, "total": time.perf_counter() - t0},
    }


def options_of(options: AlignOptions | None, settings: dict) -> AlignOptions:
    return options or AlignOptions.of(**{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})


def output_name(i: int, model: Path) -> str:
    """The folder of model ``i``'s aligned copy: its index (names may repeat) and its name."""
    return f"{i:02d}-{model.name}"


def align_universe(models: list[str | Path], out: str | Path, options: AlignOptions | None = None, *,
                   device: str | torch.device = "cpu", overwrite: bool = False, **settings) -> dict:
    """Align two or more checkpoints of one family onto their shared universe (``align.universe``) and
    write each one's aligned copy to ``out/NN-name``, a checkpoint of its family computing its input's
    function (each checked on random inputs); ``out`` appears whole or not at all.

    Returns a report: the universe's movement per round, each output and its largest logit gap.
    """
    opts = options_of(options, settings)
    t0 = time.perf_counter()
    if len(models) < 2:
        raise UserError(f"universe matching needs at least two models, got {len(models)}: "
                        f"{', '.join(map(str, models))}")
    cks = [Checkpoint(m) for m in models]
    spec = spec_of(cks[0])
    for ck in cks[1:]:
        check_pair(cks[0], ck)
    out = Path(out)
    check_output(out, [ck.path for ck in cks], overwrite)
    device = resolve_device(device)
    alignments, facts = match_to_universe(cks, spec, opts, device)
    t1 = time.perf_counter()
    outputs, gaps = [], []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i, (ck, alignment) in enumerate(zip(cks, alignments, strict=True)):
            gaps.append(write_verified(ck, spec, alignment, tmp / output_name(i, ck.path))[0])
            outputs.append(str(out / output_name(i, ck.path)))
    return {"models": [str(ck.path) for ck in cks], "outputs": outputs, "family": spec.family,
            "method": opts.method, "device": str(device), **facts, "max_logit_gap": max(gaps),
            "seconds": {"match": t1 - t0, "total": time.perf_counter() - t0}}


def fold_checkpoint(model: str | Path, out: str | Path, *, overwrite: bool = False) -> float:
    """Write ``model`` with every norm folded into its readers (the parameterization of a model aligned
    with an orthogonal residual); returns the largest logit gap of the check."""
    ck = Checkpoint(model)
    spec = spec_of(ck)
    res = spec.residual
    if res is None or not spec.residual_orthogonal_ok:
        raise UserError(f"{ck.path}: {spec.family} has no norms to fold")
    identity = Alignment({res.name: torch.eye(res.size, dtype=torch.float64)})
    return write_verified(ck, spec, identity, Path(out), overwrite=overwrite)[0]
