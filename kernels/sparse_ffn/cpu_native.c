/* Expert-major sparse BlockFFN experts for CPUs (wrapper: cpu_native.py, which documents the
 * algorithm; reference: naive.py).
 *
 * One call: scan the fp32 router scores once into an "active" mask (score > 0; NaN, zero,
 * negative and -Inf scores are inactive: the one definition, evaluated once, and the only one
 * every later pass uses), list each active expert's tokens, cut the active experts' rows into
 * units of NR rows, give each thread one chunk of equal cost, and per unit: up (NR rows x the
 * expert's tokens, SiLU, x score), then down (the same NR rows of W_down into the thread's own
 * fp32 y). Every weight byte of the step's union is read once, streamed with software prefetch
 * (each unit's W_down block is prefetched during its up pass, the next unit's W_up block during
 * its down pass).
 *
 * Safety: built without -ffast-math (the scores and x are data this kernel does not control:
 * NaN and Inf must keep IEEE semantics); every buffer is sized from the mask that fills it.
 * x may hold NaN/Inf: they propagate into y rows of the tokens that use the expert, as in the
 * PyTorch path; they never change which memory is touched.
 *
 * ISA paths, picked at run time (blockffn_cpu_isa; the caller may force a narrower one):
 *   0 portable (GCC vector extensions), 1 AVX2+FMA, 2 AVX-512 (F/BW/VL/DQ),
 *   3 AVX-512 + AVX512_BF16 (bf16 weights with bf16 x: VDPBF16PS dot products in the up pass),
 *   4 AMX (AMX-BF16 + AMX-INT8 tiles, where the OS grants the tile state: the dot products of linears,
 *     16 rows x up to 16 tokens per tile instruction; see "AMX" below).
 * One shared object serves every x86-64 CPU: each path is compiled for its own target
 * (#pragma GCC target) and only called where the CPU has it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define ALWAYS static inline __attribute__((always_inline))

/* The timeline of a router + experts call (benchmarks/expert_call_cpu.py): a build with -DBLOCKFFN_MARKS
   ($VLLM_BLOCKFFN_CPU_MARKS=1, never the served build) reads the clock at fixed points of
   blockffn_router_sparse_ffn on packed experts (kx_run) and sums each point's µs since the call's entry over the
   calls: 0 the router's linear done, 1 the scores, 2 the experts' set-up done (the threads' region next), 3 / 4
   the calling thread / the last thread in the region, 5 / 6 their up passes done, 7 / 8 their down passes
   done, 9 the region joined, 10 the call returning. Why: a decode step makes ~35 such calls; what a call spends
   besides streaming its bytes (the router's cold read, the set-up, the fork, the threads' imbalance) is its
   fixed cost, which the bytes-over-time figures cannot separate. Every other build compiles MARK to nothing. */
#ifdef BLOCKFFN_MARKS
#include <time.h>
#define N_MARKS 11
static double g_marks[N_MARKS], g_mark0;
static long g_marks_n;
static int g_mark_on;
static double mark_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}
#define MARK_START() (g_mark0 = mark_us(), g_mark_on = 1, g_marks_n++)
#define MARK(i) (g_mark_on ? (void)(g_marks[i] += mark_us() - g_mark0) : (void)0)
#define MARK_END() (MARK(10), g_mark_on = 0)
/* the calls since the last reset; out[0..n) the points' mean µs (n <= N_MARKS) */
long blockffn_marks(double *out, int n) {
    for (int i = 0; i < n && i < N_MARKS; i++) out[i] = g_marks_n ? g_marks[i] / (double)g_marks_n : 0.0;
    return g_marks_n;
}
void blockffn_marks_reset(void) {
    for (int i = 0; i < N_MARKS; i++) g_marks[i] = 0.0;
    g_marks_n = 0;
}
#else
#define MARK_START() ((void)0)
#define MARK(i) ((void)0)
#define MARK_END() ((void)0)
#endif
#define NR 4 /* weight rows per unit */

#if defined(__x86_64__) || defined(__i386__)
#define BLOCKFFN_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define BLOCKFFN_X86 0
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3, ISA_AMX = 4 };

/* The best path this CPU (and OS: __builtin_cpu_supports checks XSAVE state) can run. */
int blockffn_cpu_isa(void) {
#if BLOCKFFN_X86
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")) {
#if defined(__linux__) && defined(SYS_arch_prctl)
        /* AMX: the CPU has the tiles and Linux lets this process use their state (ARCH_REQ_XCOMP_PERM
           for XFEATURE_XTILEDATA, once per process; a VM or kernel without it refuses) */
        if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
            __builtin_cpu_supports("amx-int8") && syscall(SYS_arch_prctl, 0x1023, 18) == 0)
            return ISA_AMX;
#endif
        return ISA_AVX512_BF16;
    }
    if (avx512) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* The path a call runs, never wider than the CPU's: isa >= 0 asks for that one; -1 takes
   $VLLM_BLOCKFFN_CPU_ISA (unset, empty or "auto": the best), read here on every call (getenv is a
   short scan, and Python's os.environ writes reach it through putenv), so the switch works in a
   running process and the Python wrapper does not pay for reading it. -3: the variable names no
   path (the wrapper raises, naming it). */
static const char *const ISA_NAMES[] = {"portable", "avx2", "avx512", "avx512_bf16", "amx"};
#define N_ISAS 5
int blockffn_resolve_isa(int isa) {
    static int best = -1;
    if (best < 0) best = blockffn_cpu_isa();
    if (isa < 0) {
        const char *e = getenv("VLLM_BLOCKFFN_CPU_ISA");
        isa = best;
        if (e) {
            while (*e == ' ' || *e == '\t' || *e == '\n') e++;
            size_t n = strlen(e);
            while (n && (e[n - 1] == ' ' || e[n - 1] == '\t' || e[n - 1] == '\n')) n--;
            if (n && !(n == 4 && strncasecmp(e, "auto", 4) == 0)) {
                isa = -3;
                for (int i = 0; i < N_ISAS; i++)
                    if (strlen(ISA_NAMES[i]) == n && strncasecmp(e, ISA_NAMES[i], n) == 0) isa = i;
                if (isa < 0) return -3;
            }
        }
    }
    return isa > best ? best : isa;
}

/* Threads of a call: nthreads, or (< 1) OpenMP's current count, which torch.set_num_threads sets
   (the same libgomp and calling thread as torch's). */
ALWAYS int call_threads(int nthreads) { return nthreads > 0 ? nthreads : omp_get_max_threads(); }

/* The one definition of an active (token, expert) pair. IEEE compare: false for NaN. */
ALWAYS int is_active(float s) { return s > 0.0f; }

ALWAYS float cv_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
ALWAYS uint16_t to_bf16(float f) { /* round to nearest even; NaN stays a (quiet) NaN. Branch-free: vectorizes */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, q = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? q : r);
}
ALWAYS float silu(float v) { return v / (1.0f + expf(-v)); }

/* The elementwise loops of a call's serial set-up and of its output reduction (x from bf16 to fp32, partial
   outputs summed, fp32 rounded to bf16), compiled once per path (the compiler vectorizes each for its target)
   and picked by the call's ISA: integer steps and fp32 adds in the same order on every path, so the same
   bits. Compiled for the baseline's 128-bit vectors only, they were about half of a decode-size call's fixed
   cost (RESULTS.md, 2026-12-05 UTC). */
#define ELEMENTWISE(SUF)                                                                                \
    static void widen_bf16_##SUF(const uint16_t *src, float *dst, long n) {                             \
        for (long i = 0; i < n; i++) dst[i] = cv_bf16(src[i]);                                          \
    }                                                                                                   \
    static void add_into_##SUF(float *acc, const float *src, long n) {                                  \
        for (long i = 0; i < n; i++) acc[i] += src[i];                                                  \
    }                                                                                                   \
    static void round_bf16_##SUF(const float *src, uint16_t *dst, long n) {                             \
        for (long i = 0; i < n; i++) dst[i] = to_bf16(src[i]);                                          \
    }
ELEMENTWISE(portable)
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
ELEMENTWISE(avx2)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")
ELEMENTWISE(avx512)
#pragma GCC pop_options
#define EW_PICK(NAME, ISA, ...) \
    ((ISA) >= ISA_AVX512 ? NAME##_avx512(__VA_ARGS__) : (ISA) >= ISA_AVX2 ? NAME##_avx2(__VA_ARGS__) : NAME##_portable(__VA_ARGS__))
#else
#define EW_PICK(NAME, ISA, ...) NAME##_portable(__VA_ARGS__)
#endif
#define widen_bf16(isa, ...) EW_PICK(widen_bf16, isa, __VA_ARGS__)
#define add_into(isa, ...) EW_PICK(add_into, isa, __VA_ARGS__)
#define round_bf16(isa, ...) EW_PICK(round_bf16, isa, __VA_ARGS__)
/* Software prefetch: 0 off, n: the block n calls ahead (blockffn_set_prefetch returns the one it replaces). 1, the
   next call's block: on a Xeon without AMX the engine's expert calls, cold, ran a median 1.026x faster than with 2
   (0.984-1.073x, 46 of 50 rows >= 1: Small and XLarge, fp32 / bf16 / int8, 1-8 tokens, avx512_bf16 and the forced
   avx2 path), decode end to end 1.020x at batch 1 and 1.005x at batch 8 (RESULTS.md 2026-12-05 12:27 UTC): a unit
   lasts ~0.5-3 us, far longer than a line's latency, and 2 ahead prefetched past a span's last block (rows no call
   reads) while no call prefetched the first block after a phase change. -1 (default): 1, except expert units
   of fewer than PF_SMALL_UNIT bytes (4 rows of int8 at H = 768, Small), which take 2: on the AMD Zen 4 their 3 KB
   blocks last too little for the next one to arrive in time (one thread, cold: 14-16 GB/s with the next unit
   prefetched, 23 GB/s two ahead; the kernel's engine calls 1.03-1.20x at Small int8, 0.91-1.16x at Medium int8's 5
   KB, 0.94-1.05x at Large / XLarge and bf16; RESULTS.md 2026-12-06 00:43 UTC). g_pf_now: the distance the running
   call uses (set at each entry from g_prefetch and the call's unit size). */
#define PF_SMALL_UNIT 4096
static int g_prefetch = -1, g_pf_now = 1;
int blockffn_set_prefetch(int blocks) { int was = g_prefetch; g_prefetch = blocks < 0 ? -1 : blocks; return was; }
ALWAYS void pf_set_call(long unit_bytes) { g_pf_now = g_prefetch >= 0 ? g_prefetch : unit_bytes < PF_SMALL_UNIT ? 2 : 1; }
/* The down passes on row pairs (AVX512_BF16 + VNNI CPUs: bf_down for bf16, vq_down for int8 weights):
   1 on, 0 the widening ones (benchmarks compare). */
static int g_pairdown = 1;
void blockffn_set_pairdown(int on) { g_pairdown = on; }
/* bf16 units on AVX512_BF16: the split FMA forms (bs_up, bs_down) from this many tokens sharing an expert; 0: never;
   -1 (default): by the CPU, 3 where VDPBF16PS issues slower than 1.5 FMAs (the Xeon without AMX: from 3 tokens an
   expert the split forms were 2-7% faster, RESULTS.md 2026-12-05 05:43 UTC), else never (AMD Zen 4: served batch-8
   layers of 5.6-8 tokens an expert 23-25% faster with VDPBF16PS, RESULTS.md 2026-12-05 21:23 UTC). g_split_now is
   the count in effect, set at each call's entry (dp_fast probes outside the threads' region), read by the units. */
static int g_split_tokens = -1, g_split_now = 3;
int blockffn_set_split_tokens(int n) {
    int was = g_split_tokens;
    g_split_tokens = n < 0 ? -1 : n;
    return was;
}
static int dp_fast(void);
/* The down pass group-major for experts with more than 4 tokens (blockffn_sparse_ffn; 0: every unit takes all its
   tokens' groups at once, for benchmarks' side-by-side runs). */
static int g_group_major = 1;
void blockffn_set_group_major(int on) { g_group_major = on != 0; }
/* The work split's floor for a unit, in its tokens' dot products per weight byte (blockffn_set_unit_floor; 0: none,
   the split of before): a unit costs its tokens plus up_row_cost, but no less than its rows' read. XLarge bf16
   units, cold, one thread: 2.0-2.1 us from 1 to 3 tokens, then ~0.33 us a token, i.e. max(6.2, m + 3.1) tokens;
   without the floor a thread given the experts of few tokens ran 14% longer than the other (a served batch-8
   layer of 3.1 tokens an expert; RESULTS.md 2026-12-05 12:27 UTC). */
static int g_unit_floor = 3;
int blockffn_set_unit_floor(int per_byte) {
    int was = g_unit_floor;
    g_unit_floor = per_byte > 0 ? per_byte : 0;
    return was;
}
ALWAYS double unit_cost(double up_row_cost, int m, size_t wsz) {
    double c = up_row_cost + m, f = (double)g_unit_floor * (double)wsz;
    return c > f ? c : f;
}
/* AMX only where it is faster (kernels/dispatch.py sets both at load, blockffn_set_amx_rules): linears
   from this many rows, expert calls whose active experts have this many tokens each on average (below,
   the AVX512_BF16 code: when few tokens share each weight byte the weight stream decides, and its 4-row
   units stream better than 16-row tiles, measured). */
static long g_amx_min_rows = 2, g_amx_min_tokens = 8;
void blockffn_set_amx_rules(long min_rows, long min_tokens) { g_amx_min_rows = min_rows; g_amx_min_tokens = min_tokens; }
/* Calls that ran AMX tiles (linears and expert calls), for tests: which path a call took is otherwise
   invisible in bf16 outputs. */
static long g_amx_calls = 0;
long blockffn_amx_calls(void) { return __atomic_load_n(&g_amx_calls, __ATOMIC_RELAXED); }
/* Where column col of a y row sits when the paired down pass keeps it in its 32-column block order. */
ALWAYS long perm_col(long col) { long q = col & 31, m = q & 7; return (col & ~31L) + (m < 4 ? 0 : 16) + 4 * (q >> 3) + (m & 3); }
/* ... and when the AMX down pass keeps it: the even columns of each 32-column block, then the odd ones. */
ALWAYS long amx_col(long col) { long q = col & 31; return (col & ~31L) + ((q & 1) << 4) + (q >> 1); }

/* Everything one unit needs: NR (or fewer) rows d0.. of one expert, its m tokens. */
typedef struct {
    const void *wu, *wd;            /* the unit's first W_up / W_down row */
    const char *pf_next;            /* the weight rows the next call reads (prefetched during this one), or NULL */
    long H, D;                      /* row length; h buffer row stride */
    int nr, m;                      /* rows in this unit, tokens of the expert */
    const float *const *xs;         /* fp32 x rows of the tokens */
    const uint16_t *const *xh;      /* bf16 x rows (bf16 x only), else NULL */
    const float *sc;                /* the tokens' scores for this expert */
    const int *tok;                 /* the tokens' row indices in y */
    float *hb;                      /* h[j * D + r] for the expert's tokens */
    float *y;                       /* this thread's fp32 y [T, H] */
    const void *zrow;               /* H zero elements (of either dtype) */
    const float *su;                /* int8 weights: the unit's nr W_up row scales, else NULL */
    const float *sd;                /* int8 weights: the expert's W_down output-row scales [H], else zrow */
    const uint8_t *const *xq;       /* int8 weights on the VNNI path: the tokens' x rounded to int16, as two
                                       byte planes (vb_quantize), else NULL */
    const float *xqs;               /* ...and their scales (x ~ xq * xqs; NaN: x not finite, use the fp32 x) */
    const int32_t *rs;              /* int8 weights: the unit's W_up row sums (vb_up), else NULL */
    int phase;                      /* 1: up (h of the rows), 2: down (y += rows * h) */
    int grp;                        /* the down pass for token group grp only (tokens 4 grp .. 4 grp + 3; the
                                       AVX-512 float and VNNI units), or -1: every group (blockffn_sparse_ffn's
                                       group-major spans) */
    int perm;                       /* y is kept in perm_col order (1: the paired bf16 down pass, bf_down) or
                                       amx_col order (2: the split bf16 down pass, bs_down, or the AMX one) */
    /* int8 weights, VNNI down pass (vq_down), else acc NULL: the span's W_down rows (a thread's run of
       units of one expert) add into int32 sums, one [Hp] row per token of the expert, flushed into y once */
    int32_t *acc;                   /* the thread's int32 sums [m][Hp] (Hp = H rounded up to 32), perm_col order */
    float *hq;                      /* the thread's per-token h steps [m] and, at [m], 1 if the span's h is finite */
    long Hp;
    int span, first, last;          /* rows in the span; this unit starts it (set the steps, zero the sums),
                                       ends it (flush into y) */
    const uint32_t *xb;             /* AMX units: every token of the call packed for the B tiles (amx_pack_*), */
    int nc;                         /* ...columns per group of tokens, */
    long xt0;                       /* ...and the token of the first column */
    float *facc;                    /* AMX bf16 down pass: the thread's fp32 sums of the span (else NULL) */
} unit_t;

typedef void (*unit_fn)(const unit_t *u);

/* A dense linear y[t, n] = <W row n, x_t> for rows [n0, n1) (decode-size M: streaming GEMV). */
typedef struct {
    const void *w;                  /* W [N, K] row-major */
    long K, n0, n1;
    int m;                          /* tokens */
    const float *const *xs;         /* fp32 x rows */
    const uint16_t *const *xh;      /* bf16 x rows (bf16 x only), else NULL */
    float *out;                     /* fp32 out [m, ldo] */
    long ldo;
    const void *zrow;               /* K zero elements */
    const float *scale;             /* int8 weights: per-row scales [N], else NULL */
    const uint8_t *const *xq;       /* int8 weights on the VNNI path: x rounded to int16 per token, as two byte
                                       planes (vb_quantize), else NULL */
    const float *xqs;               /* ...their scales (NaN: not finite, use the fp32 x) */
    const int32_t *rs;              /* int8 weights: the row sums [N] (vb_up), else NULL */
    const void *xb;                 /* AMX paths: x packed as tile rows (amx_pack_*), else NULL */
    int nc;                         /* ...the B tile's columns (tokens, or token planes for int8) per group */
    long rr;                        /* ...weight rows per A tile row (int8 super rows; else 1) */
} lin_t;

typedef void (*lin_fn)(const lin_t *l);

/* Rows [n, n + nr) of a linear: the block after it is prefetched during this one. */
ALWAYS const char *lin_next(const lin_t *l, long n, long esz, long *blk) {
    long nx = n + 4, end = nx + 4 < l->n1 ? nx + 4 : l->n1;
    *blk = end > nx ? (end - nx) * l->K * esz : 0;
    return g_pf_now && *blk > 0 ? (const char *)l->w + nx * l->K * esz : NULL;
}

/* Software prefetch, g_prefetch blocks ahead: p is the block the next call reads (a stream's blocks
   are contiguous), and a call prefetches only the block g_prefetch - 1 after it (1: p itself), so every byte is
   prefetched once (prefetching all the blocks up to it spent a fifth of the loop's instructions on
   repeats). pf_stride (once, before the loop) gives the bytes per iteration and sets *lim to the
   block's bytes; pf_share (each iteration i) issues the iteration's share. No division in the loop. */
ALWAYS long pf_stride(long bytes, long steps, long *lim) {
    *lim = bytes;
    return steps > 0 ? ((*lim + steps - 1) / steps + 63) & ~63L : *lim;
}
/* The share [a, a + stride) of p's lim bytes for shares of at most 4 lines (the int8 units' up and down
   passes: 4 rows over H / 64 or H / 32 steps), without a loop: no compare and branch per line inside their
   step loops (int8 units, cold: +5-7% from 1 to 8 tokens, RESULTS.md 2026-12-03 08:54 UTC; GCC still copies
   their accumulators between registers every step, with or without). Reads no global (vq_down's loop
   stores int32, which may alias one). */
ALWAYS void pf_lines4(const char *p, long lim, long a, long stride) {
    if (a < lim) __builtin_prefetch(p + a, 0, 1);
    if (stride > 64 && a + 64 < lim) __builtin_prefetch(p + a + 64, 0, 1);
    if (stride > 128 && a + 128 < lim) __builtin_prefetch(p + a + 128, 0, 1);
    if (stride > 192 && a + 192 < lim) __builtin_prefetch(p + a + 192, 0, 1);
}
/* Share q of P of a block's prefetch (blk bytes from p, prefetched g_prefetch - 1 blocks ahead as pf_share
   does), for code that passes over the same rows P times (tokens in groups): each pass prefetches its part,
   so the weight stream keeps running through every pass instead of only the first (with the first pass
   alone, the memory idled while later passes computed from cache). Returns the pointer to give pf_share
   with *part as the block's bytes, or NULL when the part is empty. */
ALWAYS const char *pf_part(const char *p, long blk, int q, int P, long *part) {
    *part = blk;
    if (!p || P <= 1) return p;
    long s = ((blk + P - 1) / P + 63) & ~63L, a = q * s, b = a + s < blk ? a + s : blk;
    *part = b > a ? b - a : 0;
    return *part ? p + (g_pf_now - 1) * (blk - *part) + a : NULL;
}
ALWAYS void pf_share(const char *p, long lim, long i, long stride) {
    if (!p) return;
    long a = i * stride, b = a + stride;
    if (b > lim) b = lim;
    p += (g_pf_now - 1) * lim;
    for (long o = a; o < b; o += 64) __builtin_prefetch(p + o, 0, 1);
}

/* The int8 down pass in int32 sums (vq_down, a2q_down): a span's steps. A thread's run of units of one
   expert shares one h step per token, st = max|h| / 32767 over the span's rows (hq[j]; hq[m] = 1 if every
   h of the span is finite, else the span takes the float down pass) and zeroes its sums. */
#define VQ_ROWS 512 /* rows per span at most */
ALWAYS void vq_begin(const unit_t *u) {
    int ok = 1;
    for (int j = 0; j < u->m; j++) {
        const float *h = u->hb + (long)j * u->D;
        float mx = 0.0f;
        for (int r = 0; r < u->span; r++) {
            float a = fabsf(h[r]);
            ok &= a <= 3.4028235e38f;
            mx = a > mx ? a : mx;
        }
        u->hq[j] = mx > 0.0f ? mx / 32767.0f : 1.0f;
    }
    u->hq[u->m] = (float)ok;
    if (ok) memset(u->acc, 0, (size_t)u->m * u->Hp * sizeof(int32_t));
}
/* An int8 unit's NR W_up and W_down row pointers (rows past its nr point at the zero row: they add 0), the
   block to prefetch (*pfd) and its bytes per pass. */
ALWAYS long i8_unit_rows(const unit_t *u, const int8_t *wu[NR], const int8_t *wd[NR], const char **pfd) {
    for (int r = 0; r < NR; r++) {
        wu[r] = r < u->nr ? (const int8_t *)u->wu + r * u->H : (const int8_t *)u->zrow;
        wd[r] = r < u->nr ? (const int8_t *)u->wd + r * u->H : (const int8_t *)u->zrow;
    }
    *pfd = g_pf_now ? u->pf_next : NULL;
    return (long)u->nr * u->H;
}

/* A linear's rows in blocks of NR (rows past n1 read the zero row), tokens in blocks of TB: UPCALL (the
   ISA's dot kernel, the experts' up pass without SiLU) fills out[r][j] for tokens j0..j0+nt-1 from the
   rows wu over H = K elements. */
#define LIN_ROWS(NAME, WT, ESZ, TB, UPCALL)                                                             \
    static void NAME(const lin_t *l) {                                                                  \
        long K = l->K, H = K;                                                                           \
        float out[NR][TB > 4 ? TB : 4];                                                                 \
        for (long n = l->n0; n < l->n1; n += NR) {                                                      \
            int nr = l->n1 - n < NR ? (int)(l->n1 - n) : NR;                                            \
            const WT *wu[NR];                                                                           \
            for (int r = 0; r < NR; r++) wu[r] = r < nr ? (const WT *)l->w + (n + r) * K : (const WT *)l->zrow; \
            long blkn, blk;                                                                             \
            const char *pfn = lin_next(l, n, ESZ, &blkn);                                               \
            for (int j0 = 0; j0 < l->m; j0 += TB) {                                                     \
                int nt = l->m - j0 < TB ? l->m - j0 : TB;                                               \
                const char *pf = pf_part(pfn, blkn, j0 / TB, (l->m + TB - 1) / TB, &blk);               \
                UPCALL;                                                                                 \
                for (int j = 0; j < nt; j++)                                                            \
                    for (int r = 0; r < nr; r++)                                                        \
                        l->out[(long)(j0 + j) * l->ldo + n + r] = out[r][j] * row_scale(l->scale ? l->scale + n : NULL, r); \
            }                                                                                           \
        }                                                                                               \
    }

/* ------------------------------------------------------------------------------ portable */
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
ALWAYS v8f pl_f32(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
ALWAYS v8f pl_bf16(const uint16_t *p) {
    v8h h; memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f; memcpy(&f, &u, sizeof f); return f;
}
typedef int8_t v8b __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));
ALWAYS v8f pl_i8(const int8_t *p) {
    v8b b; memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
}
ALWAYS float p_f32(const float *p, long i) { return p[i]; }
ALWAYS float p_bf16(const uint16_t *p, long i) { return cv_bf16(p[i]); }
ALWAYS float p_i8(const int8_t *p, long i) { return (float)p[i]; }
/* Row scales of int8 weights: an up row's (1 for float weights: exact) and, in the down pass, a
   W_down column's (sd points at zeros for float weights, and is then not read: SCALED = 0). */
ALWAYS float row_scale(const float *su, int r) { return su ? su[r] : 1.0f; }
/* h of the unit's rows for tokens j0..j0+nt-1 from their up dots: SiLU(dot x row scale) x score. */
/* The tokens [*g0, *g1) a unit's down pass takes: group grp (4 grp .. 4 grp + 3) in a group-major span, else all. */
ALWAYS void unit_groups(const unit_t *u, int *g0, int *g1) {
    *g0 = u->grp >= 0 ? 4 * u->grp : 0;
    *g1 = u->grp >= 0 && 4 * u->grp + 4 < u->m ? 4 * u->grp + 4 : u->m;
}

ALWAYS void unit_store_h(const unit_t *u, int j0, int nt, const float *out, int ldo) {
    for (int j = 0; j < nt; j++)
        for (int r = 0; r < u->nr; r++)
            u->hb[(long)(j0 + j) * u->D + r] = silu(out[r * ldo + j] * row_scale(u->su, r)) * u->sc[j0 + j];
}

#define PORTABLE_UNIT(SUF, WT, SCALED)                                                                  \
    static void unit_portable_##SUF(const unit_t *u) {                                                  \
        const WT *wu = (const WT *)u->wu, *wd = (const WT *)u->wd;                                      \
        const float *sd = u->sd;                                                                        \
        long H = u->H;                                                                                  \
        for (int j = 0; j < u->m && (u->phase & 1); j++) {                                              \
            const float *x = u->xs[j];                                                                  \
            for (int r = 0; r < u->nr; r++) {                                                           \
                const WT *w = wu + r * H;                                                               \
                v8f acc = {0};                                                                          \
                long h = 0;                                                                             \
                for (; h + 8 <= H; h += 8) acc += pl_##SUF(w + h) * pl_f32(x + h);                      \
                float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
                for (; h < H; h++) s += p_##SUF(w, h) * x[h];                                           \
                u->hb[(long)j * u->D + r] = silu(s * row_scale(u->su, r)) * u->sc[j];                   \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < u->m && (u->phase & 2); j++) {                                              \
            float *y = u->y + (long)u->tok[j] * H;                                                      \
            const float *hv = u->hb + (long)j * u->D;                                                   \
            for (int r = 0; r < u->nr; r++) {                                                           \
                const WT *w = wd + r * H;                                                               \
                float a = hv[r];                                                                        \
                long c = 0;                                                                             \
                for (; c + 8 <= H; c += 8) {                                                            \
                    v8f wv = pl_##SUF(w + c);                                                           \
                    if (SCALED) wv *= pl_f32(sd + c);                                                   \
                    v8f v = pl_f32(y + c) + a * wv;                                                     \
                    memcpy(y + c, &v, sizeof v);                                                        \
                }                                                                                       \
                for (; c < H; c++) y[c] += a * (SCALED ? p_##SUF(w, c) * sd[c] : p_##SUF(w, c));        \
            }                                                                                           \
        }                                                                                               \
    }
PORTABLE_UNIT(f32, float, 0)
PORTABLE_UNIT(bf16, uint16_t, 0)
PORTABLE_UNIT(i8, int8_t, 1)

#define PORTABLE_LIN(SUF, WT)                                                                           \
    static void lin_portable_##SUF(const lin_t *l) {                                                    \
        long K = l->K;                                                                                  \
        for (long n = l->n0; n < l->n1; n++) {                                                          \
            const WT *w = (const WT *)l->w + n * K;                                                     \
            for (int j = 0; j < l->m; j++) {                                                            \
                const float *x = l->xs[j];                                                              \
                v8f acc = {0};                                                                          \
                long h = 0;                                                                             \
                for (; h + 8 <= K; h += 8) acc += pl_##SUF(w + h) * pl_f32(x + h);                      \
                float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])); \
                for (; h < K; h++) s += p_##SUF(w, h) * x[h];                                           \
                l->out[(long)j * l->ldo + n] = s * (l->scale ? l->scale[n] : 1.0f);                     \
            }                                                                                           \
        }                                                                                               \
    }
