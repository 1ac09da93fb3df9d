"""Fused CPU loops for the TIES family (registers nothing).

The torch formulas in :mod:`._sparsify` take one pass over memory per operation: a TIES block is some
thirty of them, each cheap, together several times the cost of reading the models. Here the same
arithmetic runs as one compiled loop per step (numba, :mod:`._numba_loops`; single-threaded, releasing
the GIL so that the runner's worker threads overlap). Every kernel gives the torch formula's result to
the bit (NaN, infinities and signed zeros included; no fused multiply-add), which the tests check both
ways, so either may compute any block.

Loading the kernels costs about 0.6 s (importing numba, then its compiler's set-up; the compiled code
comes from numba's on-disk cache after the first run). It starts in a thread at the first call of
:func:`usable` (in a merge, at its first block); until it is done the torch formulas do the work.
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


def usable(*ts: Tensor) -> bool:
    """Whether the kernels apply: loaded, and every tensor float32 or bfloat16 on the CPU. The first
    call starts loading them in a thread; until they are ready the torch formulas (the same bits) do
    the work."""
    if not all(t.device.type == "cpu" and t.dtype in DTYPES for t in ts):
        return False
    if not _ready.is_set():
        start_warm_up()
        return False
    return True


def _flat(t: Tensor) -> np.ndarray:
    """``t`` flattened as a numpy array: a bfloat16 tensor as its uint16 bits."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


@functools.cache
def _compiled():
    from modelcypher.merging.methods import _numba_loops as L

    return L.high_counts, L.low_counts, L.trim, L.consensus, L.drop


def high_counts(x: Tensor, b: Tensor) -> Tensor:
    """:func:`._sparsify.high_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    _compiled()[0](_flat(x), _flat(b), hist.numpy())
    return hist


def low_counts(x: Tensor, b: Tensor, bucket: int) -> Tensor:
    """:func:`._sparsify.low_counts` of the magnitude bits of ``x - b``."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    _compiled()[1](_flat(x), _flat(b), np.uint32(bucket), hist.numpy())
    return hist


def trim(x: Tensor, b: Tensor, cut, seen: int, w: float) -> tuple[Tensor, int]:
    """``w (x - b)`` inside ``cut`` (a :class:`._sparsify.Cut`), +0 outside; and the count of entries
    equal to the cut seen so far (as :func:`._sparsify.cut_mask_`)."""
    c, seen = _compiled()[2](_flat(x), _flat(b), cut.bits, cut.ties, cut.equal, seen, w)
    return torch.from_numpy(c).reshape(x.shape), seen


def consensus(cs: list[Tensor], weights, normalize: bool, lambda_: float = 1.0, base: Tensor | None = None) -> Tensor:
    """:func:`._sparsify.disjoint_merge_` of the contributions ``cs``, then ``merged * lambda_ + base``
    when a base is given."""
    out = np.empty(cs[0].numel(), np.float32)
    flat_base = None if base is None else _flat(base)
    _compiled()[3](tuple(_flat(c) for c in cs), np.asarray(weights, np.float32), normalize, np.float32(lambda_),
                   flat_base, out)
    return torch.from_numpy(out).reshape(cs[0].shape)


def drop(x: Tensor, b: Tensor, draws: Tensor, levels: int, scale: float) -> Tensor:
    """:func:`._sparsify.drop_and_rescale` of ``x - b`` with its coins from ``draws`` (int64, four
    16-bit coins each) and its rescale ``scale``."""
    c = _compiled()[4](_flat(x), _flat(b), draws.numpy(), levels, np.float32(scale))
    return torch.from_numpy(c).reshape(x.shape)


def start_warm_up() -> None:
    """:func:`warm_up` in a thread, once per process."""
    if _started.acquire(blocking=False):
        threading.Thread(target=warm_up, daemon=True).start()


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
            trim(x, x, Cut(0, 1, 2), 0, 1.0)
            c = torch.zeros(8)
            for base in (x, None):
                consensus([c] * models, [1.0] * models, True, 1.0, base)
            drop(x, x, torch.zeros(2, dtype=torch.int64), 1, 1.0)
    except Exception:  # noqa: BLE001  left to the torch formulas
        return
    _ready.set()

