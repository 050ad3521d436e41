"""Per-segment expert unions in plain PyTorch (the reference for the Triton kernel).

Tokens [T] are split into consecutive segments by ``cu_seqlens`` (int32 [S+1]). A segment
runs the union of its tokens' active experts. The compacted list of segment s is a
permutation of 0..E-1: its active experts in increasing order first (``counts[s]`` of
them), then the inactive ones in increasing order. Padding with real expert ids keeps
every slot a valid index, so a kernel never has to guard a gather on the padding.
"""

from __future__ import annotations

import torch


def segment_union_naive(active: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``active`` [T, E] (non-zero = active) → ``(expert_ids [S, E], counts [S])``, both int32."""
    T, E = active.shape
    cu = [int(c) for c in cu_seqlens.tolist()]
    S = len(cu) - 1
    expert_ids = torch.empty((S, E), dtype=torch.int32)
    counts = torch.empty((S,), dtype=torch.int32)
    act = active.detach().cpu() != 0
    for s in range(S):
        union = act[cu[s] : cu[s + 1]].any(dim=0)
        on = [e for e in range(E) if union[e]]
        off = [e for e in range(E) if not union[e]]
        expert_ids[s] = torch.tensor(on + off, dtype=torch.int32)
        counts[s] = len(on)
    return expert_ids.to(active.device), counts.to(active.device)


def token_blocks_naive(cu_seqlens: torch.Tensor, block_t: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every segment into blocks of at most ``block_t`` tokens, in order.

    Returns ``(block_seg, block_t0)`` int32 [num_blocks]: the segment of each block and its
    first token; blocks past the last real one have segment -1 (their programs exit).
    """
    cu = [int(c) for c in cu_seqlens.tolist()]
    seg, t0 = [], []
    for s in range(len(cu) - 1):
        for start in range(cu[s], cu[s + 1], block_t):
            seg.append(s)
            t0.append(start)
    if len(seg) > num_blocks:
        raise ValueError(f"{len(seg)} token blocks do not fit in {num_blocks}")
    pad = num_blocks - len(seg)
    block_seg = torch.tensor(seg + [-1] * pad, dtype=torch.int32)
    block_t0 = torch.tensor(t0 + [0] * pad, dtype=torch.int32)
    return block_seg, block_t0
