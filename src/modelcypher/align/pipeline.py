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

import argparse
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

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
from modelcypher.arch.families import family_of, layer_index, num_layers, with_layer
from modelcypher.arch.symmetry import NormFold, SymmetrySpec, spec_for
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.reader import GENERATION_FILES, TOKENIZER_FILES
from modelcypher.checkpoint.writer import ShardedWriter, atomic_dir
from modelcypher.errors import UserError

MIN_PROBE_TOKENS = 512
PROBE_BATCH = 8  # probe sequences per batch (activation statistics, learned matching's steps)
LEARN_STEPS, LEARN_LR = 200, 1e-3  # learned matching: Adam steps on the midpoint loss, and their size
CHECK_PARAMS = 64_000_000  # parameters per equivalence-check chunk (besides embeddings and head)
CHECK_VOCAB_ROWS = 4096  # vocabulary rows per check chunk; chunks take turns over the vocabulary
# Logit tolerance (atol, rtol relative to the largest logit) of the equivalence check, by the storage
# dtype: a permutation is exact in any dtype; a rotation rounds every weight back to its dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
             torch.bfloat16: (3e-2, 3e-2)}
STRUCTURE_KEYS = ("num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "attention_bias",
                  "mlp_bias", "n_inner", "intermediate_size", "sizes", "tie_word_embeddings")


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
    for key in STRUCTURE_KEYS[:-1]:
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


def open_pair(model_b: str | Path, model_a: str | Path) -> tuple[Checkpoint, Checkpoint, SymmetrySpec]:
    ck_b, ck_a = Checkpoint(model_b), Checkpoint(model_a)
    spec = spec_of(ck_a)
    check_pair(ck_a, ck_b)
    return ck_b, ck_a, spec


# ----------------------------------------------------------------------------- probe text


def load_tokenizer(model_dir: Path):
    """The tokenizer saved with a model (local files only)."""
    from transformers import AutoTokenizer

    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...) to read "
                        "the text with")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise UserError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read as UTF-8 text ({e})") from None


def token_ids(model_dir: Path, text: str, max_tokens: int) -> torch.Tensor:
    """``text`` in the tokens of the model's tokenizer, at most ``max_tokens`` of them (1-D long)."""
    tok = load_tokenizer(model_dir)
    ids = tok(text[: 8 * max_tokens], add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def context_length(config: dict, cap: int = 256) -> int:
    n = config.get("max_position_embeddings") or config.get("n_positions") or cap
    return min(int(n), cap)


def probe_batches(ids: torch.Tensor, seq_len: int, batch_size: int = PROBE_BATCH) -> list[torch.Tensor]:
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len) if len(ids) >= seq_len else ids[None]
    return list(rows.split(batch_size))


