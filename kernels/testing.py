"""Inputs with controlled sparsity, shared by the kernel tests and benchmarks.

Random routers are useless for measuring chunk sparsity (a random ReLU router turns on
half the experts independently per token, SPEC.md §3), so these helpers choose the active
experts directly: exact union sizes per segment, zero-score tokens, poisoned (NaN) weights
for experts that must never be read.
"""

from __future__ import annotations

import random

import torch

TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


def cu_seqlens_of(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Segment lengths → cu_seqlens int32 [S+1]."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num if den == 0.0 else num / den


def make_weights(
    E: int, D: int, H: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal-layout ``(w_up, w_down_t)`` [E, D, H] with unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    w_up = torch.randn(E, D, H, generator=g) / H**0.5
    w_down_t = torch.randn(E, D, H, generator=g) / D**0.5
    return w_up.to(device=device, dtype=dtype), w_down_t.to(device=device, dtype=dtype)


def make_scores(
    lengths: list[int],
    E: int,
    union_fraction: float | list[float],
    token_fraction: float = 0.5,
    seed: int = 0,
    zero_token_prob: float = 0.0,
) -> tuple[torch.Tensor, list[list[int]]]:
    """fp32 router scores [T, E] whose per-segment unions have exactly the chosen size.

    Segment s gets a union of round(union_fraction[s] · E) random experts; each of its
    tokens uses each union expert with probability ``token_fraction`` (every union expert
    is used by at least one token of the segment, unless all its tokens are zero tokens).
    A token is a zero token (all scores 0) with probability ``zero_token_prob``.
    Returns the scores and the unions (sorted id lists).
    """
    rng = random.Random(seed)
    T = sum(lengths)
    fractions = union_fraction if isinstance(union_fraction, list) else [union_fraction] * len(lengths)
    scores = torch.zeros(T, E)
    unions: list[list[int]] = []
    t0 = 0
    for n, frac in zip(lengths, fractions, strict=True):
        k = min(E, max(0, round(frac * E)))
        union = sorted(rng.sample(range(E), k)) if n else []
        live = [t for t in range(t0, t0 + n) if rng.random() >= zero_token_prob]
        used = []
        for e in union:
            users = [t for t in live if rng.random() < token_fraction]
            if not users and live:
                users = [rng.choice(live)]
            for t in users:
                scores[t, e] = 0.05 + rng.random()
            if users:
                used.append(e)
        unions.append(used)
        t0 += n
    return scores, unions


def poison_inactive(w_up: torch.Tensor, w_down_t: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the weights with NaN in every expert not in ``active``.

    A sparse path that reads (or multiplies by 0) an inactive expert then returns NaN.
    """
    w_up, w_down_t = w_up.clone(), w_down_t.clone()
    off = [e for e in range(w_up.shape[0]) if e not in set(active)]
    if off:
        idx = torch.tensor(off, device=w_up.device)
        w_up[idx] = float("nan")
        w_down_t[idx] = float("nan")
    return w_up, w_down_t

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
