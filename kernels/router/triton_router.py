"""Fused BlockFFN router in Triton: x @ W_r.T → ReLU → norm → (fp32 scores, active mask).

Two launches with grids that depend on shapes only:
1. ``_router_logits_kernel``: z partials over a (token block, expert block, H split) grid.
   Splitting H keeps enough programs busy at decode (T = 1), where the router is a GEMV
   whose weight read is all the work; each split writes its own fp32 partial, so the
   result is deterministic (no atomics).
2. ``_router_norm_kernel``: sums the partials and applies ReLU, the row norm (which needs
   the whole row of E ≤ 256 scores) and the z > 0 mask, one block of tokens per program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import cdiv, dot_mode, lazy_jit, next_pow2, tl

_MODE_IDS = {"none": 0, "rms": 1, "sum": 2}
# Enough programs to cover an H100's 132 SMs about twice at decode.
_TARGET_PROGRAMS = 256


@lazy_jit
def _router_logits_kernel(
    x_ptr,
    w_ptr,
    zp_ptr,
    T,
    E,
    H,
    stride_xt,
    stride_we,
    N_HB,
    SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BH: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = pid_e * BE + tl.arange(0, BE)
    rmask = rows < T
    cmask = cols < E
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for hb in range(pid_s, N_HB, SPLIT):
        k = hb * BH + tl.arange(0, BH)
        kmask = k < H
        xt = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xt + k[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_we + k[:, None],
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )
        if DOT_MODE == 0:
            acc += tl.dot(xt, wt)
        elif DOT_MODE == 1:
            acc += tl.dot(xt, wt, input_precision="ieee")
        else:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    out = zp_ptr + pid_s.to(tl.int64) * T * E + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(out, acc, mask=rmask[:, None] & cmask[None, :])


@lazy_jit
def _router_norm_kernel(
    zp_ptr,
    nw_ptr,
    scores_ptr,
    mask_ptr,
    T,
    E,
    norm_scale,
    eps,
    SPLIT: tl.constexpr,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    BT: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, E_PAD)
    rmask = rows < T
    cmask = cols < E
    m = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    z = tl.zeros((BT, E_PAD), dtype=tl.float32)
    for sp in tl.static_range(SPLIT):
        z += tl.load(zp_ptr + sp * T * E + offs, mask=m, other=0.0)
    a = tl.maximum(z, 0.0)
    if MODE == 1:
        ms = tl.sum(a * a, axis=1) / E
        r = a * (1.0 / tl.sqrt(ms + eps))[:, None]
        if HAS_W:
            w = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            r = r * w[None, :]
    elif MODE == 2:
        tot = tl.sum(a, axis=1)
        r = a / (tot * norm_scale + 1e-5)[:, None]
    else:
        r = a
    tl.store(scores_ptr + offs, r, mask=m)
    tl.store(mask_ptr + offs, (z > 0.0).to(tl.uint8), mask=m)


@dataclass(frozen=True)
class RouterConfig:
    """Tiles and grid of the two router launches, from static shapes only (CUDA-graph safe)."""

    BT: int  # tokens per logits program
    BE: int  # experts per logits program
    BH: int  # hidden columns per K step
    n_tb: int
    n_eb: int
    n_hb: int
    split: int  # K split of the logits (partial sums reduced by the norm kernel)
    BT2: int  # tokens per norm program
    E_PAD: int


def router_config(T: int, E: int, H: int) -> RouterConfig:
    """The router's launch configuration; ``benchmarks/gpu_on_paper.py`` counts bytes from it."""
    BT = 16 if T <= 16 else 32
    BE = min(64, max(16, next_pow2(E)))
    BH = 128 if BT == 16 else 64
    n_tb, n_eb, n_hb = cdiv(T, BT), cdiv(E, BE), cdiv(H, BH)
    split = max(1, min(n_hb, 16, _TARGET_PROGRAMS // (n_tb * n_eb)))
    E_PAD = max(16, next_pow2(E))
    BT2 = max(1, min(16, 4096 // E_PAD))
    return RouterConfig(BT, BE, BH, n_tb, n_eb, n_hb, split, BT2, E_PAD)


def router_triton(
    x: torch.Tensor,
    w_r: torch.Tensor,
    norm_w: torch.Tensor | None = None,
    mode: str = "rms",
    norm_scale: float = 1.0,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton router; same contract as :func:`router_naive` (fp32 scores, bool mask)."""
    if mode not in _MODE_IDS:
        raise ValueError(f"unknown router norm {mode!r}; expected one of {tuple(_MODE_IDS)}")
    T, H = x.shape
    E = w_r.shape[0]
    if E > 256:
        raise ValueError(f"router_triton supports at most 256 experts, got {E}")
    scores = torch.empty((T, E), device=x.device, dtype=torch.float32)
    mask = torch.empty((T, E), device=x.device, dtype=torch.uint8)
    if T == 0:
        return scores, mask.view(torch.bool)
    if w_r.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, w_r.dtype)
        x, w_r = x.to(dt), w_r.to(dt)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w_r = w_r.contiguous()

    c = router_config(T, E, H)
    zp = torch.empty((c.split, T, E), device=x.device, dtype=torch.float32)
    _router_logits_kernel[(c.n_tb, c.n_eb, c.split)](
        x, w_r, zp, T, E, H, x.stride(0), w_r.stride(0), c.n_hb,
        SPLIT=c.split, BT=c.BT, BE=c.BE, BH=c.BH, DOT_MODE=dot_mode(x.dtype),
    )  # fmt: skip
    has_w = mode == "rms" and norm_w is not None
    nw = norm_w.contiguous() if has_w else scores
    _router_norm_kernel[(cdiv(T, c.BT2),)](
        zp, nw, scores, mask, T, E, float(norm_scale), float(eps),
        SPLIT=c.split, MODE=_MODE_IDS[mode], HAS_W=has_w, BT=c.BT2, E_PAD=c.E_PAD,
    )  # fmt: skip
    return scores, mask.view(torch.bool)
