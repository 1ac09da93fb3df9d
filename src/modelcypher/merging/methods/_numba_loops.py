"""The compiled loops behind :mod:`._kernels` (imported only when numba is present and used).

Module-level functions, so that numba can cache them on disk (``cache=True``): nested ones that call
each other through a closure are compiled again in every process.

Inputs ``x`` and ``b`` are float32 arrays or bfloat16 ones given as their uint16 bits (numpy has no
bfloat16), in any mix; :func:`at` reads either as float32, exactly. The histograms widen and subtract a
chunk at a time into a small buffer, then count it: in one loop, the counters' stores (which might
alias the inputs) kept the subtraction from vectorizing, at twice the cost.
"""

import numba
import numpy as np
from numba import types
from numba.extending import overload

jit = numba.njit(nogil=True, cache=True)
CHUNK = 4096  # entries widened at a time: the buffers stay in the L1 cache


def at(a, j):
    """``a[j]`` as a float32 (a bfloat16's bits are the high half of its float32's)."""
    raise NotImplementedError  # compiled only, by the overload below


@overload(at, jit_options={"nogil": True})
def _at(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: np.uint32(np.uint32(a[j]) << np.uint32(16)).view(np.float32)
    return lambda a, j: np.float32(a[j])


@jit
def difference(x, b, out):
    # out = x - b in float32, for the first len(out) entries
    for j in range(out.shape[0]):
        out[j] = at(x, j) - at(b, j)


@jit
def count_high(t, hist):
    for j in range(t.shape[0]):
        hist[(t[j] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1


@jit
def high_counts(x, b, hist):
    # |x - b| as float32 bits, histogram of their high halves
    n = b.shape[0]
    c = np.empty(CHUNK, np.float32)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        difference(x[s:e], b[s:e], c[: e - s])
        count_high(c[: e - s].view(np.uint32), hist)


@jit
def count_low_branchy(t, bucket, hist):
    for j in range(t.shape[0]):
        v = t[j] & np.uint32(0x7FFFFFFF)
        if (v >> np.uint32(16)) == bucket:
            hist[v & np.uint32(0xFFFF)] += 1


@jit
def count_low_gathered(t, bucket, hist, low):
    # Branch-free: the bucket's entries with low half 0 (most of them when a difference of two bf16
    # numbers has few significant bits) are counted in a register, since incrementing one counter
    # entry after entry chains its updates; the others are gathered, then counted.
    k = 0
    zeros = 0
    for j in range(t.shape[0]):
        v = t[j] & np.uint32(0x7FFFFFFF)
        inb = np.int64((v >> np.uint32(16)) == bucket)
        lo = v & np.uint32(0xFFFF)
        nonzero = np.int64(lo != 0)
        low[k] = lo
        k += inb & nonzero
        zeros += inb & (1 - nonzero)
    hist[0] += zeros
    for j in range(k):
        hist[low[j]] += 1


@jit
def low_counts(x, b, bucket, hist):
    n = b.shape[0]
    c = np.empty(CHUNK, np.float32)
    low = np.empty(CHUNK, np.uint32)
    # How many entries fall in the bucket decides the loop: usually 1-2 %, which a branch serves best;
    # but a bf16 checkpoint's task vector takes few values, and the bucket can hold a fifth of them.
    probe = min(n, CHUNK)
    difference(x[:probe], b[:probe], c[:probe])
    t = c.view(np.uint32)
    inside = 0
    for j in range(probe):
        inside += np.int64(((t[j] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)) == bucket)
    branchy = inside * 16 <= probe
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        difference(x[s:e], b[s:e], c[: e - s])
        if branchy:
            count_low_branchy(t[: e - s], bucket, hist)
        else:
            count_low_gathered(t[: e - s], bucket, hist, low)


@jit
def keep_at_least(t, lowest):
    # zero (bitwise) the entries of t (float bits) whose magnitude bits are below lowest
    for j in range(t.shape[0]):
        keep = np.int64(t[j] & np.uint32(0x7FFFFFFF)) >= lowest
        t[j] &= np.uint32(0) - np.uint32(keep)


@jit
def trim(x, b, cut, ties, equal, seen, w):
    # c = w (x - b) where |x - b| is inside the cut, w (+0) elsewhere; returns c and the ties seen
    n = b.shape[0]
    c = np.empty(n, np.float32)
    difference(x, b, c)
    t = c.view(np.uint32)
    p = 0  # entries before p keep their magnitudes equal to the cut, those after do not
    if 0 < ties == equal:
        p = n
    elif 0 < ties < equal and seen < ties:  # the first (ties - seen) equal entries in flat order
        count = 0
        p = n
        for j in range(n):
            count += np.int64(np.int64(t[j] & np.uint32(0x7FFFFFFF)) == cut)
            if count == ties - seen:
                p = j + 1
                break
        seen += count
    keep_at_least(t[:p], cut)
    keep_at_least(t[p:], cut + 1)
    c *= np.float32(w)
    return c, seen


@jit
def consensus(cs, w, normalize, lam, base, out):
    # s = sign(sum_i c_i); num = sum of the c_i of sign s, den = their w_i (model order)
    m = len(cs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        total = cs[0][j]
        for i in range(1, m):
            total += cs[i][j]
        num, den = zero, zero
        if total > 0:
            for i in range(m):
                if cs[i][j] > 0:
                    num += cs[i][j]
                    den += w[i]
        elif total < 0:  # a NaN total elects nobody
            for i in range(m):
                if cs[i][j] < 0:
                    num += cs[i][j]
                    den += w[i]
        if normalize:
            num = num / den if den != 0 else zero
        if base is None:
            out[j] = num
        else:
            out[j] = num * lam + at(base, j)


@jit
def drop(x, b, draws, levels, scale):
    # DARE: (m (x - b)) scale, m = 1 where the 16-bit coin u < levels - 2**15, else 0
    u = draws.view(np.int16)
    c = np.empty(b.shape[0], np.float32)
    below = np.int32(levels - 2**15)
    one, zero = np.float32(1.0), np.float32(0.0)
    for j in range(c.shape[0]):
        m = one if np.int32(u[j]) < below else zero
        c[j] = (m * (at(x, j) - at(b, j))) * scale
    return c