PORTABLE_LIN(f32, float)
PORTABLE_LIN(bf16, uint16_t)
PORTABLE_LIN(i8, int8_t)

#if BLOCKFFN_X86
/* ---------------------------------------------------------------------------------- AVX2 */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
ALWAYS __m256 a2_f32(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS __m256 a2_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
ALWAYS __m256 a2_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
ALWAYS float a2_hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

#define A2_CHUNK 512
/* 16 weights as two fp32 vectors, in order. (bf16 as its even and odd elements, one load, a shift and a
   mask, with x deinterleaved to match, measured no faster here: A/B in one process, cold, M = 1-8.) */
ALWAYS void a2w_f32(const float *p, __m256 *a, __m256 *b) { *a = _mm256_loadu_ps(p); *b = _mm256_loadu_ps(p + 8); }
ALWAYS void a2w_bf16(const uint16_t *p, __m256 *a, __m256 *b) { *a = a2_bf16(p); *b = a2_bf16(p + 8); }
ALWAYS void a2w_i8(const int8_t *p, __m256 *a, __m256 *b) { *a = a2_i8(p); *b = a2_i8(p + 8); }
#define A2_STEPS(SUF, R, T)                                                                             \
    {                                                                                                   \
        __m256 a[R][T];                                                                                 \
        for (int r = 0; r < R; r++) for (int j = 0; j < T; j++) a[r][j] = acc[r0 + r][j0 + j];          \
        for (long h = h0; h < h1; h += 16, i++) {                                                       \
            pf_share(pf, pfl, i, pfs);                                                                  \
            for (int r = 0; r < R; r++) {                                                               \
                __m256 v0, v1;                                                                          \
                a2w_##SUF(w[r0 + r] + h, &v0, &v1);                                                     \
                for (int j = 0; j < T; j++) {                                                           \
                    a[r][j] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xs[j0 + j] + h), a[r][j]);            \
                    a[r][j] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xs[j0 + j] + h + 8), a[r][j]);        \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < R; r++) for (int j = 0; j < T; j++) acc[r0 + r][j0 + j] = a[r][j];          \
    }
/* 4 weight rows x nt (up to 8) tokens of a dot product, the whole row (tail in scalar code). With more
   than 2 tokens, in chunks of A2_CHUNK elements: a chunk's 4 rows and the tokens' x stay in L1 while every
   token group passes over them (groups of 4 tokens on 2 rows at a time, then 2 or 1 tokens on 4 rows),
   the accumulators kept in memory between chunks; each row step serves up to 4 tokens, and the weight
   stream runs through every group (the prefetch is spread over all the call's steps). Before: 4 rows x 2
   tokens per pass over the whole row, later passes re-reading the rows from L2 with the memory idle. */
#define A2_DOT(SUF, WT)                                                                                 \
    ALWAYS void a2_dot_##SUF(const WT *const *w, long K, const float *const *xs, int nt, float *out,    \
                             int ldo, const char *pf, long blk) {                                      \
        long K16 = K & ~15L;                                                                            \
        int n4 = nt / 4 * 4, passes = nt / 4 * 2 + (nt - n4 + 1) / 2;                                  \
        long steps = K16 / 16 * passes > 0 ? K16 / 16 * passes : 1, pfl, pfs = pf_stride(blk, steps, &pfl), i = 0; \
        __m256 acc[NR][8];                                                                              \
        for (int r = 0; r < NR; r++) for (int j = 0; j < nt; j++) acc[r][j] = _mm256_setzero_ps();      \
        long ch = nt > 2 ? A2_CHUNK : K16; /* one group: no chunks (1-2 tokens were 6-9% slower in them) */ \
        for (long h0 = 0; h0 < K16; h0 += ch) {                                                         \
            long h1 = h0 + ch < K16 ? h0 + ch : K16;                                                    \
            for (int j0 = 0; j0 < n4; j0 += 4)                                                          \
                for (int r0 = 0; r0 < NR; r0 += 2) A2_STEPS(SUF, 2, 4)                                  \
            int j0 = n4, r0 = 0;                                                                        \
            if (nt - n4 >= 2) { A2_STEPS(SUF, 4, 2) j0 += 2; }                                          \
            if (nt - j0 == 1) A2_STEPS(SUF, 4, 1)                                                       \
        }                                                                                               \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int j = 0; j < nt; j++) {                                                              \
                float t = a2_hsum(acc[r][j]);                                                           \
                for (long k = K16; k < K; k++) t += p_##SUF(w[r], k) * xs[j][k];                        \
                out[r * ldo + j] = t;                                                                   \
            }                                                                                           \
    }
A2_DOT(f32, float) A2_DOT(bf16, uint16_t) A2_DOT(i8, int8_t)

/* The down pass's steps: 8 columns of the unit's 4 W_down rows, added into the pair's y rows. (16 columns
   per step need 8 widened vectors + 8 h broadcasts + 2 sums in bf16, more than the 16 ymm registers; in
   one before/after pair of runs bf16 fell 74 -> 66% at 1 token, the next pair was within noise.) */
#define A2_DOWN_LOOP(SUF, SCALED)                                                                       \
    for (long c = 0, i = 0; c < H8; c += 8, i++) {                                                      \
        pf_share(pf, pfl, i, pfs);                                                                      \
        __m256 v[NR];                                                                                   \
        for (int r = 0; r < NR; r++) v[r] = a2_##SUF(wdr[r] + c);                                       \
        if (SCALED) {                                                                                   \
            __m256 sv = _mm256_loadu_ps(u->sd + c);                                                     \
            for (int r = 0; r < NR; r++) v[r] = _mm256_mul_ps(v[r], sv);                                \
        }                                                                                               \
        for (int j = 0; j < nt; j++) {                                                                  \
            __m256 a = _mm256_loadu_ps(ys[j] + c);                                                      \
            for (int r = 0; r < NR; r++) a = _mm256_fmadd_ps(hv[j][r], v[r], a);                        \
            _mm256_storeu_ps(ys[j] + c, a);                                                             \
        }                                                                                               \
    }
/* up: a2_dot (4 rows x up to 8 tokens); down: 4 rows x (2 or 1) tokens, each pass over the rows
   prefetching its part of the next block (pf_part). Rows past nr read the zero row (with h = 0); the
   column tail (H % 8) goes through scalar code. ESZ: bytes per weight element. */
#define AVX2_UNIT(SUF, WT, ESZ, SCALED)                                                                 \
    static void unit_avx2_##SUF(const unit_t *u) {                                                      \
        const WT *wd = (const WT *)u->wd;                                                               \
        long H = u->H, H8 = H & ~7L, steps = H8 / 8 > 0 ? H8 / 8 : 1;                                   \
        int nr = u->nr;                                                                                 \
        const char *pfn = g_pf_now ? u->pf_next : NULL; /* the next call's rows, in both passes */      \
        long blk = (long)nr * H * ESZ;                                                                  \
        const WT *wu[NR], *wdr[NR];                                                                     \
        for (int r = 0; r < NR; r++) {                                                                  \
            wu[r] = r < nr ? (const WT *)u->wu + r * H : (const WT *)u->zrow;                           \
            wdr[r] = r < nr ? wd + r * H : (const WT *)u->zrow;                                         \
        }                                                                                               \
        float out[NR][8];                                                                               \
        for (int j0 = 0; j0 < u->m && (u->phase & 1); j0 += 8) {                                        \
            int nt = u->m - j0 < 8 ? u->m - j0 : 8;                                                     \
            long pb;                                                                                    \
            const char *pf = pf_part(pfn, blk, j0 / 8, (u->m + 7) / 8, &pb);                            \
            a2_dot_##SUF(wu, H, u->xs + j0, nt, &out[0][0], 8, pf, pb);                                 \
            unit_store_h(u, j0, nt, &out[0][0], 8);                                                     \
        }                                                                                               \
        for (int j0 = 0; j0 < u->m && (u->phase & 2); j0 += 2) {                                        \
            int nt = u->m - j0 < 2 ? u->m - j0 : 2;                                                     \
            long pb, pfl;                                                                               \
            const char *pf = pf_part(pfn, blk, j0 / 2, (u->m + 1) / 2, &pb);                            \
            long pfs = pf_stride(pb, steps, &pfl);                                                      \
            float *ys[2] = {u->y + (long)u->tok[j0] * H, u->y + (long)u->tok[j0 + nt - 1] * H};         \
            __m256 hv[2][NR];                                                                           \
            for (int j = 0; j < 2; j++)                                                                 \
                for (int r = 0; r < NR; r++)                                                            \
                    hv[j][r] = _mm256_set1_ps(j < nt && r < nr ? u->hb[(long)(j0 + j) * u->D + r] : 0.0f); \
            A2_DOWN_LOOP(SUF, SCALED)                                                                   \
            for (int j = 0; j < nt; j++)                                                                \
                for (int r = 0; r < nr; r++) {                                                          \
                    float a = u->hb[(long)(j0 + j) * u->D + r];                                         \
                    for (long c = H8; c < H; c++)                                                       \
                        ys[j][c] += a * (SCALED ? p_##SUF(wd + r * H, c) * u->sd[c] : p_##SUF(wd + r * H, c)); \
                }                                                                                       \
        }                                                                                               \
    }
AVX2_UNIT(f32, float, 4, 0)
AVX2_UNIT(bf16, uint16_t, 2, 0)
AVX2_UNIT(i8, int8_t, 1, 1)

LIN_ROWS(lin_avx2_f32, float, 4, 8, a2_dot_f32(wu, H, l->xs + j0, nt, &out[0][0], 8, pf, blk))
LIN_ROWS(lin_avx2_bf16, uint16_t, 2, 8, a2_dot_bf16(wu, H, l->xs + j0, nt, &out[0][0], 8, pf, blk))

/* int8 weights on AVX2 (and plain AVX-512, which has no VPDPBUSD): the dot products in int16 x int16
   products with VPMADDWD, the same exact integers as the VNNI path (vn_dots, vq_down), so the same
   results bit for bit, and the quality measured on that path holds. x is rounded to int16 per token
   exactly as vb_quantize rounds it (a2q_quantize: stored as int16, not as byte planes); each step widens
   16 weights of a row to int16 once (VPMOVSXBW) for both tokens, then one VPMADDWD + VPADDD per token:
   no int8 -> fp32 conversions (the float path spent two per 8 weights). Exact: a lane adds 2 products of
   at most 128 x 32767 per step, 256 steps per 4096-element block (< 2^31), blocks summed in int64.
   Tokens whose x is not finite take the float path (a2_dot_i8: NaN/Inf propagate as there). */
static void a2q_quantize(const float *const *xs, long n, long H, int16_t *xq, long ldq, float *xqs) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(32767.0f), nlim = _mm256_set1_ps(-32767.0f);
    for (long t = 0; t < n; t++) {
        const float *x = xs[t];
        long H8 = H & ~7L;
        __m256 m = _mm256_setzero_ps();
        int bad = 0;
        for (long k = 0; k < H8; k += 8) {
            __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
            bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(3.4028235e38f), _CMP_NLE_UQ));
            m = _mm256_max_ps(m, a);
        }
        float mx = 0.0f, buf[8];
        _mm256_storeu_ps(buf, m);
        for (int i = 0; i < 8; i++) mx = buf[i] > mx ? buf[i] : mx;
        for (long k = H8; k < H; k++) {
            float a = fabsf(x[k]);
            bad |= !(a <= 3.4028235e38f);
            mx = a > mx ? a : mx;
        }
        float sc = mx > 0.0f ? mx / 32767.0f : 1.0f;
        xqs[t] = bad ? NAN : sc;
        int16_t *q = xq + t * ldq;
        if (bad) { memset(q, 0, (size_t)H * sizeof(int16_t)); continue; }
        const __m256 vs = _mm256_set1_ps(sc);
        long k = 0;
        for (; k + 16 <= H; k += 16) {
            __m256 v0 = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), nlim), lim);
            __m256 v1 = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + k + 8), vs), nlim), lim);
            __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1)); /* in-lane */
            _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(p, 0xd8));
        }
        for (; k < H; k++) {
            float v = x[k] / sc;
            v = v < -32767.0f ? -32767.0f : v > 32767.0f ? 32767.0f : v;
            q[k] = (int16_t)lrintf(v);
        }
    }
}
#define A2Q_DOT(NT)                                                                                     \
    ALWAYS void a2q_dot_##NT(const int8_t *const *w, long K, const int16_t *const *xq, int64_t tot[NR][2], \
                             const char *pf, long blk) {                                               \
        long K16 = K & ~15L, steps = K16 / 16 > 0 ? K16 / 16 : 1, i = 0, pfl, pfs = pf_stride(blk, steps, &pfl); \
        for (long h0 = 0; h0 < K16; h0 += 4096) {                                                       \
            long h1 = h0 + 4096 < K16 ? h0 + 4096 : K16;                                                \
            __m256i acc[NR][NT];                                                                        \
            for (int r = 0; r < NR; r++) for (int j = 0; j < NT; j++) acc[r][j] = _mm256_setzero_si256(); \
            for (long h = h0; h < h1; h += 16, i++) {                                                   \
                pf_share(pf, pfl, i, pfs);                                                              \
                __m256i xv[NT];                                                                         \
                for (int j = 0; j < NT; j++) xv[j] = _mm256_loadu_si256((const __m256i *)(xq[j] + h));  \
                for (int r = 0; r < NR; r++) {                                                          \
                    __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[r] + h)));     \
                    for (int j = 0; j < NT; j++) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(v, xv[j])); \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < NR; r++)                                                                \
                for (int j = 0; j < NT; j++) {                                                          \
                    int32_t b[8];                                                                       \
                    _mm256_storeu_si256((__m256i *)b, acc[r][j]);                                       \
                    for (int q = 0; q < 8; q++) tot[r][j] += b[q];                                      \
                }                                                                                       \
        }                                                                                               \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int j = 0; j < NT; j++)                                                                \
                for (long k = K16; k < K; k++) tot[r][j] += (int32_t)w[r][k] * xq[j][k];                \
    }
A2Q_DOT(1) A2Q_DOT(2)
/* The dots of tokens j0.. (nt <= 2) with rows w: integers when both tokens' x are finite, else fp32. */
ALWAYS void a2q_dots(const int8_t *const *w, long K, const float *const *xs, const uint8_t *const *xq,
                     const float *xqs, int nt, float out[NR][4], const char *pf, long blk) {
    int finite = 1;
    for (int j = 0; j < nt; j++) finite &= xqs[j] == xqs[j];
    if (!finite) { a2_dot_i8(w, K, xs, nt, &out[0][0], 4, pf, blk); return; }
    int64_t tot[NR][2] = {{0}};
    const int16_t *q[2] = {(const int16_t *)xq[0], (const int16_t *)xq[nt - 1]};
    if (nt == 2) a2q_dot_2(w, K, q, tot, pf, blk);
    else a2q_dot_1(w, K, q, tot, pf, blk);
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < nt; j++) out[r][j] = (float)tot[r][j] * xqs[j];
}
LIN_ROWS(lin_avx2q_i8, int8_t, 1, 2, a2q_dots(wu, H, l->xs + j0, l->xq + j0, l->xqs + j0, nt, out, pf, blk))

/* Where column col of a thread's int32 sums sits in the AVX2 down pass: VPUNPCK{L,H}WD work within 128-bit
   lanes, so a 16-column block keeps columns 0-3, 8-11, then 4-7, 12-15. */
ALWAYS long a2_col(long col) { long q = col & 15; return (col & ~15L) + ((q & 4) << 1) + ((q & 8) >> 1) + (q & 3); }
/* The down pass of an int8 unit into the span's int32 sums (as vq_down): per 16 columns, 4 widenings and
   4 unpacks into row pairs shared by the tokens, then per token 4 VPMADDWD (the products of VPDPWSSD). */
#define A2Q_DOWN(NT)                                                                                    \
    ALWAYS void a2q_down_##NT(const int8_t *const *w, long H, int32_t *const *acc, const float *hv,      \
                              const float *st, int nr, long D, const char *pf, long blk) {             \
        int32_t q[NT][NR];                                                                              \
        __m256i hp[NT][2];                                                                              \
        for (int j = 0; j < NT; j++) {                                                                  \
            for (int r = 0; r < NR; r++) q[j][r] = r < nr ? (int32_t)lrintf(hv[(long)j * D + r] / st[j]) : 0; \
            for (int p = 0; p < 2; p++)                                                                 \
                hp[j][p] = _mm256_set1_epi32((int)(((uint32_t)q[j][2 * p] & 0xffffu) | ((uint32_t)q[j][2 * p + 1] << 16))); \
        }                                                                                               \
        long H16 = H & ~15L, steps = H16 / 16 > 0 ? H16 / 16 : 1, pfl, pfs = pf_stride(blk, steps, &pfl); \
        for (long c = 0, i = 0; c < H16; c += 16, i++) {                                                \
            pf_share(pf, pfl, i, pfs);                                                                  \
            __m256i a[NR];                                                                              \
            for (int r = 0; r < NR; r++) a[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[r] + c))); \
            __m256i l01 = _mm256_unpacklo_epi16(a[0], a[1]), h01 = _mm256_unpackhi_epi16(a[0], a[1]);   \
            __m256i l23 = _mm256_unpacklo_epi16(a[2], a[3]), h23 = _mm256_unpackhi_epi16(a[2], a[3]);   \
            for (int j = 0; j < NT; j++) {                                                              \
                int32_t *s = acc[j] + c;                                                                \
                __m256i lo = _mm256_loadu_si256((const __m256i *)s), hi = _mm256_loadu_si256((const __m256i *)(s + 8)); \
                lo = _mm256_add_epi32(lo, _mm256_add_epi32(_mm256_madd_epi16(l01, hp[j][0]), _mm256_madd_epi16(l23, hp[j][1]))); \
                hi = _mm256_add_epi32(hi, _mm256_add_epi32(_mm256_madd_epi16(h01, hp[j][0]), _mm256_madd_epi16(h23, hp[j][1]))); \
                _mm256_storeu_si256((__m256i *)s, lo);                                                  \
                _mm256_storeu_si256((__m256i *)(s + 8), hi);                                            \
            }                                                                                           \
        }                                                                                               \
        for (long c = H16; c < H; c++)                                                                  \
            for (int j = 0; j < NT; j++) {                                                              \
                int32_t t = 0;                                                                          \
                for (int r = 0; r < NR; r++) t += (int32_t)w[r][c] * q[j][r];                           \
                acc[j][a2_col(c)] += t;                                                                 \
            }                                                                                           \
    }
A2Q_DOWN(1) A2Q_DOWN(2)
/* y_j += sums_j * (column scale * st_j) (as vq_flush: the same roundings), columns put back in order. */
ALWAYS void a2q_flush(const unit_t *u) {
    long H = u->H, H16 = H & ~15L;
    for (int j = 0; j < u->m; j++) {
        const int32_t *s = u->acc + (long)j * u->Hp;
        float *y = u->y + (long)u->tok[j] * H;
        float stj = u->hq[j];
        __m256 st = _mm256_set1_ps(stj);
        for (long c = 0; c < H16; c += 16) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(s + c)), hi = _mm256_loadu_si256((const __m256i *)(s + c + 8));
            __m256 v0 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20));
            __m256 v1 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x31));
            __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(u->sd + c), st), s1 = _mm256_mul_ps(_mm256_loadu_ps(u->sd + c + 8), st);
            _mm256_storeu_ps(y + c, _mm256_fmadd_ps(v0, s0, _mm256_loadu_ps(y + c)));
            _mm256_storeu_ps(y + c + 8, _mm256_fmadd_ps(v1, s1, _mm256_loadu_ps(y + c + 8)));
        }
        for (long c = H16; c < H; c++) y[c] = fmaf((float)s[a2_col(c)], u->sd[c] * stj, y[c]);
    }
}
/* One int8 unit: up dots in integers (a2q_dots), down pass into the span's int32 sums; a span with a
   non-finite h takes the float down pass (unit_avx2_i8). */
static void unit_avx2q_i8(const unit_t *u) {
    long H = u->H;
    const int8_t *wu[NR], *wd[NR];
    const char *pfd;
    long blk = i8_unit_rows(u, wu, wd, &pfd);
    float out[NR][4];
    long pb;
    for (int j0 = 0; j0 < u->m && (u->phase & 1); j0 += 2) {
        int nt = u->m - j0 < 2 ? u->m - j0 : 2;
        const char *pf = pf_part(pfd, blk, j0 / 2, (u->m + 1) / 2, &pb);
        a2q_dots(wu, H, u->xs + j0, u->xq + j0, u->xqs + j0, nt, out, pf, pb);
        unit_store_h(u, j0, nt, &out[0][0], 4);
    }
    if (!(u->phase & 2)) return;
    if (u->acc && u->first) vq_begin(u);
    if (!u->acc || u->hq[u->m] == 0.0f) {
        unit_t v = *u;
        v.phase = 2;
        unit_avx2_i8(&v);
    } else {
        for (int j0 = 0; j0 < u->m; j0 += 2) {
            int nt = u->m - j0 < 2 ? u->m - j0 : 2;
            int32_t *acc[2] = {u->acc + (long)j0 * u->Hp, u->acc + (long)(j0 + nt - 1) * u->Hp};
            const char *pf = pf_part(pfd, blk, j0 / 2, (u->m + 1) / 2, &pb);
            if (nt == 2) a2q_down_2(wd, H, acc, u->hb + (long)j0 * u->D, u->hq + j0, u->nr, u->D, pf, pb);
            else a2q_down_1(wd, H, acc, u->hb + (long)j0 * u->D, u->hq + j0, u->nr, u->D, pf, pb);
        }
    }
    if (u->acc && u->last && u->hq[u->m] != 0.0f) a2q_flush(u);
}
#pragma GCC pop_options

/* ------------------------------------------------------------------------------- AVX-512 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
ALWAYS __m512 a5_f32(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
ALWAYS __m512 a5_bf16(const uint16_t *p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
ALWAYS __m512 a5_i8(const int8_t *p, __mmask16 k) { /* full steps: the load folds into VPMOVSXBD */
    __m128i b = k == (__mmask16)0xffff ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8(k, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
ALWAYS __mmask16 a5_mask(long left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }
ALWAYS __mmask32 a5_mask32(long left) { return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1); }
/* Unmasked loads for the bf16 up passes' full steps: the masked form every step cost ~18% of a compute-bound
   8-row bf16 linear on an Intel Xeon without AMX (a loop probe, 123 vs 149 GFLOP/s; the kernel's linears, cold,
   interleaved: +2-3% at 1-4 rows, +5-12% at 8; RESULTS.md 2026-12-04 16:43 UTC). The same values, so the same
   sums. fp32 keeps one masked loop (unmasked full steps measured 1-3% slower there at 4-8 rows), as do the int8
   fallback's float steps (not measured). */
#define A5_UNMASKED_f32 0
#define A5_UNMASKED_bf16 1
#define A5_UNMASKED_bf16b 1
#define A5_UNMASKED_i8v 0
ALWAYS __m512 a5_f32f(const float *p) { return _mm512_loadu_ps(p); }
ALWAYS __m512 a5_bf16f(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* up: 4 rows x NT tokens (up to 16 zmm accumulators); down: 4 rows x NT tokens. Rows past the
   unit's nr point at a zero row (their h is 0 and they add exactly 0); the column tail (H % 16) is one
   masked step (bf16's up pass: full steps unmasked, then the tail), so there is no scalar code. */
#define A5_UP_STEP(SUF, NT, FULL, K)                                                                    \
    {                                                                                                   \
        pf_share(pf, pfl, i, pfs);                                                                    \
        __m512 wv[NR], xv[NT];                                                                          \
        for (int r = 0; r < NR; r++) wv[r] = FULL ? a5_##SUF##f(w[r] + h) : a5_##SUF(w[r] + h, K);      \
        for (int j = 0; j < NT; j++) xv[j] = FULL ? _mm512_loadu_ps(xs[j] + h) : _mm512_maskz_loadu_ps(K, xs[j] + h); \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int j = 0; j < NT; j++) acc[r][j] = _mm512_fmadd_ps(wv[r], xv[j], acc[r][j]);          \
    }
#define A5_UP(SUF, WT, NT)                                                                              \
    ALWAYS void a5_up_##SUF##_##NT(const WT *const *w, long H, const float *const *xs, float out[NR][4], \
                                    const char *pf, long blk) {                                        \
        __m512 acc[NR][NT];                                                                             \
        long steps = (H + 15) / 16, i = 0, pfl, pfs = pf_stride(blk, steps, &pfl), h = 0;                \
        for (int r = 0; r < NR; r++) for (int j = 0; j < NT; j++) acc[r][j] = _mm512_setzero_ps();      \
        if (A5_UNMASKED_##SUF)                                                                          \
            for (; h + 16 <= H; h += 16, i++) A5_UP_STEP(SUF, NT, 1, (__mmask16)0xffff)                  \
        for (; h < H; h += 16, i++) A5_UP_STEP(SUF, NT, 0, a5_mask(H - h))                              \
        for (int r = 0; r < NR; r++) for (int j = 0; j < NT; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]); \
    }
#define A5_DOWN(SUF, WT, NT, SCALED)                                                                    \
    ALWAYS void a5_down_##SUF##_##NT(const WT *const *w, long H, float *const *ys, float hs[4][NR],   \
                                      const char *pf, long blk, const float *sd) {                     \
        __m512 hv[NT][NR];                                                                              \
        long steps = (H + 15) / 16, i = 0, pfl, pfs = pf_stride(blk, steps, &pfl);                       \
        for (int j = 0; j < NT; j++) for (int r = 0; r < NR; r++) hv[j][r] = _mm512_set1_ps(hs[j][r]);  \
        for (long c = 0; c < H; c += 16, i++) {                                                         \
            __mmask16 k = a5_mask(H - c);                                                               \
            pf_share(pf, pfl, i, pfs);                                                                \
            __m512 wv[NR];                                                                              \
            for (int r = 0; r < NR; r++) wv[r] = a5_##SUF(w[r] + c, k);                                 \
            if (SCALED) { /* y += scale * (sum of the NR rows' terms): one multiply per token, not per row */ \
                __m512 sv = _mm512_maskz_loadu_ps(k, sd + c);                                           \
                for (int j = 0; j < NT; j++) {                                                          \
                    __m512 t = _mm512_mul_ps(hv[j][0], wv[0]);                                          \
                    for (int r = 1; r < NR; r++) t = _mm512_fmadd_ps(hv[j][r], wv[r], t);               \
                    _mm512_mask_storeu_ps(ys[j] + c, k, _mm512_fmadd_ps(sv, t, _mm512_maskz_loadu_ps(k, ys[j] + c))); \
                }                                                                                       \
                continue;                                                                               \
            }                                                                                           \
            for (int j = 0; j < NT; j++) {                                                              \
                __m512 a = _mm512_maskz_loadu_ps(k, ys[j] + c);                                         \
                for (int r = 0; r < NR; r++) a = _mm512_fmadd_ps(hv[j][r], wv[r], a);                   \
                _mm512_mask_storeu_ps(ys[j] + c, k, a);                                                 \
            }                                                                                           \
        }                                                                                               \
    }
#define A5_SWITCH(FN, NT, ...)                                                                          \
    switch (NT) {                                                                                       \
    case 1: FN##_1(__VA_ARGS__); break;                                                                 \
    case 2: FN##_2(__VA_ARGS__); break;                                                                 \
    case 3: FN##_3(__VA_ARGS__); break;                                                                 \
    default: FN##_4(__VA_ARGS__); break;                                                                \
    }
/* One unit in blocks of up to 4 tokens. UPCALL computes out[r][j] for tokens j0..j0+nt-1; DOWNCALL adds
   the rows times hs[j][r] into ys[j] (A5_DOWN: the default). */
#define A5_DOWNCALL(SUF) A5_SWITCH(a5_down_##SUF, nt, wd, H, ys, hs, pf, blk, u->sd)
#define A5_UNIT(NAME, SUF, WT, ESZ, SCALED, UPCALL, DOWNCALL)                                           \
    A5_UP(SUF, WT, 1) A5_UP(SUF, WT, 2) A5_UP(SUF, WT, 3) A5_UP(SUF, WT, 4)                            \
    A5_DOWN(SUF, WT, 1, SCALED) A5_DOWN(SUF, WT, 2, SCALED)                                             \
    A5_DOWN(SUF, WT, 3, SCALED) A5_DOWN(SUF, WT, 4, SCALED)                                             \
    static void NAME(const unit_t *u) {                                                                 \
        long H = u->H;                                                                                  \
        int nr = u->nr;                                                                                 \
        long ublk = (long)nr * H * ESZ;                                                                 \
        const WT *wu[NR], *wd[NR];                                                                      \
        for (int r = 0; r < NR; r++) {                                                                  \
            wu[r] = r < nr ? (const WT *)u->wu + r * H : (const WT *)u->zrow;                           \
            wd[r] = r < nr ? (const WT *)u->wd + r * H : (const WT *)u->zrow;                           \
        }                                                                                               \
        const char *pfd = g_pf_now ? u->pf_next : NULL, *pfn = pfd;                                     \
        float out[NR][4], hs[4][NR];                                                                    \
        for (int j0 = 0; j0 < u->m && (u->phase & 1); j0 += 4) {                                        \
            int nt = u->m - j0 < 4 ? u->m - j0 : 4;                                                     \
            long blk; /* each group's pass its part of the next block: the stream runs through every pass */ \
            const char *pf = pf_part(pfd, ublk, j0 / 4, (u->m + 3) / 4, &blk);                          \
            UPCALL                                                                                      \
            unit_store_h(u, j0, nt, &out[0][0], 4);                                                     \
        }                                                                                               \
        int g0, g1;                                                                                     \
        unit_groups(u, &g0, &g1);                                                                       \
        for (int j0 = g0; j0 < g1 && (u->phase & 2); j0 += 4) {                                         \
            int nt = g1 - j0 < 4 ? g1 - j0 : 4;                                                         \
            long blk = ublk; /* (group-major: groups after the first re-read the span's rows from L2) */ \
            const char *pf = u->grp > 0 ? NULL : pf_part(pfn, ublk, (j0 - g0) / 4, (g1 - g0 + 3) / 4, &blk); \
            float *ys[4];                                                                               \
            for (int j = 0; j < 4; j++) {                                                               \
                ys[j] = u->y + (long)u->tok[j0 + (j < nt ? j : 0)] * H;                                 \
                for (int r = 0; r < NR; r++)                                                            \
                    hs[j][r] = j < nt && r < nr ? u->hb[(long)(j0 + j) * u->D + r] : 0.0f;              \
            }                                                                                           \
            DOWNCALL                                                                                    \
        }                                                                                               \
    }
