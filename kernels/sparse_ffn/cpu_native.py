"""Expert-major sparse experts for CPUs: a small C kernel, compiled on first use.

Why native: at decode sizes the sparse expert op must run at memory speed (each active
expert's [D, H] slabs read once), and a Python loop of BLAS calls per run of experts is
overhead-bound (~5 µs per torch op against ~1-10 µs of weight reads per expert).

What it does for one call, whatever the segmentation (``cu_seqlens`` only bounds the token
range [cu[0], cu[S]); tokens outside it get y = 0):
1. scan the fp32 scores once (host data) and list, for every expert in the union of the
   whole step, the tokens that use it and their scores: *expert-major* — a batch of
   requests reads each active expert's weights once per step, and only the active
   (token, expert) pairs are computed. That is exact for the per-segment-union semantics
   too: a pair with score 0 contributes exactly 0.
2. the active experts' rows, in units of 4 rows, are cut into one chunk per thread of
   equal estimated cost (a unit costs its row reads plus one dot per token). For each of
   its units a thread reads the 4 W_up rows once, dots them with the expert's tokens' x (2 tokens
   per register block), h = SiLU(·) · r, then streams the same 4 rows of W_down into its
   own fp32 y buffer: no barrier inside the call; the buffers are summed at the end (T·H).
All arithmetic is fp32 (bf16 weights / x are widened on load, y rounded once at the end).
Threads: ``torch.get_num_threads()`` per call (or ``$VLLM_BLOCKFFN_CPU_THREADS``), OpenMP
from the libgomp torch has loaded (same soname, so the same thread pool that vLLM pins). On
an oversubscribed machine (more runnable threads than cores) a 2-thread call waits at the
join for a preempted thread: medians of 6-10 ms for ~1 ms of work were measured here at
load 4-10, where torch's one-token GEMV (single-threaded) is not exposed; with vLLM's
pinned threads on their own cores this does not arise. Set the variable to 1 on a shared box.

Build: ``cc -O3 -march=native -ffast-math -fopenmp -shared`` into a cache directory
(``$VLLM_BLOCKFFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/vllm_blockffn`` or ``~/.cache/...``),
keyed by the source, the compiler and the CPU's flags; 2-13 s once per machine here. Without a
compiler (or with ``VLLM_BLOCKFFN_CPU_NATIVE=0``) :func:`native_available` is False and
callers keep the plain-PyTorch path. Supported dtypes: fp32 and bf16 (weights and x,
independently); fp16 goes to the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import torch

from ..dispatch import THRESHOLDS

logger = logging.getLogger(__name__)

_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#define ALWAYS static inline __attribute__((always_inline))
#define NR 4   /* weight rows per register block */
#define NT 2   /* tokens per register block */

/* portable vectors (GCC/Clang extensions), for remainders and non-AVX2 CPUs */
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
ALWAYS v8f ld_f32(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
ALWAYS v8f ld_bf16(const uint16_t *p) {
    v8h h; memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f; memcpy(&f, &u, sizeof f); return f;
}
ALWAYS void st_f32(float *p, v8f v) { memcpy(p, &v, sizeof v); }
ALWAYS float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
ALWAYS float cv_f32(float v) { return v; }
ALWAYS float cv_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
ALWAYS uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
ALWAYS float silu(float v) { return v / (1.0f + expf(-v)); }

/* AVX2 + FMA register blocks for the hot 4-row blocks (GCC kept the portable ones' arrays on
   the stack); other CPUs use the portable code only. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
ALWAYS __m256 vl_f32(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS __m256 vl_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
ALWAYS float hsum256(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#else
#define HAVE_AVX2 0
#endif
"""

