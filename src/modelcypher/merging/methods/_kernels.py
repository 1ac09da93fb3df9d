"""Fused CPU loops for the TIES family (registers nothing).

The torch formulas in :mod:`._trim`, :mod:`._drop` and :mod:`._consensus` take one pass over memory
per operation: a TIES block is some thirty of them, each cheap, together several times the cost of
reading the models. Here the same
arithmetic runs as compiled loops (``_loops.c``, built at install time; single-threaded, called
through ctypes, which releases the GIL, so that the runner's worker threads overlap): the trim's cut
(a sample, then the count and gather around the sampled window, and a radix select among those; the
histograms where the window misses), then one loop per block for the rest of TIES (trim, election,
disjoint mean, base) or of DARE-TIES (drop, election, ...). Every loop gives the torch formulas' result to the bit (NaN,
infinities and signed zeros included; no fused multiply-add), which the tests check both ways, so
either may compute any block.

Used for float32 and bfloat16 CPU tensors (a method registered ``raw=True`` gets its blocks as stored,
and the loops widen bfloat16 as they read it) when the library was built (an optional extension:
without a C compiler the install goes on, and the torch formulas do the work). A library built from
another version of the source is not used. ``MODELCYPHER_KERNELS=torch`` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_loops.c")
# What the loops read: float32, and bfloat16 as its bits (widened exactly, in the loop).
DTYPES = (torch.float32, torch.bfloat16)

_p, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "high_counts": (None, [_p, _i32, _p, _i32, _i64, _p]),
    "low_counts": (None, [_p, _i32, _p, _i32, _i64, ctypes.c_uint32, _p]),
    "sample_magnitudes": (None, [_p, _i32, _p, _i32, _i64, _i64, _p]),
    "window": (_i64, [_p, _i32, _p, _i32, _i64, ctypes.c_uint32, ctypes.c_uint32, _p, _p]),
    "window_portable": (_i64, [_p, _i32, _p, _i32, _i64, ctypes.c_uint32, ctypes.c_uint32, _p, _p]),
    "select_rank": (ctypes.c_uint32, [_p, _i64, _i64, ctypes.c_uint32, ctypes.c_uint32, _p, _p]),
    "ties_merge": (ctypes.c_int, [_i64, _p, _p, _p, _i32, _i64, _p, _p, _p, _p, _p, _i32, _f32, _p]),
    "dare_merge": (ctypes.c_int, [_i64, _p, _p, _p, _i32, _i64, _p, _p, _p, _p, _i32, _f32, _p]),
    "consensus": (ctypes.c_int, [_i64, _p, _p, _p, _i32, _f32, _p, _i32, _i64, _p]),
}


def source_hash() -> str:
    """What setup.py compiles into the library, so a stale build is known: the source's hash."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled loops, or None: turned off, not built, or built from another source."""
    if os.environ.get("MODELCYPHER_KERNELS", "").lower() == "torch":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_loops{suffix}"
        if path.is_file():
            break
    else:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.mc_source.restype = ctypes.c_char_p
    if SOURCE.is_file() and lib.mc_source().decode() != source_hash():
        return None  # built from an older _loops.c: its loops may take other arguments
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def usable(*ts: Tensor) -> bool:
    """Whether the kernels apply: built, and every tensor float32 or bfloat16 on the CPU."""
    return library() is not None and all(t.device.type == "cpu" and t.dtype in DTYPES for t in ts)


def _flat(t: Tensor) -> np.ndarray:
    """``t`` flattened as a numpy array: a bfloat16 tensor as its uint16 bits."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _arg(a: np.ndarray) -> tuple[int, int]:
    """(address, is bfloat16) of one flat array, as the loops take an input."""
    return a.ctypes.data, int(a.dtype == np.uint16)


def _many(arrays) -> tuple[ctypes.Array, ctypes.Array]:
    """The addresses and bfloat16 flags of several flat arrays, as C arrays."""
    ptrs, flags = zip(*map(_arg, arrays), strict=True)
    return (_p * len(arrays))(*ptrs), (_i32 * len(arrays))(*flags)


def _ptr(a: np.ndarray) -> int:
    """The address of a numpy array's data (an output, or an array of counts)."""
    return a.ctypes.data


