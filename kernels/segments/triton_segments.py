"""Per-segment expert unions on the device, with no host sync and a fixed grid.

One program per segment ORs the active rows of its tokens, compacts the union into
``expert_ids[s]`` (active ids first, a permutation of 0..E-1) and ``counts[s]`` with a
prefix sum, and writes the segment's entries of the token-block table that the sparse FFN
kernels are launched over: ``block_seg[b]`` / ``block_t0[b]`` for every block of at most
``block_t`` tokens. The table has a static length (:func:`num_token_blocks`), blocks past
the last real one are marked -1, so the FFN grids depend on shapes only and the whole
decode step can be captured in a CUDA graph. Counts never leave the device.
"""

from __future__ import annotations

import torch

from .._triton import cdiv, lazy_jit, next_pow2, tl

_VEC = 64  # block-table entries written per vector store


def num_token_blocks(num_tokens: int, num_segments: int, block_t: int) -> int:
    """A static upper bound on Σ_s ceil(len_s / block_t), from shapes only (at least 1, so
    that no kernel argument is ever an empty, null-pointer tensor)."""
    return max(1, min(num_tokens, cdiv(num_tokens, block_t) + num_segments))


@lazy_jit
def _segment_union_kernel(
    act_ptr,
    stride_at,
    cu_ptr,
    ids_ptr,
    counts_ptr,
    block_seg_ptr,
    block_t0_ptr,
    S,
    E,
    NB,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    SCAN_T: tl.constexpr,
    VEC: tl.constexpr,
):
    s = tl.program_id(0)
    start = tl.load(cu_ptr + s)
    end = tl.load(cu_ptr + s + 1)
    e = tl.arange(0, E_PAD)
    emask = e < E

    # OR of the segment's active rows.
    union = tl.zeros((E_PAD,), dtype=tl.int32)
    for t0 in range(start, end, SCAN_T):
        rows = t0 + tl.arange(0, SCAN_T)
        tile = tl.load(
            act_ptr + rows[:, None].to(tl.int64) * stride_at + e[None, :],
            mask=(rows < end)[:, None] & emask[None, :],
            other=0,
        )
        union = tl.maximum(union, tl.max((tile != 0).to(tl.int32), axis=0))
    union = tl.where(emask, union, 0)

    # Compaction: active ids in order, then inactive ids in order.
    count = tl.sum(union, axis=0)
    cum = tl.cumsum(union, axis=0)  # inclusive
    pos = tl.where(union > 0, cum - 1, count + e - cum)
    tl.store(ids_ptr + s * E + pos, e, mask=emask)
    tl.store(counts_ptr + s, count)

    # Token-block table: this segment's blocks start after those of segments < s.
    j = tl.arange(0, S_PAD)
    jm = j < s
    lo = tl.load(cu_ptr + j, mask=jm, other=0)
    hi = tl.load(cu_ptr + j + 1, mask=jm, other=0)
    first = tl.sum(tl.where(jm, (hi - lo + BLOCK_T - 1) // BLOCK_T, 0), axis=0)
    nb = (end - start + BLOCK_T - 1) // BLOCK_T
    for i0 in range(0, nb, VEC):
        i = i0 + tl.arange(0, VEC)
        im = i < nb
        tl.store(block_seg_ptr + first + i, tl.zeros((VEC,), dtype=tl.int32) + s, mask=im)
        tl.store(block_t0_ptr + first + i, start + i * BLOCK_T, mask=im)
    if s == S - 1:
        # The last segment also marks the unused tail of the table.
        for i0 in range(first + nb, NB, VEC):
            i = i0 + tl.arange(0, VEC)
            im = i < NB
            tl.store(block_seg_ptr + i, tl.zeros((VEC,), dtype=tl.int32) - 1, mask=im)
            tl.store(block_t0_ptr + i, tl.zeros((VEC,), dtype=tl.int32), mask=im)


def segment_union_triton(
    active: torch.Tensor, cu_seqlens: torch.Tensor, block_t: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``active`` [T, E] (non-zero = active; bool, uint8 or the fp32 scores themselves).

    Returns ``(expert_ids [S, E], counts [S], block_seg [NB], block_t0 [NB])``, all int32,
    with NB = :func:`num_token_blocks` (T, S, block_t).
    """
    T, E = active.shape
    S = cu_seqlens.numel() - 1
    if E > 256:
        raise ValueError(f"segment_union_triton supports at most 256 experts, got {E}")
    dev = active.device
    NB = num_token_blocks(T, S, block_t)
    expert_ids = torch.empty((S, E), device=dev, dtype=torch.int32)
    counts = torch.empty((S,), device=dev, dtype=torch.int32)
    block_seg = torch.empty((NB,), device=dev, dtype=torch.int32)
    block_t0 = torch.empty((NB,), device=dev, dtype=torch.int32)
    if S == 0:
        return expert_ids, counts, block_seg.fill_(-1), block_t0.zero_()
    if active.dtype == torch.bool:
        active = active.view(torch.uint8)
    if active.stride(-1) != 1:
        active = active.contiguous()
    cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    E_PAD = max(16, next_pow2(E))
    _segment_union_kernel[(S,)](
        active, active.stride(0), cu, expert_ids, counts, block_seg, block_t0, S, E, NB,
        BLOCK_T=block_t, E_PAD=E_PAD, S_PAD=max(16, next_pow2(S)),
        SCAN_T=max(1, min(64, 4096 // E_PAD)), VEC=_VEC,
    )  # fmt: skip
    return expert_ids, counts, block_seg, block_t0
