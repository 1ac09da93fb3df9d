"""Pieces shared by the task-vector merge methods (registers nothing).

Conventions used throughout:

- every function returns new tensors and never writes into its arguments, except those whose names
  end in ``_``, which overwrite their first argument (a temporary the caller owns), as torch's
  in-place methods do;
- a "row" is ``t.reshape(t.shape[0], -1)[r]`` for tensors with two or more dimensions, and the whole
  (flattened) tensor for 0-D and 1-D tensors;
- magnitude ranking is a total order: larger ``|x|`` first, equal magnitudes broken by the smaller
  flat index first, so every mask below is deterministic and the top-k sets are nested in k;
- a fraction ``f`` of ``n`` entries means ``floor(f * n + 0.5)`` entries (round half up), clipped
  to ``[0, n]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from modelcypher.errors import UserError
from modelcypher.merging.methods import _kernels

# ---------------------------------------------------------------------------------------------
# parameter plumbing


def per_model(value: Any, n: int, name: str) -> list[float]:
    """A per-model parameter as a list of ``n`` floats (a scalar is broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"parameter {name!r}: got {len(value)} values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n


def check_fraction(values: Sequence[float], name: str) -> None:
    for v in values:
        if not (0.0 <= v <= 1.0):
            raise UserError(f"parameter {name!r} must be in [0, 1], got {v}")


def f32(t: Tensor) -> Tensor:
    """``t`` as float32 (no copy when it already is; callers must not write into the result)."""
    return t.to(torch.float32)


def as_rows(t: Tensor) -> Tensor:
    """A 2-D ``[rows, cols]`` view (or copy) of ``t``; see the module docstring for "row"."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def check_shapes(xs: Sequence[Tensor]) -> None:
    """All models' tensors must have one shape (no silent broadcasting)."""
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise UserError(f"tensor shapes differ across models: {tuple(xs[0].shape)} vs {tuple(x.shape)}")


def check_base(xs: Sequence[Tensor], base: Tensor | None) -> None:
    """A base is given, and every model's tensor has its shape."""
    if base is None:
        raise UserError("this merge method needs a base_model")
    for x in xs:
        if x.shape != base.shape:
            raise UserError(f"tensor shape {tuple(x.shape)} differs from the base's {tuple(base.shape)}")


def task_vectors(xs: Sequence[Tensor], base: Tensor | None) -> list[Tensor]:
    """``tau_i = x_i - base`` in float32 (new tensors)."""
    check_base(xs, base)
    b = f32(base)
    return [f32(x) - b for x in xs]


# ---------------------------------------------------------------------------------------------
# deterministic magnitude masks


def count(fraction: float, n: int) -> int:
    """``floor(fraction * n + 0.5)`` clipped to ``[0, n]``."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))


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


def trimmed_merge(xs: Sequence[Tensor], b: Tensor, cuts: Sequence[Cut], ties_seen: list[int],
                  w: Sequence[float], normalize: bool, lambda_: float) -> Tensor:
    """TIES on a block: each model's :func:`trimmed_contribution` (``ties_seen`` updated in place),
    then ``b + lambda_ * merged`` by :func:`disjoint_merge_`; on the CPU one fused loop (:mod:`._kernels`)."""
    if _kernels.usable(*xs, b):
        return _kernels.ties_merge(list(xs), b, cuts, ties_seen, w, normalize, lambda_)
    contributions = []
    for i, (x, cut) in enumerate(zip(xs, cuts, strict=True)):
        c, ties_seen[i] = trimmed_contribution(x, b, cut, ties_seen[i], w[i])
        contributions.append(c)
    return disjoint_merge_(contributions, w, normalize, lambda_, b)


def topk_magnitude_mask(t: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``t``) of the ``k`` largest-magnitude entries of the whole tensor.

    Ties in magnitude are broken by flat index (smaller index kept first). O(n): the radix select
    of :func:`top_k_cuts` on the whole tensor as one block.
    """
    bits = magnitude_bits(t)
    (cut,) = top_k_cuts(lambda: [{0: bits}], [k], t.numel())
    return cut_mask_(bits, cut)[0] != 0


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of ``delta`` by magnitude, zero the rest (TIES "trim")."""
    k = count(density, delta.numel())
    if k >= delta.numel():
        return delta.clone()
    return torch.where(topk_magnitude_mask(delta, k), delta, torch.zeros((), device=delta.device))


def band_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: entries whose magnitude rank lies in ``[gamma * n, (gamma + density) * n)``.

    Rank 0 is the largest magnitude, so the top ``gamma`` fraction (outliers) and everything below
    the next ``density`` fraction are masked out. ``gamma + density > 1`` simply keeps everything
    below the outliers.
    """
    n = delta.numel()
    lo = count(gamma, n)
    hi = count(gamma + density, n)
    return topk_magnitude_mask(delta, hi) & ~topk_magnitude_mask(delta, lo)


# ---------------------------------------------------------------------------------------------
# random drops


# DARE's coin flips come as 16-bit uniform integers, four from each 64-bit draw: torch's CPU generator
# makes one number per ~3 ns on one core, so a float32 draw per entry was most of a DARE merge. The
# keep probability is then ``density`` rounded to a multiple of 2**-16, and survivors are rescaled by
# the inverse of that probability, so ``E[result] = delta`` still holds exactly.
KEEP_LEVELS = 1 << 16


def keep_levels(density: float) -> int:
    """The keep probability ``density`` as a count of 2**-16 steps (round half up, clipped)."""
    return count(density, KEEP_LEVELS)


def _coins(n: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """Uniform random bits for ``n`` 16-bit coins: ``ceil(n / 4)`` int64 draws."""
    return torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=rng)


def bernoulli_mask(shape: Sequence[int], levels: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """float32 ones with probability ``levels / 2**16``, zeros elsewhere, independently per entry."""
    n = math.prod(shape)
    u = _coins(n, rng, device).view(torch.int16)[:n].to(torch.float32).reshape(shape)  # uniform on [-2**15, 2**15)
    # kept where u < levels - 2**15, i.e. where (levels - 2**15 - u) >= 1; elsewhere it is <= 0
    return u.neg_().add_(levels - 2**15).clamp_(0.0, 1.0)


def drop_and_rescale(delta: Tensor, density: float, rng: torch.Generator, weight: float = 1.0) -> Tensor:
    """DARE: keep each entry independently with probability ``p`` (``density`` to 2**-16), rescale
    survivors by ``1/p`` (times ``weight``, folded into the same multiplication).

    ``E[result] = weight * delta``. ``p = 1`` returns ``delta * weight`` (no random numbers drawn);
    ``p = 0`` returns zeros. A dropped entry is ``0 * delta``: NaN or Inf, which only
    ``--allow-nonfinite`` lets in, stay non-finite, as in task arithmetic.
    """
    return dropped_contribution(delta, None, density, rng, weight)


def dropped_contribution(x: Tensor, b: Tensor | None, density: float, rng: torch.Generator,
                         weight: float = 1.0) -> Tensor:
    """:func:`drop_and_rescale` of ``x - b`` (float32 or bfloat16 blocks; of ``x`` itself when ``b`` is
    None), as float32."""
    levels = keep_levels(density)
    if levels <= 0:
        return torch.zeros_like(x, dtype=torch.float32)
    delta = f32(x) if b is None else f32(x) - f32(b)
    if levels >= KEEP_LEVELS:
        return delta.clone() if weight == 1.0 and b is None else delta * weight
    mask = bernoulli_mask(x.shape, levels, rng, x.device)
    return mask.mul_(delta).mul_(weight * KEEP_LEVELS / levels)


def dropped_merge(xs: Sequence[Tensor], b: Tensor, density: Sequence[float], rng: torch.Generator,
                  w: Sequence[float], normalize: bool, lambda_: float) -> Tensor:
    """DARE-TIES on a block: each model's :func:`dropped_contribution` (``w_i`` folded into the rescale,
    coins drawn in model order), then ``b + lambda_ * merged`` by :func:`disjoint_merge_`; on the CPU one
    fused loop (:mod:`._kernels`) with the same coins and bits."""
    if _kernels.usable(*xs, b):
        levels = [keep_levels(d) for d in density]
        draws = [_coins(b.numel(), rng, b.device) if 0 < k < KEEP_LEVELS else None for k in levels]
        scales = [wi * KEEP_LEVELS / k if 0 < k < KEEP_LEVELS else wi for wi, k in zip(w, levels, strict=True)]
        return _kernels.dare_merge(list(xs), b, draws, levels, scales, w, normalize, lambda_)
    c = [dropped_contribution(x, b, d, rng, wi) for x, d, wi in zip(xs, density, w, strict=True)]
    return disjoint_merge_(c, w, normalize, lambda_, b)


def magprune_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities (shape of ``delta``, float32).

    Within each row the entries are ranked by magnitude (rank 0 = largest; ties by index) and get
    keep probabilities linearly spaced from ``density + e`` (largest) down to ``density - e``
    (smallest), where ``e = min(epsilon, density, 1 - density)``: the cap keeps every probability
    inside ``[0, 1]`` while the row's mean keep probability stays exactly ``density``. A row of one
    entry gets ``density``.
    """
    e = min(epsilon, density, 1.0 - density)
    rows = as_rows(delta)
    n_rows, n_cols = rows.shape
    if e <= 0.0 or n_cols == 1:
        return torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_cols, device=delta.device).expand(n_rows, n_cols))
    p = (density + e) - (2.0 * e / (n_cols - 1)) * rank.to(torch.float32)
    return p.reshape(delta.shape)


def magprune(delta: Tensor, density: float, epsilon: float, rng: torch.Generator) -> Tensor:
    """DELLA MagPrune: drop entry j with probability ``1 - p_j`` (``p`` from :func:`magprune_keep_prob`),
    rescale survivors by ``1 / p_j``. ``E[result] = delta``."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    p = magprune_keep_prob(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=rng, device=delta.device, dtype=torch.float32)
    return torch.where(u < p, delta / p.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros((), device=delta.device))


# ---------------------------------------------------------------------------------------------
# combining task vectors


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """``sum_i w_i d_i``, divided by ``sum_i w_i`` when ``normalize``."""
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        out.add_(d, alpha=w)
    if normalize:
        total = sum(weights)
        if total == 0.0:
            raise UserError("normalize: the models' weights sum to zero")
        out.div_(total)
    return out


def sign_consensus(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES "elect sign" + "disjoint merge" on (already sparsified) deltas.

    With contributions ``c_i = w_i * d_i``:

    - elected sign ``s = sign(sum_i c_i)`` (the "mass" election), per element;
    - model i agrees where ``c_i * s > 0`` (so zeros, i.e. trimmed/dropped entries, never agree,
      and nothing agrees where ``s = 0``);
    - merged ``= sum_{i agrees} c_i / sum_{i agrees} w_i`` when ``normalize``, else the numerator
      alone; elements where the denominator is 0 (no model agrees) are 0.

    For non-negative weights "c_i agrees" is the same as "d_i has the elected sign".
    """
    return disjoint_merge_([d * w for d, w in zip(deltas, weights, strict=True)], weights, normalize)


def disjoint_merge_(contributions: list[Tensor], weights: Sequence[float], normalize: bool,
                    lambda_: float = 1.0, base: Tensor | None = None) -> Tensor:
    """:func:`sign_consensus` from the contributions ``c_i = w_i d_i``, which it may overwrite (callers
    hand over temporaries: no copies); with a ``base``, ``base + lambda_ * merged`` instead (float32).
    Elementwise, so blocks of rows give the whole tensor's result. On the CPU a fused loop computes
    the same bits (:mod:`._kernels`).

    In float arithmetic only (comparisons and boolean masks cost several times more on CPU): model i
    agrees where ``a_i = relu(sign(c_i) * s)`` is 1, and adds ``c_i * a_i`` (``c_i`` or a zero) to the
    numerator and ``w_i * a_i`` to the denominator, in model order, so the sums are those of the
    boolean-mask formula to the bit. Where the elected sign is NaN (a NaN contribution, or opposite
    infinities) nobody agrees: ``a_i`` is NaN there, and both sums are set back to 0.
    """
    if _kernels.usable(*contributions, *([] if base is None else [base])):
        return _kernels.consensus(contributions, weights, normalize, lambda_, base)
    merged = _disjoint_merge_(contributions, weights, normalize)
    return merged if base is None else merged.mul_(lambda_).add_(f32(base))


def _disjoint_merge_(contributions: list[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    total = contributions[0].clone()
    for c in contributions[1:]:
        total.add_(c)
    s = total.sign_()
    num = torch.zeros_like(s)
    den = torch.zeros_like(s) if normalize else None
    for c, w in zip(contributions, weights, strict=True):
        agree = torch.sign(c).mul_(s).relu_()
        num.addcmul_(c, agree)
        if normalize:
            den.add_(agree, alpha=w)
    # a finite elected sign leaves no NaN behind (an infinite contribution agrees with it, or it is NaN)
    num.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if not normalize:
        return num
    den.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if min(weights) >= 0:
        # den is 0 only where nobody agrees, and num is +0 there: dividing by 1 keeps it
        return num.div_(den.add_(den.sign().neg_().add_(1.0)))
    nobody = den == 0  # weights of both signs can cancel where models agree
    return num.masked_fill_(nobody, 0.0).div_(den.masked_fill_(nobody, 1.0))


def scale_from_base(merged: Tensor, base: Tensor | None, lambda_: float, method: str) -> Tensor:
    """``base + lambda_ (merged - base)`` for a method that averages full weights (so, in effect, the
    task vectors); ``merged`` itself when ``lambda_`` is 1, which needs no base."""
    if lambda_ == 1.0:
        return merged
    if base is None:
        raise UserError(f"{method}: lambda {lambda_:g} scales the merge from the base, which needs a base_model")
    return apply_delta(base, merged - f32(base), lambda_)


def apply_delta(base: Tensor, merged_delta: Tensor, lambda_: float) -> Tensor:
    """``base + lambda_ * merged_delta`` as a new float32 tensor."""
    return f32(base) + merged_delta * lambda_
