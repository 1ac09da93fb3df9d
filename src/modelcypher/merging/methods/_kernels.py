"""Fused CPU loops for the TIES family (registers nothing).

The torch formulas in :mod:`._sparsify` take one pass over memory per operation: a TIES block is some
thirty of them, each cheap, together several times the cost of reading the models. Here the same
arithmetic runs as compiled loops (numba, :mod:`._numba_loops`; single-threaded, releasing the GIL so
that the runner's worker threads overlap): the trim's two histograms, then one loop per block for the
rest of TIES (trim, election, disjoint mean, base) or of DARE-TIES (drop, election, ...). Every kernel
gives the torch formulas' result to the bit (NaN, infinities and signed zeros included; no fused
multiply-add), which the tests check both ways, so either may compute any block.

Loading the kernels costs about 0.6 s (importing numba, then its compiler's set-up; the compiled code
comes from numba's on-disk cache after the first run). It starts in a thread at the first call of
:func:`usable` with a large enough block; until it is done the torch formulas do the work.
Used for float32 and bfloat16 CPU tensors (a method registered ``raw=True`` gets its blocks as stored,
and the loops widen bfloat16 as they read it) when numba imports; ``MODELCYPHER_KERNELS=torch`` turns
them off."""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch
from torch import Tensor


@functools.cache
def _numba():
    if os.environ.get("MODELCYPHER_KERNELS", "").lower() == "torch":
        return None
    try:
        import numba
    except ImportError:  # an optional speed-up: the torch formulas are the reference
        return None
    return numba


_ready = threading.Event()  # set once every kernel is compiled or loaded (warm_up)
_started = threading.Lock()


# What the loops read: float32, and bfloat16 as its bits (widened exactly, in the loop).
DTYPES = (torch.float32, torch.bfloat16)
# Loading costs about 0.65 s of a core, which blocks of fewer entries than this do not repay (and a
# process merging only such tensors would then wait for the loading at exit).
WORTH_LOADING = 1 << 16


def usable(*ts: Tensor) -> bool:
    """Whether the kernels apply: loaded, and every tensor float32 or bfloat16 on the CPU. The first
    call with a block of ``WORTH_LOADING`` entries or more starts loading them in a thread; until they
    are ready the torch formulas (the same bits) do the work."""
    if not all(t.device.type == "cpu" and t.dtype in DTYPES for t in ts):
        return False
    if not _ready.is_set():
        if ts and ts[0].numel() >= WORTH_LOADING:
            start_warm_up()
        return False
    return True


def _flat(t: Tensor) -> np.ndarray:
    """``t`` flattened as a numpy array: a bfloat16 tensor as its uint16 bits."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _models(xs: list[Tensor]) -> tuple[np.ndarray, ...]:
    """The models' blocks as one tuple of flat arrays of one type (the loops index the models), all
    float32 when their dtypes differ."""
    if len({x.dtype for x in xs}) > 1:
        xs = [x.float() for x in xs]
    return tuple(_flat(x) for x in xs)


def _loops():
    from modelcypher.merging.methods import _numba_loops

    return _numba_loops


def high_counts(x: Tensor, b: Tensor) -> Tensor:
    """:func:`._sparsify.high_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    _loops().high_counts(_flat(x), _flat(b), hist.numpy())
    return hist


def low_counts(x: Tensor, b: Tensor, bucket: int) -> Tensor:
    """:func:`._sparsify.low_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    _loops().low_counts(_flat(x), _flat(b), np.uint32(bucket), hist.numpy())
    return hist


def consensus(cs: list[Tensor], weights, normalize: bool, lambda_: float = 1.0, base: Tensor | None = None) -> Tensor:
    """:func:`._sparsify.disjoint_merge_` of the contributions ``cs``, then ``merged * lambda_ + base``
    when a base is given."""
    out = np.empty(cs[0].numel(), np.float32)
    flat_base = None if base is None else _flat(base)
    _loops().consensus(tuple(_flat(c) for c in cs), np.asarray(weights, np.float32), normalize, np.float32(lambda_),
                   flat_base, out)
    return torch.from_numpy(out).reshape(cs[0].shape)