_PER_DTYPE = r"""
/* out[r][j] = <w row r, x_j>, r < nr, j < nt (nr, nt constants after inlining). */
ALWAYS void up_blk_SUF(const WT *w, long H, int nr, const float *const *xs, int nt, float out[NR][NT]) {
    v8f acc[NR][NT];
    for (int r = 0; r < nr; r++) for (int j = 0; j < nt; j++) acc[r][j] = (v8f){0};
    long h = 0;
    for (; h + 8 <= H; h += 8) {
        v8f wv[NR];
        for (int r = 0; r < nr; r++) wv[r] = ld_SUF(w + r * H + h);
        for (int j = 0; j < nt; j++) {
            v8f xv = ld_f32(xs[j] + h);
            for (int r = 0; r < nr; r++) acc[r][j] += wv[r] * xv;
        }
    }
    for (int r = 0; r < nr; r++) for (int j = 0; j < nt; j++) {
        float s = hsum(acc[r][j]);
        for (long k = h; k < H; k++) s += cv_SUF(w[r * H + k]) * xs[j][k];
        out[r][j] = s;
    }
}

/* y_j[c0:c1] += sum_r hv[j][r] * w[r][c0:c1] */
ALWAYS void down_blk_SUF(const WT *w, long H, int nr, float *const *ys, int nt, float hv[NT][NR], long c0, long c1) {
    long c = c0;
    for (; c + 8 <= c1; c += 8) {
        v8f wv[NR];
        for (int r = 0; r < nr; r++) wv[r] = ld_SUF(w + r * H + c);
        for (int j = 0; j < nt; j++) {
            v8f a = ld_f32(ys[j] + c);
            for (int r = 0; r < nr; r++) a += hv[j][r] * wv[r];
            st_f32(ys[j] + c, a);
        }
    }
    for (; c < c1; c++) for (int j = 0; j < nt; j++) {
        float a = ys[j][c];
        for (int r = 0; r < nr; r++) a += hv[j][r] * cv_SUF(w[r * H + c]);
        ys[j][c] = a;
    }
}

#if HAVE_AVX2
/* 4 rows x 2 tokens / 4 rows x 1 token, all accumulators in registers */
static void up4_SUF(const WT *w, long H, const float *const *xs, int nt, float out[NR][NT]) {
    const WT *w0 = w, *w1 = w + H, *w2 = w + 2 * H, *w3 = w + 3 * H;
    const float *x0 = xs[0];
    long h = 0;
    if (nt == 2) {
        const float *x1 = xs[1];
        __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00, a01 = a00, a11 = a00, a21 = a00, a31 = a00;
        for (; h + 8 <= H; h += 8) {
            __m256 xa = _mm256_loadu_ps(x0 + h), xb = _mm256_loadu_ps(x1 + h), v;
            v = vl_SUF(w0 + h); a00 = _mm256_fmadd_ps(v, xa, a00); a01 = _mm256_fmadd_ps(v, xb, a01);
            v = vl_SUF(w1 + h); a10 = _mm256_fmadd_ps(v, xa, a10); a11 = _mm256_fmadd_ps(v, xb, a11);
            v = vl_SUF(w2 + h); a20 = _mm256_fmadd_ps(v, xa, a20); a21 = _mm256_fmadd_ps(v, xb, a21);
            v = vl_SUF(w3 + h); a30 = _mm256_fmadd_ps(v, xa, a30); a31 = _mm256_fmadd_ps(v, xb, a31);
        }
        out[0][0] = hsum256(a00); out[1][0] = hsum256(a10); out[2][0] = hsum256(a20); out[3][0] = hsum256(a30);
        out[0][1] = hsum256(a01); out[1][1] = hsum256(a11); out[2][1] = hsum256(a21); out[3][1] = hsum256(a31);
    } else {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; h + 8 <= H; h += 8) {
            __m256 xa = _mm256_loadu_ps(x0 + h);
            a0 = _mm256_fmadd_ps(vl_SUF(w0 + h), xa, a0);
            a1 = _mm256_fmadd_ps(vl_SUF(w1 + h), xa, a1);
            a2 = _mm256_fmadd_ps(vl_SUF(w2 + h), xa, a2);
            a3 = _mm256_fmadd_ps(vl_SUF(w3 + h), xa, a3);
        }
        out[0][0] = hsum256(a0); out[1][0] = hsum256(a1); out[2][0] = hsum256(a2); out[3][0] = hsum256(a3);
    }
    for (int j = 0; j < nt; j++)
        for (long k = h; k < H; k++)
            for (int r = 0; r < NR; r++) out[r][j] += cv_SUF(w[r * H + k]) * xs[j][k];
}

static void down4_SUF(const WT *w, long H, float *const *ys, int nt, float hv[NT][NR]) {
    const WT *w0 = w, *w1 = w + H, *w2 = w + 2 * H, *w3 = w + 3 * H;
    float *y0 = ys[0];
    __m256 h00 = _mm256_set1_ps(hv[0][0]), h01 = _mm256_set1_ps(hv[0][1]);
    __m256 h02 = _mm256_set1_ps(hv[0][2]), h03 = _mm256_set1_ps(hv[0][3]);
    long c = 0;
    if (nt == 2) {
        float *y1 = ys[1];
        __m256 h10 = _mm256_set1_ps(hv[1][0]), h11 = _mm256_set1_ps(hv[1][1]);
        __m256 h12 = _mm256_set1_ps(hv[1][2]), h13 = _mm256_set1_ps(hv[1][3]);
        for (; c + 8 <= H; c += 8) {
            __m256 v0 = vl_SUF(w0 + c), v1 = vl_SUF(w1 + c), v2 = vl_SUF(w2 + c), v3 = vl_SUF(w3 + c);
            __m256 a = _mm256_loadu_ps(y0 + c), b = _mm256_loadu_ps(y1 + c);
            a = _mm256_fmadd_ps(h00, v0, a); b = _mm256_fmadd_ps(h10, v0, b);
            a = _mm256_fmadd_ps(h01, v1, a); b = _mm256_fmadd_ps(h11, v1, b);
            a = _mm256_fmadd_ps(h02, v2, a); b = _mm256_fmadd_ps(h12, v2, b);
            a = _mm256_fmadd_ps(h03, v3, a); b = _mm256_fmadd_ps(h13, v3, b);
            _mm256_storeu_ps(y0 + c, a); _mm256_storeu_ps(y1 + c, b);
        }
    } else {
        for (; c + 8 <= H; c += 8) {
            __m256 a = _mm256_loadu_ps(y0 + c);
            a = _mm256_fmadd_ps(h00, vl_SUF(w0 + c), a);
            a = _mm256_fmadd_ps(h01, vl_SUF(w1 + c), a);
            a = _mm256_fmadd_ps(h02, vl_SUF(w2 + c), a);
            a = _mm256_fmadd_ps(h03, vl_SUF(w3 + c), a);
            _mm256_storeu_ps(y0 + c, a);
        }
    }
    for (; c < H; c++)
        for (int j = 0; j < nt; j++)
            for (int r = 0; r < NR; r++) ys[j][c] += hv[j][r] * cv_SUF(w[r * H + c]);
}
#endif

/* h[j][r] = SiLU(<w row r, x_j>) * score_j for the expert's m tokens, rows d0..d0+nr-1 */
static void up_unit_SUF(const WT *w, long H, int nr, const float *const *xs, const float *sc, int m, float *hb,
                        long D) {
    float out[NR][NT];
    for (int j0 = 0; j0 < m; j0 += NT) {
        int nt = m - j0 < NT ? m - j0 : NT;
#if HAVE_AVX2
        if (nr == NR) up4_SUF(w, H, xs + j0, nt, out);
#else
        if (nr == NR && nt == NT) up_blk_SUF(w, H, NR, xs + j0, NT, out);
        else if (nr == NR) up_blk_SUF(w, H, NR, xs + j0, 1, out);
#endif
        else if (nt == NT) up_blk_SUF(w, H, nr, xs + j0, NT, out);
        else up_blk_SUF(w, H, nr, xs + j0, 1, out);
        for (int j = 0; j < nt; j++) for (int r = 0; r < nr; r++)
            hb[(long)(j0 + j) * D + r] = silu(out[r][j]) * sc[j0 + j];
    }
}

/* y_t += W_down rows d0..d0+nr-1 weighted by h, for the expert's m tokens */
static void down_unit_SUF(const WT *w, long H, int nr, float *ybase, const int *tok, const float *hb, int m, long D) {
    float hv[NT][NR];
    float *ys[NT];
    for (int j0 = 0; j0 < m; j0 += NT) {
        int nt = m - j0 < NT ? m - j0 : NT;
        for (int j = 0; j < nt; j++) {
            ys[j] = ybase + (long)tok[j0 + j] * H;
            for (int r = 0; r < nr; r++) hv[j][r] = hb[(long)(j0 + j) * D + r];
        }
#if HAVE_AVX2
        if (nr == NR) down4_SUF(w, H, ys, nt, hv);
#else
        if (nr == NR && nt == NT) down_blk_SUF(w, H, NR, ys, NT, hv, 0, H);
        else if (nr == NR) down_blk_SUF(w, H, NR, ys, 1, hv, 0, H);
#endif
        else if (nt == NT) down_blk_SUF(w, H, nr, ys, NT, hv, 0, H);
        else down_blk_SUF(w, H, nr, ys, 1, hv, 0, H);
    }
}
"""

