"""PEFT LoRA adapters, read and written in the layout the ``peft`` library saves.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``). Each adapted module ``m`` of the base model carries two factors,
``base_model.model.<m>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r), and its weight is
updated by ``delta = scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` under rsLoRA,
Kalajdzievski 2023). ``r`` and ``alpha`` may differ per module (``rank_pattern``, ``alpha_pattern``).
Weights stored [in, out] (GPT-2's Conv1D, ``fan_in_fan_out``) and embeddings (whose factors
``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (dim x r) act on one-hot inputs) take the
update transposed. Any other tensor in the file (``modules_to_save``, trained biases, saved embedding
layers) replaces the base tensor of the same name whole.

The factors are small next to the model: they are read lazily, one module at a time, and a block of
rows of a delta is computed from the matching rows of its factors only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from modelcypher.checkpoint.safetensors_io import StreamingFile, TensorInfo, read_header, read_tensor
from modelcypher.checkpoint.writer import atomic_dir
from modelcypher.errors import UserError

CONFIG_FILE = "adapter_config.json"
SAFE_FILE, BIN_FILE = "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<w>\.weight)?$")
# Config switches this reader has no arithmetic for: a delta computed without them would be wrong.
_UNSUPPORTED = {"use_dora": "DoRA (weight-decomposed LoRA) adapters are not supported",
                "lora_bias": "LoRA biases (lora_bias) are not supported",
                "layer_replication": "layer_replication is not supported",
                "trainable_token_indices": "trainable_token_indices is not supported",
                "target_parameters": "LoRA on parameters (target_parameters) is not supported",
                "use_qalora": "QA-LoRA adapters are not supported"}


def pattern_value(patterns: dict, module: str, default):
    """A per-module value as peft resolves it: the first pattern that matches the end of the module
    name on a dot boundary (patterns are regular expressions), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraFactors:
    """One module's update ``delta = scale * B @ A``, transposed when ``transposed`` (Conv1D, embeddings)."""
    a: str  # key of A in the adapter file
    b: str
    scale: float
    transposed: bool
    embedding: bool = False

    def delta_rows(self, a: torch.Tensor, b: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """Rows ``rows`` of delta, in the base tensor's layout, in float32, from the factors alone."""
        a, b = a.float(), b.float()
        if self.transposed:  # delta = (B @ A)^T: its rows are A's columns
            a_rows = a if rows is None else a[:, rows]
            return self.scale * (a_rows.T @ b.T)
        b_rows = b if rows is None else b[rows]
        return self.scale * (b_rows @ a)


class LoraAdapter:
    """A PEFT LoRA adapter directory: per base tensor name, its factors or its full replacement."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not an adapter directory (a PEFT adapter is a folder)")
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.is_file():
            raise UserError(f"{self.path}: not a PEFT adapter (no {CONFIG_FILE})")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path}: cannot read JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{cfg_path}: expected a JSON object")
        kind = self.config.get("peft_type")
        if kind != "LORA":
            raise UserError(f"{cfg_path}: peft_type is {kind!r}; only LoRA adapters (LORA) are supported")
        for key, why in _UNSUPPORTED.items():
            if self.config.get(key):
                raise UserError(f"{cfg_path}: {why}")
        self._infos: dict[str, TensorInfo] = {}
        self._bin: dict[str, torch.Tensor] = {}
        if (self.path / SAFE_FILE).is_file():
            self.file = self.path / SAFE_FILE
            self._infos, _ = read_header(self.file)
        elif (self.path / BIN_FILE).is_file():
            self.file = self.path / BIN_FILE
            self._bin = _load_bin(self.file)
        else:
            raise UserError(f"{self.path}: no adapter weights ({SAFE_FILE} or {BIN_FILE})")
        self.factors, self.full = self._parse()

    def _keys(self) -> list[str]:
        return list(self._infos) + list(self._bin)

    def tensor(self, key: str, rows: slice | None = None) -> torch.Tensor:
        if key in self._infos:
            return read_tensor(self._infos[key], rows)
        t = self._bin[key]
        return t if rows is None or t.dim() == 0 else t[rows]

    def key_shape(self, key: str) -> tuple[int, ...]:
        return self._infos[key].shape if key in self._infos else tuple(self._bin[key].shape)

    def key_dtype(self, key: str) -> torch.dtype:
        return self._infos[key].dtype if key in self._infos else self._bin[key].dtype

    def _parse(self) -> tuple[dict[str, LoraFactors], dict[str, str]]:
        cfg = self.config
        try:
            r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        except (TypeError, ValueError):
            raise UserError(f"{self.path / CONFIG_FILE}: r and lora_alpha must be numbers") from None
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        pairs: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for key in self._keys():
            if not key.startswith(PREFIX):
                raise UserError(f"{self.file}: key {key!r} does not start with {PREFIX!r} (not a PEFT LoRA file)")
            m = _FACTOR.match(key[len(PREFIX):])
            if m:
                pairs.setdefault(m["module"], {})[m["kind"]] = key
                continue
            # modules_to_save and saved embedding layers: the tensor replaces the base's
            name = key[len(PREFIX):].replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            full[name] = key
        factors = {}
        for module, kinds in pairs.items():
            embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if a_kind not in kinds or b_kind not in kinds:
                missing = a_kind if a_kind not in kinds else b_kind
                raise UserError(f"{self.file}: module {module!r} has no {missing} factor")
            a, b = kinds[a_kind], kinds[b_kind]
            ra, rb = self.key_shape(a), self.key_shape(b)
            r = int(pattern_value(rank_pattern, module, r0))
            alpha = float(pattern_value(alpha_pattern, module, alpha0))
            if len(ra) != 2 or len(rb) != 2 or ra[0] != rb[1] or ra[0] != r:
                raise UserError(f"{self.file}: factors of {module!r} have shapes {list(ra)} and {list(rb)}, "
                                f"which do not fit rank {r}")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            transposed = embedding or bool(cfg.get("fan_in_fan_out"))
            # a full tensor of the same name (a saved embedding layer) is the weight the update adds to
            factors[module + ".weight"] = LoraFactors(a, b, scale, transposed, embedding)
        return factors, full

    def delta_shape(self, name: str) -> tuple[int, int]:
        f = self.factors[name]
        (_, n_in), (n_out, _) = self.key_shape(f.a), self.key_shape(f.b)
        return (n_in, n_out) if f.transposed else (n_out, n_in)

    def delta(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The dense update of base tensor ``name`` (or rows of it), float32, in the base's layout."""
        f = self.factors[name]
        if f.transposed or rows is None:
            return f.delta_rows(self.tensor(f.a), self.tensor(f.b), rows)
        return f.delta_rows(self.tensor(f.a), self.tensor(f.b, rows), slice(None))  # B's rows alone, from disk

    def check_base(self, names: Iterable[str], shape: Callable[[str], tuple[int, ...]], base: str,
                   conv1d: tuple[str, ...] | None = None, tied: Iterable[str] = ()) -> None:
        """Every key names a tensor of the base, with a shape that fits it; else one line naming it.

        ``conv1d``: the base's weights stored [in, out], by name suffix. peft decides the layout by
        the layer it wraps, whatever ``fan_in_fan_out`` says, so where the base's family is known it
        decides here too. ``tied``: heads the base ties to its embedding and stores no tensor for; an
        update to one is dropped (the base has one tensor for both: the embedding's update stands)."""
        names = set(names)
        tied = set(tied) - names
        self.factors = {n: f for n, f in self.factors.items() if n not in tied}
        self.full = {n: k for n, k in self.full.items() if n not in tied}
        if conv1d is not None:
            self.factors = {n: replace(f, transposed=f.embedding or n.endswith(conv1d))
                            for n, f in self.factors.items()}
        for name, f in self.factors.items():
            if name not in names:
                raise UserError(f"{self.file}: {f.a!r} names module {name[:-len('.weight')]!r}, "
                                f"which base model {base} does not have")
            if self.delta_shape(name) != tuple(shape(name)):
                raise UserError(f"{self.file}: the update of {name!r} has shape {list(self.delta_shape(name))}, "
                                f"but base model {base} stores it as {list(shape(name))}")
        for name, key in self.full.items():
            if name not in names:
                raise UserError(f"{self.file}: {key!r} names tensor {name!r}, which base model {base} does not have")
            if self.key_shape(key) != tuple(shape(name)):
                raise UserError(f"{self.file}: {key!r} has shape {list(self.key_shape(key))}, but base model "
                                f"{base} stores {name!r} as {list(shape(name))}")

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.factors)} modules, {len(self.full)} full tensors)"


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses arbitrary pickles
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise UserError(f"{path}: cannot load safely with weights_only=True ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


def lora_config(*, target_modules: list[str], r: int, lora_alpha: float, rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None, modules_to_save: list[str] | None = None,
                fan_in_fan_out: bool = False, base_model_name_or_path: str | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict:
    """An ``adapter_config.json`` that ``peft`` reads; patterns are matched as regular expressions
    there, so module names are escaped."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
        "inference_mode": True, "target_modules": sorted(target_modules),
        "rank_pattern": {re.escape(k): v for k, v in (rank_pattern or {}).items()},
        "alpha_pattern": {re.escape(k): v for k, v in (alpha_pattern or {}).items()},
        "modules_to_save": modules_to_save or None,
    }


def write_adapter(out: str | Path, config: dict, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                  read: Callable[[str], torch.Tensor], *, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None) -> Path:
    """Write a PEFT adapter directory atomically: ``config`` as adapter_config.json, and the tensors
    ``entries`` (PEFT key, shape, dtype; keys without the ``base_model.model.`` prefix get it), each
    produced by ``read(key)`` as the file is written, one at a time."""
    out = Path(out)
    given = {k if k.startswith(PREFIX) else PREFIX + k: k for k, _, _ in entries}
    entries = [(k if k.startswith(PREFIX) else PREFIX + k, tuple(s), d) for k, s, d in entries]
    # wider dtypes first: every tensor then starts aligned to its element size
    entries.sort(key=lambda e: -e[2].itemsize)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        f = StreamingFile(tmp / SAFE_FILE, entries)
        try:
            for key, shape, dtype in entries:
                t = read(given[key])
                if tuple(t.shape) != shape:
                    raise RuntimeError(f"{key}: produced shape {tuple(t.shape)}, declared {shape}")
                f.write(key, t.to(dtype))
        finally:
            f.close()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out
