"""Trimming by magnitude (TIES's trim, Breadcrumbs' band): deterministic top-k masks, whole tensor or
streamed in blocks.

Magnitude ranking is a total order: larger ``|x|`` first, equal magnitudes broken by the smaller flat
index first, so every mask is deterministic and the top-k sets are nested in k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from modelcypher.merging.methods import _kernels
from modelcypher.merging.methods._inputs import f32

# A radix select over float bits: for non-negative float32 the int32 bit pattern orders like the
# value (NaN above +inf), so histograms of the high then the low 16 bits find the k-th largest
# magnitude exactly in two O(n) passes, whether the entries come whole or in blocks of rows.
HIGH_BUCKETS = 1 << 15  # high halves of a non-negative float's bits: the sign bit is 0
LOW_BUCKETS = 1 << 16


def magnitude_bits(t: Tensor) -> Tensor:
    """The int32 bit patterns of ``|t|`` (float32), a new tensor ordered as the magnitudes are."""
    return t.to(torch.float32).view(torch.int32) & 0x7FFFFFFF


def magnitude_bits_(t: Tensor) -> Tensor:
    """:func:`magnitude_bits` made in place of a float32 temporary."""
    return t.view(torch.int32).bitwise_and_(0x7FFFFFFF)


@dataclass(frozen=True)
class Cut:
    """A top-k set by magnitude: entries whose magnitude bits exceed ``bits``, and the first ``ties``
    (in flat order) of the ``equal`` entries whose bits equal it."""

    bits: int
    ties: int = 0
    equal: int = 0


KEEP_ALL, KEEP_NONE = Cut(-1), Cut(0x7FFFFFFF)


def high_counts(bits: Tensor) -> Tensor:
    """Histogram of the high 16 bits of magnitude bits (int64, ``HIGH_BUCKETS`` bins)."""
    return torch.bincount((bits >> 16).reshape(-1), minlength=HIGH_BUCKETS)


def bucket_of_kth(high: Tensor, k: int) -> tuple[int, int]:
    """The high half shared by the ``k``-th largest entry, and how many entries lie in higher buckets."""
    at_or_above = high.flip(0).cumsum(0)
    j = int(torch.searchsorted(at_or_above, k))  # first bucket (from the top) reaching k entries
    return HIGH_BUCKETS - 1 - j, int(at_or_above[j - 1]) if j > 0 else 0


def low_counts(bits: Tensor, bucket: int) -> Tensor:
    """Histogram of the low 16 bits of the entries whose high half is ``bucket``."""
    return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=LOW_BUCKETS)


def cut_at_kth(low: Tensor, bucket: int, above: int, k: int) -> Cut:
    """The :class:`Cut` keeping the ``k`` largest, from the bucket's low histogram and the count above it."""
    at_or_above = low.flip(0).cumsum(0)
    j = int(torch.searchsorted(at_or_above, k - above))
    strictly_above = above + (int(at_or_above[j - 1]) if j > 0 else 0)
    return Cut((bucket << 16) | (LOW_BUCKETS - 1 - j), k - strictly_above, int(low[LOW_BUCKETS - 1 - j]))


# Magnitudes sampled per tensor to place the window around its k-th largest, and the window's half
# width in standard deviations of the sample's rank: the k-th falls outside (and the histograms are
# needed) about once in a billion tensors; a window then holds about 6 sigma / SAMPLE of each side.
SAMPLE = 1 << 16
WINDOW_SIGMAS = 6.0


