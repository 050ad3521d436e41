"""How a BlockFFN layer's experts are laid out on CPUs: packed K-major at load where it is faster.

Why: the native kernel's 4-row row-major units read an expert as many short row streams and compute each token's
dot products with horizontal sums; packed K-major (``layout.pack_experts_kmajor``: each expert's W_up [D, H] and
W_down [H, D] as two K-major linears, the layout of the kernel's outer-product linears) an expert is one sequential
stream a panel, every token of a line served from it. Measured per dtype and kernel path
(``THRESHOLDS.cpu_experts_kmajor_int8`` / ``_bf16`` / ``_fp32``, kernels/dispatch.py).

How: int8 experts (``--quantization blockffn_int8``) are packed by their method after loading
(quantization.py), float experts by the model's own post-load hook (``BlockFFNForCausalLM
.process_weights_after_loading``); both through :func:`pack`.
``VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor`` keeps every layer as loaded (the A/B switch). Every route reads the packed
tensors: the kernel (weight codes 3 / 4), the dense and grouped GEMMs and the PyTorch fallback through
``quant.float_experts``.
"""

from __future__ import annotations

import collections
import logging

import torch
from torch.nn import Parameter

from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.layout import experts_packable, pack_experts_kmajor
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.serving.config import env_choice

EXPERTS_ENV = "VLLM_BLOCKFFN_CPU_EXPERTS"
logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines


def experts_mode() -> str:
    """`VLLM_BLOCKFFN_CPU_EXPERTS`: auto (default: experts packed K-major where :func:`packs_experts` says) |
    rowmajor (as loaded: the kernel's 4-row units)."""
    return env_choice(EXPERTS_ENV, ("auto", "rowmajor"), "auto")


def kmajor_paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernel paths on which experts of this dtype are packed K-major."""
    return {torch.int8: THRESHOLDS.cpu_experts_kmajor_int8, torch.bfloat16: THRESHOLDS.cpu_experts_kmajor_bf16,
            torch.float32: THRESHOLDS.cpu_experts_kmajor_fp32}.get(dtype, ())


def packs_experts(w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Whether experts on a CPU are packed K-major at load: as loaded ([E, D, H]) and nothing in
    :func:`unpacked_reason` against it (the one statement of the rule)."""
    return w_up.dim() == 3 and unpacked_reason(w_up, w_down_t) is None


def unpacked_reason(w_up: torch.Tensor, w_down_t: torch.Tensor) -> str | None:
    """Why experts stay as loaded (None: they are packed, or pack — :func:`packs_experts`): shapes that pack
    (``layout.experts_packable``), a path of :func:`kmajor_paths` for their dtype, `VLLM_BLOCKFFN_CPU_EXPERTS` auto
    and the native kernel built. Said at load, so that a model whose d_e misses the packed layout's 16-row grain (an
    inflated model with d_e 149, a TP slice of 8) does not run the slower units unnoticed — two sessions' end-to-end
    figures on the AVX2 EPYC measured such a model as if packed."""
    if w_up.dim() == 5:
        return None
    if w_up.device.type != "cpu":
        return f"on {w_up.device.type}"
    if experts_mode() != "auto":
        return f"{EXPERTS_ENV}={experts_mode()}"
    if w_up.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        return f"{str(w_up.dtype).removeprefix('torch.')} experts have no packed layout"
    if cpu_native.cpu_isa() not in kmajor_paths(w_up.dtype):
        return f"path {cpu_native.cpu_isa()} is not one of {list(kmajor_paths(w_up.dtype))}"
    if not cpu_native.native_available():
        return "the native kernel is not built"
    if not experts_packable(w_up, w_down_t):
        _, d, h = w_up.shape
        return (f"d_e {d} and H {h} must be multiples of 16" + (" (int8: d_e up to 512, H up to 16384)"
                                                                 if w_up.dtype == torch.int8 else ""))
    return None


def describe(model: torch.nn.Module) -> str:
    """One line on how a model's BlockFFN layers hold their experts on this CPU (the load log; benchmarks print it)."""
    from vllm_blockffn.serving.layers.blockffn import BlockFFN

    layers = [m for m in model.modules() if isinstance(m, BlockFFN)]
    packed = [m for m in layers if m.up_proj.dim() == 5]
    reasons = collections.Counter(unpacked_reason(m.up_proj.data, m.down_proj.data) for m in layers
                                  if m.up_proj.dim() != 5)
    dtypes = sorted({str(m.up_proj.dtype).removeprefix("torch.") for m in layers})
    text = f"experts ({'/'.join(dtypes)}) of {len(packed)}/{len(layers)} layers packed K-major"
    if reasons:
        text += "; as loaded (4-row units): " + "; ".join(f"{n} layers, {r}" for r, n in reasons.items())
    return text


def pack(layer: torch.nn.Module) -> bool:
    """Pack ``layer.up_proj`` / ``layer.down_proj`` (a BlockFFN layer's experts, [E, D, H]) K-major in place when
    :func:`packs_experts` says; returns whether it did."""
    if not packs_experts(layer.up_proj.data, layer.down_proj.data):
        return False
    up, down = pack_experts_kmajor(layer.up_proj.data, layer.down_proj.data)
    layer.up_proj = Parameter(up, requires_grad=False)
    layer.down_proj = Parameter(down, requires_grad=False)
    return True