A5_UNIT(unit_avx512_f32, f32, float, 4, 0, A5_SWITCH(a5_up_f32, nt, wu, H, u->xs + j0, out, pf, blk),
        A5_DOWNCALL(f32))
A5_UNIT(unit_avx512_bf16, bf16, uint16_t, 2, 0, A5_SWITCH(a5_up_bf16, nt, wu, H, u->xs + j0, out, pf, blk),
        A5_DOWNCALL(bf16))

LIN_ROWS(lin_avx512_f32, float, 4, 4, A5_SWITCH(a5_up_f32, nt, wu, H, l->xs + j0, out, pf, blk))
LIN_ROWS(lin_avx512_bf16, uint16_t, 2, 4, A5_SWITCH(a5_up_bf16, nt, wu, H, l->xs + j0, out, pf, blk))
#pragma GCC pop_options

/* ------------------------------------------------------------------------- AVX512_BF16 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma")
ALWAYS __m512 a5_bf16b(const uint16_t *p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
ALWAYS __m512 a5_bf16bf(const uint16_t *p) { return a5_bf16f(p); }
/* up with VDPBF16PS: bf16 weights x bf16 x, 32 elements per instruction, fp32 accumulation
   (a product of two bf16 is exact in fp32). Full steps unmasked (as A5_UP's), the tail one masked step
   (masked lanes read as 0). */
#define BF_UP_STEP(NT, FULL, K)                                                                         \
    {                                                                                                   \
        pf_share(pf, pfl, i, pfs);                                                                    \
        __m512i wv[NR], xv[NT];                                                                         \
        for (int r = 0; r < NR; r++)                                                                    \
            wv[r] = FULL ? _mm512_loadu_si512(w[r] + h) : _mm512_maskz_loadu_epi16(K, w[r] + h);        \
        for (int j = 0; j < NT; j++)                                                                    \
            xv[j] = FULL ? _mm512_loadu_si512(xh[j] + h) : _mm512_maskz_loadu_epi16(K, xh[j] + h);      \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int j = 0; j < NT; j++)                                                                \
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)wv[r], (__m512bh)xv[j]);              \
    }
/* An up pass over the rows in steps of 32 elements (STEP: one step's loads and products into acc[r][j]; the
   odd-lane mask for the split form's), full steps unmasked, the tail one masked. */
#define BF_UP_FN(NAME, STEP, NT)                                                                        \
    ALWAYS void NAME##_##NT(const uint16_t *const *w, long H, const uint16_t *const *xh, float out[NR][4], \
                            const char *pf, long blk) {                                                \
        const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);                                       \
        __m512 acc[NR][NT];                                                                             \
        long steps = (H + 31) / 32, i = 0, pfl, pfs = pf_stride(blk, steps, &pfl), h = 0;                \
        (void)odd;                                                                                      \
        for (int r = 0; r < NR; r++) for (int j = 0; j < NT; j++) acc[r][j] = _mm512_setzero_ps();      \
        for (; h + 32 <= H; h += 32, i++) STEP(NT, 1, (__mmask32)0xffffffffu)                           \
        if (h < H) STEP(NT, 0, a5_mask32(H - h))                                                        \
        for (int r = 0; r < NR; r++) for (int j = 0; j < NT; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]); \
    }
#define BF_UP(NT) BF_UP_FN(bf_up, BF_UP_STEP, NT)
BF_UP(1) BF_UP(2) BF_UP(3) BF_UP(4)
/* down with VDPBF16PS on row pairs: rows r and r+1 interleaved in registers (VPUNPCKLWD / VPUNPCKHWD: one
   instruction per 32 columns, no bf16 -> fp32 widening), times the pair (h_r, h_r+1) rounded to bf16 (the
   value a bf16 model's FFN carries between its two projections), fp32 accumulation into y. At 1 token 8
   vector instructions per 4 rows x 32 columns (loads aside) instead of the widening pass's 24, each
   further token 4 instead of 8: on CPUs whose vector units are scarce, fewer per weight byte. The
   unpacks work within 128-bit lanes, so y is kept in a fixed order inside each 32-column block
   (perm_col; the thread's private y only: the final reduction puts it back). Needs H % 32 == 0. */
#define BF_DOWN(NT)                                                                                     \
    ALWAYS void bf_down_##NT(const uint16_t *const *w, long H, float *const *ys, float hs[4][NR],       \
                             const char *pf, long blk) {                                               \
        __m512i hp[NT][2];                                                                              \
        for (int j = 0; j < NT; j++)                                                                    \
            for (int p = 0; p < 2; p++)                                                                 \
                hp[j][p] = _mm512_set1_epi32((int)((uint32_t)to_bf16(hs[j][2 * p]) |                    \
                                                   ((uint32_t)to_bf16(hs[j][2 * p + 1]) << 16)));       \
        long steps = H / 32 > 0 ? H / 32 : 1, pfl, pfs = pf_stride(blk, steps, &pfl);                   \
        for (long c = 0, i = 0; c < H; c += 32, i++) {                                                  \
            pf_share(pf, pfl, i, pfs);                                                                  \
            __m512i a0 = _mm512_loadu_si512(w[0] + c), a1 = _mm512_loadu_si512(w[1] + c);               \
            __m512i a2 = _mm512_loadu_si512(w[2] + c), a3 = _mm512_loadu_si512(w[3] + c);               \
            __m512bh l01 = (__m512bh)_mm512_unpacklo_epi16(a0, a1), h01 = (__m512bh)_mm512_unpackhi_epi16(a0, a1); \
            __m512bh l23 = (__m512bh)_mm512_unpacklo_epi16(a2, a3), h23 = (__m512bh)_mm512_unpackhi_epi16(a2, a3); \
            for (int j = 0; j < NT; j++) {                                                              \
                float *y = ys[j] + c;                                                                   \
                __m512 lo = _mm512_loadu_ps(y), hi = _mm512_loadu_ps(y + 16);                           \
                lo = _mm512_dpbf16_ps(_mm512_dpbf16_ps(lo, l01, (__m512bh)hp[j][0]), l23, (__m512bh)hp[j][1]); \
                hi = _mm512_dpbf16_ps(_mm512_dpbf16_ps(hi, h01, (__m512bh)hp[j][0]), h23, (__m512bh)hp[j][1]); \
                _mm512_storeu_ps(y, lo);                                                                \
                _mm512_storeu_ps(y + 16, hi);                                                           \
            }                                                                                           \
        }                                                                                               \
    }
BF_DOWN(1) BF_DOWN(2) BF_DOWN(3) BF_DOWN(4)
/* The split forms, for tokens sharing an expert (g_split_tokens or more): VDPBF16PS runs at a quarter of the FMA
   rate on some of these CPUs (RESULTS.md 2026-12-04 22:32 UTC), and from 3-4 tokens an expert the units are as much
   compute as memory, which then add up instead of overlapping. A 64-byte line of 32 bf16 widens in two
   instructions to two fp32 vectors, its even elements (VPSLLD 16) and its odd ones (VPANDD), and FMAs take them:
   per 32 weights and token two FMAs at the FMA rate instead of one VDPBF16PS. fp32 sums, products exact (bf16 x
   bf16 fits fp32), a different order than VDPBF16PS's, so the rounding may differ in the last bit.
   Up (bs_up): x split the same way, the row dot summed over even and odd lanes. */
#define BS_UP_STEP(NT, FULL, K)                                                                         \
    {                                                                                                   \
        pf_share(pf, pfl, i, pfs);                                                                      \
        __m512 xe[NT], xo[NT];                                                                          \
        for (int j = 0; j < NT; j++) {                                                                  \
            __m512i v = FULL ? _mm512_loadu_si512(xh[j] + h) : _mm512_maskz_loadu_epi16(K, xh[j] + h);  \
            xe[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                      \
            xo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));                                      \
        }                                                                                               \
        for (int r = 0; r < NR; r++) {                                                                  \
            __m512i v = FULL ? _mm512_loadu_si512(w[r] + h) : _mm512_maskz_loadu_epi16(K, w[r] + h);    \
            __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                  \
            __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, odd));                                  \
            for (int j = 0; j < NT; j++)                                                                \
                acc[r][j] = _mm512_fmadd_ps(wo, xo[j], _mm512_fmadd_ps(we, xe[j], acc[r][j]));          \
        }                                                                                               \
    }
#define BS_UP(NT) BF_UP_FN(bs_up, BS_UP_STEP, NT)
BS_UP(1) BS_UP(2) BS_UP(3) BS_UP(4)
/* Down (bs_down): 4 rows x 32 columns widened once (8 vectors) and FMA'd per token with the rows' h (rounded to
   bf16, as bf_down), the sums of the even columns, then the odd ones, of each 32-column block: y in amx_col
   order (perm 2; the final reduction puts it back). Needs H % 32 == 0. */
#define BS_DOWN(NT)                                                                                     \
    ALWAYS void bs_down_##NT(const uint16_t *const *w, long H, float *const *ys, float hs[4][NR],       \
                             const char *pf, long blk) {                                               \
        const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);                                       \
        __m512 hb[NT][NR];                                                                              \
        for (int j = 0; j < NT; j++)                                                                    \
            for (int r = 0; r < NR; r++) hb[j][r] = _mm512_set1_ps(cv_bf16(to_bf16(hs[j][r])));        \
        long steps = H / 32 > 0 ? H / 32 : 1, pfl, pfs = pf_stride(blk, steps, &pfl);                   \
        for (long c = 0, i = 0; c < H; c += 32, i++) {                                                  \
            pf_share(pf, pfl, i, pfs);                                                                  \
            __m512 we[NR], wo[NR];                                                                      \
            for (int r = 0; r < NR; r++) {                                                              \
                __m512i v = _mm512_loadu_si512(w[r] + c);                                               \
                we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                  \
                wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));                                  \
            }                                                                                           \
            for (int j = 0; j < NT; j++) {                                                              \
                float *y = ys[j] + c;                                                                   \
                __m512 e = _mm512_loadu_ps(y), o = _mm512_loadu_ps(y + 16);                             \
                for (int r = 0; r < NR; r++) {                                                          \
                    e = _mm512_fmadd_ps(we[r], hb[j][r], e);                                            \
                    o = _mm512_fmadd_ps(wo[r], hb[j][r], o);                                            \
                }                                                                                       \
                _mm512_storeu_ps(y, e);                                                                 \
                _mm512_storeu_ps(y + 16, o);                                                            \
            }                                                                                           \
        }                                                                                               \
    }
BS_DOWN(1) BS_DOWN(2) BS_DOWN(3) BS_DOWN(4)
/* Up: the split form for groups of g_split_tokens or more tokens, VDPBF16PS below (fewer instructions a line at 1-2
   tokens, where the units are memory-bound). */
#define BF_UPCALL                                                                                       \
    if (g_split_now && nt >= g_split_now) { A5_SWITCH(bs_up, nt, wu, H, u->xh + j0, out, pf, blk) }             \
    else { A5_SWITCH(bf_up, nt, wu, H, u->xh + j0, out, pf, blk) }
A5_UNIT(unit_avx512bf16_bf16, bf16b, uint16_t, 2, 0, BF_UPCALL,
        if (u->perm == 2) { A5_SWITCH(bs_down, nt, wd, H, ys, hs, pf, blk) }
        else if (u->perm) { A5_SWITCH(bf_down, nt, wd, H, ys, hs, pf, blk) } else { A5_DOWNCALL(bf16b) })
LIN_ROWS(lin_avx512bf16_bf16, uint16_t, 2, 4, A5_SWITCH(bf_up, nt, wu, H, l->xh + j0, out, pf, blk))

/* int8 weights, up pass (and linears) with VPDPBUSD (unsigned x signed bytes, 4 products per int32 lane:
   64 weights per instruction, read straight from the row, no widening). x is rounded to int16 per token
   (xq = round(x / s), s = max|x| / 32767: a step of max|x| / 32767, finer than bf16's own rounding for
   every element above max|x| / 64) and stored offset, xu = xq + 32768 = 256 hi + lo, as two byte planes
   (vb_quantize). Then sum_k w_k xq_k = 256 A + B - 32768 sum_k w_k, with A and B the row's dot products
   with the hi and lo planes and sum_k w_k the row's sum, computed once when the weights are bound (rs).
   Per 64 weight bytes and token: two VPDPBUSD (the VPDPWSSD path this replaces spent two widenings and
   two VPDPWSSD). Exact: a lane adds 4 products of at most 255 * 128 per step, 256 steps per 16384-element
   block (< 2^25), a block's 16 lanes stay < 2^29, and blocks are summed in int64: the dot product is
   the exact integer, rounded once to fp32 and scaled by the token's and the row's scales. Tokens in
   pairs (4 rows x 2 tokens x 2 planes: 16 accumulators); a third and fourth token re-read the rows
   from L1. Tokens whose x is not finite take the fp32 path (NaN/Inf propagate as there). */
ALWAYS __m512 a5_i8v(const int8_t *p, __mmask16 k) { return a5_i8(p, k); }
ALWAYS __m512 a5_i8vf(const int8_t *p) { return a5_i8(p, (__mmask16)0xffff); }
A5_UP(i8v, int8_t, 1) A5_UP(i8v, int8_t, 2) A5_UP(i8v, int8_t, 3) A5_UP(i8v, int8_t, 4)
ALWAYS __mmask64 a5_mask64(long left) { return left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1); }
#define VB_STEP(NT, KM, LOADW, LOADX)                                                                 \
    {                                                                                                   \
        __m512i xh[NT], xl[NT];                                                                         \
        for (int j = 0; j < NT; j++) { xh[j] = LOADX(KM, xq[j0 + j] + h); xl[j] = LOADX(KM, xq[j0 + j] + H + h); } \
        for (int r = 0; r < NR; r++) {                                                                  \
            __m512i wv = LOADW(KM, w[r] + h);                                                           \
            for (int j = 0; j < NT; j++) {                                                              \
                ah[r][j] = _mm512_dpbusd_epi32(ah[r][j], xh[j], wv);                                    \
                al[r][j] = _mm512_dpbusd_epi32(al[r][j], xl[j], wv);                                    \
            }                                                                                           \
        }                                                                                               \
    }
#define VB_FULL(k, p) _mm512_loadu_si512(p)
#define VB_MASK(k, p) _mm512_maskz_loadu_epi8(k, p)
#define VB_UP(NT)                                                                                       \
    ALWAYS void vb_up_##NT(const int8_t *const *w, long H, const uint8_t *const *xq, int64_t tot[NR][4], \
                           int j0, const char *pf, long blk) {                                         \
        long steps = (H + 63) / 64, i = 0, pfl, pfs = pf_stride(blk, steps, &pfl);                       \
        const char *pt = pf ? pf + (long)(g_pf_now - 1) * pfl : NULL;                                   \
        for (long h0 = 0; h0 < H; h0 += 16384) {                                                        \
            long h1 = h0 + 16384 < H ? h0 + 16384 : H, h = h0;                                          \
            __m512i ah[NR][NT], al[NR][NT];                                                             \
            for (int r = 0; r < NR; r++)                                                                \
                for (int j = 0; j < NT; j++) ah[r][j] = al[r][j] = _mm512_setzero_si512();              \
            for (; h + 64 <= h1; h += 64, i++) {                                                        \
                if (pt) pf_lines4(pt, pfl, i * pfs, pfs);                                               \
                VB_STEP(NT, 0, VB_FULL, VB_FULL)                                                        \
            }                                                                                           \
            if (h < h1) {                                                                               \
                __mmask64 k = a5_mask64(h1 - h);                                                        \
                if (pt) pf_lines4(pt, pfl, i * pfs, pfs);                                               \
                i++;                                                                                    \
                VB_STEP(NT, k, VB_MASK, VB_MASK)                                                        \
            }                                                                                           \
            for (int r = 0; r < NR; r++)                                                                \
                for (int j = 0; j < NT; j++)                                                            \
                    tot[r][j0 + j] += 256 * (int64_t)_mm512_reduce_add_epi32(ah[r][j]) +                \
                                      (int64_t)_mm512_reduce_add_epi32(al[r][j]);                       \
        }                                                                                               \
    }
VB_UP(1) VB_UP(2)
/* The up dots of tokens j0..j0+nt-1 with rows w (nr real ones, row sums rs): VPDPBUSD when every token
   has a finite x (then scaled by its xqs), else fp32. */
ALWAYS void vn_dots(const int8_t *const *w, long H, const float *const *xs, const uint8_t *const *xq,
                    const float *xqs, const int32_t *rs, int nr, int nt, float out[NR][4], const char *pf,
                    long blk) {
    int finite = 1;
    for (int j = 0; j < nt; j++) finite &= xqs[j] == xqs[j];
    if (finite) {
        int64_t tot[NR][4] = {{0}};
        for (int j0 = 0; j0 < nt; j0 += 2) {
            if (nt - j0 >= 2) vb_up_2(w, H, xq, tot, j0, j0 ? NULL : pf, blk);
            else vb_up_1(w, H, xq, tot, j0, j0 ? NULL : pf, blk);
        }
        for (int r = 0; r < NR; r++) {
            int64_t corr = r < nr ? 32768 * (int64_t)rs[r] : 0;
            for (int j = 0; j < nt; j++) out[r][j] = (float)(tot[r][j] - corr) * xqs[j];
        }
    } else {
        A5_SWITCH(a5_up_i8v, nt, w, H, xs, out, pf, blk)
    }
}
/* x rows (fp32) -> the VPDPBUSD planes: per token 2H bytes, hi then lo of xq + 32768 (xq = round(x / s),
   round to nearest even as lrintf), and the scale s (NaN when x is not finite: that token uses fp32). */
static void vb_quantize(const float *const *xs, long n, long H, uint8_t *xq, float *xqs) {
    const __m512 big = _mm512_set1_ps(3.4028235e38f), lim = _mm512_set1_ps(32767.0f);
    for (long t = 0; t < n; t++) {
        const float *x = xs[t];
        __m512 m = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (long k = 0; k < H; k += 16) {
            __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(a5_mask(H - k), x + k));
            bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ); /* NaN or Inf */
            m = _mm512_max_ps(m, a);
        }
        float mx = _mm512_reduce_max_ps(m), sc = mx > 0.0f ? mx / 32767.0f : 1.0f;
        xqs[t] = bad ? NAN : sc;
        uint8_t *hi = xq + t * 2 * H, *lo = hi + H;
        const __m512 vs = _mm512_set1_ps(sc);
        const __m512i off = _mm512_set1_epi32(32768), ff = _mm512_set1_epi32(255);
        for (long k = 0; k < H; k += 16) {
            __mmask16 km = a5_mask(H - k);
            __m512 v = bad ? _mm512_setzero_ps() : _mm512_div_ps(_mm512_maskz_loadu_ps(km, x + k), vs);
            v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
            __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);
            _mm_mask_storeu_epi8(hi + k, km, _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
            _mm_mask_storeu_epi8(lo + k, km, _mm512_cvtepi32_epi8(_mm512_and_si512(u, ff)));
        }
    }
}
/* int8 down pass with VPDPWSSD, a span at a time: a thread's run of units of one expert (its W_up rows were
   all read before its W_down rows) shares one h step per token, st = max|h| / 32767 over the span's rows,
   so the span's rows add into exact int32 sums that meet y, the column scales and st once, at the end of
   the span (a lane adds 4 products of at most 128 x 32767 per unit: a span is at most VQ_ROWS rows,
   < 2^31; the scheduler cuts longer runs). Per unit (4 rows x 32 columns): 4 widenings (int8 -> int16, exact) and 4
   VPUNPCK{L,H}WD making row pairs (h_r, h_r+1) per dword lane, shared by the tokens, then per token 4
   VPDPWSSD on its int32 row, instead of converting, scaling and adding into fp32 y after every unit.
   The unpacks work within 128-bit lanes, so the sums are kept in perm_col order and put back at the
   flush. A span where some token's h is not finite takes the widening pass (NaN/Inf propagate as
   there). */
/* One step of vq_down: 4 rows x 32 columns at c (full: no mask; the compiler drops the masks). */
ALWAYS void vq_step(const int8_t *const *w, long c, __mmask32 k, int full, int nt, int32_t *const *acc,
                    const __m512i hp[4][2]) {
    __m512i a[NR];
    for (int r = 0; r < NR; r++)
        a[r] = _mm512_cvtepi8_epi16(full ? _mm256_loadu_si256((const __m256i *)(w[r] + c))
                                         : _mm256_maskz_loadu_epi8(k, w[r] + c));
    __m512i l01 = _mm512_unpacklo_epi16(a[0], a[1]), h01 = _mm512_unpackhi_epi16(a[0], a[1]);
    __m512i l23 = _mm512_unpacklo_epi16(a[2], a[3]), h23 = _mm512_unpackhi_epi16(a[2], a[3]);
    for (int j = 0; j < nt; j++) {
        int32_t *s = acc[j] + c;
        __m512i lo = _mm512_loadu_si512(s), hi = _mm512_loadu_si512(s + 16);
        lo = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(lo, l01, hp[j][0]), l23, hp[j][1]);
        hi = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(hi, h01, hp[j][0]), h23, hp[j][1]);
        _mm512_storeu_si512(s, lo);
        _mm512_storeu_si512(s + 16, hi);
    }
}
#define VQ_DOWN(NT)                                                                                     \
    ALWAYS void vq_down_##NT(const int8_t *const *w, long H, int32_t *const *acc, const float *hv,      \
                             const float *st, int nr, long D, const char *pf, long blk) {              \
        __m512i hp[4][2];                                                                               \
        for (int j = 0; j < NT; j++) {                                                                  \
            int32_t q[NR];                                                                              \
            for (int r = 0; r < NR; r++) q[r] = r < nr ? (int32_t)lrintf(hv[(long)j * D + r] / st[j]) : 0; \
            for (int p = 0; p < 2; p++)                                                                 \
                hp[j][p] = _mm512_set1_epi32((int)(((uint32_t)q[2 * p] & 0xffffu) | ((uint32_t)q[2 * p + 1] << 16))); \
        }                                                                                               \
        const int8_t *wr[NR] = {w[0], w[1], w[2], w[3]};                                                \
        int32_t *ar[4] = {acc[0], acc[1], acc[2], acc[3]};                                              \
        long steps = (H + 31) / 32, pfl, pfs = pf_stride(blk, steps, &pfl);                              \
        /* the prefetch target resolved here: the loop stores int32, which may alias the global */      \
        const char *pt = pf ? pf + (long)(g_pf_now - 1) * pfl : NULL;                                   \
        long c = 0, i = 0;                                                                              \
        for (; c + 32 <= H; c += 32, i++) {                                                             \
            if (pt) pf_lines4(pt, pfl, i * pfs, pfs);                                                   \
            vq_step(wr, c, 0, 1, NT, ar, hp);                                                           \
        }                                                                                               \
        if (c < H) vq_step(wr, c, a5_mask32(H - c), 0, NT, ar, hp);                                     \
    }
VQ_DOWN(1) VQ_DOWN(2) VQ_DOWN(3) VQ_DOWN(4)
/* y_j += sums_j * st_j * column scale, the sums put back into column order (2 VPERMT2D per 32 columns). */
ALWAYS void vq_flush(const unit_t *u) {
    const __m512i ilo = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
    long H = u->H;
    for (int j = 0; j < u->m; j++) {
        const int32_t *s = u->acc + (long)j * u->Hp;
        float *y = u->y + (long)u->tok[j] * H;
        __m512 st = _mm512_set1_ps(u->hq[j]);
        for (long c = 0; c < H; c += 32) {
            __mmask32 k = a5_mask32(H - c);
            __mmask16 kl = (__mmask16)k, kh = (__mmask16)(k >> 16);
            __m512i lo = _mm512_loadu_si512(s + c), hi = _mm512_loadu_si512(s + c + 16);
            __m512 v0 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, ilo, hi));
            __m512 v1 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, ihi, hi));
            __m512 s0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(kl, u->sd + c), st);
            __m512 s1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(kh, u->sd + c + 16), st);
            _mm512_mask_storeu_ps(y + c, kl, _mm512_fmadd_ps(v0, s0, _mm512_maskz_loadu_ps(kl, y + c)));
            _mm512_mask_storeu_ps(y + c + 16, kh, _mm512_fmadd_ps(v1, s1, _mm512_maskz_loadu_ps(kh, y + c + 16)));
        }
    }
}
A5_DOWN(i8v, int8_t, 1, 1) A5_DOWN(i8v, int8_t, 2, 1) A5_DOWN(i8v, int8_t, 3, 1) A5_DOWN(i8v, int8_t, 4, 1)
static void unit_avx512vnni_i8(const unit_t *u) {
    long H = u->H;
    int nr = u->nr;
    const int8_t *wu[NR], *wd[NR];
    const char *pfd;
    long ublk = i8_unit_rows(u, wu, wd, &pfd), blk;
    float out[NR][4], hs[4][NR];
    for (int j0 = 0; j0 < u->m && (u->phase & 1); j0 += 4) {
        int nt = u->m - j0 < 4 ? u->m - j0 : 4;
        const char *pf = pf_part(pfd, ublk, j0 / 4, (u->m + 3) / 4, &blk);
        vn_dots(wu, H, u->xs + j0, u->xq + j0, u->xqs + j0, u->rs, nr, nt, out, pf, blk);
        unit_store_h(u, j0, nt, &out[0][0], 4);
    }
    if (!(u->phase & 2)) return;
    /* grp >= 0 (group-major spans): tokens 4 grp .. 4 grp + 3 only; the span's sums set up by group 0's first
       unit, flushed by the last group's last unit */
    int g0, g1;
    unit_groups(u, &g0, &g1);
    if (u->acc && u->first && g0 == 0) vq_begin(u);
    int sums = u->acc && u->hq[u->m] != 0.0f;
    for (int j0 = g0; j0 < g1; j0 += 4) {
        int nt = g1 - j0 < 4 ? g1 - j0 : 4;
        blk = ublk;
        const char *pf = u->grp > 0 ? NULL : pf_part(pfd, ublk, (j0 - g0) / 4, (g1 - g0 + 3) / 4, &blk);
        if (sums) {
            int32_t *acc[4];
            for (int j = 0; j < 4; j++) acc[j] = u->acc + (long)(j0 + (j < nt ? j : 0)) * u->Hp;
            A5_SWITCH(vq_down, nt, wd, H, acc, u->hb + (long)j0 * u->D, u->hq + j0, nr, u->D, pf, blk)
            continue;
        }
        float *ys[4];
        for (int j = 0; j < 4; j++) {
            ys[j] = u->y + (long)u->tok[j0 + (j < nt ? j : 0)] * H;
            for (int r = 0; r < NR; r++) hs[j][r] = j < nt && r < nr ? u->hb[(long)(j0 + j) * u->D + r] : 0.0f;
        }
        A5_DOWNCALL(i8v)
    }
    if (sums && u->last && g1 == u->m) vq_flush(u);
}
LIN_ROWS(lin_avx512vnni_i8, int8_t, 1, 4,
       vn_dots(wu, H, l->xs + j0, l->xq + j0, l->xqs + j0, l->rs + n, nr, nt, out, pf, blk);)
#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------ AMX */
/* Linears on AMX tiles: a weight block of 16 rows is the A tile as stored (16 rows x 64 bytes at the row
   stride: no repacking of the weights), x the B tile, packed once per call as the tile wants it
   (amx_pack_bf16: pairs of consecutive k per token column; amx_pack_i8: quads of consecutive k of each
   token's two byte planes, vb_quantize). One TDPBF16PS takes 16 rows x 32 k x up to 16 tokens (1 KB of
   weights), one TDPBSUD 16 rows x 64 k x up to 8 tokens' two planes: the dot products that took one vector
   instruction per 64 weight bytes and token take one per KB whatever the tokens, so the tokens of a verify
   chunk or a batch no longer add compute to the weight stream. Arithmetic: bf16 products exact, fp32
   sums (AMX flushes fp32 denormals: a difference below any tolerance here); int8: the same exact integer
   sums as vn_dots (int32 tile lanes: K <= 65536 keeps them below 2^31), so the same results bit for
   bit. Rows past the last multiple of 16 of a thread's range, k past the last multiple of 32 (64) and
   calls with a non-finite x (int8) take the AVX-512 code.
   int8 rows are half as long as bf16's (K bytes: 1792 at the XLarge shape), and the tile loads read cold
   weights slower on short rows (16 row streams restarting every K bytes): XLarge shape, M = 1, cold,
   int8 [1792, 1792] 20.5 GB/s, [896, 3584] 23.6, bf16 [896, 1792] 25.8. So for 1-2 tokens (K a multiple
   of 64) an int8 A tile row is a super row of AMX_I8_RR adjacent weight rows (R x K contiguous bytes, read
   like a bf16 row): the B tile gets R column pairs per token, pair j holding the token's planes against
   the j-th row's k range and zeros elsewhere, so C's pair j sums row j's products only (the same integers,
   bit for bit). Cold, 2 threads, XLarge qkv / o_proj / lm_head: M = 1 +6-8%, M = 2 +3-8%, M = 4 (16
   columns) -6..+2%, hence at most AMX_I8_RR_COLS columns (RESULTS.md, 2026-12-03 08:54 UTC). */
