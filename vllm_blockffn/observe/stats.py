"""Live sparsity counters of the BlockFFN layers in a serving process.

Every expert call adds, per layer, to running sums kept beside the layer: tokens,
active experts per token (→ token-level sparsity), executed segments and the size of
their expert unions (→ the chunk-level sparsity the sparse backend actually exploits:
one segment is a decode token, a speculative verify chunk or a prefill chunk), and the
expert-weight bytes a sparse execution reads vs the dense equivalent. On an accelerator
the sums stay on the device and nothing is copied to the host per step — `snapshot()`
reads them in one transfer when asked (at a worker's step end at most once per
`VLLM_BLOCKFFN_STATS_INTERVAL`, a benchmark), so the forward pass never syncs and the
updates are captured into CUDA graphs. Only real tokens count: the segments are vLLM's
`query_start_loc`, and padding to a CUDA-graph size lies past its last entry. On the CPU
backend they are numpy counters updated from the (host-resident) router scores, which
costs far less per call than torch's small ops.

`VLLM_BLOCKFFN_STATS=0` turns collection off.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vllm_blockffn.observe.sparsity import LayerSparsity

STATS_ENV = "VLLM_BLOCKFFN_STATS"
# Columns of the per-layer accumulator.
TOKENS, ACTIVE, SEGMENTS, UNION, SEGMENT_TOKENS = range(5)
NUM_COLUMNS = 5


def stats_enabled() -> bool:
    return os.environ.get(STATS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class SparsityRecorder:
    """Per-process accumulators, one row per BlockFFN layer.

    A layer's row is allocated when the layer is built (:meth:`add_layer`), on its weights'
    device, so that no allocation happens inside a CUDA-graph capture; the forward pass only
    adds to it (:meth:`record`). Reading happens outside the forward pass: the worker's step
    end (observe.metrics.publish_if_due, patches/worker_step_end.py) and tests."""

    def __init__(self) -> None:
        self._totals: dict[int, torch.Tensor | np.ndarray] = {}
        self._shape: dict[int, tuple[int, int]] = {}
        self.model = ""

    def start_model(self, model: str) -> None:
        """A model is being built in this process: its counters start from nothing.

        A process serves one model at a time, but in-process engines (tests, `vllm.LLM`
        with multiprocessing off) may build several in turn: rows of an earlier model's
        layers must not show up under the new one."""
        self._totals.clear()
        self._shape.clear()
        self.model = model

    def add_layer(self, layer: int, model: str, num_experts: int, expert_bytes: int,
                  device: torch.device | str = "cpu") -> None:
        """Called when a BlockFFN layer is built: allocates its row (numpy on the CPU)."""
        self.model = model
        self._totals[layer] = _new_row(torch.device(device))
        self._shape[layer] = (num_experts, expert_bytes)

    def record(self, layer: int, scores: torch.Tensor, cu_seqlens: torch.Tensor, expert_bytes: int,
               on_device: bool | None = None) -> None:
        """Add one step of one layer. `cu_seqlens` are the requests' segments (vLLM's
        query_start_loc): padding tokens past cu[-1] are not counted. `on_device` (default:
        scores not on the CPU) selects the graph-safe torch path over the numpy one."""
        if on_device is None:
            on_device = scores.device.type != "cpu"
        totals = self._totals.get(layer)
        if totals is None or isinstance(totals, np.ndarray) == on_device or (
                on_device and totals.device != scores.device):
            # Not built through add_layer (tests), or on another device: allocate now.
            totals = self._totals[layer] = _new_row(scores.device if on_device else torch.device("cpu"))
            self._shape[layer] = (scores.shape[1], expert_bytes)
        if isinstance(totals, np.ndarray):
            _add_on_host(totals, scores, cu_seqlens)
        else:
            _add_on_device(totals, scores, cu_seqlens)

    def host_row(self, layer: int, num_experts: int, expert_bytes: int) -> np.ndarray:
        """The CPU counter row of `layer` (int64 [5], the columns above), for a kernel that adds
        a step's counts itself (the native CPU expert kernel does, from its own scan)."""
        totals = self._totals.get(layer)
        if not isinstance(totals, np.ndarray):
            totals = self._totals[layer] = _new_row(torch.device("cpu"))
            self._shape[layer] = (num_experts, expert_bytes)
        return totals

    def __bool__(self) -> bool:
        return bool(self._totals)

    def snapshot(self) -> list[LayerSparsity]:
        """All layers' totals; device-side ones are read in one copy (a host sync: call it
        outside the forward pass)."""
        if not self._totals:
            return []
        layers = sorted(self._totals)
        on_device = [i for i in layers if isinstance(self._totals[i], torch.Tensor)]
        rows = {i: self._totals[i].tolist() for i in layers if i not in on_device}
        if on_device:
            rows.update(zip(on_device, torch.stack([self._totals[i] for i in on_device]).cpu().tolist()))
        return [LayerSparsity(i, self._shape[i][0], *rows[i], expert_bytes=self._shape[i][1]) for i in layers]

    def reset(self) -> None:
        with torch.inference_mode():  # device totals may have been made in vLLM's inference mode
            for totals in self._totals.values():
                if isinstance(totals, np.ndarray):
                    totals.fill(0)
                else:
                    totals.zero_()


