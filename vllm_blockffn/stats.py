"""Live sparsity counters of the BlockFFN layers in a serving process.

Every expert call adds, per layer, to running sums kept on the layer's device: tokens,
active experts per token (→ token-level sparsity), executed segments and the size of
their expert unions (→ the chunk-level sparsity the sparse backend actually exploits:
one segment is a decode token, a speculative verify chunk or a prefill chunk), and the
expert-weight bytes a sparse execution reads vs the dense equivalent. Nothing is copied
to the host here — `snapshot()` reads everything in one transfer when asked (a metrics
scrape, a benchmark), so collecting costs no host sync per layer.

`VLLM_BLOCKFFN_STATS=0` turns collection off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_blockffn.sparsity import segment_union_sizes

STATS_ENV = "VLLM_BLOCKFFN_STATS"
# Columns of the per-layer accumulator.
TOKENS, ACTIVE, SEGMENTS, UNION, SEGMENT_TOKENS = range(5)
NUM_COLUMNS = 5


def stats_enabled() -> bool:
    return os.environ.get(STATS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


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


class SparsityRecorder:
    """Per-process accumulators, one row per BlockFFN layer (created lazily on first use)."""

    def __init__(self) -> None:
        self._totals: dict[int, torch.Tensor] = {}
        self._shape: dict[int, tuple[int, int]] = {}
        self.model = ""
        self.last_layer = -1
        self._publisher = None

    def start_model(self, model: str) -> None:
        """A model is being built in this process: its counters start from nothing.

        A process serves one model at a time, but in-process engines (tests, `vllm.LLM`
        with multiprocessing off) may build several in turn: rows of an earlier model's
        layers must not show up under the new one."""
        self._totals.clear()
        self._shape.clear()
        self.model = model
        self.last_layer = -1

    def add_layer(self, layer: int, model: str) -> None:
        """Called when a BlockFFN layer is built: its step's last layer publishes the totals."""
        self.model = model
        self.last_layer = max(self.last_layer, layer)

    def record(self, layer: int, scores: torch.Tensor, cu_seqlens: torch.Tensor, expert_bytes: int) -> None:
        active = scores > 0
        totals = self._totals.get(layer)
        if totals is None:
            totals = self._totals[layer] = torch.zeros(NUM_COLUMNS, dtype=torch.int64, device=scores.device)
            self._shape[layer] = (scores.shape[1], expert_bytes)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        totals[TOKENS] += scores.shape[0]
        totals[ACTIVE] += active.sum()
        totals[SEGMENTS] += (lengths > 0).sum()
        totals[UNION] += segment_union_sizes(active, cu_seqlens).sum()
        totals[SEGMENT_TOKENS] += lengths.sum()
        if layer == self.last_layer:
            self._maybe_publish()

    def _maybe_publish(self) -> None:
        from vllm_blockffn.metrics import Publisher, stats_dir

        if stats_dir() is None:
            return
        if self._publisher is None:
            self._publisher = Publisher()
        if self._publisher.due():
            self._publisher.publish(self.model, self.snapshot())

    def snapshot(self) -> list[LayerSparsity]:
        """All layers' totals, read from the device in one copy."""
        if not self._totals:
            return []
        layers = sorted(self._totals)
        rows = torch.stack([self._totals[i] for i in layers]).cpu().tolist()
        return [LayerSparsity(i, self._shape[i][0], *row, expert_bytes=self._shape[i][1])
                for i, row in zip(layers, rows)]

    def reset(self) -> None:
        with torch.inference_mode():  # the totals were made in vLLM's inference mode
            for totals in self._totals.values():
                totals.zero_()


RECORDER = SparsityRecorder()
