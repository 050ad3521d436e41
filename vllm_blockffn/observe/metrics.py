"""BlockFFN sparsity on vLLM's `/metrics` endpoint (Prometheus), next to vLLM's own metrics.

The counters live in the worker processes (vllm_blockffn.observe.stats); `/metrics` is served by
the API-server process. Workers publish their totals in bulk — a small JSON file per
worker process, rewritten at most every `VLLM_BLOCKFFN_STATS_INTERVAL` seconds (default
1) at the end of a worker step (:func:`publish_if_due`, called after `execute_model` by
patches/worker_step_end.py: outside the forward pass and any CUDA graph, on every
pipeline stage; on an accelerator that read is the counters' only host sync, once per
interval) — and a Prometheus collector in the process that first loaded the plugin reads
them at scrape time. The folder is passed to every vLLM
process through the environment (`VLLM_BLOCKFFN_STATS_DIR`), which spawned engine-core
and worker processes inherit.

Exposed (labels: model, layer):
- `vllm_blockffn:token_sparsity` — fraction of experts inactive per token, since start;
- `vllm_blockffn:chunk_sparsity` — fraction of experts outside the union of each executed
  segment (a decode token, a speculative verify chunk, a prefill chunk), since start;
- `vllm_blockffn:tokens_total`, `vllm_blockffn:segments_total` and the raw sums
  `vllm_blockffn:active_experts_total`, `vllm_blockffn:segment_union_experts_total`, so a
  dashboard can plot windowed sparsity as ratios of rates;
- `vllm_blockffn:expert_bytes_read_total` / `vllm_blockffn:expert_bytes_dense_total`
  (label: model) — expert-weight bytes a per-segment sparse execution reads vs dense.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import torch

from vllm_blockffn.observe.stats import RECORDER

STATS_DIR_ENV = "VLLM_BLOCKFFN_STATS_DIR"
INTERVAL_ENV = "VLLM_BLOCKFFN_STATS_INTERVAL"
_collector_registered = False


def stats_dir() -> str | None:
    return os.environ.get(STATS_DIR_ENV)


def setup_process() -> None:
    """In the first vLLM process: choose the folder and serve it on `/metrics`; elsewhere nothing."""
    global _collector_registered
    if stats_dir() is not None or _collector_registered:
        return
    os.environ[STATS_DIR_ENV] = tempfile.mkdtemp(prefix=f"vllm-blockffn-stats-{os.getpid()}-")
    from prometheus_client import REGISTRY

    REGISTRY.register(SparsityCollector())
    _collector_registered = True


class Publisher:
    """Writes this process's totals to the stats folder, at most once per interval."""

    def __init__(self) -> None:
        self.interval = float(os.environ.get(INTERVAL_ENV, "1.0"))
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def publish(self, model: str, layers: list) -> None:
        folder = stats_dir()
        if folder is None or not os.path.isdir(folder):
            return
        self.last = time.monotonic()
        path = os.path.join(folder, f"worker-{os.getpid()}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": model, "layers": [vars(layer) for layer in layers]}, f)
        os.replace(tmp, path)


_publisher: Publisher | None = None


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never publish then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def publish_if_due() -> None:
    """A worker's step end: publish this process's totals when the interval has passed."""
    global _publisher
    if not RECORDER or stats_dir() is None or capturing():
        return
    if _publisher is None:
        _publisher = Publisher()
    if _publisher.due():
        _publisher.publish(RECORDER.model, RECORDER.snapshot())


def read_published(folder: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "worker-*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):  # a worker mid-write or gone
            continue
    return out


class SparsityCollector:
    """prometheus_client collector over the workers' published totals."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from vllm_blockffn.observe.sparsity import LayerSparsity

        tls = GaugeMetricFamily("vllm_blockffn:token_sparsity",
                                "Fraction of experts inactive per token since start", labels=["model", "layer"])
        cls = GaugeMetricFamily("vllm_blockffn:chunk_sparsity",
                                "Fraction of experts outside each executed segment's union since start",
                                labels=["model", "layer"])
        counters = {name: CounterMetricFamily(f"vllm_blockffn:{name}", doc, labels=["model", "layer"])
                    for name, doc in (("tokens", "Tokens through the layer's experts"),
                                      ("segments", "Segments (requests' token runs) executed"),
                                      ("active_experts", "Sum over tokens of active experts"),
                                      ("segment_union_experts", "Sum over segments of the union size"))}
        read = CounterMetricFamily("vllm_blockffn:expert_bytes_read", "Expert-weight bytes read by "
                                   "per-segment sparse execution", labels=["model"])
        dense = CounterMetricFamily("vllm_blockffn:expert_bytes_dense", "Expert-weight bytes a dense "
                                    "execution of the same segments reads", labels=["model"])
        totals: dict[tuple[str, int], LayerSparsity] = {}
        for worker in read_published(stats_dir() or ""):
            for row in worker["layers"]:
                key = (worker["model"], row["layer"])
                layer = LayerSparsity(**row)
                if key in totals:  # tensor-parallel ranks see the same tokens: keep one
                    continue
                totals[key] = layer
        bytes_read: dict[str, list[int]] = {}
        for (model, index), layer in sorted(totals.items()):
            labels = [model, str(index)]
            if layer.tokens:
                tls.add_metric(labels, layer.token_sparsity)
            if layer.segments:
                cls.add_metric(labels, layer.chunk_sparsity)
            counters["tokens"].add_metric(labels, layer.tokens)
            counters["segments"].add_metric(labels, layer.segments)
            counters["active_experts"].add_metric(labels, layer.active)
            counters["segment_union_experts"].add_metric(labels, layer.union)
            acc = bytes_read.setdefault(model, [0, 0])
            acc[0] += layer.bytes_read
            acc[1] += layer.bytes_dense
        for model, (r, d) in bytes_read.items():
            read.add_metric([model], r)
            dense.add_metric([model], d)
        yield tls
        yield cls
        yield from counters.values()
        yield read
        yield dense
