"""The expert part of a BlockFFN layer in plain PyTorch, written from the math.

y(x) = Σ_e r_e · W_down,e · SiLU(W_up,e x), with the internal layout
w_up [E, D, H] (W_up,e = w_up[e]) and w_down_t [E, D, H] (W_down,e = w_down_t[e].T).
Everything is computed in float32 and cast to x's dtype at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_naive(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the ground truth (slow; for tests)."""
    T, H = x.shape
    E = w_up.shape[0]
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for t in range(T):
        xt = x[t].float()
        for e in range(E):
            r = scores[t, e].float()
            if r != 0:
                y[t] += r * (w_down_t[e].float().t() @ F.silu(w_up[e].float() @ xt))
    return y.to(x.dtype)


def experts_reference(
    x: torch.Tensor, scores: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layout: str
) -> torch.Tensor:
    """The same math on a checkpoint's own layout ("block" or "block_linear"), vectorised."""
    T, H = x.shape
    E = scores.shape[1]
    if layout == "block":  # up [E, D, H], down [E, H, D]
        u = torch.einsum("edh,th->ted", up.float(), x.float())
        return torch.einsum("ted,ehd,te->th", F.silu(u), down.float(), scores.float()).to(x.dtype)
    if layout == "block_linear":  # up [E·D, H], down [H, E·D]
        D = up.shape[0] // E
        u = F.silu(x.float() @ up.float().t()).view(T, E, D) * scores.float()[:, :, None]
        return (u.reshape(T, E * D) @ down.float().t()).to(x.dtype)
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
        union = (scores[a:b] != 0).any(dim=0).nonzero().flatten()
        xs = x[a:b].float()
        for e in union.tolist():
            hs = F.silu(xs @ w_up[e].float().t()) * scores[a:b, e, None].float()
            y[a:b] += hs @ w_down_t[e].float()
    return y.to(x.dtype)
