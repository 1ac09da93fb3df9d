"""A local Hugging Face model directory, read lazily: headers up front, tensor data only on demand."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from modelcypher.arch.families import layer_index, num_layers
from modelcypher.checkpoint.files import member, present
from modelcypher.checkpoint.safetensors_io import TensorInfo, is_finite, read_header, read_tensor
from modelcypher.errors import UserError, os_error

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files that travel with a model besides its weights (tokenizer_source, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)


def resolve_path(ref: str, config_dir: Path | None, what: str = "model") -> Path:
    """A path as written in the config: relative to the working directory, else to the config's folder."""
    for root in (Path.cwd(), config_dir):
        if root is not None and (root / ref).exists():
            return root / ref
    where = f" (looked in {Path.cwd()}" + (f" and {config_dir})" if config_dir else ")")
    if what != "model":
        raise UserError(f"{what} {ref!r}: not found{where}")
    raise UserError(f"model {ref!r}: no such local model directory{where}; downloads from a hub are not done")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise os_error(e, path) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
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
    """Tensor names, shapes and dtypes from the headers; ``get`` reads one tensor from disk.

    Every file is read under :func:`files.member`'s rule (nothing outside the folder, Hugging Face cache
    snapshots accepted), the config is checked against the tensors present before anything is built
    from it, and ``get`` refuses a floating tensor holding NaN or Inf unless ``allow_nonfinite``.
    """

    def __init__(self, path: str | Path, *, allow_nonfinite: bool = False):
        self.path = Path(path)
        self.allow_nonfinite = allow_nonfinite
        try:
            if not self.path.exists():
                raise UserError(f"{self.path}: no such model directory")
            if not self.path.is_dir():
                raise UserError(f"{self.path}: not a model directory (a Hugging Face model is a folder)")
            if not present(self.path, "config.json"):
                raise UserError(f"{self.path}: not a model directory (no config.json)")
            self.config = _read_json(member(self.path, "config.json", str(self.path)))
            self._infos: dict[str, TensorInfo] = {}
            self._bin: dict[str, torch.Tensor] = {}
            self._load_index()
        except OSError as e:
            raise os_error(e, self.path) from None
        check_layers(self)

    def _load_index(self) -> None:
        p, what = self.path, str(self.path)
        if present(p, SAFE_INDEX):
            self._from_index(member(p, SAFE_INDEX, what), self._add_safetensors)
        elif present(p, SAFE_SINGLE):
            self._add_safetensors(member(p, SAFE_SINGLE, what))
        elif present(p, BIN_INDEX):
            self._from_index(member(p, BIN_INDEX, what), self._add_bin)
        elif present(p, BIN_SINGLE):
            self._add_bin(member(p, BIN_SINGLE, what))
        else:
            raise UserError(f"{p}: no weights found ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _from_index(self, index: Path, add) -> None:
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map")
        for name, rel in weight_map.items():
            if not isinstance(rel, str):
                raise UserError(f"{index}: weight_map[{name!r}] is {rel!r}, not a shard file name")
        shards = {rel: member(self.path, rel, str(index)) for rel in set(weight_map.values())}
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

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is stored as floating point (weights are; ids, masks, counters are not)."""
        return self.dtype(name).is_floating_point

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor, or a contiguous range of its rows (read from disk alone); NaN or Inf in a floating
        tensor is refused, naming it, unless ``allow_nonfinite``."""
        if name in self._infos:
            try:
                t = read_tensor(self._infos[name], rows)
            except OSError as e:
                raise os_error(e, self._infos[name].file) from None
        elif name in self._bin:
            t = self._bin[name]
            t = t if rows is None or t.dim() == 0 else t[rows]
        else:
            raise UserError(f"{self.path}: has no tensor {name!r}")
        if not self.allow_nonfinite and not is_finite(t):
            raise UserError(f"{self.path}: tensor {name!r} contains NaN or Inf; pass --allow-nonfinite to "
                            "merge it anyway (align, barrier and diagnose need finite weights)")
        return t

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


def check_layers(ck: Checkpoint) -> None:
    """Refuse a config that claims more layers than the tensors hold, before any verb builds a model or
    allocates per layer from it (a config of 10**9 layers over two layers of tensors)."""
    try:
        claimed = num_layers(ck.config)
    except (TypeError, ValueError, AttributeError):
        return  # a config without a readable layer count is judged by the verbs that need one
    if claimed is None:
        return
    present_layers = {i for n in ck.names if (i := layer_index(n)) is not None}
    if claimed < 0 or (present_layers and claimed > len(present_layers)):
        raise UserError(f"{ck.path / 'config.json'}: claims {claimed} layers, but the weights hold "
                        f"{len(present_layers)}")
