"""The CLS-aware training objectives of BlockFFN (SPEC.md §6), as the official code computes them.

Shapes: router pre-activations z [B, T, E] of one layer (z = W_r x, before the ReLU).
"""

from __future__ import annotations

import math

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


def expert_rate_hinge_loss(z: torch.Tensor, min_rate: float = 0.01, max_rate: float = 0.9,
                           revive_rate: float = 0.02, target_max_rate: float = 0.8,
                           margin: float = 0.1, allowed_always: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-collapse terms of this repo (not in the paper), per expert on the batch activation rate.

    z: router pre-activations [B, T, E] of one layer. The rate r_e is the fraction of the batch's
    tokens with z > 0 (no gradient). Returns (revive, suppress), each a sum over the flagged
    experts of a mean hinge, so one expert's pull does not shrink as E grows:
    - revive, for r_e < min_rate: the expert's top ceil(revive_rate·N) pre-activations are pulled
      above +margin·std(z). L_CS pushes rarely used experts off first and a ReLU expert that
      never fires gets no LM gradient to come back; this pulls it up on the tokens it is closest
      to firing on, so it comes back specialised, not always on.
    - suppress, for r_e > max_rate: its smallest positive pre-activations, enough of them to bring
      the rate down to target_max_rate, are pushed below −margin·std(z). An always-on expert is a
      fixed part of a dense FFN that L_CS hardly touches (its gradient Π(1 − p) is tiny there).
      The `allowed_always` experts with the highest rates are exempt: a few always-on (shared)
      experts per layer are allowed, the rest must route.
    """
    flat = z.reshape(-1, z.shape[-1])
    N = flat.shape[0]
    m = margin * flat.detach().std()
    rate = (flat.detach() > 0).float().mean(0)
    revive = flat.new_zeros(())
    suppress = flat.new_zeros(())
    low = (rate < min_rate).nonzero().flatten()
    if low.numel():
        k = max(1, math.ceil(revive_rate * N))
        top = flat[:, low].topk(k, dim=0).values  # [k, n_low]
        revive = F.relu(m - top).mean(0).sum()
    high_mask = rate > max_rate
    if allowed_always > 0:
        high_mask[rate.topk(min(allowed_always, rate.numel())).indices] = False
    high = high_mask.nonzero().flatten()
    if high.numel():
        k = max(1, math.ceil((rate[high].max().item() - target_max_rate) * N))
        cols = flat[:, high]
        masked = torch.where(cols > 0, cols, torch.full_like(cols, float("inf")))
        bottom = -(-masked).topk(k, dim=0).values  # the k smallest positive values per column
        keep = torch.isfinite(bottom)
        excess = ((rate[high] - target_max_rate) * N).ceil().clamp(min=1)  # per-expert count
        rank = torch.arange(k, device=z.device).unsqueeze(1)
        keep &= rank < excess.unsqueeze(0)
        hinge = torch.where(keep, F.relu(bottom + m), torch.zeros_like(bottom))
        suppress = (hinge.sum(0) / keep.sum(0).clamp(min=1)).sum()
    return revive, suppress


class LayerCSController:
    """Per-layer λ_CS multipliers (not in the paper): each step, log m_l += gain · (target − TLS_l)
    on the training batch, clamped to [lo, hi]. One shared λ_CS over-sparsifies the deep layers
    (they collapse) and under-sparsifies layer 0; this holds every layer near the same TLS."""

    def __init__(self, num_layers: int, target_tls: float | list[float], gain: float = 0.1, lo: float = 0.25,
                 hi: float = 8.0):
        targets = [target_tls] if isinstance(target_tls, (int, float)) else list(target_tls)
        self.targets = targets * num_layers if len(targets) == 1 else targets
        if len(self.targets) != num_layers:
            raise ValueError(f"{len(targets)} TLS targets for {num_layers} layers")
        self.gain = gain
        self.log_lo, self.log_hi = math.log(lo), math.log(hi)
        self.log_m = [0.0] * num_layers

    @property
    def multipliers(self) -> list[float]:
        return [math.exp(v) for v in self.log_m]

    def update(self, tls: list[float]) -> list[float]:
        """Record the batch TLS per layer; returns the multipliers for the next step."""
        for i, t in enumerate(tls):
            step = self.gain * (self.targets[i] - t)
            self.log_m[i] = min(self.log_hi, max(self.log_lo, self.log_m[i] + step))
        return self.multipliers