def sampled_probes(cks: tuple[Checkpoint, ...], max_tokens: int, seed: int,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Probe sequences of the context length (at most 256), about ``max_tokens`` tokens in all, sampled
    from the models in equal shares (:mod:`.sampling`), each built in turn (float32, on ``device``)."""
    from modelcypher.align.equivalence import build_model
    from modelcypher.align.sampling import self_probes

    length = context_length(cks[0].config)

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


def resolve(residual: str, spec: SymmetrySpec) -> str:
    from modelcypher.align.weight_matching import resolve_residual

    return resolve_residual(spec, residual)


def match(ck_b: Checkpoint, ck_a: Checkpoint, spec: SymmetrySpec, *, method: str, data: str | Path | None,
          residual: str, max_sweeps: int, seed: int, device: str | torch.device, vo: bool = False,
          qk: bool = False, restarts: int = 1, text: str | None = None, max_probe_tokens: int = 65536,
          steps: int = LEARN_STEPS, lr: float = LEARN_LR) -> tuple[Alignment, dict]:
    """Transforms bringing B onto A, and facts for the report. Activation and learned matching read their
    text from the file ``data``, or take it as ``text``; ``steps`` and ``lr`` are learned matching's."""
    from modelcypher.align.activation_matching import match_activations
    from modelcypher.align.equivalence import build_model
    from modelcypher.align.weight_matching import match_weights

    residual = resolve(residual, spec)
    if method == "weight":
        folded = residual == "orthogonal"
        views = [CheckpointView(ck, spec, folded=folded) for ck in (ck_b, ck_a)]
        found = match_weights(*views, spec, residual=residual, vo=vo, qk=qk, max_sweeps=max_sweeps, seed=seed,
                              restarts=restarts, prepared=True)
        return found, {"residual": residual, "objective": found.history, "sweeps": len(found.history) - 1}
    if method not in ("activation", "learned"):
        raise UserError(f"alignment method must be weight, activation or learned, not {method!r}")
    if spec.family == "modelcypher-mlp":
        raise UserError(f"{method} matching of a modelcypher-mlp model needs feature vectors, not text: use "
                        "--method weight, or modelcypher.align in Python")
    if method == "learned" and residual != "orthogonal":
        raise UserError(f"learned matching refines an orthogonal residual, which {spec.family} "
                        f"{'does not admit' if not spec.residual_orthogonal_ok else 'was not given'} "
                        f"(--residual {residual}): use --method weight")
    if method == "learned":
        from modelcypher.align.learned_matching import match_learned

        if data is None and text is None:
            rows = sampled_probes((ck_a, ck_b), max_probe_tokens, seed, device)
            batches, tokens, probes = list(rows.split(PROBE_BATCH)), rows.numel(), "text sampled from the two models"
        else:
            ids = probe_ids(ck_a, spec, method, data, text, max_probe_tokens)
            batches, tokens, probes = probe_batches(ids, context_length(ck_a.config)), len(ids), "text"
        init, facts = match(ck_b, ck_a, spec, method="weight", data=None, residual=residual,
                            max_sweeps=max_sweeps, seed=seed, device=device, vo=True, qk=True,
                            restarts=restarts)
        sd_b, sd_a = ({n: ck.get(n) for n in ck.names} for ck in (ck_b, ck_a))
        found, losses = match_learned(sd_b, sd_a, ck_b.config, init, batches, steps=steps, lr=lr, seed=seed,
                                      device=device)
        return found, {**facts, "tokens": tokens, "probes": probes, "steps": steps,
                       "midpoint_loss": [losses[0], losses[-1]]}
    ids = probe_ids(ck_a, spec, method, data, text, max_probe_tokens)
    batches = probe_batches(ids, context_length(ck_a.config))
    models = [build_model(ck.config, {n: ck.get(n) for n in ck.names}) for ck in (ck_b, ck_a)]
    model_spec = spec_for(ck_b.config, models[0].state_dict().keys())  # probes name modules
    found = match_activations(*models, model_spec, batches, device, residual=residual)
    return found, {"residual": residual, "tokens": len(ids)}


def probe_ids(ck_a: Checkpoint, spec: SymmetrySpec, method: str, data: str | Path | None, text: str | None,
              max_tokens: int) -> torch.Tensor:
    """The probe text in A's tokens; too little of it is a user error that says how much is needed."""
    if text is None:
        if not data:
            raise UserError(f"{method} matching needs probe text: pass --data text.txt")
        text = read_text(data)
    ids = token_ids(ck_a.path, text, max_tokens)
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
    import json

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
    if ck.config.get("model_type") == "modelcypher-mlp" or not depth:
        return [None]
    sizes = [0] * depth
    for n in ck.names:
        i = layer_index(n)
        if i is not None and i < depth:
            sizes[i] += _numel(ck.shape(n))
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
        depth = num_layers(config)
        for key, v in list(config.items()):
            if isinstance(v, list) and len(v) == depth and key != "architectures":
                config[key] = [v[i] for i in layers]
        for key in (family_of(config).num_layers_key, "num_hidden_layers", "n_layer"):
            if key in config:
                config[key] = len(layers)
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
    from modelcypher.align.equivalence import check_equivalent

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
    for n in TOKENIZER_FILES + GENERATION_FILES:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)


def write_verified(ck: Checkpoint, spec: SymmetrySpec, alignment: Alignment, out: Path, *,
                   overwrite: bool = False) -> tuple[float, dict]:
    """Write ``ck`` transformed by ``alignment`` to ``out`` (atomically), only if it proves equivalent.

    Returns the largest logit gap and the seconds spent writing and checking.
    """
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        write_transformed(ck, spec, alignment, tmp)
        t1 = time.perf_counter()
        gap = verify(ck, Checkpoint(tmp), spec)
        copy_files(ck.path, tmp)
        t2 = time.perf_counter()
    return gap, {"write": t1 - t0, "check": t2 - t1}


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    for p in inputs:
        if out.resolve() == p.resolve() or out.resolve().is_relative_to(p.resolve()):
            raise UserError(f"{out}: the output may not be (inside) the input model {p}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another output or pass --overwrite")


# ----------------------------------------------------------------------------- entry points


