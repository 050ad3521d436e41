"""Sparse BlockFFN experts in Triton: only the per-segment union of active experts is read.

Pipeline (all launches have grids that depend on shapes only; nothing syncs the host):
1. ``segment_union_triton``: per-segment active-expert list ``expert_ids`` [S, E] +
   ``counts`` [S], and the token-block table (``block_seg``, ``block_t0``).
2. ``_sparse_up_kernel``: grid (token block, slot × D block). A program whose slot is past
   its segment's count returns at once; the others compute
   h[t, j, d] = SiLU(x_t · w_up[e_j, d]) · r[t, e_j] (SiLU and the router score are fused
   in the epilogue) into the intermediate [T, E, D] (only slots < count are written).
3. ``_sparse_down_kernel``: grid (token block, H block, K split). Each program loops over
   its segment's active slots only and accumulates h[t, j] · w_down_t[e_j] in fp32, so it
   reads only the active experts' rows of ``w_down_t``. With a K split > 1 the partial sums
   go to an fp32 buffer that one torch ``sum`` reduces (deterministic, no atomics).

int8 weight-only experts (``kernels/quant.py``; constexpr ``W_INT8``): the same kernels read
int8 tiles (half of bf16's bytes), widen them in registers (exact: |q| ≤ 127) and apply the
fp32 scales where they factor out of the dot products: the up kernel multiplies its [tokens, D]
sums by ``up_scale[e, d]`` before the SiLU; the down kernel sums each expert over D on its own
and multiplies by ``down_scale[e, h]`` before adding it to the other experts'. Activations,
h and the accumulation stay as for float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import cdiv, dot_mode, lazy_jit, next_pow2, tl
from ..layout import check_ffn_shapes
from ..quant import check_expert_scales
from ..segments.triton_segments import num_token_blocks, segment_union_triton

MAX_EXPERTS = 256


@dataclass(frozen=True)
class SparseFFNConfig:
    """Tile sizes of the two sparse kernels (chosen from static shapes, see :func:`default_config`)."""

    block_t: int = 16  # tokens per token block (tl.dot needs ≥ 16)
    up_block_d: int = 32
    up_block_h: int = 128
    down_block_d: int = 64
    down_block_n: int = 64
    split_k: int = 1  # programs sharing one token block × H block of the down projection
    num_warps: int = 4
    num_stages: int = 3


# About two waves of programs on an H100 (132 SMs) keep a memory-bound decode busy.
_TARGET_PROGRAMS = 264


def default_config(
    num_tokens: int, num_segments: int, num_experts: int, expert_size: int, hidden: int, w_int8: bool = False
) -> SparseFFNConfig:
    """Tile sizes from static facts only (so a captured CUDA graph stays valid).

    At decode the work is a few experts' weights streamed once, so the tiles are chosen to
    spread the *expected* active work (a union of ~30% of the experts per segment) over about
    two waves of programs: narrow D tiles for the up projection, a K split for the down one.
    Not tuned on hardware yet: ``benchmarks/bench_kernels_gpu.py --tune`` sweeps them.
    ``w_int8`` (int8 weights): the up kernel's 64-wide D tile takes 64-deep H steps, since the
    widened int8 tile at 64 × 128 spills on sm_80 (244 bytes per thread; 226 registers, no spills
    at 64 × 64: tests/test_triton_int8.py).
    """
    avg = cdiv(max(num_tokens, 1), max(num_segments, 1))
    block_t = 16 if avg <= 16 else (32 if avg <= 32 else 64)
    nb = max(1, num_token_blocks(num_tokens, num_segments, block_t))
    d_pow2 = max(16, next_pow2(expert_size))
    expected_active = max(1, round(0.3 * num_experts))
    up_bd = 16
    for bd in (64, 32):
        if bd <= d_pow2 and nb * expected_active * cdiv(expert_size, bd) >= _TARGET_PROGRAMS:
            up_bd = bd
            break
    up_bh = 128 if block_t <= 32 else 64
    if w_int8 and up_bd >= 64:
        up_bh = 64
    down_bd = min(d_pow2, 64)
    down_bn = 64
    progs = nb * cdiv(hidden, down_bn)
    split_k = max(1, min(8, expected_active, _TARGET_PROGRAMS // progs))
    return SparseFFNConfig(block_t, up_bd, up_bh, down_bd, down_bn, split_k)


@lazy_jit
def _sparse_up_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    s_ptr,
    h_ptr,
    ids_ptr,
    counts_ptr,
    block_seg_ptr,
    block_t0_ptr,
    cu_ptr,
    H,
    D,
    E,
    stride_xt,
    stride_rt,
    N_DB,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BH: tl.constexpr,
    DOT_MODE: tl.constexpr,
    W_INT8: tl.constexpr,
):
    b = tl.program_id(0)
    pid1 = tl.program_id(1)
    j = pid1 // N_DB
    db = pid1 % N_DB
    s = tl.load(block_seg_ptr + b)
    if s < 0:
        return
    count = tl.load(counts_ptr + s)
    if j >= count:
        return
    e = tl.load(ids_ptr + s * E + j).to(tl.int64)
    t0 = tl.load(block_t0_ptr + b)
    t_end = tl.load(cu_ptr + s + 1)
    rows = t0 + tl.arange(0, BT)
    rmask = rows < t_end
    rows64 = rows.to(tl.int64)
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    w_base = w_ptr + e * D * H
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for k0 in range(0, H, BH):
        k = k0 + tl.arange(0, BH)
        kmask = k < H
        xt = tl.load(x_ptr + rows64[:, None] * stride_xt + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_base + d[None, :] * H + k[:, None], mask=kmask[:, None] & dmask[None, :], other=0.0)
        if W_INT8:  # widen in registers: |q| ≤ 127 is exact in fp16 / bf16 / fp32
            if DOT_MODE == 0:
                wt = wt.to(x_ptr.dtype.element_ty)
            else:
                wt = wt.to(tl.float32)
        if DOT_MODE == 0:
            acc += tl.dot(xt, wt)
        elif DOT_MODE == 1:
            acc += tl.dot(xt, wt, input_precision="ieee")
        else:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    if W_INT8:  # the row scales of W_up,e: Σ_k x_k·(q_dk·s_d) = s_d · Σ_k x_k·q_dk
        acc *= tl.load(s_ptr + e * D + d, mask=dmask, other=0.0)[None, :]
    # Epilogue: SiLU, then the token's own router score (0 for a union expert the token
    # does not use, which makes its contribution exactly 0).
    r = tl.load(r_ptr + rows64 * stride_rt + e, mask=rmask, other=0.0)
    hval = acc / (1.0 + tl.exp(-acc)) * r[:, None]
    h_off = rows64[:, None] * (E * D) + j * D + d[None, :]
    tl.store(h_ptr + h_off, hval.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@lazy_jit
def _sparse_down_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    ids_ptr,
    counts_ptr,
    block_seg_ptr,
    block_t0_ptr,
    cu_ptr,
    T,
    H,
    D,
    E,
    SPLIT_K: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    DOT_MODE: tl.constexpr,
    W_INT8: tl.constexpr,
):
    b = tl.program_id(0)
    nb = tl.program_id(1)
    ks = tl.program_id(2)
    s = tl.load(block_seg_ptr + b)
    if s < 0:
        return
    count = tl.load(counts_ptr + s)
    t0 = tl.load(block_t0_ptr + b)
    t_end = tl.load(cu_ptr + s + 1)
    rows = t0 + tl.arange(0, BT)
    rmask = rows < t_end
    rows64 = rows.to(tl.int64)
    n = nb * BN + tl.arange(0, BN)
    nmask = n < H
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for j in range(ks, count, SPLIT_K):
        e = tl.load(ids_ptr + s * E + j).to(tl.int64)
        w_base = w_ptr + e * D * H
        # int8: the column scales of w_down_t differ per expert, so each expert's sum is scaled
        # on its own before it joins the others (float weights accumulate straight into acc).
        if W_INT8:
            part = tl.zeros((BT, BN), dtype=tl.float32)
        else:
            part = acc
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dmask = d < D
            ht = tl.load(
                h_ptr + rows64[:, None] * (E * D) + j * D + d[None, :],
                mask=rmask[:, None] & dmask[None, :],
                other=0.0,
            )
            wt = tl.load(w_base + d[:, None] * H + n[None, :], mask=dmask[:, None] & nmask[None, :], other=0.0)
            if W_INT8:
                if DOT_MODE == 0:
                    wt = wt.to(h_ptr.dtype.element_ty)
                else:
                    wt = wt.to(tl.float32)
            if DOT_MODE == 0:
                part += tl.dot(ht, wt)
            elif DOT_MODE == 1:
                part += tl.dot(ht, wt, input_precision="ieee")
            else:
                part += tl.dot(ht.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        if W_INT8:
            acc += part * tl.load(s_ptr + e * H + n, mask=nmask, other=0.0)[None, :]
        else:
            acc = part
    # Every (token, column) is written, also for count == 0: the output needs no memset.
    y_off = ks.to(tl.int64) * T * H + rows64[:, None] * H + n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def sparse_up_triton(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    expert_ids: torch.Tensor,
    counts: torch.Tensor,
    block_seg: torch.Tensor,
    block_t0: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: SparseFFNConfig,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Intermediate h [T, E, D] (x.dtype); only slots j < counts[s] of segment s are written.

    ``up_scale`` fp32 [E, D]: ``w_up`` is int8 (``kernels/quant.py``), widened in registers and
    scaled per output row before the SiLU."""
    T, H = x.shape
    E, D, _ = w_up.shape
    h = torch.empty((T, E, D), device=x.device, dtype=x.dtype)
    NB = block_seg.numel()
    if T == 0:
        return h
    n_db = cdiv(D, config.up_block_d)
    _sparse_up_kernel[(NB, E * n_db)](
        x, scores, w_up, up_scale, h, expert_ids, counts, block_seg, block_t0, cu_seqlens,
        H, D, E, x.stride(0), scores.stride(0), n_db,
        BT=config.block_t, BD=config.up_block_d, BH=config.up_block_h, DOT_MODE=dot_mode(x.dtype),
        W_INT8=up_scale is not None, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return h


def sparse_down_triton(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    expert_ids: torch.Tensor,
    counts: torch.Tensor,
    block_seg: torch.Tensor,
    block_t0: torch.Tensor,
    cu_seqlens: torch.Tensor,
    config: SparseFFNConfig,
    out_dtype: torch.dtype | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, H] = Σ over each segment's active slots of h[t, j] · w_down_t[e_j] (fp32 accumulation).

    ``down_scale`` fp32 [E, H]: ``w_down_t`` is int8, each expert's column sums scaled by its own
    scales before they are added to the other experts'."""
    T, E, D = h.shape
    H = w_down_t.shape[2]
    out_dtype = out_dtype or h.dtype
    NB = block_seg.numel()
    if T == 0:
        return torch.zeros((T, H), device=h.device, dtype=out_dtype)
    split = config.split_k
    y = torch.empty(
        (split, T, H) if split > 1 else (T, H),
        device=h.device,
        dtype=torch.float32 if split > 1 else out_dtype,
    )
    _sparse_down_kernel[(NB, cdiv(H, config.down_block_n), split)](
        h, w_down_t, down_scale, y, expert_ids, counts, block_seg, block_t0, cu_seqlens, T, H, D, E,
        SPLIT_K=split, BT=config.block_t, BD=config.down_block_d, BN=config.down_block_n,
        DOT_MODE=dot_mode(h.dtype), W_INT8=down_scale is not None, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if split > 1:
        y = y.sum(dim=0).to(out_dtype)
    return y


def sparse_ffn_triton(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    config: SparseFFNConfig | None = None,
) -> torch.Tensor:
    """y [T, H] of the BlockFFN experts, reading only each segment's union of active experts.

    ``scores`` fp32 [T, E] (zero = inactive); ``w_up`` / ``w_down_t`` [E, D, H] in x's dtype, or
    int8 weight-only (``kernels/quant.py``) with ``up_scale`` fp32 [E, D] and ``down_scale`` fp32
    [E, H]: half of bf16's weight bytes, activations stay in x's dtype;
    ``cu_seqlens`` int32 [S+1] on the same device.
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    check_ffn_shapes(x, scores, w_up, w_down_t)
    int8 = check_scales(w_up, up_scale, w_down_t, down_scale)
    if E > MAX_EXPERTS:
        raise ValueError(f"the sparse Triton kernels support at most {MAX_EXPERTS} experts, got {E}")
    S = cu_seqlens.numel() - 1
    if T == 0:
        return torch.empty((0, H), device=x.device, dtype=x.dtype)
    if config is None:
        config = default_config(T, S, E, D, H, w_int8=int8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    scores = scores.contiguous()
    if scores.dtype != torch.float32:
        scores = scores.float()
    w_up = w_up.contiguous()
    w_down_t = w_down_t.contiguous()
    if not int8 and (w_up.dtype != x.dtype or w_down_t.dtype != x.dtype):
        raise TypeError(f"x is {x.dtype} but w_up / w_down_t are {w_up.dtype} / {w_down_t.dtype}")
    if int8:
        up_scale, down_scale = up_scale.contiguous(), down_scale.contiguous()
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    expert_ids, counts, block_seg, block_t0 = segment_union_triton(scores, cu, config.block_t)
    h = sparse_up_triton(x, scores, w_up, expert_ids, counts, block_seg, block_t0, cu, config, up_scale)
    return sparse_down_triton(h, w_down_t, expert_ids, counts, block_seg, block_t0, cu, config, x.dtype, down_scale)


def check_scales(
    w_up: torch.Tensor, up_scale: torch.Tensor | None, w_down_t: torch.Tensor, down_scale: torch.Tensor | None
) -> bool:
    """``kernels.quant.check_expert_scales`` (True: int8 experts with valid scales), after a
    clear error for a scale that is not a tensor (e.g. a tile config passed positionally where
    the scales now sit in the signature), and with scales on the weights' device (a kernel would
    otherwise fault on a host pointer)."""
    for name, s in (("up_proj_scale", up_scale), ("down_proj_scale", down_scale)):
        if s is not None and not isinstance(s, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.float32 tensor or None, got {type(s).__name__} "
                "(pass a tile config as config=...)"
            )
    if not check_expert_scales(w_up, up_scale, w_down_t, down_scale):
        return False
    for name, s in (("up_proj_scale", up_scale), ("down_proj_scale", down_scale)):
        assert s is not None  # check_expert_scales raised otherwise
        if s.device != w_up.device:
            raise ValueError(f"{name}: on {s.device}; expected {w_up.device} like the expert weights")
    return True


__all__ = [
    "SparseFFNConfig",
    "check_scales",
    "default_config",
    "sparse_down_triton",
    "sparse_ffn_triton",
    "sparse_up_triton",
]