def high_counts(x: Tensor, b: Tensor) -> Tensor:
    """:func:`._trim.high_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    fx, fb = _flat(x), _flat(b)
    library().high_counts(*_arg(fx), *_arg(fb), fb.size, hist.data_ptr())
    return hist


def low_counts(x: Tensor, b: Tensor, bucket: int) -> Tensor:
    """:func:`._trim.low_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    fx, fb = _flat(x), _flat(b)
    library().low_counts(*_arg(fx), *_arg(fb), fb.size, bucket, hist.data_ptr())
    return hist


def sample_magnitudes(x: Tensor, b: Tensor, stride: int) -> Tensor:
    """:func:`._trim.sample_bits` of the magnitude bits of ``x - b``."""
    fx, fb = _flat(x), _flat(b)
    out = torch.empty((fb.size + stride - 1) // stride, dtype=torch.int32)
    library().sample_magnitudes(*_arg(fx), *_arg(fb), fb.size, stride, out.data_ptr())
    return out


def window(x: Tensor, b: Tensor, lo: int, hi: int, loop: str = "window") -> tuple[int, Tensor]:
    """:func:`._trim.window_bits` of the magnitude bits of ``x - b`` (``loop``: the C function; the
    tests also run ``window_portable``, which CPUs without AVX-512 get)."""
    fx, fb = _flat(x), _flat(b)
    above, out = np.zeros(1, np.int64), torch.empty(fb.size + 16, dtype=torch.int32)  # 16 to spare
    k = getattr(library(), loop)(*_arg(fx), *_arg(fb), fb.size, lo, hi, _ptr(above), out.data_ptr())
    return int(above[0]), out[:k].clone()


def select_rank(bits: Tensor, r: int, lo: int, hi: int) -> tuple[int, int, int]:
    """The ``r``-th largest of magnitude bits (int32, all in ``[lo, hi]``; overwritten), how many are
    greater, and how many equal."""
    counts = np.zeros(2, np.int64)
    v = library().select_rank(bits.data_ptr(), bits.numel(), r, lo, hi, _ptr(counts), _ptr(counts[1:]))
    return int(v), int(counts[0]), int(counts[1])


def _check(status: int) -> None:
    if status:
        raise MemoryError("out of memory in a merge kernel")


def consensus(cs: list[Tensor], weights, normalize: bool, lambda_: float = 1.0, base: Tensor | None = None) -> Tensor:
    """:func:`._consensus.disjoint_merge_` of the contributions ``cs``, then ``merged * lambda_ + base``
    when a base is given."""
    flat = [_flat(c) for c in cs]
    out = np.empty(flat[0].size, np.float32)
    fb = None if base is None else _flat(base)
    w = np.asarray(weights, np.float32)
    _check(library().consensus(len(flat), *_many(flat), _ptr(w), int(normalize), lambda_,
                               *(_arg(fb) if fb is not None else (None, 0)), out.size, _ptr(out)))
    return torch.from_numpy(out).reshape(cs[0].shape)


def ties_merge(xs: list[Tensor], b: Tensor, cuts, seen: list[int], weights, normalize: bool,
               lambda_: float) -> Tensor:
    """TIES on one block in one loop: each ``x_i - b`` trimmed to ``cuts[i]`` (``seen[i]``: entries
    equal to the cut met so far, updated), times ``weights[i]``, then :func:`consensus` with the base."""
    flat, fb = [_flat(x) for x in xs], _flat(b)
    bits = np.array([c.bits for c in cuts], np.int64)
    ties, equal = np.array([c.ties for c in cuts], np.int64), np.array([c.equal for c in cuts], np.int64)
    counted, w = np.array(seen, np.int64), np.asarray(weights, np.float32)
    out = np.empty(fb.size, np.float32)
    _check(library().ties_merge(len(flat), *_many(flat), *_arg(fb), fb.size, _ptr(bits), _ptr(ties), _ptr(equal),
                                _ptr(counted), _ptr(w), int(normalize), lambda_, _ptr(out)))
    seen[:] = counted.tolist()
    return torch.from_numpy(out).reshape(b.shape)


def dare_merge(xs: list[Tensor], b: Tensor, draws: list[Tensor | None], levels: list[int], scales: list[float],
               weights, normalize: bool, lambda_: float) -> Tensor:
    """DARE-TIES on one block in one loop: each ``x_i - b`` kept where its 16-bit coins (``draws[i]``,
    int64, four coins each, as :func:`._drop.bernoulli_mask` reads them) fall below ``levels[i]``
    (out of 2**16: 0 keeps none, 2**16 all, with no draws), rescaled by ``scales[i]``; then
    :func:`consensus` with the base."""
    flat, fb = [_flat(x) for x in xs], _flat(b)
    coins = (_p * len(draws))(*[0 if d is None else d.data_ptr() for d in draws])
    below = np.array([-(2**15) if k <= 0 else 2**15 + 1 if k >= 1 << 16 else k - 2**15 for k in levels], np.int32)
    scale, w = np.asarray(scales, np.float32), np.asarray(weights, np.float32)
    out = np.empty(fb.size, np.float32)
    _check(library().dare_merge(len(flat), *_many(flat), *_arg(fb), fb.size, coins, _ptr(below), _ptr(scale),
                                _ptr(w), int(normalize), lambda_, _ptr(out)))
    return torch.from_numpy(out).reshape(b.shape)