_MAIN = r"""
/* The live sparsity counters of one layer and step (vllm_blockffn/observe/stats.py columns:
   tokens, active (token, expert) pairs, non-empty segments, Σ segment union sizes, segment
   tokens), added to stats[0..4] from the scores this kernel scans anyway: a fraction of a
   microsecond instead of ~30 µs of numpy per layer and step. Only tokens in [cu[0], cu[S])
   count (padding does not). P: the active pairs in that range, already counted. */
static int count_segments(const float *scores, const int32_t *cu, long S, long T, long E, long P,
                          int64_t *stats) {
    long tokens = 0, nseg = 0, unions = 0;
    unsigned char *seen = NULL;
    for (long s = 0; s < S; s++) {
        long a = cu[s] < 0 ? 0 : cu[s], b = cu[s + 1] > T ? T : cu[s + 1];
        if (b <= a) continue;
        tokens += b - a;
        nseg++;
        if (b - a == 1) {                        /* decode: the union is the token's own set */
            const float *r = scores + a * E;
            for (long e = 0; e < E; e++) unions += r[e] != 0.0f;
            continue;
        }
        if (!seen && !(seen = malloc((size_t)E + 1))) return -1;
        memset(seen, 0, (size_t)E);
        for (long t = a; t < b; t++) {
            const float *r = scores + t * E;
            for (long e = 0; e < E; e++) seen[e] |= r[e] != 0.0f;
        }
        for (long e = 0; e < E; e++) unions += seen[e];
    }
    free(seen);
    stats[0] += tokens; stats[1] += P; stats[2] += nseg; stats[3] += unions; stats[4] += tokens;
    return 0;
}

/* dtype codes: 0 = fp32, 1 = bf16. x [T, H] (row stride ldx), scores fp32 [T, E] contiguous,
   w_up / w_down_t [E, D, H] contiguous, cu int32 [S+1], y [T, H] contiguous (dtype of x).
   Returns 0 (done), 1 (declined: the dense rule says dense wins; y untouched), -1 (no memory),
   2 (w_up NULL: only the counters were added). stats: NULL, or int64 [5] counters to add to
   (count_segments), also when the call then declines.
   Dense rule (kernels/dispatch.py): n >= min_dense_tokens and P > max_pair_fraction * n * E,
   with P the active (token, expert) pairs, n the tokens in range; allow_dense = 0 skips it. */
int blockffn_sparse_ffn(const void *x, long ldx, int xdt, const float *scores, const void *w_up,
                        const void *w_down, int wdt, const int32_t *cu, long S, long T, long E,
                        long D, long H, void *y, int nthreads, float up_row_cost, int allow_dense,
                        long min_dense_tokens, float max_pair_fraction, int64_t *stats) {
    long t0 = S > 0 ? cu[0] : 0, t1 = S > 0 ? cu[S] : 0;
    if (t0 < 0) t0 = 0;
    if (t1 > T) t1 = T;
    if (t1 < t0) t1 = t0;
    int *cnt = calloc((size_t)E + 1, sizeof(int));
    long *off = malloc(((size_t)E + 1) * sizeof(long));
    int *uni = malloc(((size_t)E + 1) * sizeof(int));
    if (!cnt || !off || !uni) { free(cnt); free(off); free(uni); return -1; }
    for (long t = t0; t < t1; t++) {
        const float *s = scores + t * E;
        for (long e = 0; e < E; e++) cnt[e] += s[e] != 0.0f;
    }
    long U = 0, P = 0;
    for (long e = 0; e < E; e++) { off[e] = P; P += cnt[e]; if (cnt[e]) uni[U++] = (int)e; }
    if (stats && count_segments(scores, cu, S, T, E, P, stats) != 0) {
        free(cnt); free(off); free(uni);
        return -1;
    }
    if (!w_up) { free(cnt); free(off); free(uni); return 2; }   /* counters only */
    if (allow_dense && t1 - t0 >= min_dense_tokens && P > (double)max_pair_fraction * (t1 - t0) * E) {
        free(cnt); free(off); free(uni);
        return 1;
    }
    long units = (D + NR - 1) / NR;
    int nth = nthreads < 1 ? 1 : nthreads;
    if ((double)P * D * H < 65536.0) nth = 1;        /* too little work to fork */
    if (nth > U * units) nth = U * units > 0 ? (int)(U * units) : 1;
    int *tok = malloc(((size_t)P + 1) * sizeof(int));
    float *sc = malloc(((size_t)P + 1) * sizeof(float));
    float *hb = malloc(((size_t)P * D + 1) * sizeof(float));
    const float **xs = malloc(((size_t)P + 1) * sizeof(float *));
    int need_xf = xdt != 0, direct = xdt == 0;   /* fp32 output: thread 0 accumulates into y */
    float *xf = need_xf ? malloc(((size_t)(t1 - t0) * H + 1) * sizeof(float)) : NULL;
    long nbuf = direct ? nth - 1 : nth;
    float *yb = nbuf > 0 ? malloc(((size_t)nbuf * T * H + 1) * sizeof(float)) : NULL;
    int *used = calloc((size_t)nth + 1, sizeof(int));
    int ok = tok && sc && hb && xs && used && (!need_xf || xf) && (nbuf == 0 || yb);
    if (ok) {
        for (long t = t0; t < t1; t++) {
            const float *s = scores + t * E;
            for (long e = 0; e < E; e++) if (s[e] != 0.0f) { tok[off[e]] = (int)t; sc[off[e]] = s[e]; off[e]++; }
        }
        for (long e = 0; e < E; e++) off[e] -= cnt[e];
        if (need_xf)
            for (long t = t0; t < t1; t++) {
                const uint16_t *src = (const uint16_t *)x + t * ldx;
                float *dst = xf + (t - t0) * H;
                for (long k = 0; k < H; k++) dst[k] = cv_bf16(src[k]);
            }
        for (long p = 0; p < P; p++)
            xs[p] = need_xf ? xf + (tok[p] - t0) * H : (const float *)x + tok[p] * ldx;
        /* cost of one 4-row unit of expert e: its row reads plus its tokens' dots */
        double total = 0.0;
        for (long u = 0; u < U; u++) total += units * (up_row_cost + cnt[uni[u]]);
        /* one chunk of equal cost per thread, assigned statically: the summation order, hence
           the rounding, depends only on the thread count (dynamic chunks measured no faster on
           a loaded machine: the join waits for a preempted thread either way) */
        long nchunks = nth;
        if (direct) memset(y, 0, (size_t)T * H * sizeof(float));
        #pragma omp parallel num_threads(nth)
        {
            int tid = omp_get_thread_num();
            float *ym = NULL;
            #pragma omp for schedule(static, 1) nowait
            for (long ch = 0; ch < nchunks; ch++) {
                if (!ym) {
                    ym = direct ? (tid == 0 ? (float *)y : yb + (tid - 1) * T * H) : yb + tid * T * H;
                    if (!(direct && tid == 0)) memset(ym, 0, (size_t)T * H * sizeof(float));
                    used[tid] = 1;
                }
                /* unit k of expert e sits at cost position cum_e + k * c_e; the chunk takes the
                   positions in [lo, hi): the same expressions for neighbours, so an exact cover.
                   A thread runs up then down for its rows into its own y: no barrier. */
                double lo = ch == 0 ? -1.0 : total * ch / nchunks;
                double hi = ch == nchunks - 1 ? 2.0 * total + 1.0 : total * (ch + 1) / nchunks, cum = 0.0;
                for (long u = 0; u < U && cum < hi; u++) {
                    long e = uni[u];
                    int m = cnt[e];
                    double c = up_row_cost + m, ce = c * units;
                    if (cum + ce > lo) {
                        long k0 = (long)ceil((lo - cum) / c), k1 = (long)ceil((hi - cum) / c);
                        k0 = k0 < 0 ? 0 : k0 > units ? units : k0;
                        k1 = k1 < 0 ? 0 : k1 > units ? units : k1;
                        for (long k = k0; k < k1; k++) {
                            long d0 = k * NR;
                            int nr = D - d0 < NR ? (int)(D - d0) : NR;
                            float *h = hb + off[e] * D + d0;
                            long o = (e * D + d0) * H;
                            if (wdt == 0) {
                                up_unit_f32((const float *)w_up + o, H, nr, xs + off[e], sc + off[e], m, h, D);
                                down_unit_f32((const float *)w_down + o, H, nr, ym, tok + off[e], h, m, D);
                            } else {
                                up_unit_bf16((const uint16_t *)w_up + o, H, nr, xs + off[e], sc + off[e], m, h, D);
                                down_unit_bf16((const uint16_t *)w_down + o, H, nr, ym, tok + off[e], h, m, D);
                            }
                        }
                    }
                    cum += ce;
                }
            }
        }
        /* sum the threads' partial outputs (and round to bf16) */
        long n = T * H;
        if (direct) {
            float *yo = (float *)y;
            for (long b = 0; b < nbuf; b++) {
                if (!used[b + 1]) continue;
                const float *src = yb + b * n;
                for (long i = 0; i < n; i++) yo[i] += src[i];
            }
        } else {
            uint16_t *yo = (uint16_t *)y;
            for (long i = 0; i < n; i++) {
                float a = 0.0f;
                for (long b = 0; b < nbuf; b++) if (used[b]) a += yb[b * n + i];
                yo[i] = to_bf16(a);
            }
        }
    }
    free(used); free(cnt); free(off); free(uni); free(tok); free(sc); free(hb); free(xs); free(xf); free(yb);
    return ok ? 0 : -1;
}
"""