def _new_row(device: torch.device) -> torch.Tensor | np.ndarray:
    if device.type == "cpu":
        return np.zeros(NUM_COLUMNS, dtype=np.int64)
    return torch.zeros(NUM_COLUMNS, dtype=torch.int64, device=device)


def _add_on_device(totals: torch.Tensor, scores: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Accelerators: a few small kernels and one in-place add; no host sync, no host→device
    copy, so it is captured into CUDA graphs and replays on each step's own `cu_seqlens`.
    Only tokens inside [cu[0], cu[-1]) count (padding to a capture size does not)."""
    active = scores > 0
    T, E = active.shape
    prefix = torch.zeros(T + 1, E, dtype=torch.int32, device=active.device)
    torch.cumsum(active, dim=0, dtype=torch.int32, out=prefix[1:])
    cu = cu_seqlens.long()
    per_segment = prefix[cu[1:]] - prefix[cu[:-1]]  # [S, E] active tokens per expert in each segment
    lengths = cu[1:] - cu[:-1]
    tokens = lengths.sum()
    totals += torch.stack([tokens, per_segment.sum(), (lengths > 0).sum(), (per_segment > 0).sum(), tokens])


def _add_on_host(totals: np.ndarray, scores: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """CPU backend: the tensors are host memory already, and numpy on a [T, E] mask avoids
    torch's per-op dispatch cost (measured: ~30 µs instead of ~140 µs per layer and step).
    The union is sparsity.segment_union_sizes in numpy; a test keeps the two equal.
    Where the native CPU kernel is built, its C scan does the same in ~1 µs."""
    from vllm_blockffn.kernels.sparse_ffn.cpu_native import count_native

    if count_native(scores.detach(), cu_seqlens, totals):
        return
    active = scores.detach().numpy() > 0
    cu = cu_seqlens.detach().cpu().numpy().astype(np.int64, copy=False)
    lengths = cu[1:] - cu[:-1]
    tokens = int(lengths.sum())
    whole = bool(lengths.size) and cu[0] == 0 and cu[-1] == active.shape[0]
    n_active = int(np.count_nonzero(active if whole else active[cu[0]:cu[-1]]))
    # decode only (one token per segment, no padding): a segment's union is its token's set
    if whole and lengths.max() <= 1:
        union = n_active
    else:
        prefix = np.zeros((active.shape[0] + 1, active.shape[1]), dtype=np.int32)
        np.cumsum(active, axis=0, out=prefix[1:])
        union = int(np.count_nonzero(prefix[cu[1:]] - prefix[cu[:-1]]))
    totals += (tokens, n_active, int(np.count_nonzero(lengths > 0)), union, tokens)


RECORDER = SparsityRecorder()
