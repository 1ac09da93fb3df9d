"""Alignment before a merge: a config's ``align:`` section carried out before the merge is planned.

A config in, a config out: every model is aligned onto the reference (the base, else the first model)
into a working directory, and the returned config names the aligned copies instead, with ``align``
removed. The display names (what the user wrote) and each model's provenance (the user's checkpoint
and the alignment's settings, which is what the merge's statistics are cached by) come back beside it.

With an orthogonal residual the aligned models have their norms folded, so the reference is written
folded too: every model then shares one parameterization, and averaging them is meaningful.

With ``universe: true`` there is no reference: every model, the base included, is aligned onto the
universe of all of them (``align.universe``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelcypher.align.pipeline import align_checkpoint, align_universe, fold_checkpoint
from modelcypher.checkpoint.adapted import AdaptedCheckpoint
from modelcypher.checkpoint.reader import resolve_path
from modelcypher.errors import UserError
from modelcypher.merging.config import MergeConfig, renamed_tokenizer
from modelcypher.merging.plan import open_model


def prealign(cfg: MergeConfig, workdir: Path, *, config_dir: Path | None = None,
             device: torch.device | str = "cpu") -> tuple[MergeConfig, list[str], list[dict]]:
    """``(config naming the aligned copies, the user's model names, provenance per model)``."""
    opts = cfg.align
    if opts.data is not None:  # relative to the working directory, else to the config's folder
        opts = opts.model_copy(update={"data": str(resolve_path(opts.data, config_dir, what="align data file"))})
    names = cfg.model_names()
    models = [open_model(n, config_dir) for n in names]
    if any(isinstance(m, AdaptedCheckpoint) for m in models):
        raise UserError("a model+lora reference cannot be aligned yet; merge the adapter into its base first "
                        "(e.g. a linear merge of that model alone)")
    paths = [m.path.resolve() for m in models]
    ref = 0 if cfg.base_model is not None else names.index((cfg.models or cfg.slices[0].sources)[0].model)
    workdir = Path(workdir)
    if opts.universe:
        report = align_universe(paths, workdir / "universe", opts, device=device)
        moved = {"align": opts.model_dump(), "universe": [str(p) for p in paths]}
        provenance = [{"model": str(p), **moved} for p in paths]
        rename = {n: str(Path(o).resolve()) for n, o in zip(names, report["outputs"], strict=True)}
        return rename_models(cfg, rename), names, provenance
    aligned = {i: str(p) for i, p in enumerate(paths)}
    orthogonal = False
    for i, p in enumerate(paths):
        if i != ref:
            out = workdir / f"{i:02d}-{p.name}"
            report = align_checkpoint(p, paths[ref], out, opts, device=device)
            orthogonal |= report["residual"] == "orthogonal"
            aligned[i] = str(out.resolve())
    if orthogonal:
        out = workdir / f"{ref:02d}-{paths[ref].name}-folded"
        fold_checkpoint(paths[ref], out)
        aligned[ref] = str(out.resolve())
    moved = {"align": opts.model_dump(), "onto": str(paths[ref])}  # what a copy is made with, beside its source
    provenance = [{"model": str(p), **({} if aligned[i] == str(p) else moved)} for i, p in enumerate(paths)]
    return rename_models(cfg, {n: aligned[i] for i, n in enumerate(names)}), names, provenance


def rename_models(cfg: MergeConfig, rename: dict[str, str]) -> MergeConfig:
    """The config with every model reference renamed, and no ``align`` section."""
    out = cfg.model_copy(deep=True, update={"align": None})
    if out.base_model is not None:
        out.base_model = rename[out.base_model]
    for e in out.models or []:
        e.model = rename[e.model]
    for sl in out.slices or []:
        for s in sl.sources:
            s.model = rename[s.model]
    if out.tokenizer_source in rename:
        out.tokenizer_source = rename[out.tokenizer_source]
    if out.tokenizer is not None:
        out.tokenizer = renamed_tokenizer(out.tokenizer, lambda n: rename.get(n, n))
    return out