_SOURCE = (
    _COMMON
    + _PER_DTYPE.replace("SUF", "f32").replace("WT", "float")
    + _PER_DTYPE.replace("SUF", "bf16").replace("WT", "uint16_t")
    + _MAIN
)

_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
UP_ROW_COST = 3.0
"""Cost of reading one weight row, in units of one token's dot product over it (work split)."""

_THREADS = int(os.environ.get("VLLM_BLOCKFFN_CPU_THREADS", "0") or 0)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> str:
    d = os.environ.get("VLLM_BLOCKFFN_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "vllm_blockffn")
    return d


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        logger.warning("blockffn: no C compiler found; CPU sparse experts use the PyTorch path")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([_SOURCE, cc, version, " ".join(_CFLAGS), _cpu_flags()]).encode()).hexdigest()
    dirs = [_cache_dir(), os.path.join(tempfile.gettempdir(), f"vllm_blockffn-{os.getuid()}")]
    for d in dirs:
        path = os.path.join(d, f"sparse_ffn_cpu_{key[:16]}.so")
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp_so = tempfile.mkstemp(suffix=".so", dir=d)
            os.close(fd)
            src = tmp_so[:-3] + ".c"
            with open(src, "w") as f:
                f.write(_SOURCE)
            r = subprocess.run([cc, *_CFLAGS, src, "-o", tmp_so, "-lm"], capture_output=True, text=True, timeout=300)
            os.unlink(src)
            if r.returncode != 0:
                os.unlink(tmp_so)
                logger.warning("blockffn: building the CPU kernel failed (%s); using the PyTorch path", r.stderr[-500:])
                return None
            os.replace(tmp_so, path)  # atomic: concurrent workers may build the same file
            return ctypes.CDLL(path)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("blockffn: cannot build in %s: %s", d, exc)
    return None


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("VLLM_BLOCKFFN_CPU_NATIVE", "1") not in ("0", "false", "False"):
                lib = _build()
                if lib is not None:
                    fn = lib.blockffn_sparse_ffn
                    p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
                    f32 = ctypes.c_float
                    fn.argtypes = [p, i64, i32, p, p, p, i32, p, i64, i64, i64, i64, i64, p, i32]
                    fn.argtypes += [f32, i32, i64, f32, p]
                    fn.restype = i32
                    _lib = lib
            _tried = True
    return _lib


