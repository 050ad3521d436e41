"""The BlockFFN router in plain PyTorch, written from the math (SPEC.md §2).

z = W_r x, a = ReLU(z), then
  "rms":  r = a · rsqrt(mean(a²) + eps) · norm_w
  "sum":  r = a / (Σa · norm_scale + 1e-5)
  "none": r = a
Active set A(x) = {e : z_e > 0}. Everything is computed in float32.
"""

from __future__ import annotations

import torch

ROUTER_MODES = ("rms", "sum", "none")


def router_naive(
    x: torch.Tensor,
    w_r: torch.Tensor,
    norm_w: torch.Tensor | None = None,
    mode: str = "rms",
    norm_scale: float = 1.0,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scores, active)``: fp32 [T, E] router scores and the bool [T, E] mask z > 0."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"unknown router norm {mode!r}; expected one of {ROUTER_MODES}")
    z = x.float() @ w_r.float().t()
    a = torch.relu(z)
    if mode == "rms":
        r = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
        if norm_w is not None:
            r = r * norm_w.float()
    elif mode == "sum":
        r = a / (a.sum(-1, keepdim=True) * norm_scale + 1e-5)
    else:
        r = a
    return r, z > 0
