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
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start, infos = 8 + n, {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise UserError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}")
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return infos, meta


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