def ties_merge(xs: list[Tensor], b: Tensor, cuts, seen: list[int], weights, normalize: bool,
               lambda_: float) -> Tensor:
    """TIES on one block in one loop: each ``x_i - b`` trimmed to ``cuts[i]`` (``seen[i]``: entries
    equal to the cut met so far, updated), times ``weights[i]``, then :func:`consensus` with the base."""
    loops, flat, fb = _loops(), _models(xs), _flat(b)
    bits = np.array([c.bits for c in cuts], np.int64)
    ties, equal = np.array([c.ties for c in cuts], np.int64), np.array([c.equal for c in cuts], np.int64)
    counted, ends = np.array(seen, np.int64), np.empty(len(xs), np.int64)
    loops.trim_quotas(flat, fb, bits, ties, equal, counted, ends)
    seen[:] = counted.tolist()
    out = np.empty(b.numel(), np.float32)
    loops.ties_merge(flat, fb, bits, ends, np.asarray(weights, np.float32), normalize, np.float32(lambda_),
                     out)
    return torch.from_numpy(out).reshape(b.shape)


def dare_merge(xs: list[Tensor], b: Tensor, draws: list[Tensor | None], levels: list[int], scales: list[float],
               weights, normalize: bool, lambda_: float) -> Tensor:
    """DARE-TIES on one block in one loop: each ``x_i - b`` kept where its 16-bit coins (``draws[i]``,
    int64, four coins each, as :func:`._sparsify.bernoulli_mask` reads them) fall below ``levels[i]``
    (out of 2**16: 0 keeps none, 2**16 all, with no draws), rescaled by ``scales[i]``; then
    :func:`consensus` with the base."""
    none = np.zeros(0, np.int16)
    coins = tuple(none if d is None else d.numpy().view(np.int16) for d in draws)
    below = np.array([-(2**15) if k <= 0 else 2**15 + 1 if k >= 1 << 16 else k - 2**15 for k in levels], np.int32)
    out = np.empty(b.numel(), np.float32)
    _loops().dare_merge(_models(xs), _flat(b), coins, below, np.asarray(scales, np.float32),
                        np.asarray(weights, np.float32), normalize, np.float32(lambda_), out)
    return torch.from_numpy(out).reshape(b.shape)


def start_warm_up() -> None:
    """:func:`warm_up` in a thread, once per process. Not a daemon: the interpreter waits for it at
    exit, since a process that ended while numba was compiling aborted in C++ ("terminate called
    without an active exception", once, in a fresh clone's test run)."""
    if _started.acquire(blocking=False):
        threading.Thread(target=warm_up, name="modelcypher-kernels").start()


def warm_up(models: int = 3) -> None:
    """Compile (or load from numba's cache) every kernel, for ``models`` inputs to the consensus (other
    counts load when first met): about half a second, in a thread (:func:`start_warm_up`)."""
    if _numba() is None:
        return
    from modelcypher.merging.methods._sparsify import Cut  # imports this module: not at the top

    try:
        for dtype in DTYPES:
            x = torch.zeros(8, dtype=dtype)
            high_counts(x, x)
            low_counts(x, x, 0)
            ties_merge([x] * models, x, [Cut(0, 1, 2)] * models, [0] * models, [1.0] * models, True, 1.0)
            draws = [torch.zeros(2, dtype=torch.int64)] * models
            dare_merge([x] * models, x, draws, [1] * models, [1.0] * models, [1.0] * models, True, 1.0)
            c = torch.zeros(8)
            for base in (x, None):
                consensus([c] * models, [1.0] * models, True, 1.0, base)
    except Exception:  # noqa: BLE001  left to the torch formulas
        return
    _ready.set()