def native_available() -> bool:
    """True when the compiled kernel is loaded (builds it on the first call)."""
    return _load() is not None


def native_supports(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Dtypes and devices the kernel takes (fp32 / bf16 CPU tensors)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPE_CODES
        and w_up.dtype in _DTYPE_CODES
        and w_down_t.dtype == w_up.dtype
        and native_available()
    )


def sparse_ffn_native(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    allow_dense: bool = False,
    num_threads: int | None = None,
    stats: np.ndarray | None = None,
) -> torch.Tensor | None:
    """y [T, H] computing only the active (token, expert) pairs, each active expert read once.

    Tokens outside [cu[0], cu[S]) (vLLM's padding) get y = 0. With ``allow_dense``, returns
    None instead when :func:`~..dispatch.cpu_native_prefers_dense` says dense GEMMs win (the
    kernel evaluates that rule on the counts it scans anyway). Call :func:`native_supports`
    first: this assumes a loaded kernel and fp32/bf16 CPU tensors. ``stats``: an int64 [5]
    array of live counters (vllm_blockffn.observe.stats columns) to add this call's to, from
    the scan the kernel does anyway (also when it declines).
    """
    lib = _load()
    assert lib is not None, "native kernel unavailable"
    T, H = x.shape
    E, D, _ = w_up.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        scores = scores.float().contiguous()
    if not (w_up.is_contiguous() and w_down_t.is_contiguous()):
        w_up, w_down_t = w_up.contiguous(), w_down_t.contiguous()
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    th = THRESHOLDS
    y = torch.empty((T, H), dtype=x.dtype)
    rc = lib.blockffn_sparse_ffn(
        x.data_ptr(), x.stride(0), _DTYPE_CODES[x.dtype], scores.data_ptr(), w_up.data_ptr(), w_down_t.data_ptr(),
        _DTYPE_CODES[w_up.dtype], cu_seqlens.data_ptr(), cu_seqlens.shape[0] - 1, T, E, D, H, y.data_ptr(),
        num_threads or _THREADS or torch.get_num_threads(), UP_ROW_COST, allow_dense,
        th.cpu_min_dense_tokens, th.cpu_max_pair_fraction, _stats_ptr(stats),
    )  # fmt: skip
    if rc == 1:
        return None
    if rc != 0:
        raise MemoryError("blockffn sparse_ffn CPU kernel: out of memory")
    return y