def align_checkpoint(model_b: str | Path, model_a: str | Path, out: str | Path, *, method: str = "weight",
                     data: str | Path | None = None, residual: str = "auto", max_sweeps: int = 20,
                     seed: int = 0, device: str | torch.device = "cpu", overwrite: bool = False,
                     vo: bool = False, qk: bool = False, restarts: int = 1, steps: int = LEARN_STEPS,
                     lr: float = LEARN_LR) -> dict:
    """Align checkpoint B onto A and write the aligned B to ``out``, a checkpoint of B's family computing
    B's function (checked on random inputs before anything is moved into place).

    Returns a report: the objective per sweep (weight matching), seconds, and the largest logit gap.
    """
    t0 = time.perf_counter()
    out = Path(out)
    ck_b, ck_a, spec = open_pair(model_b, model_a)
    check_output(out, [ck_a.path, ck_b.path], overwrite)
    device = _device(device)
    alignment, facts = match(ck_b, ck_a, spec, method=method, data=data, residual=residual,
                             max_sweeps=max_sweeps, seed=seed, device=device, vo=vo, qk=qk, restarts=restarts,
                             steps=steps, lr=lr)
    t1 = time.perf_counter()
    gap, seconds = write_verified(ck_b, spec, alignment, out, overwrite=overwrite)
    return {
        "model_a": str(ck_a.path), "model_b": str(ck_b.path), "output": str(out), "family": spec.family,
        "method": method, "device": str(device), **facts, "max_logit_gap": gap,
        "seconds": {"match": t1 - t0, **seconds, "total": time.perf_counter() - t0},
    }


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


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from modelcypher.merging.run import resolve_device

    return resolve_device(device)


def align_for_merge(plan, workdir: Path, device: str | torch.device = "cpu"):
    """Align every model of a merge plan onto its reference (the base, else the first model) into
    ``workdir``; return the plan's config naming the aligned copies instead, with ``align`` removed.

    With an orthogonal residual the aligned models have their norms folded, so the reference is written
    folded too: every model then shares one parameterization, and averaging them is meaningful.
    """
    section = plan.config.align
    ref = plan.reference
    ref_ck = plan.models[ref]
    workdir = Path(workdir)
    paths = {i: str(ck.path.resolve()) for i, ck in enumerate(plan.models)}
    orthogonal = False
    data = section.data
    if data is not None:  # relative to the working directory, else to the config's folder
        from modelcypher.merging.plan import resolve_path

        data = str(resolve_path(data, plan.config_dir, what="align data file"))
    for i, ck in enumerate(plan.models):
        if i == ref:
            continue
        out = workdir / f"{i:02d}-{ck.path.resolve().name}"
        report = align_checkpoint(ck.path, ref_ck.path, out, method=section.method, data=data,
                                  residual=section.residual, max_sweeps=section.max_sweeps, seed=section.seed,
                                  device=device, vo=section.vo, qk=section.qk, restarts=section.restarts,
                                  steps=section.steps,
                                  lr=section.lr)
        orthogonal |= report["residual"] == "orthogonal"
        paths[i] = str(out.resolve())
    if orthogonal:
        out = workdir / f"{ref:02d}-{ref_ck.path.resolve().name}-folded"
        fold_checkpoint(ref_ck.path, out)
        paths[ref] = str(out.resolve())
    rename = {name: paths[i] for i, name in enumerate(plan.names)}
    cfg = plan.config.model_copy(deep=True)
    cfg.align = None
    if cfg.base_model is not None:
        cfg.base_model = rename[cfg.base_model]
    for e in cfg.models or []:
        e.model = rename[e.model]
    for sl in cfg.slices or []:
        for s in sl.sources:
            s.model = rename[s.model]
    if cfg.tokenizer_source in rename:
        cfg.tokenizer_source = rename[cfg.tokenizer_source]
    return cfg


def cli_align(args: argparse.Namespace) -> int:
    report = align_checkpoint(args.model_b, args.model_a, args.output, method=args.method, data=args.data,
                              residual=args.residual, max_sweeps=args.max_sweeps, seed=args.seed,
                              device=args.device, overwrite=args.overwrite, vo=args.vo, qk=args.qk,
                              restarts=args.restarts, steps=args.steps, lr=args.lr)
    how = f"{report['method']} matching, residual {report['residual']}"
    if "objective" in report:
        h = report["objective"]
        how += f", objective {h[0]:.6g} -> {h[-1]:.6g} in {report['sweeps']} sweeps"
        if "midpoint_loss" in report:
            m = report["midpoint_loss"]
            how += (f", then midpoint loss {m[0]:.4f} -> {m[1]:.4f} in {report['steps']} steps on "
                    f"{report['tokens']} tokens of {report['probes']}")
    else:
        how += f", {report['tokens']} probe tokens"
    print(f"aligned {report['model_b']} onto {report['model_a']} ({how}); max logit gap "
          f"{report['max_logit_gap']:.2g}; wrote {report['output']} in {report['seconds']['total']:.1f}s")
    return 0
