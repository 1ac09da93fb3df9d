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
def quota_end(t, cut, ties, equal, seen):
    # Of a block's magnitude bits t, entries before the returned p keep their magnitudes equal to the
    # cut, those after do not (the first ties - seen equal entries in flat order); and the ties seen.
    n = t.shape[0]
    if 0 < ties == equal:
        return n, seen
    if not (0 < ties < equal and seen < ties):
        return 0, seen
    count = 0
    for j in range(n):
        count += np.int64(np.int64(t[j] & np.uint32(0x7FFFFFFF)) == cut)
        if count == ties - seen:
            return j + 1, seen + count
    return n, seen + count


@jit
def trim_quotas(xs, b, cuts, ties, equal, seen, ends):
    # quota_end of each model's block (ends[i]; seen[i] updated), scanning only where a quota runs
    c = np.empty(b.shape[0], np.float32)
    for i in range(len(xs)):
        if 0 < ties[i] < equal[i] and seen[i] < ties[i]:
            difference(xs[i], b, c)
            ends[i], seen[i] = quota_end(c.view(np.uint32), cuts[i], ties[i], equal[i], seen[i])
        else:
            ends[i] = b.shape[0] if 0 < ties[i] == equal[i] else 0


@jit
def elect(total, pos, wpos, neg, wneg, normalize):
    # The disjoint mean of one entry from its contributions' sum (s = sign(total)) and the sums of the
    # positive and of the negative ones, with their weights (each in model order); a NaN total elects
    # nobody. The kernels keep these sums in registers: a per-entry array of contributions (or one
    # passed to a helper) ran ten times slower.
    zero = np.float32(0.0)
    if total > 0:
        num, den = pos, wpos
    elif total < 0:
        num, den = neg, wneg
    else:
        num, den = zero, zero
    if normalize:
        num = num / den if den != 0 else zero
    return num


@jit
def consensus(cs, w, normalize, lam, base, out):
    # elect of the contributions cs, entry by entry; then base + lam * merged with a base
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        total = cs[0][j]
        pos, wpos, neg, wneg = zero, zero, zero, zero
        for i in range(len(cs)):
            c = cs[i][j]
            if i > 0:
                total += c
            if c > 0:
                pos += c
                wpos += w[i]
            elif c < 0:
                neg += c
                wneg += w[i]
        num = elect(total, pos, wpos, neg, wneg, normalize)
        if base is None:
            out[j] = num
        else:
            out[j] = num * lam + at(base, j)


@jit
def widen(a, out):
    for j in range(out.shape[0]):
        out[j] = at(a, j)


@jit
def ties_merge(xs, b, cuts, ends, w, normalize, lam, out):
    # trim (each model's cut, its first ends[i] entries keeping magnitudes equal to it), then elect,
    # disjoint mean and base + lam * merged, a chunk at a time: each model's x_i - b is widened into a
    # small buffer and masked there (in one per-entry loop, the bit casts ran several times slower)
    m, n = len(xs), out.shape[0]
    tau = np.empty((m, CHUNK), np.float32)
    bw = np.empty(CHUNK, np.float32)
    zero = np.float32(0.0)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        widen(b[s:e], bw[: e - s])
        for i in range(m):
            t = tau[i, : e - s]
            difference(xs[i][s:e], b[s:e], t)
            p = min(max(ends[i] - s, 0), e - s)
            keep_at_least(t[:p].view(np.uint32), cuts[i])
            keep_at_least(t[p:].view(np.uint32), cuts[i] + 1)
        for k in range(e - s):
            total, pos, wpos, neg, wneg = zero, zero, zero, zero, zero
            for i in range(m):
                c = tau[i, k] * w[i]
                total = c if i == 0 else total + c
                if c > 0:
                    pos += c
                    wpos += w[i]
                elif c < 0:
                    neg += c
                    wneg += w[i]
            out[s + k] = elect(total, pos, wpos, neg, wneg, normalize) * lam + bw[k]


@jit
def drop_in_place(t, u, below, scale):
    # t = (m t) scale, m = 1 where the 16-bit coin u < below, else 0; below <= -2**15 keeps none (+0),
    # > 2**15 keeps all (u unused)
    one, zero = np.float32(1.0), np.float32(0.0)
    if below <= -(2**15):
        t[:] = zero
    elif below > 2**15:
        for k in range(t.shape[0]):
            t[k] = t[k] * scale
    else:
        for k in range(t.shape[0]):
            t[k] = ((one if np.int32(u[k]) < below else zero) * t[k]) * scale


@jit
def dare_merge(xs, b, coins, below, scale, w, normalize, lam, out):
    # DARE's drop of each x_i - b (drop_in_place, with model i's coins), then elect, disjoint mean and
    # base + lam * merged, a chunk at a time (as ties_merge). The election's loop is written out in
    # both: shared through a helper (one call per chunk) or one kernel for both, TIES ran 1.5x slower.
    m, n = len(xs), out.shape[0]
    tau = np.empty((m, CHUNK), np.float32)
    bw = np.empty(CHUNK, np.float32)
    zero = np.float32(0.0)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        widen(b[s:e], bw[: e - s])
        for i in range(m):
            t = tau[i, : e - s]
            difference(xs[i][s:e], b[s:e], t)
            drop_in_place(t, coins[i][s:e], below[i], scale[i])  # (an empty slice where no coins)
        for k in range(e - s):
            total, pos, wpos, neg, wneg = zero, zero, zero, zero, zero
            for i in range(m):
                c = tau[i, k]
                total = c if i == 0 else total + c
                if c > 0:
                    pos += c
                    wpos += w[i]
                elif c < 0:
                    neg += c
                    wneg += w[i]
            out[s + k] = elect(total, pos, wpos, neg, wneg, normalize) * lam + bw[k]
