/* The compiled loops behind _kernels.py: TIES's cut (sample, window, selection, and the histograms
kept for a window that misses) and the fused merges, in plain C. (Named
apart: an extension module called _kernels would shadow the Python module.)

Built at install time as an optional extension (setup.py) and called through ctypes, which releases
the GIL, so the runner's worker threads overlap. Loading costs a millisecond: a JIT's start-up (half a
second of a core) was a sixth of a 200M-parameter merge.

Every loop gives the torch formulas' result to the bit: float32 arithmetic in the same order, no fused
multiply-add (built with -ffp-contract=off), NaN and signed zeros as IEEE says. Arrays are float32, or
bfloat16 given as their uint16 bits, in any mix (a flag per array): a chunk at a time is widened into a
small float32 buffer, exactly (a bfloat16's bits are the high half of its float32's), and the loops
run over the buffer. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 4096 /* entries widened at a time: the buffers stay in the L1 cache */
#define HIGH_BUCKETS (1 << 15)

/* The exported loops are compiled twice on x86-64 Linux, for AVX2 and for any x86-64, and the loader
   picks by the CPU (an ifunc); their helpers are inlined into each. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define WIDE __attribute__((target_clones("avx2", "default")))
#else
#define WIDE
#endif
#define INLINE static inline __attribute__((always_inline))

#ifndef MC_SOURCE
#define MC_SOURCE "unknown"
#endif

/* The hash of this file's text it was built from (setup.py): the loader refuses a stale build. */
const char *mc_source(void) { return MC_SOURCE; }

/* So that setuptools may link it as an extension module on every platform; never imported. */
void *PyInit__loops(void) { return 0; }

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* out[j] = a[s + j] as float32, j < n */
INLINE void widen(const void *a, int bf16, int64_t s, int64_t n, float *out) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)a + s;
        for (int64_t j = 0; j < n; j++) out[j] = from_bf16(p[j]);
    } else {
        memcpy(out, (const float *)a + s, (size_t)n * sizeof(float));
    }
}

/* out[j] = x[s + j] - b[s + j] in float32, j < n: one loop per mix of types, so each vectorizes */
INLINE void difference(const void *x, int xb, const void *b, int bb, int64_t s, int64_t n, float *out) {
    if (xb && bb) {
        const uint16_t *p = (const uint16_t *)x + s, *q = (const uint16_t *)b + s;
        for (int64_t j = 0; j < n; j++) out[j] = from_bf16(p[j]) - from_bf16(q[j]);
    } else if (xb) {
        const uint16_t *p = (const uint16_t *)x + s;
        const float *q = (const float *)b + s;
        for (int64_t j = 0; j < n; j++) out[j] = from_bf16(p[j]) - q[j];
    } else if (bb) {
        const float *p = (const float *)x + s;
        const uint16_t *q = (const uint16_t *)b + s;
        for (int64_t j = 0; j < n; j++) out[j] = p[j] - from_bf16(q[j]);
    } else {
        const float *p = (const float *)x + s, *q = (const float *)b + s;
        for (int64_t j = 0; j < n; j++) out[j] = p[j] - q[j];
    }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Histogram of the high halves of |x - b|'s bits (HIGH_BUCKETS counters). */
WIDE void high_counts(const void *x, int xb, const void *b, int bb, int64_t n, int64_t *hist) {
    float c[CHUNK];
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK);
        difference(x, xb, b, bb, s, m, c);
        for (int64_t j = 0; j < m; j++) hist[(bits_of(c[j]) & 0x7FFFFFFFu) >> 16]++;
    }
}

/* Histogram of the low halves of |x - b|'s bits whose high half is bucket (1 << 16 counters). */
WIDE void low_counts(const void *x, int xb, const void *b, int bb, int64_t n, uint32_t bucket, int64_t *hist) {
    float c[CHUNK];
    uint32_t low[CHUNK];
    /* How many entries fall in the bucket decides the loop: usually 1-2 %, which a branch serves best;
       but a bf16 checkpoint's task vector takes few values, and the bucket can hold a fifth of them,
       where the branch mispredicts: then gather the bucket's low halves, and count them after. */
    int64_t probe = min64(n, CHUNK), inside = 0;
    difference(x, xb, b, bb, 0, probe, c);
    for (int64_t j = 0; j < probe; j++) inside += ((bits_of(c[j]) & 0x7FFFFFFFu) >> 16) == bucket;
    int branchy = inside * 16 <= probe;
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK), k = 0;
        difference(x, xb, b, bb, s, m, c);
        if (branchy) {
            for (int64_t j = 0; j < m; j++) {
                uint32_t v = bits_of(c[j]) & 0x7FFFFFFFu;
                if ((v >> 16) == bucket) hist[v & 0xFFFFu]++;
            }
            continue;
        }
        for (int64_t j = 0; j < m; j++) {
            uint32_t v = bits_of(c[j]) & 0x7FFFFFFFu;
            low[k] = v & 0xFFFFu;
            k += (v >> 16) == bucket;
        }
        for (int64_t j = 0; j < k; j++) hist[low[j]]++;
    }
}

