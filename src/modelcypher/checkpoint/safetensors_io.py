"""The safetensors format, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw bytes. Reading a tensor is one ``pread`` into a fresh
buffer: the process never maps the whole file, so resident memory stays at the tensors in flight.
Writing knows every shape up front (the merge plan does), so the header goes first and each tensor's
bytes are appended as soon as it is computed: no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcypher.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; a corrupt or truncated file is a UserError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise UserError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + n
    infos = {name: _entry(path, name, h, data_start) for name, h in header.items()}
    validate_layout(path, infos, size - data_start, data_start)
    return infos, meta


def _entry(path: Path, name: str, h: object, data_start: int) -> TensorInfo:
    """One header entry, checked as safetensors checks it: a known dtype, a shape of non-negative
    integers whose byte length fits 64 bits, and a byte range of exactly that length."""
    if not isinstance(h, dict) or set(h) - {"dtype", "shape", "data_offsets"}:
        raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}")
    code, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise UserError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
    dtype = DTYPES[code]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise UserError(f"{path}: tensor {name!r} has an invalid shape {shape!r} (non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise UserError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    if nbytes >= 2**63:
        raise UserError(f"{path}: tensor {name!r} has a shape {shape} too large to address")
    begin, end = offsets
    if end - begin != nbytes:
        raise UserError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} of {code} "
                        f"({nbytes} expected)")
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, nbytes)


def validate_layout(path: Path, infos: dict[str, TensorInfo], data_bytes: int, data_start: int) -> None:
    """The tensors' byte ranges must tile the data exactly, as safetensors requires: in order, without
    overlap or gap, ending where the file ends."""
    at = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        begin = info.start - data_start
        if begin < at:
            raise UserError(f"{path}: tensor {name!r} overlaps the tensor before it (bytes {begin}.. of the data, "
                            f"which is taken up to {at})")
        if begin > at:
            raise UserError(f"{path}: a gap of {begin - at} bytes before tensor {name!r}: data_offsets do not "
                            "tile the data")
        at = begin + info.nbytes
    if at > data_bytes:
        last = max(infos, key=lambda k: infos[k].start + infos[k].nbytes)
        raise UserError(f"{path}: truncated: tensor {last!r} ends at byte {data_start + at}, "
                        f"file has {data_start + data_bytes}")
    if at < data_bytes:
        raise UserError(f"{path}: {data_bytes - at} bytes after the last tensor: data_offsets do not tile the data")


def is_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (always, for integers and booleans). One sum tells when
    all are (NaN and Inf propagate, accumulated in float32 or wider so no copy is made); the exact test
    runs only when the sum is not finite, which huge finite values can also cause."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        s = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    except (RuntimeError, TypeError):  # float8 types have no sum
        s = t.float().sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


def read_tensor(info: TensorInfo, rows: slice | None = None) -> torch.Tensor:
    """The tensor, or rows ``rows`` of it (a contiguous byte range: row-major storage)."""
    shape, start, nbytes = info.shape, info.start, info.nbytes
    if rows is not None and shape:
        a, b, _ = rows.indices(shape[0])
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        shape, start, nbytes = (max(b - a, 0),) + shape[1:], start + a * row_bytes, max(b - a, 0) * row_bytes
    if nbytes == 0:
        return torch.empty(shape, dtype=info.dtype)
    buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: the read overwrites every byte
    with open(info.file, "rb") as f:
        f.seek(start)
        if f.readinto(buf.numpy()) != nbytes:
            raise UserError(f"{info.file}: truncated while reading a tensor at byte {start}")
    return buf.view(info.dtype).reshape(shape)


class StreamingFile:
    """One safetensors file whose tensors are appended in a fixed order after the header is written."""

    def __init__(self, path: Path, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path, self.order, header, offset = path, [], {}, 0
        for name, shape, dtype in entries:
            numel = 1
            for s in shape:
                numel *= s
            header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + numel * dtype.itemsize]}
            self.order.append((name, tuple(shape), dtype))
            offset += numel * dtype.itemsize
        self.nbytes = offset
        blob = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header},
                          separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self._rows = 0  # rows of the current tensor written so far

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name``, whole or as its next block of rows."""
        want, shape, dtype = self.order[self._next]
        whole = tuple(t.shape) == shape and self._rows == 0
        if name != want or t.dtype != dtype or not (whole or (shape and tuple(t.shape[1:]) == shape[1:])):
            raise RuntimeError(f"write order broken: got {name} {tuple(t.shape)} {t.dtype}, expected {want}")
        self._f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._rows = shape[0] if whole else self._rows + t.shape[0]
        if shape and self._rows > shape[0]:
            raise RuntimeError(f"{name}: more rows written than its shape {shape}")
        if shape and self._rows < shape[0]:
            return
        self._next += 1
        self._rows = 0
        if self._next == len(self.order):
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
