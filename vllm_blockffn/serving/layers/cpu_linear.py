"""Decode-size linears of BlockFFN models on CPUs through the native streaming kernel.

Why: in a sparse decode step the experts read ~10% of their bytes, and the rest of the step
(attention projections, lm_head) becomes most of the time. vLLM's CPU linear path
(`dispatch_cpu_unquantized_gemm`: oneDNN `onednn_mm`, AMX for bf16) reads a weight at
8.7 GB/s (bf16) / 12.5 GB/s (fp32) at batch 1 on the 2-core Xeon here (ENV.md), a third of the
memory's speed. For M ≤ `THRESHOLDS.cpu_linear_max_tokens` rows the native kernel
(`kernels/sparse_ffn/cpu_native.c`, `blockffn_linear`) streams the row-major [N, K] weight once
at memory speed; larger M (prefill, big batches) is compute-bound, and each kernel path has its measured
rule (`THRESHOLDS.cpu_linear_rows`, `cpu_ops.native_rows` / `widened_rows`): the kernel a little further
where it still beats oneDNN (bf16 on AMX up to 32 rows, fp32 on AVX2 up to 64), `F.linear` (torch's oneDNN GEMM,
AMX where present) on the same weight, and for bf16 on CPUs without AMX — where oneDNN has no bf16 GEMM
(AVX2: torch's fallback, ~4x slower than the kernel) or runs it at half its fp32 rate (AVX512_BF16) —
oneDNN's fp32 GEMM on weight blocks widened to fp32 (`cpu_ops.widened_linear`). On the AVX-512 paths without
AMX (`THRESHOLDS.cpu_linear_kmajor`) bf16 weights are packed K-major at load instead (`layout.pack_kmajor`, the
same bytes) and run the kernel's outer-product linear at every M (`cpu_ops.linear_kmajor`): the row-dot GEMV is
compute-bound there from ~4 rows (8-row [5376, 1792] 1.43x faster cold, 64 rows 1.5x faster than widened fp32
GEMMs; RESULTS.md 2026-12-04 19:28 UTC). On AVX2 (`THRESHOLDS.cpu_linear_kmajor_fp32`) fp32 weights are packed
too, every M on the kernel: 1-2 rows stream four 16-row blocks side by side (0.83-0.92x the row-dot kernel's
time, cold), 64-1024 rows outrun oneDNN's fp32 GEMM (0.66-0.95x its time). Code that
needs the [N, K] weight itself calls `row_major_weight`.

How: only our model's layers change. `install(model)` gives every unquantized linear and the
lm_head of a BlockFFN model a method whose `process_weights_after_loading` keeps the weight as it
was loaded (no oneDNN reorder, so no second copy) and sets `layer.cpu_linear`, which vLLM's
`cpu_unquantized_gemm` calls, to one opaque torch op (`torch.ops.blockffn_native.linear`,
kernels/sparse_ffn/cpu_ops.py: C++, so a call adds no Python; the M test happens inside it, never in
a compiled graph). `VLLM_BLOCKFFN_CPU_LINEAR=vllm` keeps vLLM's
own path, `=rowmajor` the streaming kernel on the weight as loaded (no K-major packing: the A/B switch);
vLLM's path is kept for fp16, layers vLLM marks `_cpu_skip_gemm_dispatch`, and machines without the
native kernel.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.layout import kmajor_packable, pack_kmajor, unpack_kmajor
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops
from vllm_blockffn.serving.config import env_choice

LINEAR_ENV = "VLLM_BLOCKFFN_CPU_LINEAR"
MODES = ("auto", "rowmajor", "vllm")


def linear_mode() -> str:
    """`VLLM_BLOCKFFN_CPU_LINEAR`: auto (default: the streaming kernel for decode-size M, weights packed K-major on
    the paths of `THRESHOLDS.cpu_linear_kmajor` / `_fp32` / `_int8`) | rowmajor (the same without packing) | vllm."""
    return env_choice(LINEAR_ENV, MODES, "auto")


def _eligible(layer: torch.nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (current_platform.is_cpu() and linear_mode() != "vllm" and isinstance(w, torch.Tensor)
            and w.dim() == 2 and not w.is_meta and w.dtype in (torch.float32, torch.bfloat16)
            and not getattr(layer, "_cpu_skip_gemm_dispatch", False) and cpu_native.native_available())


def _apply(op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """op on x's rows flattened to 2-D, the output reshaped back, plus the bias."""
    shape = x.shape
    y = op(x.reshape(-1, shape[-1]), weight)
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _apply(cpu_ops.linear, x, weight, bias)