/* The magnitude bits of x - b at entries 0, stride, 2 stride, ... below n, into out. */
WIDE void sample_magnitudes(const void *x, int xb, const void *b, int bb, int64_t n, int64_t stride, uint32_t *out) {
    float c;
    for (int64_t j = 0, k = 0; j < n; j += stride, k++) {
        difference(x, xb, b, bb, j, 1, &c);
        out[k] = bits_of(c) & 0x7FFFFFFFu;
    }
}

/* The window's step over c[j:m] one entry at a time: count those above hi, gather those in [lo, hi]
   after out[0:k] (lo <= v <= hi in one unsigned comparison); returns the new k. */
INLINE int64_t window_entries(const float *c, int64_t j, int64_t m, uint32_t lo, uint32_t hi, int64_t *over,
                              uint32_t *out, int64_t k) {
    for (; j < m; j++) {
        uint32_t v = bits_of(c[j]) & 0x7FFFFFFFu;
        *over += v > hi;
        out[k] = v;
        k += v - lo <= hi - lo;
    }
    return k;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512_WINDOW 1
/* window's gather with AVX-512's compress, 16 entries a step: gathered one by one, every store waits
   on the count before it (4.7 times slower here). Compressed in a register, then stored whole: a
   compressing store to memory is slow on some CPUs. */
__attribute__((target("avx512f"))) static int64_t window_avx512(const void *x, int xb, const void *b, int bb,
                                                               int64_t n, uint32_t lo, uint32_t hi,
                                                               int64_t *above, uint32_t *out) {
    float c[CHUNK];
    int64_t k = 0, over = 0;
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), first = _mm512_set1_epi32((int)lo),
                  width = _mm512_set1_epi32((int)(hi - lo)), last = _mm512_set1_epi32((int)hi);
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK), j = 0;
        difference(x, xb, b, bb, s, m, c);
        for (; j + 16 <= m; j += 16) {
            __m512i v = _mm512_and_si512(_mm512_loadu_si512(c + j), magnitude);
            over += __builtin_popcount(_mm512_cmpgt_epu32_mask(v, last));
            __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, first), width);
            _mm512_storeu_si512(out + k, _mm512_maskz_compress_epi32(in, v));
            k += __builtin_popcount(in);
        }
        k = window_entries(c, j, m, lo, hi, &over, out, k);
    }
    *above += over;
    return k;
}
#endif

/* Of the magnitude bits of x - b: how many exceed hi (added to *above), and those in [lo, hi], gathered
   into out (room for n + 16) in flat order; returns how many. The loop for any CPU (window picks). */
WIDE int64_t window_portable(const void *x, int xb, const void *b, int bb, int64_t n, uint32_t lo, uint32_t hi,
                             int64_t *above, uint32_t *out) {
    float c[CHUNK];
    int64_t k = 0, over = 0;
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK);
        difference(x, xb, b, bb, s, m, c);
        k = window_entries(c, 0, m, lo, hi, &over, out, k);
    }
    *above += over;
    return k;
}

/* window_portable, with AVX-512 where the CPU has it. */
int64_t window(const void *x, int xb, const void *b, int bb, int64_t n, uint32_t lo, uint32_t hi, int64_t *above,
               uint32_t *out) {
#ifdef AVX512_WINDOW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return window_avx512(x, xb, b, bb, n, lo, hi, above, out);
#endif
    return window_portable(x, xb, b, bb, n, lo, hi, above, out);
}

/* The r-th largest (1 <= r <= n) of n magnitude bits v, all in [lo, hi], with how many are greater
   and how many equal; v is overwritten. A radix select, 12 bits of the range at a time: a histogram of
   4096 buckets (in the L1 cache), then only the bucket holding the r-th goes on, compacted in place. */
