/* The vector throughput one core delivers: the compute bound of decode-size GEMMs with several tokens.
 *
 * Why: at 4-8 tokens a linear does 4-8 multiply-adds per weight it reads, and on small VMs the core,
 * not the memory, can be the limit (RESULTS.md, the AVX2 EPYC section). Eight independent accumulator
 * chains of VPMADDWD + VPADDD (int8 x int16 products of the AVX2 int8 path, 16 per instruction) and of
 * VFMADD231PS (fp32, 8 per instruction), operands in registers only, and a dependent scalar add chain
 * (about one per cycle: a clock proxy). VMs without PMU counters give no cycle counts, hence this.
 *
 *   cc -O2 -o /tmp/cpu_peak benchmarks/cpu_peak.c && /tmp/cpu_peak
 *   (/tmp/cpu_peak & /tmp/cpu_peak; wait)   # both cores at once
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2,fma"))) int main(void) {
    const long n = 200000000;
    __m256i a[8], x = _mm256_set1_epi16(3), w = _mm256_set1_epi16(5);
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
    double t0 = now();
    for (long i = 0; i < n; i++) {
        for (int j = 0; j < 8; j++) a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(w, x));
        __asm__ volatile("" : "+x"(x), "+x"(w)); /* keeps the products in the loop */
    }
    double t = now() - t0;
    int s = 0;
    for (int j = 0; j < 8; j++) s += _mm256_extract_epi32(a[j], 0);
    printf("VPMADDWD + VPADDD: %.2f G/s per core = %.1f G int16 MAC/s (check %d)\n", n * 8 / t / 1e9,
           n * 8 * 16 / t / 1e9, s);

    __m256 f[8], xf = _mm256_set1_ps(1.0001f), wf = _mm256_set1_ps(0.9999f);
    for (int i = 0; i < 8; i++) f[i] = _mm256_setzero_ps();
    t0 = now();
    for (long i = 0; i < n; i++) {
        for (int j = 0; j < 8; j++) f[j] = _mm256_fmadd_ps(wf, xf, f[j]);
        __asm__ volatile("" : "+x"(xf), "+x"(wf));
    }
    t = now() - t0;
    float fs = 0;
    for (int j = 0; j < 8; j++) fs += f[j][0];
    printf("VFMADD231PS: %.2f G/s per core = %.1f G fp32 MAC/s (check %g)\n", n * 8 / t / 1e9, n * 8 * 8 / t / 1e9,
           fs);

    long c = 0;
    t0 = now();
    for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0" : "+r"(c));
    t = now() - t0;
    printf("dependent scalar adds: %.2f G/s (about the clock in GHz)\n", n / t / 1e9);
    return 0;
}