#define AMX_I8_RR 2
#define AMX_I8_RR_COLS 8
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,amx-tile,amx-bf16,amx-int8")
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) amx_cfg_t;
/* tiles 0, 3: C (16 rows x nc 32-bit sums), 1: A (16 weight rows x 64 bytes), 2: B (16 rows x nc 32-bit words of x) */
ALWAYS void amx_config(int nc) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = 16; c.colsb[0] = (uint16_t)(4 * nc);
    c.rows[1] = 16; c.colsb[1] = 64;
    c.rows[2] = 16; c.colsb[2] = (uint16_t)(4 * nc);
    c.rows[3] = 16; c.colsb[3] = (uint16_t)(4 * nc);
    _tile_loadconfig(&c);
}
#define AMX_MAX_K8 65536L /* int8: K up to this keeps every int32 lane of the C tile exact */
/* bf16 x rows -> B tiles: groups of nc tokens (the last one padded with zeros), each [K32 / 2][nc] words
   of 2 consecutive k. */
static void amx_pack_bf16(const uint16_t *const *xh, long M, long K32, int nc, uint32_t *xb) {
    long G = (M + nc - 1) / nc, KP = K32 / 2;
    for (long g = 0; g < G; g++)
        for (int c = 0; c < nc; c++) {
            long t = g * nc + c;
            uint32_t *d = xb + g * KP * nc + c;
            for (long kp = 0; kp < KP; kp++) {
                uint32_t v = 0;
                if (t < M) memcpy(&v, xh[t] + 2 * kp, 4);
                d[kp * nc] = v;
            }
        }
}
/* The int8 paths' x planes (vb_quantize: hi then lo, K bytes each) -> B tiles: groups of nc / (2 R) tokens,
   each [R K64 / 4][nc] words of 4 consecutive k: for token j of the group and its super row's row r (R rows
   per A tile row, R = 1: plain rows), column 2 (j R + r) holds the hi plane and 2 (j R + r) + 1 the lo
   plane in the tile rows of row r's k range [r K64, (r + 1) K64) / 4, zeros elsewhere. */
static void amx_pack_i8(const uint8_t *const *xq, long M, long K, long K64, int nc, long R, uint32_t *xb) {
    long tg = nc / (2 * R), G = (M + tg - 1) / tg, KQ = K64 / 4;
    memset(xb, 0, (size_t)G * R * KQ * nc * 4);
    for (long t = 0; t < M; t++)
        for (long r = 0; r < R; r++)
            for (int pl = 0; pl < 2; pl++) {
                const uint8_t *src = xq[t] + pl * K;
                uint32_t *d = xb + ((t / tg) * R + r) * KQ * nc + 2 * ((t % tg) * R + r) + pl;
                for (long kq = 0; kq < KQ; kq++) memcpy(d + kq * nc, src + 4 * kq, 4);
            }
}

/* No software prefetch on the AMX paths (linears and expert units), unlike the AVX paths: with the
   weight stream prefetched as there, the tile paths read cold weights at 52-73% of the read bandwidth;
   without, at 67-92% (XLarge shapes, 2 threads, 1-16 rows or tokens; RESULTS.md 2026-12-03 06:14 UTC), and
   then they beat the AVX512_BF16 code at every decode size (the AVX paths themselves lose 5-13 points
   without it). The hardware prefetchers follow the tile loads' 16 row streams on their own. */

/* The blocks [n0, nf) of an AMX linear, 16 A tile rows of R weight rows each (R = l->rr: int8 super rows,
   else 1), two blocks at a time: per pair and token group g, C (tiles 0 and 3) = each block's rows . the
   group's packed x over `steps` slabs of 64 bytes of each A tile row (DP), stored into c[16][16] of CT, then
   the epilogue (the variadic arguments; n: the block's first row, w: that row, as char) for each block. Two
   blocks per stop: the epilogue waits for the block's last product, and the weight stream stalls with it
   (int8 cold, XLarge qkv / o_proj: +2-6% at 1-8 rows; bf16 -1..+2%; RESULTS.md, 2026-12-03 08:54 UTC). */
#define AMX_LIN_PASS(DP_, CT_, W_)                                                                      \
    {                                                                                                   \
        _tile_zero(CT_);                                                                                \
        for (long s = 0; s < steps; s++) {                                                              \
            _tile_loadd(1, W_ + 64 * s, ld);                                                            \
            _tile_loadd(2, xb + s * 16 * nc, nc * 4);                                                   \
            DP_(CT_, 1, 2);                                                                             \
        }                                                                                               \
    }
#define AMX_LIN_BLOCKS(ESZ, DP, CT, ...)                                                                \
    {                                                                                                   \
        CT cc[2][16][16];                                                                               \
        long R = l->rr > 1 ? l->rr : 1, ld = R * K * ESZ;                                               \
        amx_config(nc);                                                                                 \
        for (long n_ = n0; n_ < nf; n_ += 32 * R) {                                                     \
            int nb = n_ + 16 * R < nf ? 2 : 1;                                                          \
            const char *w0_ = (const char *)l->w + n_ * K * ESZ, *w1_ = w0_ + 16 * R * K * ESZ;         \
            for (long g = 0; g < G; g++) {                                                              \
                const uint32_t *xb = (const uint32_t *)l->xb + g * gw;                                  \
                AMX_LIN_PASS(DP, 0, w0_)                                                                \
                if (nb == 2) {                                                                          \
                    AMX_LIN_PASS(DP, 3, w1_)                                                            \
                    _tile_stored(3, cc[1], 64);                                                         \
                }                                                                                       \
                _tile_stored(0, cc[0], 64);                                                             \
                for (int b_ = 0; b_ < nb; b_++) {                                                       \
                    long n = n_ + b_ * 16 * R;                                                          \
                    const char *w = b_ ? w1_ : w0_;                                                     \
                    CT(*c)[16] = cc[b_];                                                                \
                    (void)w;                                                                            \
                    __VA_ARGS__                                                                         \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        _tile_release();                                                                                \
    }
static void lin_amx_bf16(const lin_t *l) {
    long K = l->K, K32 = K & ~31L, n0 = l->n0, nf = n0 + ((l->n1 - n0) & ~15L);
    int nc = l->nc;
    if (!l->xb || K32 == 0) nf = n0;
    long G = nc ? (l->m + nc - 1) / nc : 0, gw = (K32 / 2) * nc, steps = K32 / 32;
    if (nf > n0)
        AMX_LIN_BLOCKS(2, _tile_dpbf16ps, float,
            if (K32 == K) { /* a token's 16 sums: a column of C, gathered */
                const __m512i cidx = _mm512_slli_epi32(
                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 4);
                for (int j = 0; j < nc && g * nc + j < l->m; j++)
                    _mm512_storeu_ps(l->out + (g * nc + j) * l->ldo + n,
                                     _mm512_i32gather_ps(_mm512_add_epi32(cidx, _mm512_set1_epi32(j)), &c[0][0], 4));
            } else for (int j = 0; j < nc && g * nc + j < l->m; j++) {
                long t = g * nc + j;
                const float *x = l->xs[t];
                const uint16_t *wr = (const uint16_t *)w;
                for (int r = 0; r < 16; r++) {
                    float v = c[r][j];
                    for (long k = K32; k < K; k++) v += cv_bf16(wr[r * K + k]) * x[k];
                    l->out[t * l->ldo + n + r] = v;
                }
            })
    if (nf < l->n1) {
        lin_t sub = *l;
        sub.n0 = nf;
        lin_avx512bf16_bf16(&sub);
    }
}
/* The int8 AMX linear's outputs of one block and token group, 16 A tile rows (rows n + i R + q) per vector:
   the C columns gathered, 256 a + b - 32768 rs summed in doubles (each step an exact integer below 2^53,
   so the same value as the int64 sum), rounded once to float, times the token's and the rows' scales in
   the scalar order: the same floats. The scalar loop it replaces cost 10% of a cold 1-row call and 43% of
   an 8-row one (16 x 8 iterations per block with the weight stream stalled); gathered: +1-5% at 1-2 rows,
   +11-19% at 4-8 (XLarge qkv / o_proj, cold; RESULTS.md, 2026-12-03 08:54 UTC). Needs K a multiple of 64
   (no tail dots: those keep the scalar loop). */
ALWAYS void amx_i8_out(const lin_t *l, int32_t c[16][16], long n, long g, long tg, long R) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i cidx = _mm512_slli_epi32(lane, 4); /* c[i][0] */
    const __m512d k256 = _mm512_set1_pd(256.0), k32768 = _mm512_set1_pd(32768.0);
    for (long q = 0; q < R; q++) {
        __m512i rows = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)R)), _mm512_set1_epi32((int)q));
        __m512i rsv = _mm512_i32gather_epi32(rows, l->rs + n, 4);
        __m512 scv = _mm512_i32gather_ps(rows, l->scale + n, 4);
        __m512d r0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(rsv)), r1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(rsv, 1));
        for (long j = 0; j < tg && g * tg + j < l->m; j++) {
            long t = g * tg + j;
            int col = (int)(2 * (j * R + q));
            __m512i a = _mm512_i32gather_epi32(_mm512_add_epi32(cidx, _mm512_set1_epi32(col)), &c[0][0], 4);
            __m512i b = _mm512_i32gather_epi32(_mm512_add_epi32(cidx, _mm512_set1_epi32(col + 1)), &c[0][0], 4);
            __m512d t0 = _mm512_fmadd_pd(k256, _mm512_cvtepi32_pd(_mm512_castsi512_si256(a)),
                                         _mm512_cvtepi32_pd(_mm512_castsi512_si256(b)));
            __m512d t1 = _mm512_fmadd_pd(k256, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(a, 1)),
                                         _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(b, 1)));
            t0 = _mm512_fnmadd_pd(k32768, r0, t0);
            t1 = _mm512_fnmadd_pd(k32768, r1, t1);
            __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(t0)), _mm512_cvtpd_ps(t1), 1);
            f = _mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(l->xqs[t])), scv);
            float *o = l->out + t * l->ldo + n;
            if (R == 1) _mm512_storeu_ps(o, f);
            else _mm512_i32scatter_ps(o, rows, f, 4);
        }
    }
}
static void lin_amx_i8(const lin_t *l) {
    long K = l->K, K64 = K & ~63L, R = l->rr, n0 = l->n0, nf = n0 + ((l->n1 - n0) / (16 * R)) * 16 * R;
    int finite = 1, nc = l->nc;
    for (int j = 0; j < l->m; j++) finite &= l->xqs[j] == l->xqs[j];
    if (!l->xb || !finite || K64 == 0 || K > AMX_MAX_K8 || (R > 1 && K64 != K)) nf = n0;
    long tg = nc / (2 * R), G = tg ? (l->m + tg - 1) / tg : 0, gw = R * (K64 / 4) * nc, steps = R * K64 / 64;
    if (nf > n0)
        AMX_LIN_BLOCKS(1, _tile_dpbsud, int32_t,
            if (K64 == K) amx_i8_out(l, c, n, g, tg, R);
            else for (long j = 0; j < tg && g * tg + j < l->m; j++) {
                long t = g * tg + j;
                const uint8_t *xh = l->xq[t], *xl = xh + K;
                for (int i = 0; i < 16; i++)
                    for (long q = 0; q < R; q++) {
                        long r = i * R + q, col = 2 * (j * R + q);
                        const int8_t *wr = (const int8_t *)w + r * K;
                        int64_t a = c[i][col], b = c[i][col + 1];
                        for (long k = K64; k < K; k++) { a += wr[k] * xh[k]; b += wr[k] * xl[k]; }
                        int64_t tot = 256 * a + b - 32768 * (int64_t)l->rs[n + r];
                        l->out[t * l->ldo + n + r] = (float)tot * l->xqs[t] * row_scale(l->scale + n, r);
                    }
            })
    if (nf < l->n1) {
        lin_t sub = *l;
        sub.n0 = nf;
        lin_avx512vnni_i8(&sub);
    }
}
/* bf16 experts on AMX, a unit of up to 16 rows of one expert (steps where the active experts have
   g_amx_min_tokens tokens each on average). Up: the unit's W_up rows as the A tile, the call's tokens
   (packed once) as B, so one TDPBF16PS serves every token of a group of 16: a token that does not use the
   expert costs nothing extra, its column is not read. Down: the unit's W_down rows as they are stored are
   the B tile (16 rows x 32 columns, read as 16 pairs of adjacent columns), and h enters as an A tile of two
   rows per token, h in the even slots of the first row (the even columns' sums) and in the odd slots of
   the second (the odd columns'), zeros elsewhere: C's two rows are the token's 32 columns, even ones then
   odd ones, summed over the span in the thread's span buffer and added once into its y, kept in that
   order (amx_col; put back by the final reduction). int8 experts keep the VNNI units on AMX CPUs: an AMX
   int8 unit (TDPBSUD up pass, VPDPWSSD down pass) measured only 1.05-1.1x on long steps, and its 16-row
   blocking cut the down pass's spans elsewhere, so its h rounding differed from the VNNI path's, which the
   int8 quality figures were measured on (RESULTS.md, 2026-12-02 16:08 UTC). */
/* Up: tiles 0, 1 C (nr x nc sums: even and odd slabs, two chains), 2, 3 A (nr weight rows), 4, 5 B (x). */
ALWAYS void amx_up_config(int nr, int nc) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.rows[t] = (uint8_t)nr; c.colsb[t] = (uint16_t)(4 * nc);
        c.rows[2 + t] = (uint8_t)nr; c.colsb[2 + t] = 64;
        c.rows[4 + t] = 16; c.colsb[4 + t] = (uint16_t)(4 * nc);
    }
    _tile_loadconfig(&c);
}
/* Down (bf16): tile 0 A (h of nt tokens: 2 nt rows of nr pairs), 2, 3 B (nr W_down rows x 32 columns), 6, 7
   C (2 nt rows x 16 sums): even and odd column slabs alternate tiles, so a slab's loads need not wait for
   the previous slab's product. */
ALWAYS void amx_down_config(int nr, int nt) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = (uint8_t)(2 * nt); c.colsb[0] = (uint16_t)(4 * nr);
    for (int t = 0; t < 2; t++) {
        c.rows[2 + t] = (uint8_t)nr; c.colsb[2 + t] = 64;
        c.rows[6 + t] = (uint8_t)(2 * nt); c.colsb[6 + t] = 64;
    }
    _tile_loadconfig(&c);
}
static void amx_release(void) { _tile_release(); }
/* C0 + C1 (tiles 0, 1) = the unit's rows . the tokens of group g, slab by slab (32 k). */
#define AMX_UP_LOOP                                                                                     \
    {                                                                                                   \
        const char *w = (const char *)u->wu;                                                            \
        const uint32_t *xb = u->xb + g * gw;                                                            \
        _tile_zero(0);                                                                                  \
        _tile_zero(1);                                                                                  \
        long s = 0;                                                                                     \
        for (; s + 1 < steps; s += 2) {                                                                 \
            _tile_loadd(2, w + 64 * s, rowb);                                                           \
            _tile_loadd(4, xb + s * 16 * nc, nc * 4);                                                   \
            _tile_dpbf16ps(0, 2, 4);                                                                                \
            _tile_loadd(3, w + 64 * (s + 1), rowb);                                                     \
            _tile_loadd(5, xb + (s + 1) * 16 * nc, nc * 4);                                             \
            _tile_dpbf16ps(1, 3, 5);                                                                                \
        }                                                                                               \
        if (s < steps) {                                                                                \
            _tile_loadd(2, w + 64 * s, rowb);                                                           \
            _tile_loadd(4, xb + s * 16 * nc, nc * 4);                                                   \
            _tile_dpbf16ps(0, 2, 4);                                                                                \
        }                                                                                               \
        _tile_stored(0, c0, 64);                                                                        \
        _tile_stored(1, c1, 64);                                                                        \
    }
/* One column slab of the bf16 down pass on tiles B = BT, C = CT (literal numbers: the intrinsics paste
   them into the instruction): C (the span's sums, or 0 when the span starts here) += A . B, stored back. */
#define AMX_DOWN_SLAB(BT, CT)                                                                           \
    {                                                                                                   \
        float *cs = base + s * 32 * nt;                                                                 \
        _tile_loadd(BT, w + 64 * s, rowb);                                                              \
        if (u->first) _tile_zero(CT);                                                                   \
        else _tile_loadd(CT, cs, 64);                                                                   \
        _tile_dpbf16ps(CT, 0, BT);                                                                      \
        _tile_stored(CT, cs, 64);                                                                       \
    }
static void unit_amx_bf16(const unit_t *u) {
    long H = u->H, rowb = 2 * H, steps = H / 32;
    int nr = u->nr, nc = u->nc, m = u->m;
    if (u->phase & 1) {
        long gw = (H / 2) * nc;
        float c0[16][16], c1[16][16];
        amx_up_config(nr, nc);
        for (int j = 0; j < m;) {
            long g = (u->tok[j] - u->xt0) / nc;
            AMX_UP_LOOP
            for (; j < m && (u->tok[j] - u->xt0) / nc == g; j++) {
                int col = (int)((u->tok[j] - u->xt0) % nc);
                for (int r = 0; r < nr; r++)
                    u->hb[(long)j * u->D + r] = silu((c0[r][col] + c1[r][col]) * row_scale(u->su, r)) * u->sc[j];
            }
        }
    }
    if (u->phase & 2) {
        /* the span's sums: per chunk of up to 8 tokens (at j0 * H), per column slab 2 nt rows x 16 */
        const char *w = (const char *)u->wd;
        uint16_t a[16][32];
        for (int j0 = 0; j0 < m; j0 += 8) {
            int nt = m - j0 < 8 ? m - j0 : 8;
            float *base = u->facc + (long)j0 * H;
            amx_down_config(nr, nt);
            memset(a, 0, sizeof a);
            for (int j = 0; j < nt; j++)
                for (int r = 0; r < nr; r++) {
                    uint16_t v = to_bf16(u->hb[(long)(j0 + j) * u->D + r]);
                    a[2 * j][2 * r] = v;
                    a[2 * j + 1][2 * r + 1] = v;
                }
            _tile_loadd(0, a, 64);
            long s = 0;
            for (; s + 1 < steps; s += 2) {
                AMX_DOWN_SLAB(2, 6)
                s++;
                AMX_DOWN_SLAB(3, 7)
                s--;
            }
            if (s < steps) AMX_DOWN_SLAB(2, 6)
        }
        if (u->last) /* into the thread's y (amx_col order: a token's two rows of a slab are its 32 columns) */
            for (int j = 0; j < m; j++) {
                int q = j / 8, nt = m - 8 * q < 8 ? m - 8 * q : 8;
                const float *src = u->facc + (long)(8 * q) * H + (long)(j % 8) * 32;
                float *y = u->y + (long)u->tok[j] * H;
                for (long s = 0; s < steps; s++) {
                    const float *cs = src + s * 32 * nt;
                    _mm512_storeu_ps(y + 32 * s, _mm512_add_ps(_mm512_loadu_ps(y + 32 * s), _mm512_loadu_ps(cs)));
                    _mm512_storeu_ps(y + 32 * s + 16,
                                     _mm512_add_ps(_mm512_loadu_ps(y + 32 * s + 16), _mm512_loadu_ps(cs + 16)));
                }
            }
    }
}
#pragma GCC pop_options

#endif /* BLOCKFFN_X86 */

/* The VPDPBUSD paths' x planes (vb_quantize); only called where the CPU has them (x86). */
/* x rows -> the integer paths' int16 x (2H bytes per token): byte planes for VPDPBUSD (AVX512_BF16 CPUs,
   which all have VNNI), plain int16 for VPMADDWD (AVX2, AVX-512); the same integers either way. */
static void quantize_planes(int isa, const float *const *xs, long n, long H, uint8_t *xq, float *xqs) {
#if BLOCKFFN_X86
    if (isa >= ISA_AVX512_BF16) vb_quantize(xs, n, H, xq, xqs);
    else a2q_quantize(xs, n, H, (int16_t *)xq, H, xqs);
#else
    (void)isa; (void)xs; (void)n; (void)H; (void)xq; (void)xqs;
#endif
}

/* The function of a family (unit_: the experts, lin_: a linear) for an ISA, weight dtype (0 fp32,
   1 bf16, 2 int8 with row scales) and x dtype. int8 weights on AVX512_BF16 (+ VNNI) CPUs: VPDPBUSD
   up dots on x rounded to int16 (vn_dots), VPDPWSSD down pass on row pairs (vq_down); on plain AVX-512
   and AVX2 the same integers by VPMADDWD (a2q_dots, a2q_down); portable: fp32 FMAs. */
#if BLOCKFFN_X86
#define PICK(FAM)                                                                                       \
    if (isa >= ISA_AVX512_BF16 && wdt == 1 && xdt == 1) return FAM##avx512bf16_bf16;                    \
    if (isa >= ISA_AVX512_BF16 && wdt == 2) return FAM##avx512vnni_i8;                                  \
    if (isa >= ISA_AVX2 && wdt == 2) return FAM##avx2q_i8;                                              \
    if (isa >= ISA_AVX512) return wdt ? FAM##avx512_bf16 : FAM##avx512_f32;                             \
    if (isa >= ISA_AVX2) return wdt ? FAM##avx2_bf16 : FAM##avx2_f32;                                   \
    return wdt == 2 ? FAM##portable_i8 : wdt ? FAM##portable_bf16 : FAM##portable_f32;
#else
#define PICK(FAM)                                                                                       \
    (void)isa; (void)xdt;                                                                               \
    return wdt == 2 ? FAM##portable_i8 : wdt ? FAM##portable_bf16 : FAM##portable_f32;
#endif
static unit_fn pick_unit(int isa, int wdt, int xdt) {
#if BLOCKFFN_X86
    if (isa >= ISA_AMX && wdt == 1 && xdt == 1) return unit_amx_bf16;
#endif
    PICK(unit_)
}
static lin_fn pick_lin(int isa, int wdt, int xdt) {
#if BLOCKFFN_X86
    if (isa >= ISA_AMX && wdt == 1 && xdt == 1) return lin_amx_bf16;
    if (isa >= ISA_AMX && wdt == 2) return lin_amx_i8;
#endif
    PICK(lin_)
}

/* y [M, N] (row stride ldy, dtype of x) = x [M, K] (row stride ldx) W^T, W [N, K] row-major: a
   streaming GEMV for decode-size M (vLLM's linear layers of BlockFFN models on CPUs). Threads
   take contiguous row ranges of equal bytes; every W byte is read once. int8 W (wdt 2): scale fp32 [N]
   and rowsum int32 [N] (each row's sum, vb_up), both NULL for float W. isa, nthreads:
   blockffn_resolve_isa, call_threads. Returns 0, -1 (no memory), -2 (bad arguments) or -3
   ($VLLM_BLOCKFFN_CPU_ISA names no path). */
int blockffn_linear(const void *x, long ldx, int xdt, const void *w, int wdt, long M, long N, long K, void *y,
                    long ldy, int nthreads, int isa, const float *scale, const int32_t *rowsum) {
    pf_set_call(1L << 30); /* a linear: g_prefetch, or 1 block ahead */
    if (M < 0 || N < 0 || K <= 0 || ldx < K || ldy < N || xdt < 0 || xdt > 1 || wdt < 0 || wdt > 2 ||
        (wdt == 2) != (scale != NULL) || (wdt == 2) != (rowsum != NULL))
        return -2;
    if (M == 0 || N == 0) return 0;
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) return -3;
    lin_fn fn = pick_lin(isa, wdt, xdt);
#if BLOCKFFN_X86
    if (M < g_amx_min_rows && fn == lin_amx_bf16) fn = lin_avx512bf16_bf16;
    if (M < g_amx_min_rows && fn == lin_amx_i8) fn = lin_avx512vnni_i8;
#endif
    const float **xs = malloc((size_t)M * sizeof(float *));
    const uint16_t **xh = malloc((size_t)M * sizeof(uint16_t *));
    float *xf = xdt ? malloc((size_t)M * K * sizeof(float)) : NULL;
    float *out = xdt ? malloc((size_t)M * N * sizeof(float)) : NULL;
    void *zrow = calloc((size_t)K + 16, 4);
    if (!xs || !xh || !zrow || (xdt && (!xf || !out))) {
        free(xs); free(xh); free(xf); free(out); free(zrow);
        return -1;
    }
    for (long t = 0; t < M; t++) {
        if (xdt) {
            const uint16_t *src = (const uint16_t *)x + t * ldx;
            widen_bf16(isa, src, xf + t * K, K);
            xs[t] = xf + t * K;
            xh[t] = src;
        } else {
            xs[t] = (const float *)x + t * ldx;
            xh[t] = NULL;
        }
    }
    int vnni = wdt == 2 && isa >= ISA_AVX2; /* int8: the integer paths (x rounded to int16) */
    uint8_t *xq8 = vnni ? malloc((size_t)M * 2 * K) : NULL;
    float *xqs = vnni ? malloc((size_t)M * sizeof(float)) : NULL;
    const uint8_t **xqp = vnni ? malloc((size_t)M * sizeof(uint8_t *)) : NULL;
    if (vnni && (!xq8 || !xqs || !xqp)) {
        free(xs); free(xh); free(xf); free(out); free(zrow); free(xq8); free(xqs); free(xqp);
        return -1;
    }
    if (vnni) {
        quantize_planes(isa, xs, M, K, xq8, xqs);
        for (long t = 0; t < M; t++) xqp[t] = xq8 + t * 2 * K;
    }
    float *o = xdt ? out : (float *)y;
    long ldo = xdt ? N : ldy;
    /* AMX: x packed once for the B tiles; threads take whole 16-row blocks */
    uint32_t *xb = NULL;
    int nc = 0, rb = 4;
    long rr = 1;
#if BLOCKFFN_X86
    if (fn == lin_amx_bf16 && K >= 32) {
        nc = M < 16 ? (int)M : 16;
        xb = malloc((size_t)((M + nc - 1) / nc) * (size_t)(K & ~31L) / 2 * nc * 4 + 64);
        if (xb) amx_pack_bf16(xh, M, K & ~31L, nc, xb);
    } else if (fn == lin_amx_i8 && K >= 64) {
        rr = K % 64 == 0 && 2 * AMX_I8_RR * M <= AMX_I8_RR_COLS ? AMX_I8_RR : 1;
        nc = 2 * M * rr < 16 ? 2 * (int)(M * rr) : 16;
        long tg = nc / (2 * rr);
        xb = malloc((size_t)((M + tg - 1) / tg) * (size_t)rr * (size_t)(K & ~63L) / 4 * nc * 4 + 64);
        if (xb) amx_pack_i8(xqp, M, K, K & ~63L, nc, rr, xb);
    }
    if (xb) {
        rb = 16 * (int)rr;
        __atomic_add_fetch(&g_amx_calls, 1, __ATOMIC_RELAXED);
    }
#endif
    int nth = call_threads(nthreads);
    if ((double)N * K < 32768.0) nth = 1; /* a fork (~2 µs) pays once a share takes longer to read cold */
    long blocks = (N + rb - 1) / rb;
    if (nth > blocks) nth = (int)blocks;
    #pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        lin_t l = {w, K, (blocks * tid / nt) * rb, (blocks * (tid + 1) / nt) * rb, (int)M, xs, xh, o, ldo, zrow, scale,
                   xqp, xqs, rowsum, xb, nc, rr};
        if (l.n1 > N) l.n1 = N;
        if (l.n1 > l.n0) fn(&l);
    }
    if (xdt)
        for (long t = 0; t < M; t++)
            round_bf16(isa, out + t * N, (uint16_t *)y + t * ldy, N);
    free(xs); free(xh); free(xf); free(out); free(zrow); free(xq8); free(xqs); free(xqp); free(xb);
    return 0;
}

/* ---------------------------------------------------------------------- K-major bf16 linears */
/* bf16 weights packed K-major at load (kernels/layout.py pack_kmajor; serving/layers/cpu_linear.py packs them
   on the AVX-512 paths): [N / 16][K / 2][16][2], each 64-byte line the k pair (2q, 2q + 1) of 16 output rows.
   The outer-product form: a line is widened once (even k: a shift, odd k: a mask) and serves every token of
   the pass by broadcast x, 16 outputs per vector: no horizontal sums, no widening per token block. Why: the
   row-dot loops of blockffn_linear are compute-bound at 4-8 rows in bf16 on AVX-512 cores without AMX (8-row
   [5376, 1792] linears at ~123 GFLOP/s where memory speed needs ~263; RESULTS.md 2026-12-04). Every output is
   the sequential fp32 chain over k = 1, 0, 3, 2, ..., K - 1, K - 2 (each pair's odd k first, VDPBF16PS's order)
   on every path: the paths agree bit for bit. bf16 x on AVX512_BF16 CPUs whose VDPBF16PS issues as fast as an
   FMA (AMD Zen 4) take the dot form instead (km_dot below): one VDPBF16PS a line and token where the split form
   spends two FMAs (and the widening); the same chain, so the same bits, except that VDPBF16PS flushes
   subnormal inputs and results to zero (products and partial sums below 1.2e-38).
   Threads take contiguous runs of panels of 2 blocks (4 at <= 4 tokens on AVX-512: four streams of K / 2 lines);
   tokens in passes of KM_TG (AVX2: 4), each pass over a panel that the first left in L2, in sweeps of KM_SB
   tokens; the first pass prefetches KM_PF bytes ahead. */
