"""A base model with a PEFT LoRA adapter applied as its tensors are read: the ``model+lora`` reference.

It answers the same verbs as :class:`~modelcypher.checkpoint.reader.Checkpoint`, so a merge reads it
like any other model, tensor by tensor (or block of rows by block of rows); the adapted model is never
held whole. A tensor the adapter updates is returned in float32 (base + delta, unrounded); the others
as stored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelcypher.arch.families import GENERIC, family_of, ties_embeddings
from modelcypher.checkpoint.peft import LoraAdapter
from modelcypher.checkpoint.reader import Checkpoint


class AdaptedCheckpoint:
    """``base`` with ``adapter`` merged in on read; ``path`` is the base's (config, tokenizer)."""

    def __init__(self, base: str | Path | Checkpoint, adapter: str | Path | LoraAdapter, name: str | None = None):
        self.base = base if isinstance(base, Checkpoint) else Checkpoint(base)
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
        self.name = name or f"{self.base.path}+{self.adapter.path}"
        fam = family_of(self.base.config)
        # an unknown family: the adapter's fan_in_fan_out flag says which weights are stored [in, out]
        tied = [o for _, o in fam.tied] if ties_embeddings(self.base.config) else []
        self.adapter.check_base(self.base.names, self.base.shape, str(self.base.path),
                                None if fam is GENERIC else fam.conv1d, tied)
        self.path = self.base.path
        self.config = self.base.config

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.adapter.factors:
            return torch.float32
        if name in self.adapter.full:
            return self.adapter.key_dtype(self.adapter.full[name])
        return self.base.dtype(name)

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor, or a contiguous range of its rows: the base's (or the adapter's full replacement)
        plus the adapter's update of those rows."""
        full = self.adapter.full.get(name)
        w = self.adapter.tensor(full, rows) if full else self.base.get(name, rows)
        if name not in self.adapter.factors:
            return w
        return w.float() + self.adapter.delta(name, rows)

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({self.name!r})"
