"""``extract-lora``: a PEFT LoRA adapter from a fine-tune minus its base, module by module.

Each weight matrix's update ``W_ft - W_base`` is cut to its best low-rank approximation
(:func:`~modelcypher.adapters.low_rank.low_rank_factors`); embeddings and the output head are kept
whole as ``modules_to_save`` (the form a vocabulary's rows take best), or factored too on request.
Modules are visited one at a time: each one's factors go to a scratch file beside the output as soon
as they are computed, so memory holds one module's tensors whatever the depth, and the adapter file
is assembled from the scratch file once every rank is known.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelcypher.adapters.low_rank import low_rank_factors
from modelcypher.arch.families import family_of, ties_embeddings
from modelcypher.checkpoint.guard import check_output_dir
from modelcypher.checkpoint.peft import lora_config, write_adapter
from modelcypher.checkpoint.reader import Checkpoint
from modelcypher.checkpoint.safetensors_io import TensorInfo, read_tensor
from modelcypher.errors import UserError

REPORT_FILE = "extract_report.json"
# input embeddings besides the tied ones a family record names (position and token-type tables)
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "wpe.weight", "word_embeddings.weight",
                       "position_embeddings.weight", "token_type_embeddings.weight")


@dataclass
class ModuleReport:
    rank: int
    kept: float  # share of the update's energy (squared Frobenius norm) the factors keep


@dataclass
class ExtractReport:
    rank: int
    sv_epsilon: float
    modules: dict[str, ModuleReport] = field(default_factory=dict)  # LoRA modules
    modules_to_save: list[str] = field(default_factory=list)  # tensors kept whole
    unchanged: list[str] = field(default_factory=list)  # matrices equal in both models (no module)
    not_carried: list[str] = field(default_factory=list)  # other tensors that differ (norms, biases)

    def to_json(self) -> dict:
        return {"rank": self.rank, "sv_epsilon": self.sv_epsilon,
                "modules": {k: {"rank": v.rank, "kept": v.kept} for k, v in self.modules.items()},
                "modules_to_save": self.modules_to_save, "unchanged": self.unchanged,
                "not_carried": self.not_carried}


def _arch(ck: Checkpoint) -> tuple[str, str]:
    return ",".join(ck.config.get("architectures") or []), str(ck.config.get("model_type"))


def _check_pair(ft: Checkpoint, base: Checkpoint) -> None:
    if _arch(ft) != _arch(base):
        raise UserError(f"models differ in family: {ft.path} is {'/'.join(_arch(ft))}, "
                        f"{base.path} is {'/'.join(_arch(base))}")
    for n in ft.names:
        if n not in base:
            raise UserError(f"tensor {n!r} is in {ft.path} but not in the base {base.path}")
        if ft.shape(n) != base.shape(n):
            raise UserError(f"tensor {n!r} has shape {list(ft.shape(n))} in {ft.path} and "
                            f"{list(base.shape(n))} in the base {base.path}")
    for n in base.names:
        if n not in ft:
            raise UserError(f"tensor {n!r} is in the base {base.path} but not in {ft.path}")


def extract_lora(finetune: str | Path, base: str | Path, out: str | Path, *, rank: int = 32,
                 sv_epsilon: float = 0.0, embed_lora: bool = False, overwrite: bool = False,
                 log=None) -> ExtractReport:
    """Write a PEFT LoRA adapter to ``out`` that turns ``base`` into (approximately) ``finetune``.

    Each matrix update gets rank ``rank``, or fewer where singular values fall to ``sv_epsilon``
    times the largest; ``log`` (e.g. ``print``) hears one line per module as it is done."""
    if rank <= 0:
        raise UserError(f"--rank {rank}: must be a positive integer")
    if not 0 <= sv_epsilon < 1:
        raise UserError(f"--sv-epsilon {sv_epsilon}: must be in [0, 1) (relative to the largest singular value)")
    ft, bs = Checkpoint(finetune), Checkpoint(base)
    _check_pair(ft, bs)
    out = check_output_dir(out, [ft.path, bs.path], overwrite=overwrite)  # the guard every writer shares

    fam = family_of(ft.config)
    embeddings = {i for i, _ in fam.tied} | {n for n in ft.names if n.endswith(_EMBEDDING_SUFFIXES)}
    heads = {o for _, o in fam.tied}
    # A head tied to its embedding is no tensor of its own in the checkpoint, but is a module of its
    # own in peft: it gets the embedding's update too, or the adapted model's head would stay the base's.
    tied_head = {i: o for i, o in fam.tied if i in ft and o not in ft and ties_embeddings(ft.config)}
    report = ExtractReport(rank, sv_epsilon)
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    scratch_at: dict[str, TensorInfo] = {}
    full: dict[str, str] = {}  # PEFT key -> fine-tune tensor name
    conv1d = False
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.factors-{uuid.uuid4().hex[:8]}"
    try:
        with open(scratch, "wb") as f:
            for n in ft.names:
                dtype = ft.dtype(n)
                if not dtype.is_floating_point:
                    continue
                matrix = len(ft.shape(n)) == 2 and n.endswith(".weight")
                whole = n in embeddings or n in heads
                if whole and not embed_lora:
                    if not torch.equal(ft.get(n), bs.get(n)):
                        for key in [n] + ([tied_head[n]] if n in tied_head else []):
                            report.modules_to_save.append(key)
                            entries.append((key, ft.shape(n), dtype))
                            full[key] = n
                    continue
                delta = ft.get(n).float() - bs.get(n).float()
                if not matrix:
                    if delta.abs().max() > 0:
                        report.not_carried.append(n)
                    continue
                if not delta.any():
                    report.unchanged.append(n)
                    continue
                module = n[: -len(".weight")]
                embedding = n in embeddings
                transposed = embedding or n.endswith(fam.conv1d)
                conv1d |= transposed and not embedding
                a, b, kept = low_rank_factors(delta.T if transposed else delta, rank, sv_epsilon)
                kinds = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
                factors = {f"{module}.{kinds[0]}": a, f"{module}.{kinds[1]}": b}
                if n in tied_head:  # the head's update is the embedding's, transposed: B_h = A^T, A_h = B^T
                    head = tied_head[n][: -len(".weight")]
                    factors |= {f"{head}.lora_A.weight": b.T, f"{head}.lora_B.weight": a.T}
                    report.modules[head] = ModuleReport(a.shape[0], kept)
                for key, t in factors.items():
                    t = t.to(dtype).contiguous()
                    scratch_at[key] = TensorInfo(scratch, dtype, tuple(t.shape), f.tell(), t.numel() * t.itemsize)
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    entries.append((key, tuple(t.shape), dtype))
                report.modules[module] = ModuleReport(a.shape[0], kept)
                if log:
                    log(f"  {module}: rank {a.shape[0]}, kept {kept:.4f} of the update's energy")
        if not report.modules and not report.modules_to_save:
            raise UserError(f"{ft.path} and {bs.path} have the same weights: there is no update to extract")
        if not report.modules:  # peft refuses an adapter whose every module is saved whole
            raise UserError(f"{ft.path} differs from {bs.path} only in its embeddings or head; "
                            "pass --embed-lora to factor them")
        ranks = {m: r.rank for m, r in report.modules.items()}
        r_max = max(ranks.values(), default=rank)
        others = {m: r for m, r in ranks.items() if r != r_max}
        leaves = sorted({n[: -len(".weight")].rsplit(".", 1)[-1] for n in report.modules_to_save})
        config = lora_config(target_modules=list(ranks), r=r_max, lora_alpha=r_max, rank_pattern=others,
                             alpha_pattern=others, modules_to_save=leaves, fan_in_fan_out=conv1d,
                             base_model_name_or_path=str(bs.path))

        def read(key: str) -> torch.Tensor:
            return read_tensor(scratch_at[key]) if key in scratch_at else ft.get(full[key])

        write_adapter(out, config, entries, read, overwrite=overwrite,
                      extra_files={REPORT_FILE: json.dumps(report.to_json(), indent=1) + "\n"})
    finally:
        if scratch.exists():
            os.remove(scratch)
    return report
