"""A local Hugging Face model directory, read lazily: headers up front, tensor data only on demand."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from modelcypher.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from modelcypher.errors import UserError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files that travel with a model besides its weights (tokenizer_source, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)


def _inside(root: Path, rel: str, what: str) -> Path:
    """Resolve a file name given by an index, refusing anything that escapes the model directory."""
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root.resolve()):
        raise UserError(f"{what}: shard path {rel!r} points outside the model directory {root}")
    if not p.is_file():
        raise UserError(f"{what}: names shard {rel!r}, which does not exist in {root}")
    return p


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded safely: weights_only refuses arbitrary pickles; mmap keeps the data
    on disk until a tensor is used."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise UserError(f"{path}: cannot load safely with weights_only=True ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


class Checkpoint:
    """Tensor names, shapes and dtypes from the headers; ``get`` reads one tensor from disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such model directory")
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a model directory (a Hugging Face model is a folder)")
        if not (self.path / "config.json").is_file():
            raise UserError(f"{self.path}: not a model directory (no config.json)")
        self.config = _read_json(self.path / "config.json")
        self._infos: dict[str, TensorInfo] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._load_index()

    def _load_index(self) -> None:
        p = self.path
        if (p / SAFE_INDEX).is_file():
            self._from_index(p / SAFE_INDEX, self._add_safetensors)
        elif (p / SAFE_SINGLE).is_file():
            self._add_safetensors(p / SAFE_SINGLE)
        elif (p / BIN_INDEX).is_file():
            self._from_index(p / BIN_INDEX, self._add_bin)
        elif (p / BIN_SINGLE).is_file():
            self._add_bin(p / BIN_SINGLE)
        else:
            raise UserError(f"{p}: no weights found ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _from_index(self, index: Path, add) -> None:
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map")
        shards = {rel: _inside(self.path, rel, str(index)) for rel in set(weight_map.values())}
        for rel in sorted(shards):
            names = add(shards[rel])
            for name, where in weight_map.items():
                if where == rel and name not in names:
                    raise UserError(f"{index}: tensor {name!r} is not in shard {rel}")

    def _add_safetensors(self, path: Path) -> set[str]:
        infos, _ = read_header(path)
        self._infos.update(infos)
        return set(infos)

    def _add_bin(self, path: Path) -> set[str]:
        sd = load_bin(path)
        self._bin.update(sd)
        return set(sd)

    @cached_property
    def names(self) -> list[str]:
        return list(self._infos) + list(self._bin)

    def __contains__(self, name: str) -> bool:
        return name in self._infos or name in self._bin

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape if name in self._infos else tuple(self._bin[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._infos[name].dtype if name in self._infos else self._bin[name].dtype

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor, or a contiguous range of its rows (read from disk alone)."""
        if name in self._infos:
            return read_tensor(self._infos[name], rows)
        if name in self._bin:
            t = self._bin[name]
            return t if rows is None or t.dim() == 0 else t[rows]
        raise UserError(f"{self.path}: has no tensor {name!r}")

    @property
    def num_parameters(self) -> int:
        n = 0
        for name in self.names:
            k = 1
            for s in self.shape(name):
                k *= s
            n += k
        return n

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors)"