def _stats_ptr(stats: np.ndarray | None) -> int | None:
    if stats is None:
        return None
    if stats.dtype != np.int64 or stats.shape != (5,) or not stats.flags.c_contiguous:
        raise ValueError(f"stats must be a contiguous int64 array of 5 counters, got {stats.dtype} {stats.shape}")
    return stats.ctypes.data


def count_native(scores: torch.Tensor, cu_seqlens: torch.Tensor, stats: np.ndarray) -> bool:
    """Add one step's sparsity counters to ``stats`` (int64 [5]) without running the experts.

    For steps that do not run the sparse kernel (the dense backend, the PyTorch fallback):
    the same C scan, well under the ~30 µs numpy needs. False when the kernel is unavailable
    (the caller counts another way)."""
    lib = _load()
    if lib is None or scores.device.type != "cpu":
        return False
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        scores = scores.float().contiguous()
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    T, E = scores.shape
    rc = lib.blockffn_sparse_ffn(
        None, 0, 0, scores.data_ptr(), None, None, 0, cu_seqlens.data_ptr(), cu_seqlens.shape[0] - 1,
        T, E, 0, 0, None, 1, 0.0, 0, 0, 0.0, _stats_ptr(stats),
    )  # fmt: skip
    if rc == -1:
        raise MemoryError("blockffn counters: out of memory")
    return rc == 2
