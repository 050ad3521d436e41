"""How a BlockFFN layer's experts are laid out on CPUs: packed K-major at load where it is faster.

Why: the native kernel's 4-row row-major units read an expert as many short row streams and compute each token's
dot products with horizontal sums; packed K-major (``layout.pack_experts_kmajor``: each expert's W_up [D, H] and
W_down [H, D] as two K-major linears, the layout of the kernel's outer-product linears) an expert is one sequential
stream a panel, every token of a line served from it. Measured per dtype and kernel path
(``THRESHOLDS.cpu_experts_kmajor_int8`` / ``cpu_experts_kmajor_bf16``, kernels/dispatch.py).

How: int8 experts (``--quantization blockffn_int8``) are packed by their method after loading
(quantization.py), float experts by the model's own post-load hook (``BlockFFNForCausalLM
.process_weights_after_loading``); both through :func:`pack`. fp32 experts stay as loaded (no fp32 K-major layout).
``VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor`` keeps every layer as loaded (the A/B switch). Every route reads the packed
tensors: the kernel (weight codes 3 / 4), the dense and grouped GEMMs and the PyTorch fallback through
``quant.float_experts``.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter

from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.layout import experts_packable, pack_experts_kmajor
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.serving.config import env_choice

EXPERTS_ENV = "VLLM_BLOCKFFN_CPU_EXPERTS"


def experts_mode() -> str:
    """`VLLM_BLOCKFFN_CPU_EXPERTS`: auto (default: experts packed K-major where :func:`packs_experts` says) |
    rowmajor (as loaded: the kernel's 4-row units)."""
    return env_choice(EXPERTS_ENV, ("auto", "rowmajor"), "auto")


def kmajor_paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernel paths on which experts of this dtype are packed K-major (none for fp32)."""
    return {torch.int8: THRESHOLDS.cpu_experts_kmajor_int8,
            torch.bfloat16: THRESHOLDS.cpu_experts_kmajor_bf16}.get(dtype, ())


def packs_experts(w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Whether experts on a CPU are packed K-major at load: shapes that pack (``layout.experts_packable``), a path of
    :func:`kmajor_paths` for their dtype, `VLLM_BLOCKFFN_CPU_EXPERTS` auto and the native kernel built."""
    return (experts_mode() == "auto" and w_up.device.type == "cpu" and experts_packable(w_up, w_down_t)
            and cpu_native.cpu_isa() in kmajor_paths(w_up.dtype) and cpu_native.native_available())


def pack(layer: torch.nn.Module) -> bool:
    """Pack ``layer.up_proj`` / ``layer.down_proj`` (a BlockFFN layer's experts, [E, D, H]) K-major in place when
    :func:`packs_experts` says; returns whether it did."""
    if not packs_experts(layer.up_proj.data, layer.down_proj.data):
        return False
    up, down = pack_experts_kmajor(layer.up_proj.data, layer.down_proj.data)
    layer.up_proj = Parameter(up, requires_grad=False)
    layer.down_proj = Parameter(down, requires_grad=False)
    return True
