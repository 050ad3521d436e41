"""Weight-only int8 with symmetric per-output-row scales: the one definition every path uses.

Why: a memory-bound decoder's time is its bytes; int8 halves bf16's. Weight-only (activations stay
fp32/bf16): the kernels widen int8 to fp32 in registers and multiply by the row's scale, so the
arithmetic is the dequantized weight's (up to fp32 rounding order), and nothing about the router,
hence the sparsity, changes.

A weight W [..., K] (rows along the last dim: the dim a dot product runs over) is stored as
q int8 [..., K] and scale fp32 [...]: W ≈ q · scale[..., None], scale = max|row| / 127,
q = round(W / scale) in [-127, 127] (-128 unused: symmetric). An all-zero row has scale 1, q 0.

Layouts (internal, see ``layout.py``): experts ``w_up`` int8 [E, D, H] with ``up_scale`` [E, D]
(per output row of W_up,e); ``w_down_t`` int8 [E, D, H] with ``down_scale`` [E, H] (per output row
of W_down,e = the checkpoint's [E, H, D] rows, i.e. per *column* of ``w_down_t``); a dense linear's
weight int8 [N, K] with ``weight_scale`` [N]. On CPUs with VNNI the experts are packed K-major at load
(``layout.pack_experts_kmajor``: the same bytes and scales, 5-D tensors).
"""

from __future__ import annotations

import torch

from .layout import expert_dims, unpack_experts

QMAX = 127


def quantize_rows(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 like ``w``, scale fp32 ``w.shape[:-1]``) with w ≈ q · scale[..., None].

    Raises ValueError naming ``name`` when ``w`` is not floating point or holds NaN/Inf (a
    non-finite weight has no int8 value)."""
    if not w.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {w.dtype} tensor to int8; expected a floating-point weight")
    wf = w.float()
    amax = wf.abs().amax(-1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{name}: holds NaN or Inf values; int8 quantization needs finite weights")
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale[..., None] in ``dtype`` (computed in fp32)."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def quantize_experts(w_up: torch.Tensor, w_down_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Internal-layout experts → (w_up q [E, D, H], up_scale [E, D], w_down_t q [E, D, H], down_scale [E, H])."""
    q_up, s_up = quantize_rows(w_up, "up_proj")
    q_down, s_down = quantize_rows(w_down_t.transpose(1, 2), "down_proj")  # rows of W_down,e: [E, H, D]
    return q_up, s_up, q_down.transpose(1, 2).contiguous(), s_down


def dequantize_experts(w_up: torch.Tensor, up_scale: torch.Tensor, w_down_t: torch.Tensor, down_scale: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 experts + scales → (w_up, w_down_t) in ``dtype``: the references' dequantize step (experts packed
    K-major at load, ``layout.pack_experts_kmajor``, come back to [E, D, H] here)."""
    w_up, w_down_t = unpack_experts(w_up, w_down_t)
    up = dequantize_rows(w_up, up_scale, dtype)
    down = (w_down_t.float() * down_scale.float().unsqueeze(1)).to(dtype)
    return up, down


def float_experts(w_up: torch.Tensor, up_scale: torch.Tensor | None, w_down_t: torch.Tensor,
                  down_scale: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts as [E, D, H] tensors of ``dtype`` (x's) for the GEMM and PyTorch routes, whatever their storage: int8
    dequantized (:func:`dequantize_experts`), bf16 packed K-major at load unpacked (copies), float experts cast where
    their dtype differs (else as they are)."""
    if check_expert_scales(w_up, up_scale, w_down_t, down_scale):
        return dequantize_experts(w_up, up_scale, w_down_t, down_scale, dtype)
    w_up, w_down_t = unpack_experts(w_up, w_down_t)
    return w_up.to(dtype), w_down_t.to(dtype)


def check_expert_scales(w_up: torch.Tensor, up_scale: torch.Tensor | None, w_down_t: torch.Tensor,
                        down_scale: torch.Tensor | None) -> bool:
    """True for int8 experts with scales of the right shapes, False for float experts without;
    ValueError naming the tensor otherwise."""
    if w_up.dtype != torch.int8 and w_down_t.dtype != torch.int8:
        if up_scale is not None or down_scale is not None:
            raise ValueError(f"expert scales given for {w_up.dtype} experts; scales go with int8 weights only")
        return False
    E, D, H = expert_dims(w_up)
    for name, w, s, shape in (("up_proj", w_up, up_scale, (E, D)), ("down_proj", w_down_t, down_scale, (E, H))):
        if w.dtype != torch.int8:
            raise ValueError(f"{name}: {w.dtype}; expected int8 like the other expert weight")
        if s is None:
            raise ValueError(f"{name}_scale: missing; int8 {name} needs fp32 scales of shape {list(shape)}")
        if tuple(s.shape) != shape or s.dtype != torch.float32:
            raise ValueError(f"{name}_scale: {s.dtype} {list(s.shape)}; expected torch.float32 {list(shape)}")
    return True