#ifndef KM_PF
#define KM_PF 2048
#endif
/* KM_PF: bytes ahead in each weight stream of a panel. Cold, [5376, 1792] and [1792, 1792], 1 / 4 / 8 rows, the
   builds interleaved (two runs): 2 KB 1-3% faster than 4 KB at 1-4 rows and level at 8; 1 KB 5-7% slower at 8
   rows; 8-12 KB 1-11% slower; none 35% slower (the scratch probe). */
/* Which K-major streams prefetch KM_PF ahead: those whose streamed lines serve at least km_pf_tokens() tokens (the
   call's rows for a linear, an expert's tokens). On AMD's AVX-512 cores (Zen 4) the hardware prefetchers follow a
   stream alone while the work per line is light, and the software prefetches only occupy the core's miss buffers:
   without them, cold, every expert row of bench_memory_cpu.py was 1.01-1.15x faster (40 rows, 2 runs) and the
   linears at 1-4 rows 1.00-1.18x; with more work per line they are needed: int8 linears at 5-16 rows 1.2-1.7x
   slower without, bf16 in the widening FMA form 1.2-1.4x from 5 rows, bf16 in the dot form level from 6 rows
   (RESULTS.md 2026-12-06 17:10 UTC). So there: int8 and the FMA form from 5 tokens, the dot form from 8. Elsewhere
   (the Xeons: no prefetch was 35% slower; the AVX2 path, unmeasured without) every stream prefetches, as before.
   g_km_pf_tokens: -1 that rule, 0 every stream, n from n tokens (benchmarks compare). */
static int g_km_pf_tokens = -1, g_cpu_amd = -1;
int blockffn_set_kmajor_prefetch(int tokens) {
    int was = g_km_pf_tokens;
    g_km_pf_tokens = tokens < 0 ? -1 : tokens;
    return was;
}
/* Prefetch ahead (the AVX2 forms, where more tokens than one pass holds share a stream): the first token pass over a
   piece of weight (an fp32 chunk of KF_KC k, an int8 span of KQ2_SPAN quads) streams it from memory and prefetches
   KM_PF ahead in it; the later passes read it from L1, and the last of them now prefetches the next piece (fp32: into
   L1, the next chunk; int8 at 4 tokens: into L2, the next span or block), so that memory is not idle while they
   compute. Why: fp32 linears at 8 rows read at 61-66% of the bandwidth cold and at 79-82% with it, 0.78-0.81x the
   time (the scratch probe on the Zen 3 EPYC, [1856 / 3712 / 4096, 1856]; 6 rows 0.82-0.93x; bench_memory_cpu.py
   --ab kmajor_ahead=1,0 --linears-only: 0.74-0.95x at 8 rows; RESULTS.md 2026-12-07 12:45 UTC). The bf16 widening
   form's second pass over a panel, given the next panel into L2, was level (0.99-1.03x at 8 rows, compute-bound
   there): not taken. The same bits either way (prefetches only). g_km_ahead: 1 (default) or 0 (benchmarks compare). */
static int g_km_ahead = 1;
int blockffn_set_kmajor_ahead(int on) {
    int was = g_km_ahead;
    g_km_ahead = on != 0;
    return was;
}
static int cpu_is_amd(void) {
#if BLOCKFFN_X86
    unsigned a, b, c, d;
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u; /* AuthenticAMD */
#else
    return 0;
#endif
}
/* the fewest tokens a line must serve for its stream to prefetch, on path isa; light: bf16 in the dot form (one
   VDPBF16PS a line and token; int8 takes two VPDPBUSD, the FMA form two FMAs and the widening) */
static int km_pf_tokens(int isa, int light) {
    if (g_km_pf_tokens >= 0) return g_km_pf_tokens;
    if (g_cpu_amd < 0) g_cpu_amd = cpu_is_amd();
    return g_cpu_amd && isa >= ISA_AVX512 ? (light ? 8 : 5) : 0;
}
static int km_dot_on(void);
/* the same for int8 weights, or bf16 in the form path isa takes now (-3: $VLLM_BLOCKFFN_CPU_ISA names no path) */
int blockffn_kmajor_prefetch_tokens(int isa, int int8) {
    isa = blockffn_resolve_isa(isa);
    return isa < 0 ? -3 : km_pf_tokens(isa, !int8 && BLOCKFFN_X86 && isa >= ISA_AVX512_BF16 && km_dot_on());
}
#ifndef KM_PF_L2
#define KM_PF_L2 4096
#endif
/* The int8 K-major linears' streams on those AMD cores prefetch into L2 (PREFETCHT1) KM_PF_L2 ahead from 2 rows: their
   lines take two VPDPBUSD a row, and from 4 rows a call ran its reads and its arithmetic nearly one after the other
   ([3712, 1856], 4 rows: 326 us; its bytes at the read bandwidth 238, its VPDPBUSD at their peak 129). Into L1 (T0,
   2 or 4 KB ahead) the prefetches changed nothing there (0.97-1.10x); into L2 a call is 1.1-1.35x faster at 4-16
   rows, 0.92-1.03x the time at 2, level at 1 row (0.98-1.05x), which the hardware prefetchers keep (cold [1856..32000,
   1856], interleaved; RESULTS.md 2026-12-06 20:03 UTC). The int8 experts: km_i8x_pf below. Returns the mode for a
   linear of M rows: 0 none, 1 into L1 KM_PF ahead, 2 into L2 KM_PF_L2 ahead; a set km_pf_tokens (benchmarks,
   $VLLM_BLOCKFFN_CPU_PREFETCH) restores the L1 prefetch from that many rows. */
static int km_i8_linear_pf(int isa, long M) {
    if (!(BLOCKFFN_X86 && isa >= ISA_AVX2)) return 0; /* the fp32 fallback (kq_float), unprefetched */
    if (isa < ISA_AVX512_BF16) return M >= km_pf_tokens(isa, 0) ? 1 : 0; /* VPMADDWD (kq_avx2): as the bf16 streams */
    if (g_km_pf_tokens < 0 && km_pf_tokens(isa, 0) > 0) return M >= 2 ? 2 : 0; /* the AMD rule is in effect */
    return M >= km_pf_tokens(isa, 0) ? 1 : 0;
}
int blockffn_kmajor_i8_linear_prefetch(int isa, long rows) {
    isa = blockffn_resolve_isa(isa);
    return isa < 0 ? -3 : km_i8_linear_pf(isa, rows);
}
#ifndef KX_L2_FROM
#define KX_L2_FROM 3
#endif
/* The int8 packed experts' streams (up and down passes) on those AMD cores: into L2 KM_PF_L2 ahead where the expert
   serves at least KX_L2_FROM tokens, the rule above below that. From 3 (bench_memory_cpu.py --ab int8_experts_l2=0,3,
   two runs, four shapes): 4-token verify chunks 1.04-1.30x faster; decode rows level (0.94-1.07x, the spread of the
   1-token rows, which the switch does not change); every expert stream into L2 was mixed at 1-2 tokens (0.92-1.12x).
   g_i8x_l2: -1 that, 0 never (the rule above alone), n from n tokens (benchmarks compare). Returns the mode as
   km_i8_linear_pf. */
static int g_i8x_l2 = -1;
int blockffn_set_int8_experts_l2(int tokens) {
    int was = g_i8x_l2;
    g_i8x_l2 = tokens < 0 ? -1 : tokens;
    return was;
}
static int km_i8x_pf(int isa, int m) {
    int l1 = km_pf_tokens(isa, 0);
    if (BLOCKFFN_X86 && isa >= ISA_AVX512_BF16) {
        int from = g_i8x_l2 >= 0 ? g_i8x_l2 : g_km_pf_tokens < 0 && l1 > 0 ? KX_L2_FROM : 0;
        if (from > 0 && m >= from) return 2;
    }
    return m >= l1 ? 1 : 0;
}
int blockffn_int8_experts_prefetch(int isa, int tokens) {
    isa = blockffn_resolve_isa(isa);
    return isa < 0 ? -3 : km_i8x_pf(isa, tokens);
}
#define KM_TG 8    /* tokens per pass (AVX-512: 2 x 8 accumulators) */
#ifndef KM_SB
#define KM_SB 128 /* tokens per sweep over the weights: their fp32 x (0.9 MB at K = 1792) stays in L2 while every
                     panel passes over it (with all of a 1024-token prefill's x per panel, read from the LLC, the
                     kernel was 0.94x oneDNN's fp32 GEMM; the weight is read again per sweep, from the LLC) */
#endif
#ifndef KM_PB4
#define KM_PB4 1 /* 4-block panels at <= 4 tokens (0: always 2; KM_PF, KM_SB, KM_PB4 are build knobs for A/B builds) */
#endif

static void km_portable(const uint16_t *w, long K2, int nb, const float *const *x, int nt, float *y, long ldy) {
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 16; r++) {
                const uint16_t *p = w + (long)b * K2 * 32 + 2 * r;
                const float *xt = x[t];
                float acc = 0.0f;
                for (long q = 0; q < K2; q++) {
                    acc = fmaf(cv_bf16(p[q * 32 + 1]), xt[2 * q + 1], acc);
                    acc = fmaf(cv_bf16(p[q * 32]), xt[2 * q], acc);
                }
                y[t * ldy + b * 16 + r] = acc;
            }
}

#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define KM5(NT, NB)                                                                                     \
    static void km5_##NT##_##NB(const uint16_t *w, long K2, const float *const *x, float *y, long ldy,  \
                                int pf) {                                                               \
        const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);                                         \
        __m512 acc[NB][NT];                                                                             \
        for (int b = 0; b < NB; b++) for (int t = 0; t < NT; t++) acc[b][t] = _mm512_setzero_ps();      \
        for (long q = 0; q < K2; q++) {                                                                 \
            __m512 we[NB], wo[NB];                                                                      \
            for (int b = 0; b < NB; b++) {                                                              \
                const uint16_t *p = w + (long)b * K2 * 32 + q * 32;                                     \
                __m512i v = _mm512_loadu_si512(p);                                                      \
                if (pf) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);                             \
                we[b] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                  \
                wo[b] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));                                   \
            }                                                                                           \
            for (int t = 0; t < NT; t++) {                                                              \
                __m512 xe = _mm512_set1_ps(x[t][2 * q]), xo = _mm512_set1_ps(x[t][2 * q + 1]);         \
                for (int b = 0; b < NB; b++) {                                                          \
                    acc[b][t] = _mm512_fmadd_ps(wo[b], xo, acc[b][t]);                                  \
                    acc[b][t] = _mm512_fmadd_ps(we[b], xe, acc[b][t]);                                  \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int b = 0; b < NB; b++) for (int t = 0; t < NT; t++) _mm512_storeu_ps(y + t * ldy + 16 * b, acc[b][t]); \
    }
/* A K-major form's instances (GEN(NT, NB): up to 4 blocks at <= 4 tokens, else 2) and NAME, its dispatcher on nb
   blocks of nt tokens (x of type XT) */
#define KM_FORM(GEN, P, NAME, XT)                                                                       \
    GEN(1, 1) GEN(1, 2) GEN(1, 3) GEN(1, 4) GEN(2, 1) GEN(2, 2) GEN(2, 3) GEN(2, 4) GEN(3, 1) GEN(3, 2) \
    GEN(3, 3) GEN(3, 4) GEN(4, 1) GEN(4, 2) GEN(4, 3) GEN(4, 4) GEN(5, 1) GEN(5, 2) GEN(6, 1) GEN(6, 2) \
    GEN(7, 1) GEN(7, 2) GEN(8, 1) GEN(8, 2)                                                             \
    static void NAME(const uint16_t *w, long K2, int nb, const XT *const *x, int nt, float *y, long ldy, int pf) { \
        switch (nt) {                                                                                   \
        KM_C4(P, 1) KM_C4(P, 2) KM_C4(P, 3) KM_C4(P, 4) KM_C2(P, 5) KM_C2(P, 6) KM_C2(P, 7) KM_C2(P, 8) \
        }                                                                                               \
    }
#define KM_C4(P, NT) case NT: (nb == 4 ? P##_##NT##_4 : nb == 3 ? P##_##NT##_3 : nb == 2 ? P##_##NT##_2 : P##_##NT##_1) \
    (w, K2, x, y, ldy, pf); break;
#define KM_C2(P, NT) case NT: (nb == 2 ? P##_##NT##_2 : P##_##NT##_1)(w, K2, x, y, ldy, pf); break;
KM_FORM(KM5, km5, km_avx512, float)
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
/* The dot form (bf16 x): a line's 16 rows x the token's k pair broadcast as one 32-bit bf16 pair, one VDPBF16PS
   (acc += w[2q + 1] x[2q + 1], then += w[2q] x[2q], each rounded: the split form's chain). No widening of the line
   or of x (x is read as stored, a pointer a token). */
#define KMD(NT, NB)                                                                                     \
    static void kmd_##NT##_##NB(const uint16_t *w, long K2, const uint16_t *const *x, float *y, long ldy, \
                                int pf) {                                                               \
        __m512 acc[NB][NT];                                                                             \
        for (int b = 0; b < NB; b++) for (int t = 0; t < NT; t++) acc[b][t] = _mm512_setzero_ps();      \
        for (long q = 0; q < K2; q++) {                                                                 \
            __m512bh wl[NB];                                                                            \
            for (int b = 0; b < NB; b++) {                                                              \
                const uint16_t *p = w + (long)b * K2 * 32 + q * 32;                                     \
                wl[b] = (__m512bh)_mm512_loadu_si512(p);                                                \
                if (pf) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);                             \
            }                                                                                           \
            for (int t = 0; t < NT; t++) {                                                              \
                int32_t pair;                                                                           \
                memcpy(&pair, x[t] + 2 * q, sizeof pair);                                               \
                __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);                                        \
                for (int b = 0; b < NB; b++) acc[b][t] = _mm512_dpbf16_ps(acc[b][t], wl[b], xp);        \
            }                                                                                           \
        }                                                                                               \
        for (int b = 0; b < NB; b++) for (int t = 0; t < NT; t++) _mm512_storeu_ps(y + t * ldy + 16 * b, acc[b][t]); \
    }
KM_FORM(KMD, kmd, km_dot, uint16_t)
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* AVX2: a line as two 8-row halves, up to 4 tokens a pass (8 of the 16 ymm registers accumulate). */
#define KM2(NT)                                                                                         \
    static void km2_##NT(const uint16_t *w, long K2, const float *const *x, float *y, long ldy, int pf) { \
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);                                         \
        __m256 acc[2][NT];                                                                              \
        for (int h = 0; h < 2; h++) for (int t = 0; t < NT; t++) acc[h][t] = _mm256_setzero_ps();       \
        for (long q = 0; q < K2; q++) {                                                                 \
            __m256 we[2], wo[2];                                                                        \
            if (pf) _mm_prefetch((const char *)(w + q * 32) + KM_PF, _MM_HINT_T0);                      \
            for (int h = 0; h < 2; h++) {                                                               \
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + q * 32 + 16 * h));                 \
                we[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                                  \
                wo[h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));                                  \
            }                                                                                           \
            for (int t = 0; t < NT; t++) {                                                              \
                __m256 xe = _mm256_set1_ps(x[t][2 * q]), xo = _mm256_set1_ps(x[t][2 * q + 1]);         \
                for (int h = 0; h < 2; h++) {                                                           \
                    acc[h][t] = _mm256_fmadd_ps(wo[h], xo, acc[h][t]);                                  \
                    acc[h][t] = _mm256_fmadd_ps(we[h], xe, acc[h][t]);                                  \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int h = 0; h < 2; h++) for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + t * ldy + 8 * h, acc[h][t]); \
    }
KM2(1) KM2(2) KM2(3) KM2(4)
/* One or two tokens, two blocks side by side (two streams). Why: each output is one FMA chain (its order is the
   same bits on every path), 2 FMAs a k pair, so km2_1 keeps 2 chains of 4-cycle FMAs in flight where the core
   retires 2 FMAs a cycle: ~24 GB/s of bf16 a core, below a decode step's share of the memory; two blocks double the
   chains (RESULTS.md 2026-12-07 23:10 UTC). Each output's chain is unchanged: the same bits. A form of its own, not KM2
   with a block count: the tokens' broadcasts are hoisted over both blocks here, which KM2's 4 tokens have no
   registers for; KM2's order at 2 tokens x 2 blocks took 1.6x the time warm (measured, 2 threads). */
#define KM2X2(NT)                                                                                       \
    static void km2x2_##NT(const uint16_t *w, long K2, const float *const *x, float *y, long ldy, int pf) { \
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);                                         \
        __m256 acc[2][2][NT];                                                                           \
        for (int b = 0; b < 2; b++)                                                                     \
            for (int h = 0; h < 2; h++) for (int t = 0; t < NT; t++) acc[b][h][t] = _mm256_setzero_ps(); \
        for (long q = 0; q < K2; q++) {                                                                 \
            __m256 xe[NT], xo[NT];                                                                      \
            for (int t = 0; t < NT; t++) {                                                              \
                xe[t] = _mm256_set1_ps(x[t][2 * q]);                                                    \
                xo[t] = _mm256_set1_ps(x[t][2 * q + 1]);                                                \
            }                                                                                           \
            for (int b = 0; b < 2; b++) {                                                               \
                const uint16_t *p = w + (long)b * K2 * 32 + q * 32;                                     \
                if (pf) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);                             \
                for (int h = 0; h < 2; h++) {                                                           \
                    __m256i v = _mm256_loadu_si256((const __m256i *)(p + 16 * h));                      \
                    __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                          \
                    __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));                           \
                    for (int t = 0; t < NT; t++) {                                                      \
                        acc[b][h][t] = _mm256_fmadd_ps(wo, xo[t], acc[b][h][t]);                        \
                        acc[b][h][t] = _mm256_fmadd_ps(we, xe[t], acc[b][h][t]);                        \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int b = 0; b < 2; b++)                                                                     \
            for (int h = 0; h < 2; h++)                                                                 \
                for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + t * ldy + 16 * b + 8 * h, acc[b][h][t]); \
    }
KM2X2(1) KM2X2(2)
static void km_avx2(const uint16_t *w, long K2, int nb, const float *const *x, int nt, float *y, long ldy, int pf) {
    int b0 = 0;
    if (nt <= 2)
        for (; b0 + 2 <= nb; b0 += 2) {
            if (nt == 1) km2x2_1(w + (long)b0 * K2 * 32, K2, x, y + 16 * b0, ldy, pf);
            else km2x2_2(w + (long)b0 * K2 * 32, K2, x, y + 16 * b0, ldy, pf);
        }
    for (int b = b0; b < nb; b++) {
        const uint16_t *wb = w + (long)b * K2 * 32;
        for (int t0 = 0; t0 < nt; t0 += 4) {
            const float *const *xt = x + t0;
            float *yt = y + t0 * ldy + 16 * b;
            switch (nt - t0 < 4 ? nt - t0 : 4) {
            case 1: km2_1(wb, K2, xt, yt, ldy, pf); break;
            case 2: km2_2(wb, K2, xt, yt, ldy, pf); break;
            case 3: km2_3(wb, K2, xt, yt, ldy, pf); break;
            default: km2_4(wb, K2, xt, yt, ldy, pf); break;
            }
        }
    }
}
#pragma GCC pop_options
#endif

/* out = nb blocks of a K-major bf16 weight at w (K2 k pairs a row) times nt <= KM_TG tokens (rows x[t]: fp32, or
   xh[t]: bf16 for the dot form), in the form of isa and dot: every form sums each output in the same order (the
   odd product of a pair first), so the same bits on every path (but the dot form's flush of subnormals) */
ALWAYS void km_any(int isa, int dot, const uint16_t *w, long K2, int nb, const float *const *x,
                   const uint16_t *const *xh, int nt, float *y, long ldy, int pf) {
#if BLOCKFFN_X86
    if (dot) km_dot(w, K2, nb, xh, nt, y, ldy, pf);
    else if (isa >= ISA_AVX512) km_avx512(w, K2, nb, x, nt, y, ldy, pf);
    else if (isa >= ISA_AVX2) km_avx2(w, K2, nb, x, nt, y, ldy, pf);
    else
#else
    (void)isa; (void)dot; (void)xh; (void)pf;
#endif
        km_portable(w, K2, nb, x, nt, y, ldy);
}
/* Work split with stealing. Items [0, n) start as the static split's T contiguous ranges, each thread taking its own
   from the front, in order (one sequential stream a thread, as before); a thread whose range is empty then takes
   items one at a time from the back of the others' ranges. Why: the static split ends each call when the slower
   thread ends, and on these VMs the two threads' speed differs from call to call (a neighbour, the memory
   controller): in a served int8 decode step on the Zen 3 EPYC the calling thread waited at the K-major linears' join
   for 4.2% of the wall time, 1.6% with stealing (perf), and paired engines ran 1.06x (bf16) and 1.02x (int8) faster
   end to end with it; isolated cold linears, level (RESULTS.md 2026-12-07 19:35 UTC). An item is computed whole by
   the one thread that claims it, so every output has the same bits whatever the split. A range is (front, back) in
   one 64-bit word on a cache line of its own, claimed by compare-and-swap. The packed experts' down pass claims its
   16-column blocks the same way, several at a time (ws_claim). g_ws_steal: bit 0 the K-major linears, bit 1 the
   experts' down pass; 3 (default), 0 the static splits (benchmarks compare). */
typedef struct { _Alignas(64) uint64_t fb; } ws_slot;
#define WS_LINEARS 1
#define WS_EXPERTS 2
static int g_ws_steal = WS_LINEARS | WS_EXPERTS;
int blockffn_set_work_stealing(int mode) {
    int was = g_ws_steal;
    g_ws_steal = mode & (WS_LINEARS | WS_EXPERTS);
    return was;
}
static void ws_init(ws_slot *ws, long n, int T) {
    for (int i = 0; i < T; i++) ws[i].fb = (uint64_t)(n * i / T) | (uint64_t)(n * (i + 1) / T) << 32;
}
/* Thread tid's next claim [*i0, *i1) of the n ranges at ws (T threads in the team); 0 when none is left. From its own
   range's front: one item (half 0), or half of what is left (half 1; the whole range with stealing off, as the static
   split); else, with stealing on (mode: its g_ws_steal bit), from another range's back the same amount. Ranges no
   thread owns (a team smaller than asked for) are taken either way. Half a range a claim (the packed experts' down
   pass: 16-column blocks, each claim streamed expert by expert) keeps the streams long while a slower thread's rest
   can still be shared. */
static int ws_claim(ws_slot *ws, int n, int T, int tid, int mode, int half, long *i0, long *i1) {
    const int steal = g_ws_steal & mode;
    for (int k = 0; k < n; k++) {
        int o = (tid + k) % n;
        if (k && !steal && o < T) continue;
        ws_slot *r = &ws[o];
        uint64_t v = __atomic_load_n(&r->fb, __ATOMIC_RELAXED);
        for (;;) {
            uint32_t f = (uint32_t)v, b = (uint32_t)(v >> 32);
            if (f >= b) break;
            uint32_t c = !half ? 1 : k == 0 && !steal ? b - f : (b - f + 1) / 2;
            uint64_t nv = k == 0 ? (uint64_t)(f + c) | (uint64_t)b << 32 : (uint64_t)f | (uint64_t)(b - c) << 32;
            if (__atomic_compare_exchange_n(&r->fb, &v, nv, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                *i0 = k == 0 ? (long)f : (long)(b - c);
                *i1 = *i0 + c;
                return 1;
            }
        }
    }
    return 0;
}
/* a linear's next panel (× sweep) for thread tid, one at a time; -1 when none is left */
ALWAYS long ws_next(ws_slot *ws, int n, int T, int tid) {
    long i0, i1;
    return ws_claim(ws, n, T, tid, WS_LINEARS, 0, &i0, &i1) ? i0 : -1;
}
/* Panel pi of a K-major weight (panels of pb blocks of 16 rows; blocks in all): its first output row *n0 and its
   blocks. Block b starts at element b * 16 * K (bf16: K / 2 lines of 32 elements; int8: K / 4 lines of 64). */
ALWAYS int km_panel(long pi, int pb, long blocks, long *n0) {
    *n0 = pi * pb * 16;
    return blocks - pi * pb < pb ? (int)(blocks - pi * pb) : pb;
}

/* ------------------------------------------------------------------------ K-major fp32 */
/* fp32 weights packed K-major (layout.pack_kmajor on an fp32 weight: [N / 16][K][16], each 64-byte line one k of 16
   output rows): the outer-product form of the bf16 K-major linears without the widening. Why: vLLM serves fp32 on
   CPUs without AVX-512 (its bf16 GEMM there is torch's fallback), and the row-dot kernel read an fp32 weight as 4
   short row streams with horizontal sums; packed, 1-2 tokens stream 4 blocks side by side (the scratch probe on the
   Zen 3 EPYC, [1856, 1856] / [3712, 1856] / [1792, 4096] fp32, 1 row, cold: 0.75 / 0.90 / 0.81x the row-dot
   kernel's time; one block at a time 0.83-0.96x; RESULTS.md 2026-12-07 09:15 UTC). Every output is one chain of
   FMAs in k order, on every path: the same bits everywhere (the portable form through fmaf). */
static void kf_portable(const float *w, long K, int nb, const float *const *x, int nt, float *y, long ldy) {
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 16; r++) {
                const float *p = w + (long)b * K * 16 + r, *xt = x[t];
                float acc = 0.0f;
                for (long k = 0; k < K; k++) acc = fmaf(p[k * 16], xt[k], acc);
                y[t * ldy + b * 16 + r] = acc;
            }
}

#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KF_KC 128 /* k a chunk of a block when more than 4 tokens share it (kf_avx2) */
/* k in [k0, k1) of NB blocks side by side (NB streams), a line as two 8-row halves, NT tokens: 2 NB NT accumulators
   (at most 8), started from zero (first) or from the sums in y (a later chunk of k: the same chain continued); pf 1:
   prefetch KM_PF ahead, 2: the next chunk's line (KF_KC lines on: g_km_ahead) */
#define KF2(NT, NB)                                                                                     \
    static void kf2_##NT##_##NB(const float *w, long K, long k0, long k1, const float *const *x, float *y, \
                                long ldy, int pf, int first) {                                          \
        __m256 acc[NB][2][NT];                                                                          \
        for (int b = 0; b < NB; b++)                                                                    \
            for (int h = 0; h < 2; h++)                                                                 \
                for (int t = 0; t < NT; t++)                                                            \
                    acc[b][h][t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + t * ldy + 16 * b + 8 * h); \
        for (long k = k0; k < k1; k++) {                                                                \
            __m256 wv[NB][2];                                                                           \
            for (int b = 0; b < NB; b++) {                                                              \
                const float *p = w + (long)b * K * 16 + k * 16;                                         \
                if (pf) _mm_prefetch((const char *)p + (pf == 2 ? KF_KC * 64 : KM_PF), _MM_HINT_T0);    \
                wv[b][0] = _mm256_loadu_ps(p);                                                          \
                wv[b][1] = _mm256_loadu_ps(p + 8);                                                      \
            }                                                                                           \
            for (int t = 0; t < NT; t++) {                                                              \
                __m256 xv = _mm256_set1_ps(x[t][k]);                                                    \
                for (int b = 0; b < NB; b++)                                                            \
                    for (int h = 0; h < 2; h++) acc[b][h][t] = _mm256_fmadd_ps(wv[b][h], xv, acc[b][h][t]); \
            }                                                                                           \
        }                                                                                               \
        for (int b = 0; b < NB; b++)                                                                    \
            for (int h = 0; h < 2; h++)                                                                 \
                for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + t * ldy + 16 * b + 8 * h, acc[b][h][t]); \
    }
