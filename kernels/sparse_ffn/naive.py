"""The expert part of a BlockFFN layer in plain PyTorch, written from the math.

y(x) = Σ_e r_e · W_down,e · SiLU(W_up,e x), with the internal layout
w_up [E, D, H] (W_up,e = w_up[e]) and w_down_t [E, D, H] (W_down,e = w_down_t[e].T).
Everything is computed in float32 and cast to x's dtype at the end.

Active pairs: expert e is active for token t iff scores[t, e] > 0. A zero, negative, -Inf or
NaN score is inactive: the expert contributes exactly 0 to the token (NaN scores arise from
garbage activations, e.g. vLLM's memory-profiling pass, or a bf16 overflow; they must neither
crash a kernel nor poison other tokens). Every path (native CPU kernel, PyTorch, Triton, dense)
uses this definition; :func:`active_scores` applies it to a score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def active_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with every inactive entry (not > 0, NaN included) set to exactly 0."""
    return torch.where(scores > 0, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


def experts_naive(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the ground truth (slow; for tests)."""
    T, H = x.shape
    E = w_up.shape[0]
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for t in range(T):
        xt = x[t].float()
        for e in range(E):
            r = scores[t, e].float()
            if r > 0:
                y[t] += r * (w_down_t[e].float().t() @ F.silu(w_up[e].float() @ xt))
    return y.to(x.dtype)


def experts_reference(
    x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layout: str
) -> torch.Tensor:
    """The same math on a checkpoint's own layout ("block" or "block_linear"), vectorised."""
    T, H = x.shape
    E = scores.shape[1]
    active = (scores > 0)[:, :, None]
    r = active_scores(scores.float())[:, :, None]
    if layout == "block":  # up [E, D, H], down [E, H, D]
        u = torch.einsum("edh,th->ted", up.float(), x.float())
        h = torch.where(active, F.silu(u) * r, 0.0)
        return torch.einsum("ted,ehd->th", h, down.float()).to(x.dtype)
    if layout == "block_linear":  # up [E·D, H], down [H, E·D]
        D = up.shape[0] // E
        h = torch.where(active, F.silu(x.float() @ up.float().t()).view(T, E, D) * r, 0.0)
        return (h.reshape(T, E * D) @ down.float().t()).to(x.dtype)
    raise ValueError(f"unknown layout {layout!r}")


def sparse_up_naive(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    expert_ids: torch.Tensor,
    counts: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """h[t, j] = SiLU(w_up[expert_ids[s, j]] x_t) · r[t, expert_ids[s, j]] for j < counts[s].

    Returns fp32 [T, E, D]; slots j ≥ counts[s] are zero here (the kernel leaves them unset).
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    h = torch.zeros((T, E, D), dtype=torch.float32, device=x.device)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        for j in range(int(counts[s])):
            e = int(expert_ids[s, j])
            xs = x[cu[s] : cu[s + 1]].float()
            h[cu[s] : cu[s + 1], j] = F.silu(xs @ w_up[e].float().t()) * scores[cu[s] : cu[s + 1], e, None].float()
    return h


def sparse_down_naive(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    expert_ids: torch.Tensor,
    counts: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """y_t = Σ_{j < counts[s]} w_down_t[expert_ids[s, j]].T h[t, j]; fp32 [T, H]."""
    T = h.shape[0]
    H = w_down_t.shape[2]
    y = torch.zeros((T, H), dtype=torch.float32, device=h.device)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        for j in range(int(counts[s])):
            e = int(expert_ids[s, j])
            y[cu[s] : cu[s + 1]] += h[cu[s] : cu[s + 1], j].float() @ w_down_t[e].float()
    return y


def sparse_ffn_naive(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Segment by segment: run only the union of the segment's active experts, on all its tokens."""
    T, H = x.shape
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        union = (scores[a:b] > 0).any(dim=0).nonzero().flatten()
        xs = x[a:b].float()
        for e in union.tolist():
            act = scores[a:b, e, None] > 0
            hs = torch.where(act, F.silu(xs @ w_up[e].float().t()) * scores[a:b, e, None].float(), 0.0)
            y[a:b] += hs @ w_down_t[e].float()
    return y.to(x.dtype)


def moe_align_block_size_naive(
    topk_ids: torch.Tensor, block_size: int, num_valid_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What vLLM's ``moe_align_block_size(topk_ids, block_size, E + 1, expert_map=[0..E-1, -1],
    ignore_invalid_experts=True)`` returns (E = ``num_valid_experts``), written as loops.

    Pair p (a flat index into ``topk_ids``) goes to expert ``topk_ids.flat[p]``; ids ≥ E (the
    dummy id of an inactive slot) are dropped. Each expert's pairs, in ascending order, fill a
    run of ``sorted_token_ids`` padded to a multiple of ``block_size`` with the sentinel
    ``topk_ids.numel()``; the runs follow each other in expert order. ``expert_ids[b]`` is the
    expert of block b (0 for blocks past the end, as vLLM's op fills them);
    ``num_tokens_post_padded`` [1] the padded total. The buffers have vLLM's static lengths:
    ``numel + (E + 1)·(block_size − 1)`` entries (``min(numel·block_size, ·)`` when
    numel < E + 1) and one expert id per block of them.
    """
    flat = topk_ids.reshape(-1).tolist()
    numel, E = len(flat), num_valid_experts
    length = numel + (E + 1) * (block_size - 1)
    if numel < E + 1:
        length = min(numel * block_size, length)
    sorted_ids = [numel] * length
    expert_ids = [0] * (-(-length // block_size))
    pos = 0
    for e in range(E):
        pairs = [p for p, v in enumerate(flat) if v == e]
        if not pairs:
            continue
        for i, p in enumerate(pairs):
            sorted_ids[pos + i] = p
        n_blocks = -(-len(pairs) // block_size)
        for b in range(n_blocks):
            expert_ids[pos // block_size + b] = e
        pos += n_blocks * block_size
    dev = topk_ids.device
    return (torch.tensor(sorted_ids, dtype=torch.int32, device=dev),
            torch.tensor(expert_ids, dtype=torch.int32, device=dev),
            torch.tensor([pos], dtype=torch.int32, device=dev))


def expert_major_naive(
    x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor
) -> torch.Tensor:
    """Expert by expert over its active tokens only (score > 0), fp32: the expert-major order
    of the GPU path (``triton_expert_major.py``), as a reference. Cast to x's dtype at the end."""
    T, H = x.shape
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for e in range(w_up.shape[0]):
        tokens = (scores[:, e] > 0).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        h = F.silu(x[tokens].float() @ w_up[e].float().t())
        y[tokens] += scores[tokens, e, None].float() * (h @ w_down_t[e].float())
    return y.to(x.dtype)