WIDE uint32_t select_rank(uint32_t *v, int64_t n, int64_t r, uint32_t lo, uint32_t hi, int64_t *greater,
                          int64_t *equal) {
    int64_t hist[4096], above = 0;
    int width = 0;
    while (width < 32 && ((uint64_t)(hi - lo) >> width) != 0) width++;
    int shift = width > 12 ? width - 12 : 0;
    uint32_t base = lo;
    for (;;) {
        memset(hist, 0, sizeof hist);
        for (int64_t j = 0; j < n; j++) hist[(v[j] - base) >> shift]++;
        int64_t need = r - above;
        int b = 4095;
        while (hist[b] < need) {
            need -= hist[b];
            above += hist[b];
            b--;
        }
        if (shift == 0) {
            *greater = above;
            *equal = hist[b];
            return base + (uint32_t)b;
        }
        int64_t k = 0;
        for (int64_t j = 0; j < n; j++) {
            uint32_t x = v[j];
            v[k] = x;
            k += ((x - base) >> shift) == (uint32_t)b;
        }
        n = k;
        base += (uint32_t)b << shift;
        shift = shift > 12 ? shift - 12 : 0;
    }
}

/* Where the quota of entries equal to the cut runs out in t[0:m] (magnitude bits compared): m when it
   lasts through; *seen counts the equal entries met while it runs (at most ties). The count is one
   vectorized pass; only the chunk where the quota ends is scanned entry by entry. */
INLINE int64_t quota_end(const float *t, int64_t m, int64_t cut, int64_t ties, int64_t equal, int64_t *seen) {
    if (0 < ties && ties == equal) return m;   /* every equal entry is in */
    if (!(0 < ties && ties < equal && *seen < ties)) return 0;  /* none (more) */
    int64_t count = 0;
    for (int64_t j = 0; j < m; j++) count += (int64_t)(bits_of(t[j]) & 0x7FFFFFFFu) == cut;
    if (*seen + count <= ties) {
        *seen += count;
        return m;
    }
    count = 0;
    for (int64_t j = 0;; j++) {
        count += (int64_t)(bits_of(t[j]) & 0x7FFFFFFFu) == cut;
        if (*seen + count == ties) {
            *seen = ties;
            return j + 1;
        }
    }
}

/* t[k] = t[k] * w where its magnitude bits are lowest or more, +0.0 * w elsewhere (zeroed bitwise). */
INLINE void trim_scale(float *t, int64_t n, int64_t lowest, float w) {
    if (lowest > 0x7FFFFFFF) { /* none kept */
        for (int64_t k = 0; k < n; k++) t[k] = 0.0f * w;
        return;
    }
    int32_t lo = lowest < 0 ? 0 : (int32_t)lowest; /* magnitudes and lo are non-negative int32s */
    for (int64_t k = 0; k < n; k++) {
        uint32_t u = bits_of(t[k]);
        t[k] = of_bits(u & (0u - (uint32_t)((int32_t)(u & 0x7FFFFFFFu) >= lo))) * w;
    }
}

/* c where keep is 1, +0.0 where it is 0 (by the bits: no branch, and c * 0 would make NaN of Inf) */
static inline float masked(float c, uint32_t keep) { return of_bits(bits_of(c) & (0u - keep)); }

/* The election over the models' contributions tau[i * CHUNK + k] (k < m), written into out[k]: with
   s = sign(sum_i c_i), the mean of the c_i of sign s (their sum over their weights' when normalize),
   0 where s is 0 or NaN (nobody elected); then merged * lam + base (bw, widened), or the merged value
   alone when bw is null. Without branches: random signs mispredict every other one, at ten times the
   cost. Adding a masked +0.0 leaves a sum as it was (none of these sums can be -0.0). */
INLINE void elect_chunk(int64_t models, const float *tau, const float *w, int normalize, float lam,
                        const float *bw, int64_t m, float *out) {
    /* models outermost, entries innermost, so that the compiler vectorizes over entries */
    float total[CHUNK], pos[CHUNK], wpos[CHUNK], neg[CHUNK], wneg[CHUNK];
    for (int64_t k = 0; k < m; k++) {
        total[k] = tau[k];
        pos[k] = wpos[k] = neg[k] = wneg[k] = 0.0f;
    }
    for (int64_t i = 0; i < models; i++) {
        const float *c = tau + i * CHUNK;
        float wi = w[i];
        if (i > 0)
            for (int64_t k = 0; k < m; k++) total[k] += c[k];
        for (int64_t k = 0; k < m; k++) {
            uint32_t gt = c[k] > 0, lt = c[k] < 0;
            pos[k] += masked(c[k], gt);
            wpos[k] += masked(wi, gt);
            neg[k] += masked(c[k], lt);
            wneg[k] += masked(wi, lt);
        }
    }
    for (int64_t k = 0; k < m; k++) {
        uint32_t up = total[k] > 0, down = total[k] < 0;
        float num = of_bits(bits_of(masked(pos[k], up)) | bits_of(masked(neg[k], down)));
        if (normalize) {
            float den = of_bits(bits_of(masked(wpos[k], up)) | bits_of(masked(wneg[k], down)));
            num = masked(num / den, den != 0);
        }
        out[k] = num;
    }
    if (bw)
        for (int64_t k = 0; k < m; k++) out[k] = out[k] * lam + bw[k];
}

