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
The CPU path knows its counts for free and decides on the actual union sizes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DispatchThresholds:
    # ---- CUDA: static facts only (T, S, E, D, H).
    cuda_expected_union_fraction: float = 0.3
    """Union density assumed per segment: trained BlockFFN routers reach ~70% CLS-8 (SPEC §3)."""
    cuda_max_read_ratio: float = 0.9
    """Sparse while S · expected union fraction ≤ this, i.e. while the per-segment unions are
    expected to read fewer weight bytes than one dense pass over all E experts (S ≤ 3 here)."""
    cuda_max_tokens: int = 512
    """Above this many tokens in the step, run dense: the GEMMs are compute-bound."""
    cuda_max_tokens_per_segment: int = 128
    """Above this average segment length a union is close to all experts: run dense."""
    cuda_max_experts: int = 256
    """The Triton kernels keep one row of E scores per program."""
    # ---- CPU: data-dependent (the counts are on the host anyway).
    cpu_max_union_fraction: float = 0.8
    """PyTorch path only (no C compiler, or fp16; the native kernel has its own rule below).
    Dense when Σ_s |U_s| > this · E: beyond it the sparse path's per-run overheads and the
    repeated reads of experts shared by segments cost more than reading all experts once.
    Measured (bench_kernels_cpu.py, E=56, 1-64 tokens, 2-core EPYC): sparse/dense ≈ 0.6 with
    50% of the experts in the union, ≈ 0.8 with 70%, ≈ 0.9-1.7 with 90%."""
    cpu_max_tokens_per_segment: int = 4096
    """Segments longer than this are compute-bound: dense (one big GEMM) is as good and simpler."""
    # ---- CPU native kernel (kernels/sparse_ffn/cpu_native.py, expert-major over the whole step).
    # It reads each expert of the step's union once and computes only the P active (token,
    # expert) pairs of the n tokens; dense_ffn reads all E experts and computes all n·E pairs
    # with oneDNN GEMMs. Measured (bench_kernels_cpu.py --dispatch, 2 threads, fp32, 2-core
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


THRESHOLDS = DispatchThresholds()


def cuda_prefers_dense(
    num_tokens: int,
    num_segments: int,
    num_experts: int,
    expert_size: int,
    hidden_size: int,
    thresholds: DispatchThresholds = THRESHOLDS,
) -> bool:
    """Static (shape-only) choice for CUDA tensors: True → dense GEMMs, False → sparse Triton."""
    t = thresholds
    if num_tokens == 0 or num_segments == 0:
        return True
    if num_experts > t.cuda_max_experts or num_tokens > t.cuda_max_tokens:
        return True
    if num_tokens > t.cuda_max_tokens_per_segment * num_segments:
        return True
    return num_segments * t.cuda_expected_union_fraction > t.cuda_max_read_ratio


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
