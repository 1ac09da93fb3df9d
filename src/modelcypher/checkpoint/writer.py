"""Writing a Hugging Face model directory: sharded safetensors with an index, atomically.

Everything goes into a temporary directory beside the target and is renamed into place at the end
(:func:`guard.atomic_dir`); a failed or interrupted run removes it, so no half-written model is ever left
behind. Every block is checked for NaN and Inf in the output dtype as it is written, so neither a
non-finite input nor a cast that overflows (float16 beyond 65504) writes a broken model silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from modelcypher.checkpoint.guard import atomic_dir
from modelcypher.checkpoint.safetensors_io import CODES, StreamingFile, is_finite
from modelcypher.errors import UserError

__all__ = ["ShardedWriter", "atomic_dir", "parse_size", "shard"]

# Bytes per unit. The bare letters are mergekit's spelling of --out-shard-size (K, M and B for thousand,
# million and billion bytes: its default "5B" is five billion), so its sizes mean here what they mean there.
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from '2GB' (decimal, as Hugging Face writes it), '2GiB' (binary), mergekit's '5B' / '500M' /
    '64K' (billion, million, thousand bytes) or a plain number of bytes. A bare 'G' or 'T' is refused:
    mergekit has no such suffix and the user may have meant either convention."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Z]*)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise UserError(f"size {text!r}: expected a number with a unit such as 500MB, 2GB, 2GiB or mergekit's 5B")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise UserError(f"size {text!r}: must be positive")
    return size


Entry = tuple[str, tuple[int, ...], torch.dtype]


def shard(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive tensors fill a shard up to the size limit (a larger tensor gets a shard of its own);
    inside a shard wider dtypes come first so every tensor starts aligned to its element size."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = e[2].itemsize
        for s in e[1]:
            n *= s
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return [sorted(s, key=lambda e: -e[2].itemsize) for s in shards]


class ShardedWriter:
    """Writes tensors in ``order`` (decided by the sharding) into model[-0000i-of-0000n].safetensors."""

    def __init__(self, out_dir: Path, entries: Sequence[Entry], max_shard_size: int, *,
                 allow_nonfinite: bool = False):
        self.out_dir, self.allow_nonfinite = out_dir, allow_nonfinite
        self.shards = shard(entries, max_shard_size)
        n = len(self.shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.order = [e[0] for s in self.shards for e in s]
        self._where = {e[0]: i for i, s in enumerate(self.shards) for e in s}
        self._open: StreamingFile | None = None
        self._opened = -1

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name`` (whole, or its next block of rows) in its output dtype; NaN or Inf
        there is refused, naming the tensor, unless ``allow_nonfinite``."""
        if not self.allow_nonfinite and not is_finite(t):
            raise UserError(f"output tensor {name!r} would hold NaN or Inf in {CODES.get(t.dtype, t.dtype)} "
                            "(a non-finite input or parameter, or values beyond the output dtype's range); "
                            "nothing written (pass --allow-nonfinite to write it anyway)")
        i = self._where[name]
        if i != self._opened:
            if self._open:
                self._open.close()
            self._open = StreamingFile(self.out_dir / self.files[i], self.shards[i])
            self._opened = i
        self._open.write(name, t)

    def finish(self) -> None:
        if self._open:
            self._open.close()
        if len(self.files) > 1:
            total = sum(e[2].itemsize * _numel(e[1]) for s in self.shards for e in s)
            index = {"metadata": {"total_size": total},
                     "weight_map": {e[0]: self.files[i] for i, s in enumerate(self.shards) for e in s}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
