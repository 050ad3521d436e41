"""When to run the sparse kernels and when dense GEMMs win: every threshold in one place.

Sparse execution pays when the step is memory-bound (few tokens: decode, speculative
verify chunks) and the per-segment unions are small: the time then falls towards the
fraction of expert weight bytes read. It stops paying when
- the step is compute-bound (many tokens: prefill), where cuBLAS / oneDNN dense GEMMs are
  more efficient than gathered sparse tiles and long segments' unions approach all experts;
- many segments each read their own union: the weight bytes read grow with the number of
  segments, Σ_s |U_s| · D · H, and exceed one dense pass over the E experts.

CUDA decisions may use static facts only (T, S, E, D, H): counts live on the device and a
decision must not sync the host or differ between a CUDA graph's capture and its replays.
On CUDA there are three paths (:func:`cuda_path`): the per-segment Triton kernels, the
expert-major path through vLLM's fused-MoE kernel (each expert of the whole step's union read
once, only active pairs computed) and dense GEMMs; the choice is the cheapest by a closed-form
byte/FLOP model (:func:`cuda_costs`) under a routing model fitted to the bundled model.
The CPU path knows its counts for free and decides on the actual union sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEVER = 1 << 62
"""A row or token count no step reaches (a route a path never takes)."""


@dataclass(frozen=True)
class DispatchThresholds:
    # ---- CUDA: static facts only (T, S, E, D, H). See cuda_costs for the model.
    cuda_max_experts: int = 256
    """Both Triton paths keep E-wide rows per program (and vLLM's reduction unrolls over E)."""
    # Routing model: the fraction of the E experts that the union of S segments of L consecutive
    # tokens each (independent requests) uses is  c + (1 − c)·(1 − (1 − q)^(S^β·L^γ)):  c of the
    # experts fire on (nearly) every token, the others like independent draws with rate q, and
    # S requests / L consecutive tokens act like S^β / L^γ independent tokens (shared
    # preferences, activation locality). Fitted to the bundled model's routing on held-out text
    # (benchmarks/gpu_on_paper_routing.json; within 0.03 of every measured point with S·L ≤ 2048:
    # one segment of 8 tokens 29.5%, 8 decode requests 25.6%, 32: 64%, 128: 97%). Active
    # (token, expert) pairs: 9.7% of T·E, the same at every S and L. Its CLS-8 (≈ 70%) and
    # per-token sparsity (≈ 90%) are what the BlockFFN paper reports for its models.
    cuda_always_on_fraction: float = 0.03
    cuda_other_rate: float = 0.048
    cuda_segments_exponent: float = 0.86
    cuda_locality_exponent: float = 0.84
    cuda_pair_fraction: float = 0.097
    # Device (H100 SXM, bf16 dense tensor cores) and per-launch cost (CUDA-graph replay).
    cuda_bandwidth_tbps: float = 3.35
    cuda_peak_tflops: float = 989.0
    cuda_launch_us: float = 1.0
    # ---- CUDA without the expert-major path (vLLM not importable: the bare-kernels GPU machine).
    cuda_expected_union_fraction: float = 0.3
    """Union density assumed per segment: trained BlockFFN routers reach ~70% CLS-8 (SPEC §3)."""
    cuda_max_read_ratio: float = 0.9
    """Per-segment while S · expected union fraction ≤ this, i.e. while the per-segment unions are
    expected to read fewer weight bytes than one dense pass over all E experts (S ≤ 3 here)."""
    cuda_max_tokens: int = 512
    """Above this many tokens in the step, run dense: the GEMMs are compute-bound."""
    cuda_max_tokens_per_segment: int = 128
    """Above this average segment length a union is close to all experts: run dense."""
    # ---- CPU: data-dependent (the counts are on the host anyway).
    cpu_max_union_fraction: float = 0.8
    """PyTorch path only (no C compiler, or fp16; the native kernel has its own rule below).
    Dense when Σ_s |U_s| > this · E: beyond it the sparse path's per-run overheads and the
    repeated reads of experts shared by segments cost more than reading all experts once.
    Measured (bench_kernels_cpu.py at 16abe25, cache-resident; E=56, 1-64 tokens, 2-core EPYC):
    sparse/dense ≈ 0.6 with 50% of the experts in the union, ≈ 0.8 with 70%, ≈ 0.9-1.7 with 90%."""
    cpu_max_tokens_per_segment: int = 4096
    """Segments longer than this are compute-bound: dense (one big GEMM) is as good and simpler."""
    # ---- CPU native kernel (kernels/sparse_ffn/cpu_native.py, expert-major over the whole step).
    # It reads each expert of the step's union once and computes only the P active (token,
    # expert) pairs of the n tokens; dense_ffn reads all E experts and computes all n·E pairs
    # with oneDNN GEMMs. Measured (bench_kernels_cpu.py --dispatch at 16abe25, 2 threads, fp32, 2-core
    # EPYC AVX2, Small and XLarge shapes): the native kernel wins at every union size when
    # few tokens (1 token, all experts active: new/dense 0.52-0.60; 4 tokens: 0.44-0.49), and
    # loses only when most tokens use most experts and n is large: P = n·E at n = 64:
    # new/dense 0.85-1.06, at n = 256: 1.20-1.35; P = n·E/2 at n = 256: 0.65-0.93.
    # Rule: dense ⇔ n ≥ cpu_min_dense_tokens and P > cpu_max_pair_fraction · n · E
    # (evaluated in C on the counts the kernel scans anyway: no extra pass).
    cpu_min_dense_tokens: int = 64
    """Below this many tokens the native kernel always wins (memory-bound)."""
    cpu_max_pair_fraction: float = 0.75
    """Dense when more than this fraction of all (token, expert) pairs is active (compute-bound
    and nearly dense; trained BlockFFN routers activate ~20% per token, so prefill stays sparse)."""
    cpu_grouped_min_tokens: int = 128
    """From this many tokens in a step (prefill chunks, big batches) the CPU auto path may run each active expert's
    tokens as one gathered GEMM pair (sparse_ffn_grouped: FLOPs ∝ active pairs at the GEMM library's speed)
    instead of the streaming kernel, which is built for memory-bound steps; where it does is
    ``cpu_grouped_min_tokens_by_path``. This floor is checked first (no ISA lookup for shorter steps): it must
    not exceed any entry there."""
    cpu_grouped_min_tokens_by_path: dict[str, tuple[int, int, int]] = field(default_factory=lambda: {
        "portable": (128, 128, 128),
        "avx2": (1024, 1024, 4096),
        "avx512": (384, 1024, 1024),
        "avx512_bf16": (384, 1024, 1536),
        "avx512_bf16_dp": (5120, 4096, 3072),
        "amx": (384, 1536, 1536),
    })
    """Per kernel path, the step size (fp32, bf16, int8 experts) from which the grouped GEMMs beat the native
    kernel. bf16 GEMMs run in fp32 on widened weights except on ``amx`` (:func:`~.sparse_ffn.cpu.gemm_dtype`),
    int8 experts are dequantized first. Measured with benchmarks/bench_long_steps_cpu.py (XLarge shape, 4
    segments, 2 threads; kernel vs grouped ms):
    ``avx2`` (AMD EPYC Zen 3; RESULTS.md 2026-12-04 07:01 UTC): fp32 512 tokens 31.6 vs 33.4, 1024 56.7 vs
    54.8; bf16 512 34.4 vs 43.6, 1024 78 vs 70; int8 (fp32 x) 3072 150 vs 160, 4096 217 vs 189.
    ``avx512_bf16`` (Intel Xeon with AVX512_BF16 and no AMX, oneDNN's bf16 GEMM 168 GFLOP/s against its fp32
    GEMM's 312; RESULTS.md 2026-12-04 16:43 UTC): fp32 256 10.0 vs 10.8, 384 15.1 vs 14.7; bf16 (fp32 GEMMs)
    512 22.1 vs 23.2, 1024 47.5 vs 42.8; int8 (bf16 x) 1536 61.4 vs 59.2, 2048 95.7 vs 74.3. ``avx512`` (the
    same Xeon, path forced: the kernel's side as on an AVX-512 CPU without BF16, oneDNN's fp32 GEMM the same
    cores'): fp32 as ``avx512_bf16``; bf16 512 21.4 vs 23.2, 1024 47.0 vs 42.8; int8 512 21.1 vs 26.8, 1024
    46.7 vs 46.0.
    ``amx`` (Intel Xeon with AMX; RESULTS.md 2026-12-02 16:08 UTC): bf16 1024 22.3 vs 31.0, 2048 77 vs 49;
    int8 1024 32.6 vs 44.3, 2048 112 vs 66; fp32 has no tiles: as ``avx512_bf16`` (the same cores).
    ``avx512_bf16_dp`` (``cpu_native.route_path``: an AVX512_BF16 CPU whose VDPBF16PS is as fast as an FMA, AMD
    Zen 4, where oneDNN's bf16 GEMM runs 412 GFLOP/s against its fp32 GEMM's 186, so ``gemm_dtype`` keeps bf16;
    RESULTS.md 2026-12-06 00:43 UTC; this VM's figures move by up to 1.5x between runs, 3-4 runs each): bf16
    2048 41-60 vs 47-75, 3072 86-92 vs 90-104, 4096 113-120 vs 93-124, 6144 202-207 vs 200-212; int8 (bf16 x) 2048
    51-87 vs 55-96, 3072 74-113 vs 75-83, 4096 118-155 vs 100-118; fp32 2048 68-70 vs 79-106, 4096 156-165 vs
    182-197, 6144 309-310 vs 241-257 (int8 with fp32 x: 4096 146-153 vs 180-209). The kernel wins to ~3000 (int8),
    ~4000 (bf16) and ~5000 (fp32) tokens a step, 3-13x the Xeon's crossovers.
    ``portable``: not measured (the default before any of these)."""
    cpu_amx_min_tokens: int = 1
    """On AMX CPUs (kernel path ``amx``), bf16 expert calls whose active experts have at least this many tokens
    each on average (active pairs / union size) run the AMX units (16 rows x up to 16 tokens per tile
    product); fewer keep the AVX512_BF16 units. 1: the tiles always, since the AMX paths stopped prefetching
    in software (cpu_native.c says why). Measured (RESULTS.md, 2026-12-03 06:14 UTC, XLarge shape, cold
    weights, the engine's C++ call, interleaved rounds): 1 token 70% of read bandwidth on the AVX512_BF16
    units, 56% on the tiles with the prefetch, 73% without; decode x4 72 / 61 / 75%; x8 76 / 63 / 78%; a
    4-token verify chunk 59 / 53 / 67%; two 60 / 52 / 67%. A benchmark can raise it to compare
    (bench_memory_cpu.py --amx-min-tokens). int8 experts keep the VNNI units (cpu_native.c says why)."""
    cpu_amx_min_rows: int = 1
    """On AMX CPUs, linears of at least this many rows run the AMX tiles. 1: every decode-size linear, since
    the tile paths stopped prefetching in software: cold, 2 threads, the engine's C++ op, bf16 M = 1 qkv /
    o_proj / lm_head 81 / 75 / 89% of read bandwidth on the AVX512_BF16 GEMV vs 90 / 89 / 92% on the tiles;
    M = 2-16 7-13 points above the tiles with the prefetch; int8 M = 1 71 / 72 / 81% (VNNI GEMV) vs 77 / 73 /
    77% (RESULTS.md, 2026-12-03 06:14 UTC); the int8 tiles since (super rows at 1-2 rows, a vector epilogue):
    75 / 74 / 81% at M = 1, 65 / 60 / 68% at M = 8 (RESULTS.md, 2026-12-03 08:54 UTC)."""
    # ---- CPU dense linears of BlockFFN models (vllm_blockffn/serving/layers/cpu_linear.py).
    cpu_linear_max_tokens: int = 8
    """Up to this many rows (decode sizes), a linear runs the native streaming GEMV on every path (each weight
    byte read once, at memory speed; benchmarks/bench_memory_cpu.py, linear rows); past it the path's
    ``cpu_linear_rows``. int8 weights run the kernel at every M on every path (torch's ``_weight_int8pack_mm``
    was 25-32x slower with fp32 x and ~1.4x with bf16 x from 9 to 256 rows on the AMD EPYC, RESULTS.md
    2026-12-04 07:01 UTC)."""
    cpu_linear_rows: dict[str, tuple[int, int, int]] = field(default_factory=lambda: {
        "portable": (8, 8, NEVER),
        "avx2": (64, 127, 128),
        "avx512": (32, 39, 40),
        "avx512_bf16": (32, 16, 64),
        "avx512_bf16_dp": (256, 64, NEVER),
        "amx": (32, 32, NEVER),
    })
    """Past decode sizes, per kernel path: fp32 linears run the native kernel up to the first entry's rows, bf16 ones
    up to the second, and bf16 ones from the third run oneDNN's fp32 GEMM on weight blocks widened to fp32
    (``cpu_ops.widened_linear``); every other size ``F.linear`` (oneDNN). Measured with
    benchmarks/bench_long_steps_cpu.py ([5376, 1792], 2 threads; ms):
    ``avx2`` (AMD EPYC; RESULTS.md 2026-12-04 07:01 UTC): no oneDNN bf16 GEMM (torch's fallback 3.6-4.1x slower
    than the kernel); fp32 kernel vs F.linear 64 rows 11.2 vs 16.8, 128 23.0 vs 24.1, 256 45.5 vs 39.4; bf16
    kernel vs widened 64 10.3 vs 10.7, 128 23.6 vs 17.1, 1024 183 vs 122.
    ``avx512_bf16`` (Intel Xeon, AVX512_BF16, no AMX; RESULTS.md 2026-12-04 16:43 UTC): fp32 kernel vs F.linear
    32 rows 3.7 vs 4.3, 64 6.8 vs 6.1; bf16 kernel / F.linear / widened 16 2.4 / 2.5 / 3.5, 32 4.7 / 4.2 / 4.5,
    64 9.4 / 7.9 / 7.0, 256 37.6 / 29.4 / 19.6 (oneDNN's bf16 GEMM without AMX runs at half its fp32 rate).
    ``avx512`` (the same Xeon, path forced): bf16 kernel vs widened 32 4.2 vs 4.5, 48 6.3 vs 5.6.
    ``amx`` (RESULTS.md 2026-12-02 16:08 UTC): the AMX linears beat F.linear (AMX) up to 32 rows (1008 vs 1234 µs),
    lose from 64 (1813 vs 1702); fp32 as ``avx512_bf16`` (no tiles, the same cores). ``portable``: decode
    sizes only.
    ``avx512_bf16_dp`` (``cpu_native.route_path``: AMD Zen 4, VDPBF16PS as fast as an FMA, oneDNN's bf16 GEMM at
    twice its fp32 rate; RESULTS.md 2026-12-06 00:43 UTC): fp32 kernel vs F.linear 64 rows 6.8 vs 12.0, 128 14.3
    vs 17.7, 256 29.5 vs 31.5; bf16 row-dot kernel vs F.linear 32 1.76 vs 2.32, 64 3.3 vs 3.7, 128 6.5 vs 6.4;
    widened never (5x slower than F.linear at 256-1024 rows: a [56, 1792] router at 1024 rows 3.6 vs 0.68 ms)."""

    cpu_linear_kmajor: tuple[str, ...] = ("avx2", "avx512", "avx512_bf16")
    """Kernel paths whose bf16 linears are packed K-major at load (``layout.pack_kmajor``) and run the kernel's
    outer-product linear at every M (``cpu_ops.linear_kmajor``; ``cpu_linear_rows``' bf16 entries then apply only
    to weights that cannot be packed). Measured ([5376, 1792], 2 threads; RESULTS.md 2026-12-04 19:28 UTC) on the
    Xeon without AMX (``avx512_bf16``): cold against the row-dot kernel 1 row 671 vs 726 µs, 4 729 vs 847, 8 783
    vs 1121, 16 1339 vs 2039; warm against oneDNN's fp32 GEMM on widened weights 64 rows 4.6 vs 6.8 ms, 256 17.7
    vs 19.8, 1024 72.3 vs 69.7. On AMD Zen 4 (``avx512_bf16``, VDPBF16PS as fast as an FMA: the kernel's dot form,
    ``cpu_native.kmajor_dot``; RESULTS.md 2026-12-05 21:23 UTC) [3584, 1792] cold 8 rows 422 µs (the split form
    545), 16 rows 628 (1024). On the Zen 3 EPYC (``avx2``; RESULTS.md 2026-12-06 23:10 UTC), cold, XLarge qkv /
    o_proj / lm_head against the row-dot kernel: 1 row 0.89 / 0.96 / 0.94x its time, 4 rows 0.69 / 0.77 / 0.70x, 8
    rows 0.79 / 0.80 / 0.70x; from 128 rows bf16 x runs widened GEMMs (``cpu_linear_kmajor_widen_min_tokens``). Not
    ``amx`` (its tiles read the row-major weight)."""

    cpu_linear_kmajor_fp32: tuple[str, ...] = ("avx2",)
    """Kernel paths whose fp32 linears are packed K-major at load (``layout.pack_kmajor``, [N / 16, K, 16, 1]) and run
    the kernel's outer-product fp32 linear at every M (``cpu_ops.linear_kmajor``; ``cpu_linear_rows``' fp32 entries
    then apply only to weights that cannot be packed). Measured on the Zen 3 EPYC (``avx2``, 2 threads; RESULTS.md
    2026-12-07 09:15 UTC): cold (bench_memory_cpu.py --linears-only) against the row-dot kernel, XLarge qkv / o_proj /
    lm_head: 1 row 0.90 / 0.76 / 0.89x its time, 4 rows 0.93 / 0.87 / 0.93x, 8 rows 0.94 / 1.04 / 1.01x (more than 4
    tokens in chunks of k; vLLM's oneDNN handler 1.13-1.48x the packed kernel's time); warm, [5376, 1792], against
    oneDNN's fp32 GEMM (``F.linear``) 64 / 128 / 256 / 512 / 1024
    rows 7.6 / 13.5 / 28.1 / 54.2 / 110 ms vs 11.5 / 18.9 / 36.5 / 60.1 / 116 (163-183 GFLOP/s: one line serves 4
    tokens from registers, 8 independent FMA chains). Not the AVX-512 paths (the kernel has no AVX-512 fp32 form;
    unmeasured there)."""

    cpu_linear_kmajor_widen_min_tokens: dict[str, int] = field(default_factory=lambda: {"avx2": 384})
    """Per route entry, the rows from which a bf16 linear packed K-major (``cpu_linear_kmajor``) with bf16 x runs
    oneDNN's fp32 GEMM on blocks of ``cpu_ops.WIDEN_ROWS`` rows unpacked and widened from the packed weight
    (``cpu_ops.widened_linear_kmajor``: the same fp32 weights as ``widened_linear``'s, so the same bits) instead of
    the kernel; entries not here: never. ``avx2``, the Zen 3 EPYC ([5376, 1792], bf16 x, warm, 2 threads, one run;
    RESULTS.md 2026-12-06 23:10 UTC): the K-major kernel vs the widened GEMMs from the packed weight 128 rows 24.9 vs
    25.6 ms, 192 37.5 vs 39.2, 256 50.2 vs 58.1, 384 74.5 vs 63.3, 512 96.8 vs 77.2 (the kernel ~100 GFLOP/s,
    FMA-latency bound: each output's odd and even products in the same order as every other form; the unpacking
    costs ~1-4 ms a weight beside widening the row-major one, whose GEMMs took 21.4 / 33.9 / 46.8 / 58.7 / 74.1);
    below 128 rows the K-major kernel took 0.75-0.86x the row-dot kernel's time (16 / 64 / 127 rows)."""

    cpu_linear_kmajor_int8: tuple[str, ...] = ("avx2", "avx512_bf16")
    """Kernel paths whose int8 linears (``--quantization blockffn_int8``) are packed K-major at load
    (``layout.pack_kmajor``, [N / 16, K / 4, 16, 4]) and run the kernel's outer-product int8 linear at every M
    (``cpu_ops.int8_linear_kmajor``: the row-major VNNI linear's integers, the same bits). Measured cold on the Xeon
    without AMX (``avx512_bf16``, 2 threads; RESULTS.md 2026-12-04 22:32 UTC) against the row-dot VNNI kernel:
    [3584, 1792] 1 / 4 / 8 rows 312 vs 349, 366 vs 456, 468 vs 631 µs; lm_head [32000, 1792] 1873 vs 1992, 2072
    vs 2558, 2646 vs 3668 µs; warm, bf16 x, 64 / 256 / 1024 rows 1.5 vs 2.2, 5.8 vs 8.9, 24.4 vs 60.9 ms. On the
    Zen 3 EPYC (``avx2``: VPMADDWD on x in int16, ``kq_avx2``, the row-major AVX2 kernel's integers; RESULTS.md
    2026-12-07 02:49 UTC), cold, XLarge qkv / o_proj / lm_head against the row-major kernel: 1 row 0.90 / 1.07 /
    1.05x its time (the VM's spread), 4 rows 0.72 / 0.72 / 0.67x, 8 rows 0.70 / 1.01 / 0.68x. Not ``amx`` (its int8
    tiles read the row-major weight), nor ``avx512`` (the same kernel would run; not measured)."""


    cpu_grouped_min_tokens_kmajor_int8: dict[str, int] = field(
        default_factory=lambda: {"avx512_bf16_dp": NEVER, "avx2": NEVER})
    """Per route entry, the step size from which int8 experts packed K-major (``cpu_experts_kmajor_int8``) take the
    grouped GEMMs; entries not here keep ``cpu_grouped_min_tokens_by_path``'s int8 one (not measured with packed
    experts). ``avx512_bf16_dp``, the Zen 4 EPYC (RESULTS.md 2026-12-06 03:53 UTC; XLarge shape, 4 segments, bf16 x,
    chunks of 2048 tokens): the packed kernel 61-178 ms against the grouped GEMMs' 73-281 at 2048-8192 tokens
    (1.2-2.0x), 302-328 GFLOP/s when the VM streams well: never grouped. ``avx2``, the Zen 3 EPYC (VPMADDWD; XLarge
    shape, 4 segments, bf16 x, warm, 2 threads, bench_long_steps_cpu.py at 41a99d5): the packed kernel 5.3 / 26.0 /
    125 / 159 ms at 128 / 512 / 2048 / 4096 tokens (81-126 GFLOP/s on the active pairs), the grouped GEMMs on the
    experts as loaded 19.2 / 56.1 / 181 / 198, on the packed ones 40.9 / 84.1 / 215 / 220: never grouped (RESULTS.md
    2026-12-07 02:49 UTC)."""

    cpu_grouped_min_tokens_kmajor_bf16: dict[str, int] = field(
        default_factory=lambda: {"avx512_bf16_dp": NEVER, "avx2": NEVER})
    """Per route entry, the step size from which bf16 experts packed K-major (``cpu_experts_kmajor_bf16``) take the
    grouped GEMMs; entries not here keep ``cpu_grouped_min_tokens_by_path``'s bf16 one (not measured with packed
    experts). ``avx512_bf16_dp``, the Zen 4 EPYC (bench_long_steps_cpu.py at 252203d; XLarge shape, 4 segments, bf16
    x): the packed kernel 4.3 / 14.9 / 30.3 / 59.7 / 135 ms at 256 / 1024 / 2048 / 4096 / 8192 tokens (291-337
    GFLOP/s on the active pairs, 79-82% of oneDNN's bf16 GEMM from 1024), the grouped GEMMs on the experts as loaded
    12.9 / 28.5 / 47.4 / 94.7 / 210 ms: never grouped (RESULTS.md 2026-12-06 07:00 UTC). ``avx2``, the Zen 3 EPYC
    (AVX2 only; bf16 x, warm, 2 threads): the packed kernel 7.7 / 29.6 / 38.2 / 143 / 241 ms at 128 / 512 / 1024 /
    2048 / 4096 tokens, the grouped GEMMs as loaded (fp32 GEMMs on widened experts) 22.0 / 46.8 / 52.8 / 161 / 244,
    the 4-row units it replaces 11.7 / 43.7 / 98.5 / 205 (to 2048): never grouped (RESULTS.md 2026-12-06 23:10
    UTC)."""

    cpu_experts_kmajor_bf16: tuple[str, ...] = ("avx2", "avx512_bf16")
    """Kernel paths whose bf16 experts are packed K-major at load (``layout.pack_experts_kmajor``) and run as two
    K-major bf16 linears an expert (cpu_native.c ``kx_run`` with the linears' forms: VDPBF16PS on x as stored where
    it is fast, the split FMA forms otherwise) instead of 4-row units. Measured on the Zen 4 EPYC (RESULTS.md
    2026-12-06 07:00 UTC): long steps 1.35-1.8x the 4-row units and 1.6-3.0x the grouped GEMMs, cold decode
    calls 0.88-1.09x the units' time (on par at Medium-XLarge, faster at Small), end to end batch 1 / 8 1.04 / 1.06x
    and the prefill-heavy row 1.14x. On the Zen 3 EPYC (``avx2``, AVX2 only: the lines widened by a shift and a
    mask, each widened line serving 4 tokens; RESULTS.md 2026-12-06 23:10 UTC), cold engine calls, side by side: 4-token
    verify chunks 0.66-0.84x the units' time at every official shape, decode 1-8 tokens 0.84-0.98x (XLarge 1 token
    1.03x, within noise); long steps 1.5x the units at 128-512 tokens. Not ``amx`` (its tiles read the row-major
    experts), nor ``avx512`` (not measured)."""

    cpu_experts_kmajor_fp32: tuple[str, ...] = ("avx2",)
    """Kernel paths whose fp32 experts (what vLLM serves on CPUs without AVX-512) are packed K-major at load
    (``layout.pack_experts_kmajor``, g = 1) and run as two K-major fp32 linears an expert (cpu_native.c ``kx_run``
    with ``kf_any``'s forms: up to 4 blocks streamed side by side at 1-2 tokens) instead of 4-row units. Measured on
    the Zen 3 EPYC (RESULTS.md 2026-12-07 09:15 UTC), cold engine calls against the units, two runs: 0.80-1.01x
    their time, 39 of 40 rows faster (XLarge 82-89% of the read bandwidth at 1-8 tokens); end to end, fp32 batch 1 /
    4, with the fp32 linears packed too, 1.13 / 1.15x. Not the AVX-512 paths (the kernel has no AVX-512 fp32 form;
    not measured)."""

    cpu_grouped_min_tokens_kmajor_fp32: dict[str, int] = field(default_factory=lambda: {"avx2": NEVER})
    """Per route entry, the step size from which fp32 experts packed K-major (``cpu_experts_kmajor_fp32``) take the
    grouped GEMMs (on experts unpacked for the call); entries not here keep ``cpu_grouped_min_tokens_by_path``'s fp32
    one. ``avx2``, the Zen 3 EPYC (XLarge shape, 4 segments, warm; RESULTS.md 2026-12-07 09:15 UTC): the packed kernel
    8.9 / 17.3 / 33.8 / 65.9 ms at 128 / 512 / 1024 / 2048 tokens (146-153 GFLOP/s from 512, 88-94% of oneDNN's fp32
    GEMM rate), the grouped GEMMs as loaded 19.5 / 35.9 / 62.7 / 105: never grouped."""

    cpu_experts_kmajor_int8: tuple[str, ...] = ("avx2", "avx512_bf16")
    """Kernel paths whose int8 experts are packed K-major at load (``layout.pack_experts_kmajor``) and run as two
    K-major int8 linears an expert (cpu_native.c ``kx_run``) instead of 4-row row-major units. Measured on the Zen 4
    EPYC (``avx512_bf16``, RESULTS.md 2026-12-06 03:53 UTC) and on the Zen 3 EPYC (``avx2``: the same integers by
    VPMADDWD, ``kq_avx2`` / ``kx_down_avx2``; cold engine calls against the units, side by side, 0.73-0.98x their
    time on all 20 rows of the four official shapes, verify chunks 0.76-0.90x; RESULTS.md 2026-12-07 02:49 UTC).
    Not ``amx`` (not measured there), nor ``avx512`` (the AVX2 kernel would run; not measured)."""

THRESHOLDS = DispatchThresholds()


CUDA_PATHS = ("segments", "expert_major", "dense")


def union_fraction(
    num_segments: float, tokens_per_segment: float, thresholds: DispatchThresholds = THRESHOLDS
) -> float:
    """Expected fraction of the experts in the union of ``num_segments`` independent segments of
    ``tokens_per_segment`` consecutive tokens each (the routing model of :class:`DispatchThresholds`)."""
    t = thresholds
    if num_segments <= 0 or tokens_per_segment <= 0:
        return 0.0
    n = num_segments**t.cuda_segments_exponent * tokens_per_segment**t.cuda_locality_exponent
    c = t.cuda_always_on_fraction
    return c + (1.0 - c) * (1.0 - (1.0 - t.cuda_other_rate) ** n)


def cuda_costs(
    num_tokens: int,
    num_segments: int,
    num_experts: int,
    expert_size: int,
    hidden_size: int,
    elt: int = 2,
    thresholds: DispatchThresholds = THRESHOLDS,
    act_elt: int | None = None,
) -> dict[str, float]:
    """Modelled µs of one layer's expert part per CUDA path, from static shapes only.

    Each launch costs max(bytes / bandwidth, FLOPs / peak) + a fixed launch cost; bytes are what
    the launch must move (weights once per launch, activations once), expected sizes from the
    routing model. Segments: ``num_segments`` may count an empty padding segment, so at most
    ``num_tokens`` of them are taken to read weights. The launches (benchmarks/gpu_on_paper.py
    counts them exactly and checks this model against its own figures):
    - segments: union + up (its union's weights, every token × every union expert, h out) + down
      (weights again, h in, y out) + the K-split reduction when the grid is small: 3 or 5;
    - expert_major: routing (2 elementwise) + alignment (vLLM's op: 1 or 2 kernels) + up GEMM
      (the step union's weights, an x row per active pair, h out) + SiLU over the [T·E, D] buffer
      + down GEMM (weights, h in, a [pairs, H] output) + the weighted sum over each token's
      pairs: 7 or 8;
    - dense: GEMM (all weights), SiLU, score cast, score multiply, GEMM: 5.

    ``elt``: bytes per expert weight (2 bf16/fp16, 4 fp32, 1 int8 weight-only). int8 weights
    (``kernels/quant.py``) also read their fp32 scales, 4·E·D (up) and 4·E·H (down) bytes per
    projection read in full, the union's share of them otherwise; both sparse paths read them
    in their kernels (``W_INT8`` / vLLM's ``use_int8_w8a16``). Dense with int8 weights is costed as
    dequantize-then-GEMM (one elementwise launch per projection: int8 + scales in, activation-
    dtype weights out, then the float GEMMs): the only dense int8 path without a weight-only
    GEMM kernel of our own. ``act_elt``: bytes per activation (x, h, y); default ``elt``, or 2
    (bf16) for int8 weights.
    """
    t = thresholds
    T, E, D, H = num_tokens, num_experts, expert_size, hidden_size
    bw, peak = t.cuda_bandwidth_tbps * 1e6, t.cuda_peak_tflops * 1e6  # bytes / µs, FLOP / µs

    def cost(nbytes: float, flops: float = 0.0) -> float:
        return max(nbytes / bw, flops / peak) + t.cuda_launch_us

    int8 = elt == 1
    a = act_elt or (2 if int8 else elt)
    W = E * D * H * elt  # one projection of all experts
    W_up = W + (E * D * 4 if int8 else 0)  # + the fp32 scales of int8 weights
    W_down = W + (E * H * 4 if int8 else 0)
    s_eff = max(1, min(num_segments, T))
    L = T / s_eff
    u_seg = union_fraction(1, L, t)
    u_step = union_fraction(s_eff, L, t)
    P = t.cuda_pair_fraction * T * E  # active pairs
    h_seg = T * u_seg * E * D * a
    # The K-split of the per-segment down kernel (and its 2-launch reduction) when its grid is
    # small (triton_sparse_ffn.default_config: about two waves of 132 SMs).
    blocks = max(1, min(T, -(-T // 16) + num_segments))
    split = max(1, min(8, round(0.3 * E), 264 // (blocks * -(-H // 64))))
    seg = (cost(T * E * 4)  # union of the fp32 scores
           + cost(s_eff * u_seg * W_up + T * H * a + h_seg, 2 * T * u_seg * E * D * H)
           + cost(s_eff * u_seg * W_down + h_seg + split * T * H * 4, 2 * T * u_seg * E * D * H)
           + (2 * cost(2 * split * T * H * 4) if split > 1 else 0.0))
    align_launches = 1 if T * E < 1024 and E < 64 else 2  # vLLM's op: one kernel, or align + sort
    em = (2 * cost(T * E * 5) + align_launches * cost(T * E * 12)
          + cost(u_step * W_up + P * (H + D) * a, 2 * P * D * H)
          + cost(2 * T * E * D * a)
          + cost(u_step * W_down + P * (D + H) * a, 2 * P * D * H)
          + cost(P * H * a + T * E * 8 + T * H * a))
    h = T * E * D * a
    Wd = E * D * H * a  # the weights the dense GEMMs read
    dequant = (cost(W_up + Wd) + cost(W_down + Wd)) if int8 else 0.0
    dense = (dequant + cost(Wd + T * H * a + h, 2 * T * E * D * H) + cost(2 * h) + cost(T * E * (4 + a))
             + cost(2 * h + T * E * a) + cost(Wd + h + T * H * a, 2 * T * E * D * H))
    return {"segments": seg, "expert_major": em, "dense": dense}


def cuda_path(
    num_tokens: int,
    num_segments: int,
    num_experts: int,
    expert_size: int,
    hidden_size: int,
    thresholds: DispatchThresholds = THRESHOLDS,
    expert_major: bool = True,
    elt: int = 2,
    allow_dense: bool = True,
    act_elt: int | None = None,
) -> str:
    """Static (shape-only) choice for CUDA tensors: "segments", "expert_major" or "dense".

    ``elt``: bytes per expert weight (1 for int8 weight-only experts: 1 byte per weight plus the
    fp32 scales), ``act_elt``: per activation (see :func:`cuda_costs`).

    The cheapest path by :func:`cuda_costs`, the per-segment kernels only for steps of at most
    ``cuda_max_tokens`` tokens and ``cuda_max_tokens_per_segment`` tokens per segment on average;
    dense when there is nothing to do or more experts than the Triton paths take.
    ``expert_major=False`` (vLLM's kernels not importable) keeps the per-segment-or-dense rule of
    the thresholds' last CUDA block. ``allow_dense=False``: the cheaper of the two sparse paths
    (a forced sparse backend)."""
    t = thresholds
    T, S, E = num_tokens, num_segments, num_experts
    if not expert_major:
        if not allow_dense:
            return "segments"
        if T == 0 or S == 0 or E > t.cuda_max_experts or T > t.cuda_max_tokens:
            return "dense"
        if T > t.cuda_max_tokens_per_segment * S:
            return "dense"
        return "dense" if S * t.cuda_expected_union_fraction > t.cuda_max_read_ratio else "segments"
    if T == 0 or S == 0 or E > t.cuda_max_experts:
        return "dense" if allow_dense else "segments"
    costs = cuda_costs(T, S, E, expert_size, hidden_size, elt, t, act_elt)
    if not allow_dense:
        del costs["dense"]
    if T > t.cuda_max_tokens or T > t.cuda_max_tokens_per_segment * S:
        # Long segments: the per-segment kernels multiply every token by its whole union at well
        # below cuBLAS efficiency (the model's peak-FLOP figure would flatter them).
        del costs["segments"]
    return min(costs, key=lambda p: (costs[p], CUDA_PATHS.index(p)))


def cuda_prefers_dense(
    num_tokens: int,
    num_segments: int,
    num_experts: int,
    expert_size: int,
    hidden_size: int,
    thresholds: DispatchThresholds = THRESHOLDS,
    expert_major: bool = True,
) -> bool:
    """True → dense GEMMs, False → one of the sparse Triton paths (:func:`cuda_path`)."""
    return cuda_path(num_tokens, num_segments, num_experts, expert_size, hidden_size, thresholds,
                     expert_major) == "dense"


def cpu_native_prefers_dense(
    pairs: int, num_tokens: int, num_experts: int, thresholds: DispatchThresholds = THRESHOLDS
) -> bool:
    """The native kernel's rule (mirrored in its C code): True → :func:`dense_ffn` for the call."""
    t = thresholds
    return num_tokens >= t.cpu_min_dense_tokens and pairs > t.cpu_max_pair_fraction * num_tokens * num_experts


def cpu_prefers_dense(
    union_sizes: list[int],
    segment_lengths: list[int],
    num_experts: int,
    thresholds: DispatchThresholds = THRESHOLDS,
) -> bool:
    """Data-dependent choice for CPU tensors: True → :func:`dense_ffn` for the whole call."""
    if not union_sizes:
        return False
    if max(segment_lengths, default=0) > thresholds.cpu_max_tokens_per_segment:
        return True
    return sum(union_sizes) > thresholds.cpu_max_union_fraction * num_experts