def sample_stride(n: int) -> int:
    """Every how many entries of ``n`` to sample ``SAMPLE`` or so: a prime, so that the sampled entries
    of a matrix run through all its columns."""
    stride = max(1, n // SAMPLE)
    while stride > 2 and any(stride % p == 0 for p in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def sample_bits(bits: Tensor, stride: int) -> Tensor:
    """Magnitude bits at flat positions 0, stride, 2 stride, ... (int32)."""
    return bits.reshape(-1)[::stride]


def window_bits(bits: Tensor, lo: int, hi: int) -> tuple[int, Tensor]:
    """How many magnitude bits exceed ``hi``, and those in ``[lo, hi]`` (flat order)."""
    flat = bits.reshape(-1)
    return int((flat > hi).sum()), flat[(flat >= lo) & (flat <= hi)]


def window_of(sample: Tensor, k: int, n: int) -> tuple[int, int]:
    """Bits ``(lo, hi)`` that hold the ``k``-th largest of ``n`` magnitudes with near certainty, from a
    uniform sample of them: the sample's ranks ``k s / n`` plus and minus ``WINDOW_SIGMAS`` of its
    binomial standard deviation."""
    s, q = sample.numel(), k / n
    r, margin = q * s, WINDOW_SIGMAS * math.sqrt(s * q * (1 - q)) + 2
    # the sample's (r -/+ margin)-th largest, 0-based: kthvalue counts from the smallest, from 1
    hi = int(sample.kthvalue(s - int(r - margin)).values) if r - margin >= 0 else 0x7FFFFFFF
    lo = int(sample.kthvalue(s - int(r + margin)).values) if r + margin < s else 0
    return lo, hi


def cut_in_window(inside: Tensor, lo: int, hi: int, above: int, k: int) -> Cut | None:
    """The :class:`Cut` keeping the ``k`` largest, from the count above a window ``[lo, hi]`` and the
    window's entries (magnitude bits, int32; may be overwritten); None when the ``k``-th largest lies
    outside the window."""
    r = k - above  # rank of the k-th largest among the window's entries
    if not 0 < r <= inside.numel():
        return None
    if inside.device.type == "cpu" and _kernels.usable():
        v, greater, equal = _kernels.select_rank(inside, r, lo, hi)
    else:
        v = int(inside.kthvalue(inside.numel() - r + 1).values)
        greater, equal = int((inside > v).sum()), int((inside == v).sum())
    return Cut(v, k - above - greater, equal)


def top_k_cuts(passes: Callable[[], Iterable[Mapping[int, Any]]], ks: Sequence[int], n: int,
               sample: Callable = sample_bits, window: Callable = window_bits,
               high: Callable = high_counts, low: Callable = low_counts) -> list[Cut]:
    """The top-``k_i`` cut of each of several tensors of ``n`` entries, seen as magnitude bits in blocks.

    ``passes()`` starts a pass over the blocks, yielding per block ``{i: tensor i's block of magnitude
    bits}`` for every ``i`` with ``0 < k_i < n`` (the others need no data). Two passes: the first
    samples each tensor (every ``sample_stride(n)``-th entry of each block), the second counts the
    entries above a window of magnitudes the sample places around the ``k``-th largest and gathers
    those inside, among which the cut is exact. Where the ``k``-th lies outside the window after all,
    two more passes make histograms of the bits' high halves, then of the low halves in the ``k``-th's
    bucket (a radix select). Memory: a block, the samples and the windows (a few percent of ``n``).
    ``sample(block, stride)``, ``window(block, lo, hi)``, ``high(block)`` and ``low(block, bucket)``
    read a block; other block forms come with their own (e.g. the fused ones of ``._kernels``).
    """
    cuts: list[Cut | None] = [KEEP_NONE if k <= 0 else KEEP_ALL if k >= n else None for k in ks]
    todo = [i for i, c in enumerate(cuts) if c is None]
    if not todo:
        return cuts
    stride = sample_stride(n)
    samples: dict[int, list] = {i: [] for i in todo}
    for block in passes():
        for i in todo:
            samples[i].append(sample(block[i], stride))
    windows = {i: window_of(torch.cat(samples[i]), ks[i], n) for i in todo}
    above, inside = {i: 0 for i in todo}, {i: [] for i in todo}
    for block in passes():
        for i in todo:
            a, v = window(block[i], *windows[i])
            above[i] += a
            inside[i].append(v)
    for i in todo:
        cuts[i] = cut_in_window(torch.cat(inside[i]), *windows[i], above[i], ks[i])
    todo = [i for i in todo if cuts[i] is None]
    if not todo:
        return cuts
    hist = {i: 0 for i in todo}
    for block in passes():
        for i in todo:
            hist[i] = hist[i] + high(block[i])
    found = {i: bucket_of_kth(hist[i], ks[i]) for i in todo}
    lows = {i: 0 for i in todo}
    for block in passes():
        for i in todo:
            lows[i] = lows[i] + low(block[i], found[i][0])
    for i in todo:
        cuts[i] = cut_at_kth(lows[i], *found[i], ks[i])
    return cuts


# Masks below are int32, all bits set (-1) where an entry is kept and 0 where it is not: ANDed into
# a float32's bits they keep it or make it +0.0 exactly, as masked_fill would, but at the speed of
# integer arithmetic (boolean masks and masked_fill/where run several times slower on CPU).


def keep_(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (float32, overwritten) where ``mask`` is -1, +0.0 where it is 0."""
    x.view(torch.int32).bitwise_and_(mask)
    return x


def cut_mask_(bits: Tensor, cut: Cut, ties_seen: int = 0) -> tuple[Tensor, int]:
    """The int32 mask of a block's entries inside ``cut``, made from (and over) its magnitude bits,
    given how many entries equal to the cut came in earlier blocks (flat order); returns the mask
    and that count after this block."""
    keep_equal, first = cut.ties == cut.equal and cut.ties > 0, None
    if 0 < cut.ties < cut.equal and ties_seen < cut.ties:  # the first equal entries are in
        at = bits == cut.bits
        n_at = int(at.count_nonzero())
        if ties_seen + n_at <= cut.ties:
            keep_equal = True  # the quota lasts through this block: no positions needed
        else:  # it runs out here
            first = at.reshape(-1).nonzero().reshape(-1)[: cut.ties - ties_seen]
        ties_seen += n_at
    # bits >= lowest  <=>  (lowest - 1 - bits) < 0: the sign bit, spread by an arithmetic shift
    # (no overflow: bits and lowest - 1 both lie in [-1, 2**31 - 1])
    mask = bits.neg_().add_(cut.bits - 1 if keep_equal else cut.bits).bitwise_right_shift_(31)
    if first is not None:
        mask.view(-1)[first] = -1
    return mask, ties_seen


def tau_sample(x: Tensor, b: Tensor, stride: int) -> Tensor:
    """:func:`sample_bits` of the magnitude bits of ``tau = x - b`` (float32 or bfloat16 blocks)."""
    if _kernels.usable(x, b):
        return _kernels.sample_magnitudes(x, b, stride)
    return magnitude_bits_(f32(x.reshape(-1)[::stride]) - f32(b.reshape(-1)[::stride]))


def tau_window(x: Tensor, b: Tensor, lo: int, hi: int) -> tuple[int, Tensor]:
    """:func:`window_bits` of the magnitude bits of ``tau = x - b`` (float32 or bfloat16 blocks)."""
    if _kernels.usable(x, b):
        return _kernels.window(x, b, lo, hi)
    return window_bits(magnitude_bits_(f32(x) - f32(b)), lo, hi)


def tau_high_counts(x: Tensor, b: Tensor) -> Tensor:
    """:func:`high_counts` of the magnitude bits of ``tau = x - b`` (float32 or bfloat16 blocks)."""
    if _kernels.usable(x, b):
        return _kernels.high_counts(x, b)
    return high_counts(magnitude_bits_(f32(x) - f32(b)))


def tau_low_counts(x: Tensor, b: Tensor, bucket: int) -> Tensor:
    """:func:`low_counts` of the magnitude bits of ``tau = x - b`` (float32 or bfloat16 blocks)."""
    if _kernels.usable(x, b):
        return _kernels.low_counts(x, b, bucket)
    return low_counts(magnitude_bits_(f32(x) - f32(b)), bucket)


def trimmed_contribution(x: Tensor, b: Tensor, cut: Cut, ties_seen: int, w: float) -> tuple[Tensor, int]:
    """TIES's ``c_i = w_i d_i`` for a block: ``tau = x - b`` inside ``cut``, +0 outside, times ``w``;
    and the count of entries equal to the cut seen so far (see :func:`cut_mask_`)."""
    tau = f32(x) - f32(b)
    if cut != KEEP_ALL:
        inside, ties_seen = cut_mask_(magnitude_bits(tau), cut, ties_seen)
        keep_(tau, inside)
    return tau.mul_(w), ties_seen


def topk_magnitude_mask(t: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``t``) of the ``k`` largest-magnitude entries of the whole tensor.

    Ties in magnitude are broken by flat index (smaller index kept first). O(n): the radix select
    of :func:`top_k_cuts` on the whole tensor as one block.
    """
    bits = magnitude_bits(t)
    (cut,) = top_k_cuts(lambda: [{0: bits}], [k], t.numel())
    return cut_mask_(bits, cut)[0] != 0


def top_count(density: float, n: int) -> int:
    """How many of ``n`` entries a magnitude trim at ``density`` keeps: all at 1 or more, none at 0 or
    less, else ``int(density * n)`` but at least one (mergekit's rule, which TIES configs are written for)."""
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    return max(1, int(density * n))


def band_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: ``k = int(density * n)`` entries, ranked by magnitude (rank 0 the largest),
    starting below the ``int(gamma * n)`` outliers, or lower so that ``k`` fit: ranks ``[lo, lo + k)``
    with ``lo = min(int(gamma * n), n - k)``. ``density`` 1 or more keeps every entry (mergekit's rule).
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    k = max(0, int(density * n))
    lo = min(int(gamma * n), n - k)
    return topk_magnitude_mask(delta, lo + k) & ~topk_magnitude_mask(delta, lo)