KF2(1, 1) KF2(1, 2) KF2(1, 4) KF2(2, 1) KF2(2, 2) KF2(3, 1) KF2(4, 1)
/* k in [k0, k1) of nb blocks for m <= 4 tokens: 1 token 4 blocks at once, 2 tokens 2, more one */
static void kf_pass(const float *w, long K, long k0, long k1, int nb, const float *const *x, int m, float *y, long ldy,
                    int pf, int first) {
    for (int b = 0; b < nb;) {
        const float *wb = w + (long)b * K * 16;
        float *yb = y + 16 * b;
        int left = nb - b, step = m == 1 ? (left >= 4 ? 4 : left >= 2 ? 2 : 1) : m == 2 && left >= 2 ? 2 : 1;
        switch (m * 8 + step) {
        case 12: kf2_1_4(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        case 10: kf2_1_2(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        case 9: kf2_1_1(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        case 18: kf2_2_2(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        case 17: kf2_2_1(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        case 25: kf2_3_1(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        default: kf2_4_1(wb, K, k0, k1, x, yb, ldy, pf, first); break;
        }
        b += step;
    }
}
/* nb blocks for nt tokens: up to 4 tokens in one pass over the blocks; more, block by block in chunks of KF_KC k,
   each chunk (8 KB a block) read from memory by the first 4 tokens' pass and from L1 by the next ones' (passes over
   whole blocks, each block read again from L2, left 8-row linears 1.04-1.12x the row-dot kernel's time, cold), the
   last of which prefetches the next chunk (g_km_ahead) */
static void kf_avx2(const float *w, long K, int nb, const float *const *x, int nt, float *y, long ldy, int pf) {
    if (nt <= 4) {
        kf_pass(w, K, 0, K, nb, x, nt, y, ldy, pf, 1);
        return;
    }
    for (int b = 0; b < nb; b++)
        for (long k0 = 0; k0 < K; k0 += KF_KC)
            for (int t0 = 0; t0 < nt; t0 += 4)
                kf_pass(w + (long)b * K * 16, K, k0, k0 + KF_KC < K ? k0 + KF_KC : K, 1, x + t0,
                        nt - t0 < 4 ? nt - t0 : 4, y + t0 * ldy + 16 * b, ldy,
                        !pf ? 0 : t0 == 0 ? 1 : t0 + 4 >= nt && g_km_ahead ? 2 : 0, k0 == 0);
}
#pragma GCC pop_options
#endif

/* out = nb blocks of a K-major fp32 weight at w times nt tokens (x rows fp32): the AVX2 form on every x86 path
   that has it (no AVX-512 form: unmeasured there, and the AVX2 form is memory-bound at decode sizes), else the
   portable one; the same bits either way */
ALWAYS void kf_any(int isa, const float *w, long K, int nb, const float *const *x, int nt, float *y, long ldy,
                   int pf) {
#if BLOCKFFN_X86
    if (isa >= ISA_AVX2) kf_avx2(w, K, nb, x, nt, y, ldy, pf);
    else
#else
    (void)isa; (void)pf;
#endif
        kf_portable(w, K, nb, x, nt, y, ldy);
}

/* y [M, N] (row stride ldy, dtype of x: 0 fp32, 1 bf16) = x [M, K] W^T for bf16 W packed K-major (above; N a
   multiple of 16, K even), or fp32 W (f32). isa, nthreads: as blockffn_linear. Returns 0, -1 (no memory), -2 (bad
   arguments), -3 ($VLLM_BLOCKFFN_CPU_ISA names no path). */
static int linear_kmajor(const void *x, long ldx, int xdt, const void *wp, int f32, long M, long N, long K, void *y,
                         long ldy, int nthreads, int isa) {
    pf_set_call(1L << 30); /* a linear: g_prefetch, or 1 block ahead */
    if (M < 0 || N < 0 || K <= 0 || N % 16 || (!f32 && K % 2) || ldx < K || ldy < N || xdt < 0 || xdt > 1) return -2;
    if (M == 0 || N == 0) return 0;
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) return -3;
    int dot = !f32 && BLOCKFFN_X86 && xdt == 1 && isa >= ISA_AVX512_BF16 && km_dot_on();
    float *xf = xdt && !dot ? malloc((size_t)M * K * sizeof(float)) : NULL;
    if (xdt && !dot && !xf) return -1;
    const float *xs = xdt ? xf : (const float *)x;
    long ldxf = xdt ? K : ldx;
    int tg = isa >= ISA_AVX2 && !f32 && isa < ISA_AVX512 ? 4 : KM_TG, kpf = g_pf_now && M >= km_pf_tokens(isa, dot);
    /* blocks per panel: 4 streams at once where the tokens leave the registers for them (AVX-512, <= 4 tokens);
       fp32: 4-block panels to 4 rows (kf_avx2 streams them side by side at 1-2 tokens), else one block (kf_avx2 runs
       its 8 tokens a chunk of k at a time; a next pass of 8 reads the block again from L2) */
    int pb = f32 ? (M <= 4 ? 4 : 1) : isa >= ISA_AVX512 && M <= 4 && KM_PB4 ? 4 : 2;
    long K2 = K / 2, blocks = N / 16, panels = (blocks + pb - 1) / pb;
    int nth = call_threads(nthreads);
    if ((double)N * K < 32768.0) nth = 1; /* as blockffn_linear */
    if (nth > panels) nth = (int)panels;
    long items = (M + KM_SB - 1) / KM_SB * panels; /* (sweep of KM_SB tokens, panel), sweep-major */
    ws_slot ws[nth];
    ws_init(ws, items, nth);
    /* bf16 x widened and bf16 y rounded by every thread (a prefill's 1024 x 5376 outputs rounded by one thread
       took ~5 ms of a 70 ms call): x rows split before a barrier, y a token pass at a time from a small buffer */
    #pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num(), T = omp_get_num_threads();
        float yb[KM_TG * 64];
        if (xf) {
            for (long t = M * tid / T; t < M * (tid + 1) / T; t++)
                widen_bf16(isa, (const uint16_t *)x + t * ldx, xf + t * K, K);
            #pragma omp barrier
        }
        for (long it; (it = ws_next(ws, nth, T, tid)) >= 0;) {
            long pi = it % panels, s0 = it / panels * KM_SB;
            long n0, s1 = s0 + KM_SB < M ? s0 + KM_SB : M;
            int nb = km_panel(pi, pb, blocks, &n0);
            const uint16_t *w = (const uint16_t *)wp + n0 * K;
            const float *wf = (const float *)wp + n0 * K;
            for (long t0 = s0; t0 < s1; t0 += tg) {
                int nt = s1 - t0 < tg ? (int)(s1 - t0) : tg, pf = kpf && t0 == 0;
                const float *xt[KM_TG];
                const uint16_t *xh[KM_TG];
                for (int t = 0; t < nt; t++) {
                    xt[t] = xs + (t0 + t) * ldxf;
                    xh[t] = (const uint16_t *)x + (t0 + t) * ldx;
                }
                float *yt = xdt ? yb : (float *)y + t0 * ldy + n0;
                long ldo = xdt ? 64 : ldy;
                if (f32) kf_any(isa, wf, K, nb, xt, nt, yt, ldo, pf);
                else km_any(isa, dot, w, K2, nb, xt, xh, nt, yt, ldo, pf);
                if (xdt)
                    for (int t = 0; t < nt; t++)
                        for (int c = 0; c < 16 * nb; c++)
                            ((uint16_t *)y)[(t0 + t) * ldy + n0 + c] = to_bf16(yb[t * 64 + c]);
            }
        }
    }
    free(xf);
    return 0;
}
int blockffn_linear_kmajor(const void *x, long ldx, int xdt, const uint16_t *wp, long M, long N, long K, void *y,
                           long ldy, int nthreads, int isa) {
    return linear_kmajor(x, ldx, xdt, wp, 0, M, N, K, y, ldy, nthreads, isa);
}
/* The same for fp32 W packed K-major ([N / 16, K, 16]: kf_any's forms; N a multiple of 16, any K). */
int blockffn_linear_kmajor_f32(const void *x, long ldx, int xdt, const float *wp, long M, long N, long K, void *y,
                               long ldy, int nthreads, int isa) {
    return linear_kmajor(x, ldx, xdt, wp, 1, M, N, K, y, ldy, nthreads, isa);
}

/* ------------------------------------------------------------------------ K-major int8 linears */
/* int8 weights packed K-major at load (kernels/layout.py pack_kmajor on an int8 weight; serving/layers/quantization.py
   packs them on the VNNI path): [N / 16][K / 4][16][4], each 64-byte line the k quad (4q .. 4q + 3) of 16 output rows,
   as VPDPBUSD takes it. The outer-product form of the bf16 K-major linears: a line serves every token of the pass by
   broadcast x (the token's 4 bytes of each VPDPBUSD plane, vb_quantize), 16 int32 sums per vector, no horizontal
   sums. The integers are the row-major VNNI path's (vn_dots: 256 A + B - 32768 rowsum, exact for K <= 16384), scaled
   in the same order ((float)dot * x step * row scale): the two layouts agree bit for bit. Why: the row-dot VNNI
   linears read [3584, 1792] int8 at 82% of the read bandwidth at 1 row and 48% at 8 (the bf16 K-major: 91 / 74%;
   RESULTS.md 2026-12-04 22:32 UTC). AVX2 (and AVX-512 without VNNI) takes the same integers by VPMADDWD on x in
   int16 (kq_avx2). Tokens whose x is not finite, and the portable path, take fp32 FMAs over the same lines (as the
   row-major int8 paths' fallback). */
#define KQ_MAXK 16384 /* K at most: every int32 lane of a plane's sums stays exact */
static void kq_float(const int8_t *w, long K4, int nb, const float *const *xr, int nt, float *y, long ldy) {
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 16; r++) {
                const int8_t *p = w + (long)b * K4 * 64 + 4 * r;
                float acc = 0.0f;
                for (long q = 0; q < K4; q++)
                    for (int j = 0; j < 4; j++) acc = fmaf((float)p[q * 64 + j], xr[t][4 * q + j], acc);
                y[t * ldy + b * 16 + r] = acc;
            }
}
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
/* NB blocks x NT tokens: the two planes' int32 sums into hi / lo [NT][64] */
#define KQ5(NT, NB)                                                                                     \
    static void kq5_##NT##_##NB(const int8_t *w, long K4, const uint8_t *const *xq, long K, int32_t *hi,  \
                                int32_t *lo, int pf) {                                                  \
        __m512i ah[NB][NT], al[NB][NT];                                                                 \
        const uint8_t *xp[NT];                                                                          \
        for (int t = 0; t < NT; t++) xp[t] = xq[t];                                                     \
        for (int b = 0; b < NB; b++) for (int t = 0; t < NT; t++) ah[b][t] = al[b][t] = _mm512_setzero_si512(); \
        for (long q = 0; q < K4; q++) {                                                                 \
            __m512i wv[NB];                                                                             \
            for (int b = 0; b < NB; b++) {                                                              \
                const int8_t *p = w + (long)b * K4 * 64 + q * 64;                                       \
                wv[b] = _mm512_loadu_si512(p);                                                          \
                if (pf == 2) _mm_prefetch((const char *)p + KM_PF_L2, _MM_HINT_T1);                     \
                else if (pf) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);                        \
            }                                                                                           \
            for (int t = 0; t < NT; t++) {                                                              \
                int32_t bh, bl;                                                                         \
                memcpy(&bh, xp[t] + 4 * q, 4);                                                          \
                memcpy(&bl, xp[t] + K + 4 * q, 4);                                                      \
                __m512i vh = _mm512_set1_epi32(bh), vl = _mm512_set1_epi32(bl);                         \
                for (int b = 0; b < NB; b++) {                                                          \
                    ah[b][t] = _mm512_dpbusd_epi32(ah[b][t], vh, wv[b]);                                \
                    al[b][t] = _mm512_dpbusd_epi32(al[b][t], vl, wv[b]);                                \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int b = 0; b < NB; b++)                                                                    \
            for (int t = 0; t < NT; t++) {                                                              \
                _mm512_storeu_si512(hi + t * 64 + 16 * b, ah[b][t]);                                    \
                _mm512_storeu_si512(lo + t * 64 + 16 * b, al[b][t]);                                    \
            }                                                                                           \
    }
KQ5(1, 1) KQ5(1, 2) KQ5(1, 3) KQ5(1, 4) KQ5(2, 1) KQ5(2, 2) KQ5(2, 3) KQ5(2, 4)
KQ5(3, 1) KQ5(3, 2) KQ5(4, 1) KQ5(4, 2) KQ5(5, 1) KQ5(6, 1) KQ5(7, 1) KQ5(8, 1)
/* nb blocks (up to 4 at <= 2 tokens, 2 at <= 4, else 1) of nt tokens */
static void kq_avx512(const int8_t *w, long K4, int nb, const uint8_t *const *xq, long K, int nt, int32_t *hi,
                      int32_t *lo, int pf) {
#define KQ_C4(NT) case NT: (nb == 4 ? kq5_##NT##_4 : nb == 3 ? kq5_##NT##_3 : nb == 2 ? kq5_##NT##_2 : kq5_##NT##_1) \
    (w, K4, xq, K, hi, lo, pf); break;
#define KQ_C2(NT) case NT: (nb == 2 ? kq5_##NT##_2 : kq5_##NT##_1)(w, K4, xq, K, hi, lo, pf); break;
#define KQ_C1(NT) case NT: kq5_##NT##_1(w, K4, xq, K, hi, lo, pf); break;
    switch (nt) { KQ_C4(1) KQ_C4(2) KQ_C2(3) KQ_C2(4) KQ_C1(5) KQ_C1(6) KQ_C1(7) KQ_C1(8) }
#undef KQ_C4
#undef KQ_C2
#undef KQ_C1
}
/* y[t][0..16) = ((float)(256 hi + lo - 32768 rowsum) * xqs[t]) * scale, as vn_dots and LIN_ROWS make them */
static void kq_finish(const int32_t *hi, const int32_t *lo, const int32_t *rs, const float *scale, float xqs,
                      float *y) {
    for (int h = 0; h < 2; h++) {
        __m512i a = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(hi + 8 * h)));
        __m512i b = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(lo + 8 * h)));
        __m512i c = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(rs + 8 * h)));
        __m512i tot = _mm512_sub_epi64(_mm512_add_epi64(_mm512_slli_epi64(a, 8), b), _mm512_slli_epi64(c, 15));
        __m256 f = _mm256_mul_ps(_mm512_cvtepi64_ps(tot), _mm256_set1_ps(xqs));
        _mm256_storeu_ps(y + 8 * h, _mm256_mul_ps(f, _mm256_loadu_ps(scale + 8 * h)));
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* AVX2 (and AVX-512 without VNNI): the same integers by VPMADDWD on x rounded to int16 (a2q_quantize, exactly as
   vb_quantize rounds it; stored as int16 where the VNNI paths keep two byte planes of the same size). A line's four
   16-byte quarters (4 rows x the k quad) are widened to int16 once a pass (VPMOVSXBW) and multiplied by the
   token's k quad broadcast (VPMADDWD: 8 int32 sums of (row, k pair)), 2 tokens a pass (4 x 2 accumulators), 3 when
   a group has just 3 (kq2_span). Why: the row-major int8 linears on AVX2 read 53-79% of the bandwidth at 1 row and
   19-40% at 4-8 rows (two tokens a pass over 4 rows, horizontal sums per row; RESULTS.md 2026-12-07), and the 4-row
   units of the int8 experts keep their down-pass sums in memory. A lane adds at most 2 x 128 x 32767 a quad, so
   the int32 sums of KQ2_SPAN quads are exact; spans are folded into int64 (linears, up pass) or, for the down
   pass (D <= KX_MAXD: at most 128 quads and |sum| < 2^31), summed in int32: the exact integers of the VNNI path,
   scaled in its order, so the same bits. */
#define KQ2_SPAN 256
/* pf: 0 none, 1 into L1 KM_PF ahead, 2 into L2 KM_PF_L2 ahead, larger: into L2 that many bytes ahead (kq2_span's
   ahead) */
#define KQ2(NT)                                                                                         \
    static void kq2_##NT(const int8_t *w, long q0, long q1, const int16_t *const *xq, int32_t *s, int pf) { \
        __m256i acc[NT][4];                                                                             \
        for (int t = 0; t < NT; t++) for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_si256();   \
        for (long q = q0; q < q1; q++) {                                                                \
            const int8_t *p = w + q * 64;                                                               \
            if (pf == 1) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);                            \
            else if (pf) _mm_prefetch((const char *)p + (pf == 2 ? KM_PF_L2 : pf), _MM_HINT_T1);        \
            __m256i xb[NT];                                                                             \
            for (int t = 0; t < NT; t++) {                                                              \
                long long v;                                                                            \
                memcpy(&v, xq[t] + 4 * q, sizeof v);                                                    \
                xb[t] = _mm256_set1_epi64x(v);                                                          \
            }                                                                                           \
            for (int i = 0; i < 4; i++) {                                                               \
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * i)));      \
                for (int t = 0; t < NT; t++) acc[t][i] = _mm256_add_epi32(acc[t][i], _mm256_madd_epi16(wv, xb[t])); \
            }                                                                                           \
        }                                                                                               \
        for (int t = 0; t < NT; t++)                                                                    \
            for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(s + t * 32 + 8 * i), acc[t][i]); \
    }
KQ2(1) KQ2(2) KQ2(3)
/* one token, two blocks side by side (two streams: 8 accumulators) */
static void kq2_1x2(const int8_t *w, long K4, long q0, long q1, const int16_t *xq, int32_t *s, int pf) {
    __m256i acc[2][4];
    for (int b = 0; b < 2; b++) for (int i = 0; i < 4; i++) acc[b][i] = _mm256_setzero_si256();
    for (long q = q0; q < q1; q++) {
        long long v;
        memcpy(&v, xq + 4 * q, sizeof v);
        const __m256i xb = _mm256_set1_epi64x(v);
        for (int b = 0; b < 2; b++) {
            const int8_t *p = w + b * K4 * 64 + q * 64;
            if (pf == 2) _mm_prefetch((const char *)p + KM_PF_L2, _MM_HINT_T1);
            else if (pf) _mm_prefetch((const char *)p + KM_PF, _MM_HINT_T0);
            for (int i = 0; i < 4; i++) {
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * i)));
                acc[b][i] = _mm256_add_epi32(acc[b][i], _mm256_madd_epi16(wv, xb));
            }
        }
    }
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i *)(s + b * 32 + 8 * i), acc[b][i]);
}
/* the sums of quads [q0, q1) of one block for nt tokens into s [nt][32] (row r's two k pairs at 2r, 2r + 1), in
   passes of 2 tokens (an odd one last alone), the first pass prefetching (pf). A 3-token pass keeps 12 accumulators,
   3 broadcasts and the widened line in 16 registers and spills: 2-token passes over the span the first left in L1
   took 0.70-0.86x its time at 5-32 rows warm, 0.80-0.92x at 6, 8 and 21 rows cold (level at 5 and 7; the [3712,
   1856] linear, 1-2 threads; RESULTS.md 2026-12-07 23:10 UTC). A group of exactly 3 stays one pass: cold, its
   first pass streams from memory, and 2 + 1 was 1.1x slower there. At 4 tokens the second pass prefetches the
   lines `ahead` bytes on into L2 (0: none; g_km_ahead): linears at 4 rows 0.92-0.96x the time without, cold; at 8
   rows (VPMADDWD-bound) 1.03-1.05x slower, so not there (bench_memory_cpu.py --ab kmajor_ahead=1,0, two runs;
   RESULTS.md 2026-12-07 12:45 UTC) */
static void kq2_span(const int8_t *w, long q0, long q1, const int16_t *const *xq, int nt, int32_t *s, int pf,
                     long ahead) {
    for (int t0 = 0; t0 < nt;) {
        int g = nt == 3 ? 3 : nt - t0 >= 2 ? 2 : 1;
        int p = t0 == 0 ? pf : t0 + g >= nt && nt <= 4 && pf && g_km_ahead && ahead > 2 ? (int)ahead : 0;
        switch (g) {
        case 1: kq2_1(w, q0, q1, xq + t0, s + t0 * 32, p); break;
        case 2: kq2_2(w, q0, q1, xq + t0, s + t0 * 32, p); break;
        default: kq2_3(w, q0, q1, xq + t0, s + t0 * 32, p); break;
        }
        t0 += g;
    }
}
/* span sums s [n][32] (row r's two k pairs at 2r, 2r + 1) added into tot [n][16] in int64 */
ALWAYS void kq2_fold(const int32_t *s, int n, int64_t (*tot)[16]) {
    for (int t = 0; t < n; t++)
        for (int r = 0; r < 16; r++) tot[t][r] += (int64_t)s[t * 32 + 2 * r] + s[t * 32 + 2 * r + 1];
}
/* kq_finish's order for one 16-row block: out[r] = ((float)tot[r] * xqs) * scale[r] */
ALWAYS void kq2_finish(const int64_t *tot, float xqs, const float *scale, float *out) {
    for (int r = 0; r < 16; r++) out[r] = ((float)tot[r] * xqs) * scale[r];
}
/* kq_avx512 + kq_finish on this path: out[t * 64 + 16 b + r] = ((float)dot * xqs[t]) * scale[16 b + r] for nb
   blocks at w (K4 quads a row) and nt <= KM_TG tokens */
static void kq_avx2(const int8_t *w, long K4, int nb, const int16_t *const *xq, int nt, const float *xqs,
                    const float *scale, float *out, int pf) {
    int32_t s[KM_TG * 32];
    int64_t tot[KM_TG][16];
    int b = 0;
    if (nt == 1) /* one token: two blocks side by side, two streams (0.93-0.95x the time of one, [1792..3584, 1792]) */
        for (; b + 2 <= nb; b += 2) {
            memset(tot, 0, 2 * sizeof tot[0]);
            for (long q0 = 0; q0 < K4; q0 += KQ2_SPAN) {
                kq2_1x2(w + (long)b * K4 * 64, K4, q0, q0 + KQ2_SPAN < K4 ? q0 + KQ2_SPAN : K4, xq[0], s, pf);
                kq2_fold(s, 2, tot); /* the two blocks as two rows of tot */
            }
            for (int j = 0; j < 2; j++) kq2_finish(tot[j], xqs[0], scale + 16 * (b + j), out + 16 * (b + j));
        }
    for (; b < nb; b++) {
        memset(tot, 0, (size_t)nt * sizeof tot[0]);
        for (long q0 = 0; q0 < K4; q0 += KQ2_SPAN) {
            long q1 = q0 + KQ2_SPAN < K4 ? q0 + KQ2_SPAN : K4; /* ahead q1 - q0 lines: the next span's line, or */
            kq2_span(w + (long)b * K4 * 64, q0, q1, xq, nt, s, pf, (q1 - q0) * 64); /* (last span) the next block's */
            kq2_fold(s, nt, tot);
        }
        for (int t = 0; t < nt; t++) kq2_finish(tot[t], xqs[t], scale + 16 * b, out + t * 64 + 16 * b);
    }
}
/* kx_down on this path: blocks [0, nblk) at w of one expert, m tokens' int16 h (hq), y += ((float)dot * step) *
   column scale, kxd's order (D <= KX_MAXD: the row sums exact in int32) */
static void kx_down_avx2(const int8_t *w, long K4, long nblk, int m, const int16_t *const *hq, const float *sd,
                         const float *st, float *const *yr, int pf) {
    int32_t s[KM_TG * 32];
    for (long b = 0; b < nblk; b++, w += K4 * 64) {
        const __m256 s0 = _mm256_loadu_ps(sd + 16 * b), s1 = _mm256_loadu_ps(sd + 16 * b + 8);
        for (int j0 = 0; j0 < m; j0 += KM_TG) {
            int nt = m - j0 < KM_TG ? m - j0 : KM_TG;
            kq2_span(w, 0, K4, hq + j0, nt, s, j0 == 0 ? pf : 0, K4 * 64); /* ahead: the next block */
            for (int t = 0; t < nt; t++) {
                const int32_t *v = s + t * 32;
                __m256 stv = _mm256_set1_ps(st[j0 + t]);
                float *y = yr[j0 + t] + 16 * b;
                for (int h = 0; h < 2; h++) { /* rows 8h .. 8h + 7: lanes 16h .. 16h + 15 */
                    __m256i a = _mm256_loadu_si256((const __m256i *)(v + 16 * h));
                    __m256i c = _mm256_loadu_si256((const __m256i *)(v + 16 * h + 8));
                    __m256i rs = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, c), 0xd8);
                    __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(rs), stv), h ? s1 : s0);
                    _mm256_storeu_ps(y + 8 * h, _mm256_add_ps(_mm256_loadu_ps(y + 8 * h), f));
                }
            }
        }
    }
}
#pragma GCC pop_options
#endif

/* y [M, N] (row stride ldy, dtype of x: 0 fp32, 1 bf16) = x [M, K] W^T for int8 W packed K-major (above; N a multiple
   of 16, K a multiple of 4 up to KQ_MAXK) with fp32 row scales [N] and W's row sums [N] (int8_row_sums). isa,
   nthreads: as blockffn_linear. Returns 0, -1 (no memory), -2 (bad arguments), -3 ($VLLM_BLOCKFFN_CPU_ISA names no
   path). */
int blockffn_linear_kmajor_i8(const void *x, long ldx, int xdt, const int8_t *wp, long M, long N, long K, void *y,
                              long ldy, int nthreads, int isa, const float *scale, const int32_t *rowsum) {
    pf_set_call(1L << 30); /* a linear: g_prefetch, or 1 block ahead */
    if (M < 0 || N < 0 || K <= 0 || N % 16 || K % 4 || K > KQ_MAXK || ldx < K || ldy < N || xdt < 0 || xdt > 1 ||
        !scale || !rowsum)
        return -2;
    if (M == 0 || N == 0) return 0;
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) return -3;
    /* the integer paths: VPDPBUSD on x's byte planes (vnni), VPMADDWD on x in int16 (AVX2, AVX-512 without VNNI) */
    int vnni = BLOCKFFN_X86 && isa >= ISA_AVX512_BF16, ints = BLOCKFFN_X86 && isa >= ISA_AVX2;
    float *xf = xdt ? malloc((size_t)M * K * sizeof(float)) : NULL;
    const float **xs = malloc((size_t)M * sizeof(float *));
    uint8_t *xq8 = ints ? malloc((size_t)M * 2 * K) : NULL;
    float *xqs = ints ? malloc((size_t)M * sizeof(float)) : NULL;
    if (!xs || (xdt && !xf) || (ints && (!xq8 || !xqs))) {
        free(xf); free(xs); free(xq8); free(xqs);
        return -1;
    }
    for (long t = 0; t < M; t++) {
        if (xdt)
            widen_bf16(isa, (const uint16_t *)x + t * ldx, xf + t * K, K);
        xs[t] = xdt ? xf + t * K : (const float *)x + t * ldx;
    }
    if (ints) quantize_planes(isa, xs, M, K, xq8, xqs);
    int pb = M <= 2 ? 4 : M <= 4 ? 2 : 1, kpf = g_pf_now ? km_i8_linear_pf(isa, M) : 0; /* pb: blocks per panel */
    if (!ints) pb = 1;
    long K4 = K / 4, blocks = N / 16, panels = (blocks + pb - 1) / pb;
    int nth = call_threads(nthreads);
    if ((double)N * K < 32768.0) nth = 1;
    if (nth > panels) nth = (int)panels;
    long items = (M + KM_SB - 1) / KM_SB * panels; /* (sweep of KM_SB tokens, panel), sweep-major: ws_next */
    ws_slot ws[nth];
    ws_init(ws, items, nth);
    #pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num(), T = omp_get_num_threads();
        float yb[KM_TG * 64];
        int32_t hi[KM_TG * 64], lo[KM_TG * 64];
        const float *xr[KM_TG];
        const uint8_t *qr[KM_TG];
        for (long it; (it = ws_next(ws, nth, T, tid)) >= 0;) {
            long pi = it % panels, s0 = it / panels * KM_SB;
            long n0, s1 = s0 + KM_SB < M ? s0 + KM_SB : M;
            int nb = km_panel(pi, pb, blocks, &n0);
            const int8_t *w = wp + n0 * K;
            for (long t0 = s0; t0 < s1; t0 += KM_TG) {
                int nt = s1 - t0 < KM_TG ? (int)(s1 - t0) : KM_TG, finite = 1;
                for (int t = 0; t < nt; t++) {
                    xr[t] = xs[t0 + t];
                    if (ints) { qr[t] = xq8 + (t0 + t) * 2 * K; finite &= xqs[t0 + t] == xqs[t0 + t]; }
                }
#if BLOCKFFN_X86
                if (vnni && finite) {
                    kq_avx512(w, K4, nb, qr, K, nt, hi, lo, t0 == 0 ? kpf : 0);
                    for (int t = 0; t < nt; t++)
                        for (int b = 0; b < nb; b++)
                            kq_finish(hi + t * 64 + 16 * b, lo + t * 64 + 16 * b, rowsum + n0 + 16 * b,
                                      scale + n0 + 16 * b, xqs[t0 + t], yb + t * 64 + 16 * b);
                } else if (ints && finite) {
                    kq_avx2(w, K4, nb, (const int16_t *const *)qr, nt, xqs + t0, scale + n0, yb, t0 == 0 ? kpf : 0);
                } else
#endif
                {
                    kq_float(w, K4, nb, xr, nt, yb, 64);
                    for (int t = 0; t < nt; t++)
                        for (int c = 0; c < 16 * nb; c++) yb[t * 64 + c] *= scale[n0 + c];
                }
                for (int t = 0; t < nt; t++)
                    for (int c = 0; c < 16 * nb; c++) {
                        long at = (t0 + t) * ldy + n0 + c;
                        if (xdt) ((uint16_t *)y)[at] = to_bf16(yb[t * 64 + c]);
                        else ((float *)y)[at] = yb[t * 64 + c];
                    }
            }
        }
    }
    free(xf); free(xs); free(xq8); free(xqs);
    return 0;
}

