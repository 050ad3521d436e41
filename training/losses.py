"""The CLS-aware training objectives of BlockFFN (SPEC.md §6), as the official code computes them.

Shapes: router pre-activations z [B, T, E] of one layer (z = W_r x, before the ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIGMOID_STEEPNESS = 100.0  # α


def activation_probability(z: torch.Tensor) -> torch.Tensor:
    """p = a / (Σ_e a + 1e-5), a = ReLU(z): taken on the ReLU output (before the rms router norm)."""
    a = F.relu(z)
    return a / (a.sum(-1, keepdim=True) + 1e-5)


def activation_locality_loss(z: torch.Tensor, pair_mask: torch.Tensor | None = None,
                             alpha: float = SIGMOID_STEEPNESS) -> torch.Tensor:
    """L_AL = BCE_with_logits(α·z_{t−1}, target = sigmoid(α·z_t)), mean over pairs and experts.

    z: [B, T, E]; pair_mask: bool [B, T−1], True where tokens t−1 and t are in the same document.
    As in the official code the target is not detached (both tokens of a pair get gradients).
    """
    prev, cur = z[:, :-1], z[:, 1:]
    if pair_mask is not None:
        prev, cur = prev[pair_mask], cur[pair_mask]  # [P, E]
    if prev.numel() == 0:
        return z.sum() * 0.0
    return F.binary_cross_entropy_with_logits(alpha * prev, torch.sigmoid(alpha * cur))


def chunk_sparsification_loss(z: torch.Tensor, chunk: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_CS = mean over chunks and experts of P(expert active somewhere in the chunk)
    = 1 − mean(exp(Σ_t log(1 − p_t,e + 1e-5))), p = activation_probability(z).

    z: [B, T, E] with T a multiple of `chunk` (chunks never straddle sequences);
    token_mask: bool/float [B, T], 0 for padding tokens (their p is zeroed, as officially).
    """
    B, T, E = z.shape
    if T % chunk:
        raise ValueError(f"sequence length {T} is not a multiple of the chunk length {chunk}")
    p = activation_probability(z)
    if token_mask is not None:
        p = p * token_mask.unsqueeze(-1).to(p.dtype)
    log_none = torch.log(1 - p + 1e-5).view(B, T // chunk, chunk, E).sum(2)
    return 1 - log_none.exp().mean()


class AdaptiveFactor:
    """λ_CS schedule: after `stable_steps`, every `window` steps compare the mean L_CS of the last
    window with the window before; if it rose by a ratio r > 1, grow λ_CS linearly over the next
    window by the factor max(1.025, r), never beyond `max_ratio` × its initial value."""

    def __init__(self, initial: float, stable_steps: int = 1000, window: int = 100, max_ratio: float = 4.0):
        self.initial, self.stable_steps, self.window, self.max_ratio = initial, stable_steps, window, max_ratio
        self.value = initial
        self._start, self._target, self._ramp_step = initial, initial, window
        self._history: list[float] = []
        self._prev_mean: float | None = None

    def step(self, cs_loss: float, step: int) -> float:
        """Record this step's L_CS (mean over layers) and return the λ_CS for the next step."""
        if self._ramp_step < self.window:  # linear growth towards the target
            self._ramp_step += 1
            self.value = self._start + (self._target - self._start) * self._ramp_step / self.window
        if step < self.stable_steps:
            return self.value
        self._history.append(cs_loss)
        if len(self._history) == self.window:
            mean = sum(self._history) / self.window
            self._history = []
            if self._prev_mean is not None and self._prev_mean > 0:
                ratio = mean / self._prev_mean
                if ratio > 1:
                    cap = self.initial * self.max_ratio
                    self._start = self.value
                    self._target = min(cap, self.value * max(1.025, ratio))
                    self._ramp_step = 0
            self._prev_mean = mean
        return self.value