def _cpu_linear_kmajor(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _apply(cpu_ops.linear_kmajor, x, weight, bias)


def packs_kmajor(weight: torch.Tensor) -> bool:
    """Whether a loaded linear weight is to be packed K-major: packable (fp32, bf16, or int8 from
    `--quantization blockffn_int8`), on a path of `THRESHOLDS.cpu_linear_kmajor_fp32` (fp32),
    `THRESHOLDS.cpu_linear_kmajor` (bf16) or `THRESHOLDS.cpu_linear_kmajor_int8` (int8), `VLLM_BLOCKFFN_CPU_LINEAR`
    auto. (:func:`_streaming` also keeps the layers marked `blockffn_row_major` as loaded: other kernels read their
    weight as [N, K].)"""
    paths = {torch.int8: THRESHOLDS.cpu_linear_kmajor_int8, torch.float32: THRESHOLDS.cpu_linear_kmajor_fp32}.get(
        weight.dtype, THRESHOLDS.cpu_linear_kmajor)
    return linear_mode() == "auto" and kmajor_packable(weight) and cpu_native.cpu_isa() in paths


def row_major_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear's weight [N, K] whatever its layout (a copy when it is packed K-major): for code that reads
    rows of it (the EAGLE head's reduced vocabulary), not for the forward pass."""
    w = layer.weight
    return unpack_kmajor(w) if getattr(layer, "blockffn_kmajor", False) else w


def _streaming(layer: torch.nn.Module) -> None:
    """The weight as a plain Parameter (K-major when :func:`packs_kmajor`) and `layer.cpu_linear` the op."""
    cpu_ops.implementation()  # the op registered (built on first use) before any graph refers to it
    if packs_kmajor(layer.weight) and not getattr(layer, "blockffn_row_major", False):
        layer.weight = torch.nn.Parameter(pack_kmajor(layer.weight.data), requires_grad=False)
        layer.blockffn_kmajor = True
        layer.cpu_linear = _cpu_linear_kmajor
        return
    _plain_weight(layer)
    layer.cpu_linear = _cpu_linear


def _plain_weight(layer: torch.nn.Module) -> None:
    """The loaded weight as a plain Parameter (contiguous, same storage when it already is). vLLM's
    parameter classes carry a Python ``__torch_function__`` that every op call on them runs: ~100
    calls per decode step; their weight loaders are not needed after loading (vLLM's quantized
    methods replace their parameters the same way)."""
    layer.weight = torch.nn.Parameter(layer.weight.data.contiguous(), requires_grad=False)


class StreamingLinearMethod(UnquantizedLinearMethod):
    """UnquantizedLinearMethod whose CPU GEMM is :func:`_cpu_linear` (weight kept as loaded)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _eligible(layer):
            return super().process_weights_after_loading(layer)
        _streaming(layer)


class StreamingLMHeadMethod(UnquantizedEmbeddingMethod):
    """The lm_head's method with the same CPU GEMM (the embedding lookup is unchanged)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _eligible(layer):
            return super().process_weights_after_loading(layer)
        _streaming(layer)


def install(model: torch.nn.Module) -> int:
    """Give the model's unquantized linears and lm_head the streaming method; returns how many.
    A no-op off CPUs or with VLLM_BLOCKFFN_CPU_LINEAR=vllm (checked again after loading)."""
    if not current_platform.is_cpu() or linear_mode() == "vllm":
        return 0
    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(method) is UnquantizedLinearMethod:
            module.quant_method = StreamingLinearMethod()
            n += 1
        elif isinstance(module, ParallelLMHead) and type(method) is UnquantizedEmbeddingMethod:
            module.quant_method = StreamingLMHeadMethod()
            n += 1
    return n