/* ------------------------------------------------------------------ int8 experts packed K-major */
/* wdt 3: int8 experts packed at load like the K-major int8 linears (kernels/layout.py pack_experts_kmajor): expert e's
   W_up [D, H] as [D / 16][H / 4][16][4] and its W_down [H, D] (the checkpoint's rows: the outputs) as
   [H / 16][D / 4][16][4]. An expert is then two K-major linears over its tokens, read as the linears are: one
   sequential stream a panel, a line serving every token, 16 sums a vector, no horizontal sums. Why: the 4-row
   row-major units (wdt 2) stream at half the linears' speed per byte in a served int8 step (RESULTS.md 2026-12-06
   00:43 UTC: 23.2% of the samples for ~128 MB against 33.5% for ~345 MB; a scratch probe, one thread, cold, the
   down pass 14-23 GB/s as 4-row units, 25-33 packed K-major).
   Two phases with one barrier between: (1) the 16-row up blocks of every active expert, split across threads by cost
   (bytes plus tokens) and read in panels, h = SiLU(up) * score into hb; (2) every thread rounds each (token,
   expert)'s h to int16 (x's two byte planes, vb_quantize) and runs the down pass on its own output columns: whole
   16-column blocks of y, every active expert's contribution in expert order, one sequential stream an expert
   (kx_down), so no thread-private y and no reduction, and every output is summed in the same order whatever the
   thread count. The up sums are vn_dots' integers, scaled in its order (bit for bit the row-major VNNI units' h);
   the down pass's integers are exact (256 A + B - 32768 rowsum in int32 for D <= KX_MAXD) and meet the step and
   the column scale once per expert, rounding differently from vq_down's per-span
   sums (both within fp32 rounding of the dequantized weights). rs: W_up's row sums [E, D] then W_down's [E, H].
   AVX2 and AVX-512 without VNNI take the same integers by VPMADDWD (kq_avx2, kx_down_avx2: h in int16, not planes).
   Tokens with a non-finite x, (token, expert) pairs with a non-finite h, and the portable path take kq_float over
   the same lines. bf16 experts (weight code 4) take the same two phases with the K-major bf16 linears' forms
   (km_any): h = SiLU(up) * score rounded to bf16 for bf16 x, the down pass block after block into fp32 y. */
typedef struct {
    long U, D, H, T, P;
    int xdt, kqv;
    int bf, isa, dot;               /* float experts: 1 bf16 (weight code 4: the K-major bf16 forms of isa, dot:
                                       VDPBF16PS), 2 fp32 (code 5: kf_any's forms); 0 int8 (code 3) */
    const int *uni, *cnt, *tok;
    const long *off;
    const float *sc, *const *xs, *xqs, *su, *sd;
    const uint8_t *const *xq;
    const uint16_t *const *xh;      /* bf16: the pairs' x rows as stored (bf16 x) */
    const void *wu, *wd;
    const int32_t *rsu, *rsd;
    float *hb, *hqs, *yf;           /* h [P, D]; h's steps [nth][P]; fp32 y [T, H] */
    uint8_t *hq8;                   /* h's int16 planes [nth][P][2 D] (each thread its own) */
    uint16_t *hh;                   /* bf16 experts, bf16 x: h rounded to bf16 [P, D] (hb holds the same values) */
    const float **hrow;             /* the P rows of hb */
    const uint16_t **hhrow;         /* the P rows of hh */
    void *y;
    double up_row_cost;
} kx_t;

#define KX_MAXD 512 /* D at most for packed experts (kx_down's int32 sums) */
#define KX_CHUNK 2048 /* tokens a packed-experts call runs at a time (blockffn_sparse_ffn) */
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
/* The down pass of one expert over nblk consecutive 16-column blocks: block after block, one sequential stream (the
   blocks of a panel read side by side were four 2 KB streams, which the hardware prefetchers hardly follow: the down
   pass took 1.5x the up pass's time for the same bytes, measured). Per block: the tokens' two planes (hq: hi at +0,
   lo at +D) by VPDPBUSD, then y += ((float)(256 hi + lo - 32768 rowsum) * step) * column scale, kq_finish's order
   and value: the sums in int32 are exact for D <= KX_MAXD (|sum w xq| < 2^31; intermediate wraps cancel). */
#define KXD(NT)                                                                                         \
    ALWAYS void kxd_##NT(const int8_t *w, long K4, const uint8_t *const *hq, __m512i c, __m512 s,        \
                         const float *st, float *const *yr, int pf) {                                  \
        __m512i ah[NT], al[NT];                                                                         \
        long D = 4 * K4;                                                                                \
        for (int t = 0; t < NT; t++) ah[t] = al[t] = _mm512_setzero_si512();                            \
        for (long q = 0; q < K4; q++) {                                                                 \
            __m512i wv = _mm512_loadu_si512(w + q * 64);                                                \
            if (pf == 2) _mm_prefetch((const char *)w + q * 64 + KM_PF_L2, _MM_HINT_T1);                \
            else if (pf) _mm_prefetch((const char *)w + q * 64 + KM_PF, _MM_HINT_T0);                   \
            for (int t = 0; t < NT; t++) {                                                              \
                int32_t bh, bl;                                                                         \
                memcpy(&bh, hq[t] + 4 * q, 4);                                                          \
                memcpy(&bl, hq[t] + D + 4 * q, 4);                                                      \
                ah[t] = _mm512_dpbusd_epi32(ah[t], _mm512_set1_epi32(bh), wv);                          \
                al[t] = _mm512_dpbusd_epi32(al[t], _mm512_set1_epi32(bl), wv);                          \
            }                                                                                           \
        }                                                                                               \
        for (int t = 0; t < NT; t++) {                                                                  \
            __m512i tot = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(ah[t], 8), al[t]), c);    \
            __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(tot), _mm512_set1_ps(st[t])), s); \
            _mm512_storeu_ps(yr[t], _mm512_add_ps(_mm512_loadu_ps(yr[t]), f));                          \
        }                                                                                               \
    }
KXD(1) KXD(2) KXD(3) KXD(4)
/* blocks [0, nblk) at w (K4 quads a row; rs, sd, y rows at the first block's column) for m tokens, 4 at a time */
static void kx_down(const int8_t *w, long K4, long nblk, int m, const uint8_t *const *hq, const int32_t *rs,
                    const float *sd, const float *st, float *const *yr, int pf) {
    for (long b = 0; b < nblk; b++, w += K4 * 64) {
        __m512i c = _mm512_slli_epi32(_mm512_loadu_si512(rs + 16 * b), 15);
        __m512 s = _mm512_loadu_ps(sd + 16 * b);
        for (int j0 = 0; j0 < m; j0 += 4) {
            float *y[4] = {NULL, NULL, NULL, NULL};
            for (int t = 0; t < 4 && j0 + t < m; t++) y[t] = yr[j0 + t] + 16 * b;
            switch (m - j0 < 4 ? m - j0 : 4) {
            case 1: kxd_1(w, K4, hq + j0, c, s, st + j0, y, j0 == 0 ? pf : 0); break;
            case 2: kxd_2(w, K4, hq + j0, c, s, st + j0, y, j0 == 0 ? pf : 0); break;
            case 3: kxd_3(w, K4, hq + j0, c, s, st + j0, y, j0 == 0 ? pf : 0); break;
            default: kxd_4(w, K4, hq + j0, c, s, st + j0, y, j0 == 0 ? pf : 0); break;
            }
        }
    }
}
#pragma GCC pop_options
#endif

/* panels of pb 16-row blocks by the tokens of an expert (16 accumulators, as the linears: int8 two planes a
   token, bf16 one) */
ALWAYS int kx_pb(int m, int bf) { return bf ? (m <= 4 ? 4 : 2) : m <= 2 ? 4 : m <= 4 ? 2 : 1; }

/* out[t * 64 + 16 b + r] for the nt tokens (pointers q: VPDPBUSD planes, xr: fp32 rows, steps s) and nb blocks at w
   (K4 quads a row), times the rows' scales; rs / scale: the blocks' first row's entries */
static void kx_panel(const kx_t *k, const int8_t *w, long K4, int nb, const uint8_t *const *q, const float *const *xr,
                     const float *s, int nt, const int32_t *rs, const float *scale, float *out, int pf) {
    int finite = k->kqv;
    for (int t = 0; t < nt && finite; t++) finite = s[t] == s[t];
#if BLOCKFFN_X86
    if (finite && k->isa < ISA_AVX512_BF16) {
        kq_avx2(w, K4, nb, (const int16_t *const *)q, nt, s, scale, out, pf);
        return;
    }
    if (finite) {
        int32_t hi[KM_TG * 64], lo[KM_TG * 64];
        kq_avx512(w, K4, nb, q, 4 * K4, nt, hi, lo, pf);
        for (int t = 0; t < nt; t++)
            for (int b = 0; b < nb; b++)
                kq_finish(hi + t * 64 + 16 * b, lo + t * 64 + 16 * b, rs + 16 * b, scale + 16 * b, s[t],
                          out + t * 64 + 16 * b);
        return;
    }
#else
    (void)q; (void)s; (void)rs; (void)pf;
#endif
    kq_float(w, K4, nb, xr, nt, out, 64);
    for (int t = 0; t < nt; t++)
        for (int c = 0; c < 16 * nb; c++) out[t * 64 + c] *= scale[c];
}

/* Packed experts: the down pass of an expert waits only for that expert's up blocks (a counter per expert, released
   by whichever thread computed them) instead of a barrier after the whole up pass (g_expert_flags 1; 0: the barrier).
   Why: at Small, a quarter of a call was one thread waiting for the other at the barrier (perf, RESULTS.md
   2026-12-06 10:15 UTC); with the counters, a thread that finishes its up share first starts on the experts that are
   ready. The same sums in the same order either way: the same bits. */
static int g_expert_flags = 1;
ALWAYS void wait_up(long *n, long want) {
    while (__atomic_load_n(n, __ATOMIC_ACQUIRE) < want) {
#if BLOCKFFN_X86
        _mm_pause();
#endif
    }
}
int blockffn_set_expert_flags(int on) { int was = g_expert_flags; g_expert_flags = on != 0; return was; }

static void kx_run(const kx_t *k, int nth) {
    const long D = k->D, H = k->H, U = k->U;
    double total = 0.0;
    const size_t wsz = k->bf == 2 ? 4 : k->bf ? 2 : 1;
    for (long u = 0; u < U; u++) total += D * unit_cost(k->up_row_cost, k->cnt[k->uni[u]], wsz);
    const long nbk = H / 16;
    const int flags = g_expert_flags && nth > 1, pf_min = km_pf_tokens(k->isa, k->bf && k->dot); /* streams that prefetch */
    long *done = flags ? calloc((size_t)U + 1, sizeof(long)) : NULL; /* up blocks finished, per union entry */
    ws_slot ws[nth]; /* the down pass's 16-column blocks (ws_claim) */
    ws_init(ws, nbk, nth);
    #pragma omp parallel num_threads(nth)
    {
        int tid = omp_get_thread_num(), T_ = omp_get_num_threads(), mk = tid == 0 ? 0 : tid == T_ - 1 ? 1 : -1;
        if (mk >= 0) MARK(3 + mk);
        float out[KM_TG * 64];
        const uint8_t *q[KM_TG];
        const float *xr[KM_TG];
        const uint16_t *xb[KM_TG];
        float st[KM_TG];
        /* phase 1: the 16-row up blocks whose cost position falls in this thread's share, in expert order (block r of
           expert e at cum_e + r c_e: the same expressions for neighbours, so an exact cover), in panels of pb */
        int last = tid == T_ - 1;
        double lo = tid ? total * tid / T_ : -1.0, hi = last ? 2.0 * total + 1.0 : total * (tid + 1) / T_, cum = 0.0;
        for (long u = 0; u < U && cum < hi; cum += unit_cost(k->up_row_cost, k->cnt[k->uni[u]], wsz) * D, u++) {
            long e = k->uni[u], o = k->off[e], nblk = D / 16;
            int m = k->cnt[e], pb = kx_pb(m, k->bf);
            double c = unit_cost(k->up_row_cost, m, wsz) * 16;
            long r0 = (long)ceil((lo - cum) / c), r1 = last ? nblk : (long)ceil((hi - cum) / c);
            r0 = r0 < 0 ? 0 : r0 > nblk ? nblk : r0;
            r1 = r1 < 0 ? 0 : r1 > nblk ? nblk : r1;
            for (long rb = r0; rb < r1; rb += pb) {
                long d0 = rb * 16;
                int nb = r1 - rb < pb ? (int)(r1 - rb) : pb;
                for (int j0 = 0; j0 < m; j0 += KM_TG) {
                    int nt = m - j0 < KM_TG ? m - j0 : KM_TG;
                    for (int t = 0; t < nt; t++) {
                        q[t] = k->kqv ? k->xq[o + j0 + t] : NULL;
                        xr[t] = k->xs[o + j0 + t];
                        xb[t] = k->xh ? k->xh[o + j0 + t] : NULL;
                        st[t] = k->kqv ? k->xqs[o + j0 + t] : NAN;
                    }
                    if (k->bf == 2)
                        kf_any(k->isa, (const float *)k->wu + (e * D + d0) * H, H, nb, xr, nt, out, 64,
                               j0 == 0 && m >= pf_min);
                    else if (k->bf)
                        km_any(k->isa, k->dot, (const uint16_t *)k->wu + (e * D + d0) * H, H / 2, nb, xr, xb, nt, out,
                               64, j0 == 0 && m >= pf_min);
                    else
                        kx_panel(k, (const int8_t *)k->wu + (e * D + d0) * H, H / 4, nb, q, xr, st, nt,
                                 k->rsu + e * D + d0, k->su + e * D + d0, out, j0 == 0 ? km_i8x_pf(k->isa, m) : 0);
                    for (int t = 0; t < nt; t++) {
                        long p = o + j0 + t;
                        float *h = k->hb + p * D + d0, sct = k->sc[p];
                        for (int r = 0; r < 16 * nb; r++) h[r] = silu(out[t * 64 + r]) * sct;
                        if (k->hh) /* bf16 x: h in the model's dtype, as the reference computes it */
                            for (int r = 0; r < 16 * nb; r++) h[r] = cv_bf16(k->hh[p * D + d0 + r] = to_bf16(h[r]));
                    }
                }
                if (done) __atomic_add_fetch(&done[u], (long)nb, __ATOMIC_RELEASE);
            }
        }
        if (mk >= 0) MARK(5 + mk);
        if (!done) {
            #pragma omp barrier
        }
        /* phase 2: the 16-column blocks of y this thread claims (ws_claim: its own share, half of what is left at a
           time, then the rest of the others'), each claim every active expert in order, each expert once its up
           blocks are done (g_expert_flags; else after the barrier above). Each thread rounds every (token, expert) h
           to int16 itself, as x is (P x D elements, a few us at most: cheaper than a second barrier), expert by
           expert as they become ready, once */
        uint8_t *hq8 = k->kqv ? k->hq8 + tid * k->P * 2 * D : NULL;
        float *hqs = k->kqv ? k->hqs + tid * k->P : NULL;
        if (!done && k->kqv && k->P > 0) quantize_planes(k->isa, k->hrow, k->P, D, hq8, hqs);
        long qdone = 0; /* union entries whose h this thread has rounded (g_expert_flags: expert by expert) */
        for (long g0, g1; ws_claim(ws, nth, T_, tid, WS_EXPERTS, 1, &g0, &g1);) {
            long b0 = g0, b1 = g1, c0 = b0 * 16, c1 = b1 * 16; /* a claim is never empty */
            for (long t = 0; t < k->T; t++) memset(k->yf + t * H + c0, 0, (size_t)(c1 - c0) * sizeof(float));
            for (long u = 0; u < U && k->bf; u++) {
                /* bf16 experts: this thread's 16-column blocks of the expert one after another, one stream (two blocks
                   side by side were 1.3x slower at 1024 tokens, XLarge shape, measured), but on the avx2 path two
                   at a time for 1-2 tokens (km2x2: twice the FMA chains, where one token's chains bound the pass;
                   the AVX-512 forms keep one block, as measured there) */
                long e = k->uni[u], o = k->off[e];
                int m = k->cnt[e];
                const uint16_t *w = (const uint16_t *)k->wd + e * H * D + c0 * D;
                const float *wf = (const float *)k->wd + e * H * D + c0 * D;
                if (done) wait_up(done + u, D / 16);
                for (long cb = b0, nbk; cb < b1; cb += nbk, w += 16 * D * nbk, wf += 16 * D * nbk) {
                    nbk = k->bf == 1 && !k->dot && k->isa == ISA_AVX2 && m <= 2 && cb + 1 < b1 ? 2 : 1;
                    for (int j0 = 0; j0 < m; j0 += KM_TG) {
                        int nt = m - j0 < KM_TG ? m - j0 : KM_TG;
                        /* the pass's y pieces of the next block: scattered rows, no stream to follow */
                        if (cb + nbk < b1)
                            for (int t = 0; t < nt; t++)
                                __builtin_prefetch(k->yf + (long)k->tok[o + j0 + t] * H + (cb + nbk) * 16, 1);
                        if (k->bf == 2)
                            kf_any(k->isa, wf, D, 1, k->hrow + o + j0, nt, out, 64, j0 == 0 && m >= pf_min);
                        else
                            km_any(k->isa, k->dot, w, D / 2, (int)nbk, k->hrow + o + j0,
                                   k->hhrow ? k->hhrow + o + j0 : NULL, nt, out, 64, j0 == 0 && m >= pf_min);
                        for (int t = 0; t < nt; t++) /* (vectorized: the plain loop compiled to scalar adds) */
                            add_into(k->isa, k->yf + (long)k->tok[o + j0 + t] * H + cb * 16, out + t * 64, 16 * nbk);
                    }
                }
            }
            for (long u = 0; u < U && !k->bf; u++) {
                long e = k->uni[u], o = k->off[e];
                int m = k->cnt[e], pb = kx_pb(m, 0), finite = k->kqv;
                if (done && u >= qdone) {
                    wait_up(done + u, D / 16);
                    if (k->kqv) quantize_planes(k->isa, k->hrow + o, m, D, hq8 + o * 2 * D, hqs + o);
                    qdone = u + 1;
                }
                for (int t = 0; t < m && finite; t++) finite = hqs[o + t] == hqs[o + t];
    #if BLOCKFFN_X86
                if (finite) { /* the integer paths, every h finite: one stream over the thread's blocks */
                    const uint8_t *hq[64];
                    float *yr[64], sv[64];
                    for (int j0 = 0; j0 < m; j0 += 64) {
                        int nt = m - j0 < 64 ? m - j0 : 64;
                        for (int t = 0; t < nt; t++) {
                            hq[t] = hq8 + (o + j0 + t) * 2 * D;
                            yr[t] = k->yf + (long)k->tok[o + j0 + t] * H + c0;
                            sv[t] = hqs[o + j0 + t];
                        }
                        if (k->isa >= ISA_AVX512_BF16)
                            kx_down((const int8_t *)k->wd + e * H * D + c0 * D, D / 4, b1 - b0, nt, hq,
                                    k->rsd + e * H + c0, k->sd + e * H + c0, sv, yr, j0 == 0 ? km_i8x_pf(k->isa, m) : 0);
                        else
                            kx_down_avx2((const int8_t *)k->wd + e * H * D + c0 * D, D / 4, b1 - b0, nt,
                                         (const int16_t *const *)hq, k->sd + e * H + c0, sv, yr,
                                         j0 == 0 ? km_i8x_pf(k->isa, m) : 0);
                    }
                    continue;
                }
    #endif
                for (long cb = b0; cb < b1; cb += pb) {
                    int nb = b1 - cb < pb ? (int)(b1 - cb) : pb;
                    const int8_t *w = (const int8_t *)k->wd + e * H * D + cb * 16 * D;
                    for (int j0 = 0; j0 < m; j0 += KM_TG) {
                        int nt = m - j0 < KM_TG ? m - j0 : KM_TG;
                        for (int t = 0; t < nt; t++) {
                            q[t] = k->kqv ? hq8 + (o + j0 + t) * 2 * D : NULL;
                            xr[t] = k->hb + (o + j0 + t) * D;
                            st[t] = k->kqv ? hqs[o + j0 + t] : NAN;
                        }
                        kx_panel(k, w, D / 4, nb, q, xr, st, nt, k->rsd + e * H + cb * 16, k->sd + e * H + cb * 16, out,
                                 j0 == 0 ? km_i8x_pf(k->isa, m) : 0);
                        for (int t = 0; t < nt; t++) /* (vectorized: the plain loop compiled to scalar adds) */
                            add_into(k->isa, k->yf + (long)k->tok[o + j0 + t] * H + cb * 16, out + t * 64, 16 * nb);
                    }
                }
            }
            if (k->xdt) /* bf16 out: the claim's columns rounded once */
                for (long t = 0; t < k->T; t++)
                    for (long c = c0; c < c1; c++) ((uint16_t *)k->y)[t * H + c] = to_bf16(k->yf[t * H + c]);
        }
        if (mk >= 0) MARK(7 + mk);
    }
    free(done);
}

/* ------------------------------------------------------------------------------ counters */
/* The live sparsity counters of one layer and step (vllm_blockffn/observe/stats.py columns:
   tokens, active (token, expert) pairs, non-empty segments, sum of segment union sizes, segment
   tokens), added to stats[0..4] from the scores this kernel scans anyway. Only tokens in
   [cu[0], cu[S]) count (padding does not). P: the active pairs in that range, already counted.
   Reads scores rows in [0, T) only, whatever cu holds. */
static int count_segments(const float *scores, const int32_t *cu, long S, long T, long E, long P,
                          int64_t *stats) {
    long tokens = 0, nseg = 0, unions = 0;
    unsigned char *seen = NULL;
    for (long s = 0; s < S; s++) {
        long a = cu[s] < 0 ? 0 : cu[s], b = cu[s + 1] > T ? T : cu[s + 1];
        if (b <= a) continue;
        tokens += b - a;
        nseg++;
        if (!seen && !(seen = malloc((size_t)E + 1))) return -1;
        memset(seen, 0, (size_t)E);
        for (long t = a; t < b; t++) {
            const float *r = scores + t * E;
            for (long e = 0; e < E; e++) seen[e] |= (unsigned char)is_active(r[e]);
        }
        for (long e = 0; e < E; e++) unions += seen[e];
    }
    free(seen);
    stats[0] += tokens; stats[1] += P; stats[2] += nseg; stats[3] += unions; stats[4] += tokens;
    return 0;
}

/* ------------------------------------------------------------------------ output reduction */
/* The threads' partial outputs summed into y, elements [a, b) of the T x H output: fp32 y (thread 0's own buffer,
   direct) += each other used buffer, or (bf16 x) the used buffers' sum rounded to bf16 and put back in column
   order (perm 1: the paired down pass's perm_col order, 2: the split or AMX down pass's amx_col order, both within 32-column
   blocks, so a and b are multiples of 32 there). Buffers are summed in the order b = 0, 1, ... (the same sums as
   one thread made them a row at a time before). Every thread reduces its own share after the units (the serial
   loop took ~1.4 ns per element with the permuted gathers: 20 us of a 45 us 8-token layer call, RESULTS.md
   2026-12-04 22:32 UTC). */
#define RED_CH 256 /* elements summed at a time (a multiple of 32) */
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
/* to_bf16 on 16 lanes: the same integer steps (round to nearest even, NaN -> its quiet NaN), so the same bits */
ALWAYS __m256i bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v), s = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                   _mm512_and_si512(s, _mm512_set1_epi32(1))), 16);
    __m512i q = _mm512_or_si512(s, _mm512_set1_epi32(0x40));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q));
}
/* dst[c] = to_bf16(ra[tab[c % 32] + c - c % 32]) for n (a multiple of 32) elements */
static void unperm_avx512(const float *ra, uint16_t *dst, long n, const int *tab) {
    __m512i i0 = _mm512_loadu_si512(tab), i1 = _mm512_loadu_si512(tab + 16);
    for (long o = 0; o < n; o += 32) {
        __m512 lo = _mm512_loadu_ps(ra + o), hi = _mm512_loadu_ps(ra + o + 16);
        _mm256_storeu_si256((__m256i *)(dst + o), bf16x16(_mm512_permutex2var_ps(lo, i0, hi)));
        _mm256_storeu_si256((__m256i *)(dst + o + 16), bf16x16(_mm512_permutex2var_ps(lo, i1, hi)));
    }
}
#pragma GCC pop_options
#endif
static void reduce_out(int isa, void *y, int direct, const float *yb, long nbuf, const int *used, long nn, int perm,
                       long a, long b) {
    if (direct) {
        float *yo = (float *)y;
        for (long k = 0; k < nbuf; k++) {
            if (!used[k + 1]) continue;
            add_into(isa, yo + a, yb + k * nn + a, b - a);
        }
        return;
    }
    int tab[32];
    for (int q = 0; q < 32; q++) tab[q] = (int)(perm == 2 ? amx_col(q) : perm_col(q));
    float ra[RED_CH];
    for (long o = a; o < b; o += RED_CH) {
        long n = b - o < RED_CH ? b - o : RED_CH;
        for (long i = 0; i < n; i++) ra[i] = 0.0f;
        for (long k = 0; k < nbuf; k++)
            if (used[k]) add_into(isa, ra, yb + k * nn + o, n);
        uint16_t *dst = (uint16_t *)y + o;
#if BLOCKFFN_X86
        if (perm) { unperm_avx512(ra, dst, n, tab); continue; } /* perm: AVX-512 paths only */
#endif
        if (perm) for (long i = 0; i < n; i++) dst[i] = to_bf16(ra[tab[i & 31] + (i & ~31L)]);
        else round_bf16(isa, ra, dst, n);
    }
}

/* --------------------------------------------------------------------------------- entry */
/* dtype codes: 0 = fp32, 1 = bf16, 2 = int8 (weights only: then up_scale fp32 [E, D] and down_scale
   fp32 [E, H], the per-output-row scales of kernels/quant.py, and up_rowsum int32 [E, D], the sums of
   W_up's int8 rows (vb_up); all NULL for float weights), 3 = int8 experts packed K-major (kx_run: w_up, w_down as
   layout.pack_experts_kmajor packs them, D and H multiples of 16, D <= KX_MAXD; the same scales, and up_rowsum
   then holds W_up's [E, D] row sums followed by W_down's [E, H]), 4 = bf16 experts packed K-major (kx_run with the
   K-major bf16 linears' forms; D and H multiples of 16, no scales), 5 = fp32 experts packed K-major (kx_run with the
   K-major fp32 linears' forms, kf_any; D and H multiples of 16, no scales). x [T, H] (row stride ldx), scores fp32 [T, E]
   contiguous, w_up / w_down_t [E, D, H] contiguous, cu int32 [S+1], y [T, H] contiguous (dtype of x).
   Returns 0 (done), 1 (declined: the dense rule says dense wins; y untouched), -1 (no memory),
   2 (w_up NULL: only the counters were added), -2 (bad arguments), -3 ($VLLM_BLOCKFFN_CPU_ISA names
   no path; isa, nthreads: blockffn_resolve_isa, call_threads). stats: NULL, or int64 [5]
   counters to add to (count_segments), also when the call then declines.
   Dense rule (kernels/dispatch.py): n >= min_dense_tokens and P > max_pair_fraction * n * E,
   with P the active (token, expert) pairs, n the tokens in range; allow_dense = 0 skips it.
   isa: the path to use (clamped to blockffn_cpu_isa()). all_experts: the dense layer (every expert
   for every token in range, inactive pairs weighted by exactly 0): the streaming dense baseline. */
