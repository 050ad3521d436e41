/* The vector throughput one core delivers: the compute bound of decode-size GEMMs with several tokens.
 *
 * Why: at 4-8 tokens a linear does 4-8 multiply-adds per weight it reads, and on small VMs the core,
 * not the memory, can be the limit. VMs without PMU counters give no cycle counts, hence this probe.
 * Each loop is written in inline assembly: eight independent accumulators held in registers. (The first
 * version, in C intrinsics on arrays, let GCC keep the accumulators in memory and hoist the products out
 * of the loop; it measured store-forwarding latency, a third of the real rate: RESULTS.md, the AVX2 EPYC
 * sections of 2026-12-03.) Loops: VFMADD231PS (8 fp32 MACs), VPMADDWD + VPADDD (16 int16 MACs, the AVX2
 * int8 path's product), the AVX2 int8 step itself (VPMOVSXBW of 16 weights from L1, then one VPMADDWD +
 * VPADDD per token for 2 tokens), the bf16 widening step (VPMOVZXWD + VPSLLD, then 2 FMAs), and a
 * dependent scalar add chain (about one per cycle: a clock proxy).
 *
 *   cc -O2 -o /tmp/cpu_peak benchmarks/cpu_peak.c && /tmp/cpu_peak
 *   (/tmp/cpu_peak & /tmp/cpu_peak; wait)   # both cores at once
 */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define ACC8 "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
static char l1[4096] __attribute__((aligned(64)));

/* One timed loop of n iterations of an inline-assembly body: seconds. */
#define TIMED(T, ...)                                                                                   \
    do {                                                                                                \
        double t0_ = now();                                                                             \
        for (long i = 0; i < n; i++) __asm__ volatile(__VA_ARGS__);                                     \
        T = now() - t0_;                                                                                \
    } while (0)
#define FMA(k) "vfmadd231ps %%ymm1, %%ymm2, %%ymm" #k "\n\t"
#define MADD(tmp, k) "vpmaddwd %%ymm1, %%ymm2, %%ymm" #tmp "\n\t vpaddd %%ymm" #tmp ", %%ymm" #k ", %%ymm" #k "\n\t"

int main(void) {
#if defined(__x86_64__)
    const long n = 100000000;
    double t;
    TIMED(t, FMA(8) FMA(9) FMA(10) FMA(11) FMA(12) FMA(13) FMA(14) FMA(15) ::: ACC8);
    printf("VFMADD231PS: %.2f G/s per core = %.1f G fp32 MAC/s\n", n * 8 / t / 1e9, n * 64 / t / 1e9);

    TIMED(t, MADD(3, 8) MADD(4, 9) MADD(5, 10) MADD(6, 11) MADD(3, 12) MADD(4, 13) MADD(5, 14) MADD(6, 15)
          ::: "xmm3", "xmm4", "xmm5", "xmm6", ACC8);
    printf("VPMADDWD + VPADDD: %.2f G/s per core = %.1f G int16 MAC/s\n", n * 8 / t / 1e9, n * 128 / t / 1e9);

    TIMED(t, "vpmovsxbw (%0), %%ymm2\n\t vpmaddwd %%ymm1, %%ymm2, %%ymm3\n\t vpaddd %%ymm3, %%ymm8, %%ymm8\n\t"
             "vpmaddwd %%ymm0, %%ymm2, %%ymm4\n\t vpaddd %%ymm4, %%ymm9, %%ymm9\n\t"
             "vpmovsxbw 16(%0), %%ymm5\n\t vpmaddwd %%ymm1, %%ymm5, %%ymm6\n\t vpaddd %%ymm6, %%ymm10, %%ymm10\n\t"
             "vpmaddwd %%ymm0, %%ymm5, %%ymm7\n\t vpaddd %%ymm7, %%ymm11, %%ymm11\n\t" ::"r"(l1)
          : "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", ACC8);
    printf("int8 step (VPMOVSXBW, 2 tokens): %.2f G VPMADDWD/s per core = %.1f G int8 MAC/s\n", n * 4 / t / 1e9,
           n * 64 / t / 1e9);

    TIMED(t, "vpmovzxwd (%0), %%ymm2\n\t vpslld $16, %%ymm2, %%ymm2\n\t"
             "vfmadd231ps %%ymm0, %%ymm2, %%ymm8\n\t vfmadd231ps %%ymm1, %%ymm2, %%ymm9\n\t"
             "vpmovzxwd 16(%0), %%ymm3\n\t vpslld $16, %%ymm3, %%ymm3\n\t"
             "vfmadd231ps %%ymm0, %%ymm3, %%ymm10\n\t vfmadd231ps %%ymm1, %%ymm3, %%ymm11\n\t" ::"r"(l1)
          : "xmm2", "xmm3", ACC8);
    printf("bf16 step (VPMOVZXWD + VPSLLD, 2 tokens): %.2f G FMA/s per core = %.1f G bf16 MAC/s\n",
           n * 4 / t / 1e9, n * 32 / t / 1e9);

    long c = 0;
    TIMED(t, "add $1, %0\n\t add $1, %0\n\t add $1, %0\n\t add $1, %0" : "+r"(c));
    printf("dependent scalar adds: %.2f G/s (about the clock in GHz)\n", n * 4 / t / 1e9);
#else
    puts("x86-64 only");
#endif
    return 0;
}