/* TIES: each x_i - b trimmed to its cut (magnitude bits below cuts[i] out, above in, equal in for the
   first ties[i] of the equal[i] in flat order; seen[i] of them came in earlier blocks, updated), times
   w[i], then elect, disjoint mean and base + lam * merged. Returns -1 when out of memory. */
WIDE int ties_merge(int64_t models, const void *const *xs, const int32_t *xb, const void *b, int bb, int64_t n,
                    const int64_t *cuts, const int64_t *ties, const int64_t *equal, int64_t *seen, const float *w,
                    int normalize, float lam, float *out) {
    float *tau = malloc((size_t)models * CHUNK * sizeof(float));
    if (!tau) return -1;
    float bw[CHUNK];
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK);
        widen(b, bb, s, m, bw);
        for (int64_t i = 0; i < models; i++) {
            float *t = tau + i * CHUNK;
            difference(xs[i], xb[i], b, bb, s, m, t);
            int64_t p = quota_end(t, m, cuts[i], ties[i], equal[i], &seen[i]);
            trim_scale(t, p, cuts[i], w[i]);
            trim_scale(t + p, m - p, cuts[i] + 1, w[i]);
        }
        elect_chunk(models, tau, w, normalize, lam, bw, m, out + s);
    }
    free(tau);
    return 0;
}

/* DARE-TIES: each x_i - b kept where its 16-bit coin (coins[i], as int16) is below below[i] (at most
   -2**15 keeps none, above 2**15 all, coins unused), times scale[i]; then as ties_merge. */
WIDE int dare_merge(int64_t models, const void *const *xs, const int32_t *xb, const void *b, int bb, int64_t n,
                const int16_t *const *coins, const int32_t *below, const float *scale, const float *w,
                int normalize, float lam, float *out) {
    float *tau = malloc((size_t)models * CHUNK * sizeof(float));
    if (!tau) return -1;
    float bw[CHUNK];
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK);
        widen(b, bb, s, m, bw);
        for (int64_t i = 0; i < models; i++) {
            float *t = tau + i * CHUNK, sc = scale[i];
            difference(xs[i], xb[i], b, bb, s, m, t);
            if (below[i] <= -(1 << 15)) {
                for (int64_t k = 0; k < m; k++) t[k] = 0.0f;
            } else if (below[i] > (1 << 15)) {
                for (int64_t k = 0; k < m; k++) t[k] = t[k] * sc;
            } else {
                const int16_t *u = coins[i] + s;
                int32_t lim = below[i];
                for (int64_t k = 0; k < m; k++) t[k] = ((u[k] < lim ? 1.0f : 0.0f) * t[k]) * sc;
            }
        }
        elect_chunk(models, tau, w, normalize, lam, bw, m, out + s);
    }
    free(tau);
    return 0;
}

/* The election over given contributions cs[i] (float32, or bfloat16 by cb[i]); then merged * lam +
   base when a base is given (b non-null). */
WIDE int consensus(int64_t models, const void *const *cs, const int32_t *cb, const float *w, int normalize, float lam,
               const void *b, int bb, int64_t n, float *out) {
    float *tau = malloc((size_t)models * CHUNK * sizeof(float));
    if (!tau) return -1;
    float bw[CHUNK];
    for (int64_t s = 0; s < n; s += CHUNK) {
        int64_t m = min64(n - s, CHUNK);
        if (b) widen(b, bb, s, m, bw);
        for (int64_t i = 0; i < models; i++) widen(cs[i], cb[i], s, m, tau + i * CHUNK);
        elect_chunk(models, tau, w, normalize, lam, b ? bw : 0, m, out + s);
    }
    free(tau);
    return 0;
}