int blockffn_sparse_ffn(const void *x, long ldx, int xdt, const float *scores, const void *w_up,
                        const void *w_down, int wdt, const int32_t *cu, long S, long T, long E,
                        long D, long H, void *y, int nthreads, float up_row_cost, int allow_dense,
                        long min_dense_tokens, float max_pair_fraction, int64_t *stats, int isa,
                        int all_experts, const float *up_scale, const float *down_scale,
                        const int32_t *up_rowsum) {
    if (S < 0 || T < 0 || E < 0 || (w_up && (D <= 0 || H <= 0 || ldx < H)) || xdt < 0 || xdt > 1 ||
        wdt < 0 || wdt > 5 ||
        (w_up && (wdt == 2 || wdt == 3) != (up_scale != NULL && down_scale != NULL && up_rowsum != NULL)) ||
        (w_up && wdt >= 3 && (D % 16 || H % 16)) || (w_up && wdt == 3 && (D > KX_MAXD || H > KQ_MAXK)))
        return -2;
    long t0 = S > 0 ? cu[0] : 0, t1 = S > 0 ? cu[S] : 0;
    if (t0 < 0) t0 = 0;
    if (t1 > T) t1 = T;
    if (t1 < t0) t1 = t0;
    long n = t1 - t0;
    /* the one evaluation of "active": mask[(t - t0) * E + e], counts from the same mask */
    unsigned char *mask = malloc((size_t)n * E + 1);
    int *cnt = calloc((size_t)E + 1, sizeof(int));
    long *off = malloc(((size_t)E + 1) * sizeof(long));
    int *uni = malloc(((size_t)E + 1) * sizeof(int));
    if (!mask || !cnt || !off || !uni) { free(mask); free(cnt); free(off); free(uni); return -1; }
    for (long t = t0; t < t1; t++) {
        const float *s = scores + t * E;
        unsigned char *mk = mask + (t - t0) * E;
        for (long e = 0; e < E; e++) {
            unsigned char a = all_experts ? 1 : (unsigned char)is_active(s[e]);
            mk[e] = a; cnt[e] += a;
        }
    }
    long U = 0, P = 0;
    for (long e = 0; e < E; e++) { off[e] = P; P += cnt[e]; if (cnt[e]) uni[U++] = (int)e; }
    int rc = 0;
    if (stats && all_experts) stats = NULL; /* the dense layer counts nothing */
    if (stats && count_segments(scores, cu, S, T, E, P, stats) != 0) rc = -1;
    else if (!w_up) rc = 2; /* counters only */
    else if (allow_dense && n >= min_dense_tokens && P > (double)max_pair_fraction * n * E) rc = 1;
    if (rc == 0 && (isa = blockffn_resolve_isa(isa)) < 0) rc = -3;
    if (rc != 0) { free(mask); free(cnt); free(off); free(uni); return rc; }
    if (wdt >= 3 && n > KX_CHUNK) {
        /* packed experts, a long step: in chunks of KX_CHUNK tokens (one segment each: a token's output does
           not depend on its segment; the counters and the dense rule were taken over the whole range above), so
           that the step's h, its int16 planes and y stay in the last-level cache (XLarge shape: 302-318 GFLOP/s
           up to 2048 tokens, 149 at 4096 in one piece; RESULTS.md 2026-12-06 03:53 UTC) */
        free(mask); free(cnt); free(off); free(uni);
        size_t xe = xdt ? 2 : 4; /* bytes of an x / y element */
        for (long t = 0; t < T; t++)
            if (t < t0 || t >= t1) memset((char *)y + t * H * xe, 0, (size_t)H * xe);
        for (long a = t0; a < t1 && rc == 0; a += KX_CHUNK) {
            long b = a + KX_CHUNK < t1 ? a + KX_CHUNK : t1;
            int32_t one[2] = {0, (int32_t)(b - a)};
            rc = blockffn_sparse_ffn((const char *)x + a * ldx * xe, ldx, xdt, scores + a * E, w_up, w_down, wdt,
                                     one, 1, b - a, E, D, H, (char *)y + a * H * xe,
                                     nthreads, up_row_cost, 0, min_dense_tokens, max_pair_fraction, NULL, isa,
                                     all_experts, up_scale, down_scale, up_rowsum);
        }
        return rc;
    }

    int kx = wdt >= 3; /* experts packed K-major (kx_run): int8 (3), bf16 (4), fp32 (5) */
    unit_fn unit = kx ? NULL : pick_unit(isa, wdt, xdt);
    int ur = NR; /* rows per unit */
#if BLOCKFFN_X86
    /* AMX units (bf16) from g_amx_min_tokens tokens per active expert (P / U), with whole tile slabs
       along H */
    if (unit == unit_amx_bf16 && (H % 32 || P < (double)g_amx_min_tokens * U)) unit = unit_avx512bf16_bf16;
    if (unit == unit_amx_bf16) {
        ur = 16;
        __atomic_add_fetch(&g_amx_calls, 1, __ATOMIC_RELAXED);
    }
#endif
    long units = (D + ur - 1) / ur;
    int grouped = 0; /* units whose down pass takes one group of 4 tokens at a time (unit_t.grp) */
#if BLOCKFFN_X86
    grouped = g_group_major && (unit == unit_avx512_f32 || unit == unit_avx512_bf16 ||
                                unit == unit_avx512bf16_bf16 || unit == unit_avx512vnni_i8);
#endif
    int nth = call_threads(nthreads);
    if ((double)P * D * H < 65536.0) nth = 1; /* too little work to fork */
    if (nth > U * units) nth = U * units > 0 ? (int)(U * units) : 1;
    size_t wsz = wdt == 2 || wdt == 3 ? 1 : wdt == 1 || wdt == 4 ? 2 : 4;
    pf_set_call((long)ur * H * (long)wsz); /* the prefetch distance for this call's units (g_prefetch) */
    int *tok = malloc(((size_t)P + 1) * sizeof(int));
    float *sc = malloc(((size_t)P + 1) * sizeof(float));
    float *hb = malloc(((size_t)P * D + 1) * sizeof(float));
    const float **xs = malloc(((size_t)P + 1) * sizeof(float *));
    const uint16_t **xh = malloc(((size_t)P + 1) * sizeof(uint16_t *));
    void *zrow = calloc((size_t)H + 16, 4);
    /* bf16 experts, bf16 x, the dot form: x read as stored */
    int kdot = wdt == 4 && BLOCKFFN_X86 && xdt == 1 && isa >= ISA_AVX512_BF16 && km_dot_on();
    int need_xf = xdt != 0 && !kdot, direct = xdt == 0; /* fp32 output: thread 0 accumulates into y */
    float *xf = need_xf ? malloc(((size_t)n * H + 1) * sizeof(float)) : NULL;
    long nbuf = kx ? 0 : direct ? nth - 1 : nth; /* thread-private y (kx_run: none) */
    float *yb = nbuf > 0 ? malloc(((size_t)nbuf * T * H + 1) * sizeof(float)) : NULL;
    int *used = calloc((size_t)nth + 1, sizeof(int));
    /* int8: the integer paths (x rounded to int16: VPDPBUSD planes or VPMADDWD int16, quantize_planes) */
    int vnni = kx ? wdt == 3 && BLOCKFFN_X86 && isa >= ISA_AVX2 : wdt == 2 && isa >= ISA_AVX2;
    /* the paired bf16 down pass: thread-private y only (bf16 x: never direct), whole 32-column blocks */
    int perm = 0;
    uint32_t *xb = NULL; /* AMX: the call's tokens packed for the B tiles */
    float *faccb = NULL; /* the AMX bf16 down pass's span sums, per thread (T + 8) x Hp */
    const void **xr = NULL;
    int nc = 0;
#if BLOCKFFN_X86
    /* the bf16 down pass on thread-private y: row pairs (perm 1) while the experts have few tokens each, the
       split form (perm 2) from g_split_now tokens an active expert on average (P / U) */
    if (unit == unit_avx512bf16_bf16) g_split_now = g_split_tokens >= 0 ? g_split_tokens : dp_fast() ? 0 : 3;
    if (g_pairdown && unit == unit_avx512bf16_bf16 && H % 32 == 0 && !direct)
        perm = g_split_now && P >= (long)g_split_now * U ? 2 : 1;
    if (unit == unit_amx_bf16) {
        perm = 2; /* bf16 x: never direct */
        nc = n < 16 ? (int)n : 16;
        faccb = malloc(((size_t)nth * (T + 8) * ((H + 31) & ~31L) + 1) * sizeof(float));
        xb = malloc((size_t)((n + nc - 1) / nc + 1) * (size_t)H * nc * 2 + 64);
        xr = malloc(((size_t)n + 1) * sizeof(void *));
    }
#endif
    /* the int8 down pass in int32 sums per span (vq_down): per thread [T][Hp] sums and T + 1 steps */
    int vq = vnni && g_pairdown && !kx;
    long Hp = (H + 31) & ~31L;
    int32_t *accb = vq ? malloc(((size_t)nth * T * Hp + 1) * sizeof(int32_t)) : NULL;
    float *hqb = vq ? malloc(((size_t)nth * (T + 1) + 1) * sizeof(float)) : NULL;
    uint8_t *xq8 = vnni ? malloc((size_t)n * 2 * H + 1) : NULL;
    float *xqs = vnni ? malloc(((size_t)n + 1) * sizeof(float)) : NULL;
    const float **xrow = vnni ? malloc(((size_t)n + 1) * sizeof(float *)) : NULL;
    const uint8_t **xqp = vnni ? malloc(((size_t)P + 1) * sizeof(uint8_t *)) : NULL;
    float *xqsp = vnni ? malloc(((size_t)P + 1) * sizeof(float)) : NULL;
    float *kyf = kx && !direct ? malloc(((size_t)T * H + 1) * sizeof(float)) : NULL; /* kx_run's fp32 y (bf16 out) */
    uint8_t *khq = kx && vnni ? malloc((size_t)nth * P * 2 * D + 1) : NULL; /* h's planes, per thread */
    float *khs = kx && vnni ? malloc(((size_t)nth * P + 1) * sizeof(float)) : NULL;
    const float **khr = kx ? malloc(((size_t)P + 1) * sizeof(float *)) : NULL;
    uint16_t *khh = wdt == 4 && xdt ? malloc(((size_t)P * D + 1) * sizeof(uint16_t)) : NULL; /* bf16 h (bf16 x) */
    const uint16_t **khhr = khh ? malloc(((size_t)P + 1) * sizeof(uint16_t *)) : NULL;
    int ok = tok && sc && hb && xs && xh && zrow && used && (!need_xf || xf) && (nbuf == 0 || yb) &&
             (!kx || ((direct || kyf) && khr && (!vnni || (khq && khs)) && (wdt != 4 || !xdt || (khh && khhr)))) &&
             (!vnni || (xq8 && xqs && xrow && xqp && xqsp)) && (!vq || (accb && hqb)) && (!nc || (xb && xr && faccb));
    if (ok) {
        for (long t = t0; t < t1; t++) { /* fill: the same mask, so exactly cnt[e] entries each */
            const float *s = scores + t * E;
            const unsigned char *mk = mask + (t - t0) * E;
            for (long e = 0; e < E; e++)
                if (mk[e]) { tok[off[e]] = (int)t; sc[off[e]] = is_active(s[e]) ? s[e] : 0.0f; off[e]++; }
        }
        for (long e = 0; e < E; e++) off[e] -= cnt[e];
        if (need_xf)
            for (long t = t0; t < t1; t++) {
                const uint16_t *src = (const uint16_t *)x + t * ldx;
                float *dst = xf + (t - t0) * H;
                widen_bf16(isa, src, dst, H);
            }
        for (long p = 0; p < P; p++) {
            xs[p] = need_xf ? xf + (tok[p] - t0) * H : xdt ? NULL : (const float *)x + tok[p] * ldx;
            xh[p] = xdt ? (const uint16_t *)x + tok[p] * ldx : NULL;
        }
        if (vnni) { /* int8 weights, integer paths: each token's x rounded to int16 once (quantize_planes) */
            for (long t = t0; t < t1; t++) xrow[t - t0] = need_xf ? xf + (t - t0) * H : (const float *)x + t * ldx;
            quantize_planes(isa, xrow, n, H, xq8, xqs);
            for (long p = 0; p < P; p++) { xqp[p] = xq8 + (tok[p] - t0) * 2 * H; xqsp[p] = xqs[tok[p] - t0]; }
        }
        if (kx) {
            for (long p = 0; p < P; p++) khr[p] = hb + p * D;
            for (long p = 0; p < P && khhr; p++) khhr[p] = khh + p * D;
            kx_t k = {.U = U, .D = D, .H = H, .T = T, .P = P, .xdt = xdt, .kqv = vnni, .bf = wdt - 3, .isa = isa,
                      .dot = kdot, .uni = uni, .cnt = cnt, .tok = tok, .off = off, .sc = sc, .xs = xs, .xqs = xqsp,
                      .su = up_scale, .sd = down_scale, .xq = xqp, .xh = wdt == 4 && xdt ? xh : NULL, .wu = w_up,
                      .wd = w_down, .rsu = up_rowsum, .rsd = up_rowsum ? up_rowsum + E * D : NULL, .hb = hb,
                      .hqs = khs, .yf = direct ? (float *)y : kyf, .hq8 = khq, .hh = khh, .hrow = khr,
                      .hhrow = khhr, .y = y, .up_row_cost = up_row_cost};
            MARK(2);
            kx_run(&k, nth);
            MARK(9);
            goto done;
        }
#if BLOCKFFN_X86
        if (unit == unit_amx_bf16) {
            for (long t = t0; t < t1; t++) xr[t - t0] = (const uint16_t *)x + t * ldx;
            amx_pack_bf16((const uint16_t *const *)xr, n, H, nc, xb);
        }
#endif
        /* cost of one unit of expert e: its row reads plus its tokens' dots, no less than its rows' read (unit_cost) */
        double total = 0.0;
        for (long u = 0; u < U; u++) total += units * unit_cost(up_row_cost, cnt[uni[u]], wsz);
        /* one chunk of equal cost per thread, assigned statically: the summation order, hence
           the rounding, depends only on the thread count */
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
                unit_t cur, nxt;
                int have = 0;
                for (long u = 0; u < U && cum < hi; u++) {
                    long e = uni[u];
                    int m = cnt[e];
                    double c = unit_cost(up_row_cost, m, wsz), ce = c * units;
                    if (cum + ce > lo) {
                        long k0 = (long)ceil((lo - cum) / c), k1 = (long)ceil((hi - cum) / c);
                        k0 = k0 < 0 ? 0 : k0 > units ? units : k0;
                        k1 = k1 < 0 ? 0 : k1 > units ? units : k1;
                        /* the span's W_up rows as one stream (phase 1), then its W_down rows (phase 2);
                           each call prefetches the rows of the call after it */
                        /* the down pass group-major where the units take groups (AVX-512 float and VNNI
                           units, more than 4 tokens): the span's units for tokens 0-3, then again for 4-7, ...:
                           a group's y rows (4 x H fp32; int8: its int32 sums) stay in L1 through the span, the
                           rows come again from L2, instead of every token's (57 KB at 8 tokens and H = 1792)
                           passing through L1 per unit. The same sums in the same order per output (each token's
                           units in order). Served routing at batch 8, bf16: 5.6-8 tokens an expert -7 to -18%
                           cold; int8 8-12 tokens -9 to -14% (RESULTS.md 2026-12-05 09:04). */
                        int ngrp = grouped && m > 4 ? (m + 3) / 4 : 1;
                        /* ... within each span of the int8 down pass's sums (set up by its first unit,
                           flushed by its last: VQ_ROWS rows), over the whole range otherwise */
                        long sblk = vq ? VQ_ROWS / ur : k1 - k0; /* (the up pass: the same order in blocks) */
                        for (int phase = 1; phase <= 2; phase++)
                            for (long ks = k0; ks < k1; ks += sblk)
                            for (int g = 0; g < (phase == 2 ? ngrp : 1); g++)
                            for (long k = ks; k < k1 && k < ks + sblk; k++) {
                                long d0 = k * ur;
                                size_t o = (size_t)(e * D + d0) * H * wsz;
                                nxt.wu = (const char *)w_up + o;
                                nxt.wd = (const char *)w_down + o;
                                nxt.pf_next = NULL;
                                nxt.phase = phase;
                                nxt.grp = phase == 2 && ngrp > 1 ? g : -1;
                                nxt.H = H; nxt.D = D;
                                nxt.nr = D - d0 < ur ? (int)(D - d0) : ur;
                                nxt.m = m;
                                nxt.xs = xs + off[e]; nxt.xh = xh + off[e];
                                nxt.sc = sc + off[e]; nxt.tok = tok + off[e];
                                nxt.hb = hb + off[e] * D + d0;
                                nxt.y = ym; nxt.zrow = zrow;
                                nxt.su = up_scale ? up_scale + e * D + d0 : NULL;
                                nxt.sd = down_scale ? down_scale + e * H : (const float *)zrow;
                                nxt.xq = vnni ? xqp + off[e] : NULL;
                                nxt.xqs = vnni ? xqsp + off[e] : NULL;
                                nxt.rs = up_rowsum ? up_rowsum + e * D + d0 : NULL;
                                nxt.perm = perm;
                                nxt.acc = vq && phase == 2 ? accb + (size_t)tid * T * Hp : NULL;
                                nxt.hq = vq ? hqb + (size_t)tid * (T + 1) : NULL;
                                nxt.Hp = Hp;
                                nxt.xb = xb; nxt.nc = nc; nxt.xt0 = t0;
                                nxt.facc = faccb && phase == 2 ? faccb + (size_t)tid * (T + 8) * Hp : NULL;
                                if (nxt.acc || nxt.facc) { /* the span this unit belongs to: at most VQ_ROWS rows */
                                    long su = VQ_ROWS / ur, q = (k - k0) % su, kend = k - q + su;
                                    long rend = (kend < k1 ? kend : k1) * ur;
                                    nxt.first = q == 0;
                                    nxt.last = k == k1 - 1 || q == su - 1;
                                    nxt.span = (int)((rend < D ? rend : D) - d0);
                                }
                                if (have) {
                                    cur.pf_next = (const char *)(phase == 1 ? nxt.wu : nxt.wd);
                                    unit(&cur);
                                }
                                cur = nxt;
                                have = 1;
                            }
                    }
                    cum += ce;
                }
                if (have) unit(&cur);
            }
#if BLOCKFFN_X86
            if (nc) amx_release();
#endif
            /* sum the threads' partial outputs (and round to bf16): each thread a share of 32-element blocks */
            #pragma omp barrier
            long nn = T * H, nbk = (nn + 31) / 32, nt_ = omp_get_num_threads();
            long ra0 = nbk * tid / nt_ * 32, ra1 = nbk * (tid + 1) / nt_ * 32;
            reduce_out(isa, y, direct, yb, nbuf, used, nn, perm, ra0, ra1 < nn ? ra1 : nn);
        }
    }
done:
    free(kyf); free(khq); free(khs); free(khr); free(khh); free(khhr);
    free(mask); free(used); free(cnt); free(off); free(uni); free(tok); free(sc); free(hb); free(xs);
    free(xh); free(zrow); free(xf); free(yb); free(accb); free(hqb); free(xq8); free(xqs); free(xrow); free(xqp); free(xqsp);
    free(xb); free(xr); free(faccb);
    return ok ? 0 : -1;
}

/* ------------------------------------------------------------------------ read bandwidth */
/* Sum `bytes` of memory with nthreads OpenMP threads (each a contiguous share), the widest
   vector loads the CPU has: what this kernel's threads can stream at most (benchmarks). */
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
static float stream_avx512(const float *p, long n) {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    long i = 0;
    for (; i + 64 <= n; i += 64) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(p + i)); b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
        c = _mm512_add_ps(c, _mm512_loadu_ps(p + i + 32)); d = _mm512_add_ps(d, _mm512_loadu_ps(p + i + 48));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
    for (; i < n; i++) s += p[i];
    return s;
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2")
static float stream_avx2(const float *p, long n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i)); b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16)); d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
    float v[8]; _mm256_storeu_ps(v, t);
    float s = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    for (; i < n; i++) s += p[i];
    return s;
}
#pragma GCC pop_options
#endif

double blockffn_stream_read(const float *p, long n, int nthreads, int isa) {
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) isa = ISA_PORTABLE;
    double total = 0.0;
    #pragma omp parallel num_threads(call_threads(nthreads)) reduction(+ : total)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        long a = n / nt * id, b = id == nt - 1 ? n : n / nt * (id + 1);
        float s = 0.0f;
#if BLOCKFFN_X86
        if (isa >= ISA_AVX512) s = stream_avx512(p + a, b - a);
        else if (isa >= ISA_AVX2) s = stream_avx2(p + a, b - a);
        else
#endif
            for (long i = a; i < b; i++) s += p[i];
        total += s;
    }
    return total;
}

/* The read floor of a sequence of kernel calls (benchmarks): call c reads the byte ranges r of [call_off[c],
   call_off[c + 1]) (ptrs[r], lens[r] bytes, multiples of 4) with the streaming loop above, in one parallel region
   of nthreads threads that splits the call's bytes evenly (in 64-byte lines). What a call reading exactly those bytes
   costs at least on these threads: a region's fork and join and each short stream's first misses, which a long
   stream's bandwidth hides. Beside a kernel's time for the same calls it separates the kernel's own cost from the
   memory's. Returns the sum read (so nothing is elided). The bytes are summed as floats whatever they hold (bf16,
   int8): denormals are read as zero (MXCSR DAZ / FTZ in the region), so no CPU spends microcode assists on them. */
double blockffn_read_ranges(const float *const *ptrs, const long *lens, const long *call_off, long ncalls,
                            int nthreads, int isa) {
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) isa = ISA_PORTABLE;
    double total = 0.0;
    for (long c = 0; c < ncalls; c++) {
        long r0 = call_off[c], r1 = call_off[c + 1], bytes = 0;
        for (long r = r0; r < r1; r++) bytes += lens[r];
        long lines = bytes / 64;
        #pragma omp parallel num_threads(call_threads(nthreads)) reduction(+ : total)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            long a = lines * id / nt * 64, b = id == nt - 1 ? bytes : lines * (id + 1) / nt * 64, off = 0;
            float s = 0.0f;
#if BLOCKFFN_X86
            unsigned csr = _mm_getcsr();
            _mm_setcsr(csr | 0x8040); /* FTZ | DAZ */
#endif
            for (long r = r0; r < r1 && off < b; off += lens[r], r++) {
                long lo = a > off ? a - off : 0, hi = b - off < lens[r] ? b - off : lens[r];
                if (hi <= lo) continue;
                const float *p = ptrs[r] + lo / 4;
                long n = (hi - lo) / 4;
#if BLOCKFFN_X86
                if (isa >= ISA_AVX512) s += stream_avx512(p, n);
                else if (isa >= ISA_AVX2) s += stream_avx2(p, n);
                else
#endif
                    for (long i = 0; i < n; i++) s += p[i];
            }
#if BLOCKFFN_X86
            _mm_setcsr(csr);
#endif
            total += s;
        }
    }
    return total;
}

/* ------------------------------------------------------------------------ arithmetic peak */
/* Multiply-adds per second the cores can issue: nthreads threads, each `rounds` rounds of FMAs on 12 independent
   accumulator chains in the widest vector the path has (fp32; VDPBF16PS, where present, issues fewer multiply-adds
   per cycle on some of these CPUs: RESULTS.md 2026-12-04). Returns multiply-adds per second over all threads (the
   slowest thread's time). Benchmarks: the compute ceiling of a step beside its bytes at the read bandwidth. */
#define FP_CHAINS 12
/* fma_rounds_<path>(rounds): the chains' rounds in one vector type (VT, its SET1 and FMA), summed by HSUM */
#define FMA_ROUNDS(SUF, VT, SET1, FMA, HSUM)                                                            \
    static float fma_rounds_##SUF(long rounds) {                                                        \
        VT a[FP_CHAINS], b = SET1(0.999999f), c = SET1(1e-6f);                                          \
        for (int i = 0; i < FP_CHAINS; i++) a[i] = SET1((float)i);                                      \
        for (long n = 0; n < rounds; n++)                                                               \
            for (int i = 0; i < FP_CHAINS; i++) a[i] = FMA(a[i], b, c);                                 \
        float s = 0.0f;                                                                                 \
        for (int i = 0; i < FP_CHAINS; i++) s += HSUM(a[i]);                                            \
        return s;                                                                                       \
    }
#if BLOCKFFN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
FMA_ROUNDS(avx512, __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
static float hsum_avx2(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}
FMA_ROUNDS(avx2, __m256, _mm256_set1_ps, _mm256_fmadd_ps, hsum_avx2)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
/* dp_fast's VDPBF16PS chains: each step adds 1.0 x 2^-24 twice (b and c, the rounds' fp32 constants, are not
   finite as bf16 pairs, so the step takes its own) */
#define DP_STEP(a, b, c) \
    ((void)(b), (void)(c), _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32(0x3F803F80), (__m512bh)_mm512_set1_epi32(0x33803380)))
FMA_ROUNDS(avx512bf16, __m512, _mm512_set1_ps, DP_STEP, _mm512_reduce_add_ps)
#pragma GCC pop_options
#endif
#define FP_SCALAR(v) (v)
FMA_ROUNDS(portable, float, FP_SCALAR, fmaf, FP_SCALAR)

/* Whether this CPU issues VDPBF16PS faster than 1.5 FMAs (callers check the CPU has AVX512_BF16): one VDPBF16PS
   does a line's 32 multiply-adds where the split forms spend two FMAs and the widening. AMD Zen 4: as fast as an
   FMA, i.e. twice the multiply-adds; the Xeon without AMX of RESULTS.md: a quarter as fast. Asked once a process
   (~0.3 ms), outside any parallel region. Decides the K-major linears' dot form and the experts' split forms. */
#define DP_PROBE_ROUNDS 20000
static int g_dp_fast = -1;
static int dp_fast(void) {
    int v = __atomic_load_n(&g_dp_fast, __ATOMIC_ACQUIRE);
    if (v >= 0) return v;
#if BLOCKFFN_X86
    double tf = 1e30, td = 1e30;
    float sink = 0.0f;
    for (int r = 0; r < 3; r++) { /* alternating, the fastest of each: the clock ramps, VMs share cores */
        double t = omp_get_wtime();
        sink += fma_rounds_avx512(DP_PROBE_ROUNDS);
        t = omp_get_wtime() - t;
        tf = t < tf ? t : tf;
        t = omp_get_wtime();
        sink += fma_rounds_avx512bf16(DP_PROBE_ROUNDS);
        t = omp_get_wtime() - t;
        td = t < td ? t : td;
    }
    v = sink == sink && td < 1.5 * tf;
#else
    v = 0;
#endif
    __atomic_store_n(&g_dp_fast, v, __ATOMIC_RELEASE);
    return v;
}
/* Whether the K-major linears take the dot form for bf16 x (blockffn_linear_kmajor, on AVX512_BF16 paths):
   g_km_dot 1 / 0 forces it (blockffn_set_kmajor_dot, for tests and benchmarks' side-by-side runs), -1 (default)
   where dp_fast. */
static int g_km_dot = -1;
int blockffn_set_kmajor_dot(int mode) {
    int was = g_km_dot;
    g_km_dot = mode < 0 ? -1 : mode > 0;
    return was;
}
static int km_dot_on(void) { return g_km_dot >= 0 ? g_km_dot : dp_fast(); }
/* dp_fast for callers outside (0 on CPUs without AVX512_BF16): which forms the bf16 code takes by default. */
int blockffn_dp_fast(void) { return blockffn_resolve_isa(ISA_AMX) >= ISA_AVX512_BF16 && dp_fast(); }
/* 1 when bf16 x on path isa takes the dot form now (resolving the probe), else 0. */
int blockffn_kmajor_dot(int isa) {
    isa = blockffn_resolve_isa(isa);
    return BLOCKFFN_X86 && isa >= ISA_AVX512_BF16 && km_dot_on();
}

double blockffn_fma_peak(long rounds, int nthreads, int isa) {
    isa = blockffn_resolve_isa(isa);
    if (isa < 0) isa = ISA_PORTABLE;
    if (rounds < 1) rounds = 1;
    int lanes = 1;
#if BLOCKFFN_X86
    lanes = isa >= ISA_AVX512 ? 16 : isa >= ISA_AVX2 ? 8 : 1;
#endif
    double slowest = 0.0, sink = 0.0;
    int nt = 1;
    #pragma omp parallel num_threads(call_threads(nthreads)) reduction(max : slowest) reduction(+ : sink)
    {
        #pragma omp single
        nt = omp_get_num_threads();
        double t = omp_get_wtime();
        float s = 0.0f;
#if BLOCKFFN_X86
        if (isa >= ISA_AVX512) s = fma_rounds_avx512(rounds);
        else if (isa >= ISA_AVX2) s = fma_rounds_avx2(rounds);
        else
#endif
            s = fma_rounds_portable(rounds);
        slowest = omp_get_wtime() - t;
        sink += s;
    }
    if (sink != sink) return 0.0; /* keeps the chains live */
    return (double)rounds * FP_CHAINS * lanes * nt / (slowest > 0.0 ? slowest : 1e-9);
}

/* ------------------------------------------------------------------- router + experts */
/* The layer's router and experts in one call, for decode-size steps on CPUs: z = x W_r^T through
   blockffn_linear (W_r [E, H], fp32 or bf16; z rounded to x's dtype, as the model's linear returns
   it), then the ReLU + RMS-norm router in fp32 -- a = relu(z) (NaN stays NaN, as torch.relu),
   s = a * (1 / sqrt(mean_e a^2 + eps)) * norm_w[e] (norm_w fp32 [E]) -- then blockffn_sparse_ffn
   on those scores. One ctypes call, one output, no scores tensor: a served model makes this call
   once per layer and step, where every separate op costs tens of µs of Python with cold caches.
   Returns as blockffn_sparse_ffn (the router's errors included). */
int blockffn_router_sparse_ffn(const void *x, long ldx, int xdt, const void *w_r, int wdt_r, const float *norm_w,
                               float eps, const void *w_up, const void *w_down, int wdt, const int32_t *cu, long S,
                               long T, long E, long D, long H, void *y, int nthreads, float up_row_cost,
                               int allow_dense, long min_dense_tokens, float max_pair_fraction, int64_t *stats,
                               int isa, const float *up_scale, const float *down_scale, const int32_t *up_rowsum) {
    if (T < 0 || E <= 0 || H <= 0 || xdt < 0 || xdt > 1 || wdt_r < 0 || wdt_r > 1 || !w_r || !norm_w) return -2;
    MARK_START();
    size_t zsz = xdt ? 2 : 4;
    void *z = malloc((size_t)T * E * zsz + 4);
    float *sc = malloc((size_t)T * E * sizeof(float) + 4);
    if (!z || !sc) { free(z); free(sc); return -1; }
    int rc = T > 0 ? blockffn_linear(x, ldx, xdt, w_r, wdt_r, T, E, H, z, E, nthreads, isa, NULL, NULL) : 0;
    MARK(0);
    if (rc == 0) {
        for (long t = 0; t < T; t++) {
            float *s = sc + t * E;
            float ss = 0.0f;
            for (long e = 0; e < E; e++) {
                float v = xdt ? cv_bf16(((const uint16_t *)z)[t * E + e]) : ((const float *)z)[t * E + e];
                float a = v > 0.0f ? v : (v != v ? v : 0.0f);
                s[e] = a;
                ss += a * a;
            }
            float r = 1.0f / sqrtf(ss / (float)E + eps);
            for (long e = 0; e < E; e++) s[e] = s[e] * r * norm_w[e];
        }
        MARK(1);
        rc = blockffn_sparse_ffn(x, ldx, xdt, sc, w_up, w_down, wdt, cu, S, T, E, D, H, y, nthreads, up_row_cost,
                                 allow_dense, min_dense_tokens, max_pair_fraction, stats, isa, 0, up_scale,
                                 down_scale, up_rowsum);
    }
    free(z);
    free(sc);
    MARK_END();
    return rc;
}
