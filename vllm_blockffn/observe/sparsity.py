"""The BlockFFN paper's sparsity metrics (SPEC.md §3) as small pure functions.

Every function takes a boolean *active mask* ``active[t, e]`` = "expert e is active for
token t", i.e. ``(W_r x_t)_e > 0`` (``RouterTrace.active`` of the reference model).
A mask of router logits or scores is refused rather than silently read as "non-zero
means active": the logits are mostly non-zero, so that mistake would report ~0% sparsity.

- Token-level sparsity (TLS): the fraction of experts a single token leaves off,
  averaged over tokens. It bounds what a batch-1, one-token decode step can skip.
- Chunk-level sparsity (CLS-L): the same, but for the *union* of the active sets of L
  consecutive tokens. A speculative verify step (k draft tokens + 1) or a prefill chunk
  runs the FFN on several tokens at once and has to read every expert that any of
  them uses, so the union — not a single token's set — sets its memory traffic.

All functions work on any device and never sync more than once (for the final float).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_mask(active: torch.Tensor) -> None:
    if not isinstance(active, torch.Tensor) or active.dim() != 2:
        raise ValueError(f"active must be a 2-D [tokens, experts] tensor, got "
                         f"{getattr(active, 'shape', type(active).__name__)}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must be a boolean mask (e.g. router_logits > 0), got dtype {active.dtype}")
    if active.shape[1] == 0:
        raise ValueError("active has no experts (shape [T, 0])")


def token_sparsity(active: torch.Tensor) -> float:
    """TLS = mean over tokens t of 1 − |A(x_t)| / E.

    ``active``: bool [T, E]. Raises ValueError for T = 0 (the mean of nothing).
    Equal to ``chunk_sparsity(active, 1)`` by definition: a 1-token chunk's union is
    the token's own active set.
    """
    _check_mask(active)
    T, E = active.shape
    if T == 0:
        raise ValueError("token_sparsity of an empty mask (no tokens)")
    return 1.0 - float(active.sum(dtype=torch.float64)) / (T * E)


def chunk_union_sizes(active: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """|∪_{t in chunk} A(x_t)| for each full, non-overlapping ``chunk_size``-token chunk.

    Chunks are tokens [0, L), [L, 2L), …; a trailing chunk shorter than L is left out
    (as in the paper: a shorter chunk has a smaller union and would inflate CLS-L).
    Returns int64 [T // L] (empty when T < L).
    """
    _check_mask(active)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    T, E = active.shape
    n = T // chunk_size
    return active[: n * chunk_size].reshape(n, chunk_size, E).any(dim=1).sum(dim=-1)


def chunk_sparsity(active: torch.Tensor, chunk_size: int) -> float:
    """CLS-L = mean over full L-token chunks of 1 − |∪_{t in chunk} A(x_t)| / E.

    ``active``: bool [T, E] for ONE sequence (chunks must not straddle sequences: for
    several sequences, collect ``chunk_union_sizes`` per sequence and average those).
    The trailing partial chunk is left out; raises ValueError when T < L (no full chunk).
    CLS-1 equals TLS.
    """
    sizes = chunk_union_sizes(active, chunk_size)
    if sizes.numel() == 0:
        raise ValueError(f"chunk_sparsity: no full chunk of {chunk_size} tokens in a mask of "
                         f"{active.shape[0]} tokens")
    E = active.shape[1]
    return 1.0 - float(sizes.sum(dtype=torch.float64)) / (sizes.numel() * E)


def segment_union_sizes(active: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Union size |∪_{t in segment} A(x_t)| per segment; segment s is tokens [cu[s], cu[s+1]).

    ``cu_seqlens``: int tensor [S+1], non-decreasing, cu[0] = 0 … cu[S] ≤ T (vLLM's
    ``query_start_loc`` layout; see ``segments.py``). Returns int64 [S] on the mask's
    device; an empty segment has union 0. Vectorised with a prefix count of active
    tokens per expert (no Python loop over segments, no host sync), so the serving
    metrics can call it on every forward step. For the same reason the offsets are not
    checked for order on the host; a decreasing pair yields 0 for that segment.
    """
    _check_mask(active)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S+1]")
    T, E = active.shape
    prefix = torch.zeros(T + 1, E, dtype=torch.int32, device=active.device)
    torch.cumsum(active, dim=0, dtype=torch.int32, out=prefix[1:])
    cu = cu_seqlens.to(device=active.device, dtype=torch.long)
    counts = prefix[cu[1:]] - prefix[cu[:-1]]  # [S, E]: active tokens per expert in each segment
    return (counts > 0).sum(dim=-1)


__all__ = ["chunk_sparsity", "chunk_union_sizes", "segment_union_sizes", "token_sparsity"]


@dataclass
class LayerSparsity:
    """Totals of one layer since start (or the last reset)."""

    layer: int
    num_experts: int
    tokens: int
    active: int
    segments: int
    union: int
    segment_tokens: int
    expert_bytes: int  # bytes of one expert's up + down weights on this rank

    @property
    def token_sparsity(self) -> float:
        """Fraction of experts inactive per token (TLS over all tokens seen)."""
        return 1.0 - self.active / (self.tokens * self.num_experts) if self.tokens else float("nan")

    @property
    def chunk_sparsity(self) -> float:
        """Fraction of experts outside each executed segment's union (mean over segments)."""
        return 1.0 - self.union / (self.segments * self.num_experts) if self.segments else float("nan")

    @property
    def bytes_read(self) -> int:
        """Expert-weight bytes a per-segment sparse execution reads."""
        return self.union * self.expert_bytes

    @property
    def bytes_dense(self) -> int:
        """Expert-weight bytes reading every expert once per segment."""
        return self.segments * self.num_experts * self.expert_bytes
