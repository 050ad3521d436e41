"""Which tokens of a forward pass share one expert union (a "segment").

vLLM lays a step's tokens out request by request; `query_start_loc` in the
attention metadata marks where each request's query tokens start. One segment per
request is what chunk-level sparsity is about: a decode token, a speculative verify
chunk of k+1 tokens, or a prefill chunk each reads only its own experts' union.

On an accelerator everything here is graph-safe (README "CUDA graphs"): no host sync,
no host→device copy, no branch on device data. The request offsets are read from the
attention metadata, whose `query_start_loc` is a view of the model runner's persistent
buffer, so a captured full CUDA graph reads each replay's new layout. What vLLM hands
the op in each cudagraph mode (vLLM 0.32, gpu_model_runner.py):
- no graph, piecewise replay (the op is a splitting op, patches/splitting_ops.py, so it
  runs eagerly between the captured pieces): `query_start_loc` [num_reqs + 1]; the token
  count may be padded to a capture size past `query_start_loc[-1]`;
- full-graph capture and replay: `query_start_loc` [num_reqs_padded + 1], its tail
  repeated from the last real value (empty segments), tokens padded to the capture size;
- profiling and warm-up runs, piecewise capture: no metadata → one segment.
Tokens past `query_start_loc[-1]` (padding) form one extra segment, appended with a
device-side fill, so the kernels cover every row; their router scores are zeroed
(:func:`mask_padding`), so that segment reads no weights and outputs exact zeros.
"""

from __future__ import annotations

import torch
import vllm.forward_context as forward_context


def on_accelerator(t: torch.Tensor) -> bool:
    """Whether the expert op must stay graph-safe for tensors like `t` (CUDA, ROCm, XPU...).

    The single device decision of the op's forward path: tests emulate an accelerator with
    CPU or meta tensors by patching this function (tests/test_replay.py)."""
    return t.device.type != "cpu"


def request_starts(num_tokens: int) -> torch.Tensor | None:
    """vLLM's `query_start_loc` for this step ([R+1], on the device, not copied), or None
    when no request layout is known (profiling and warm-up runs, piecewise capture,
    micro-batching): the caller then treats the batch as one segment."""
    if not forward_context.is_forward_context_available():
        return None
    metadata = forward_context.get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    qsl = getattr(next(iter(metadata.values())), "query_start_loc", None)
    if qsl is None or qsl.shape[0] < 2 or qsl.shape[0] > num_tokens + 1:
        return None
    return qsl


def whole_batch(num_tokens: int, device: torch.device, graph_safe: bool) -> torch.Tensor:
    """cu_seqlens [0, num_tokens] (int32): built by a device fill, not copied from the host."""
    if not graph_safe:
        return torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    cu = torch.full((2,), num_tokens, dtype=torch.int32, device=device)
    cu[:1].zero_()
    return cu


def kernel_segments(starts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """cu_seqlens for the accelerator kernels: the requests' segments, then [starts[-1], num_tokens),
    always appended (empty when nothing is padded): its presence cannot depend on device data.
    (The CPU path passes `starts` as is: its kernels give tokens past the last entry y = 0.)"""
    return torch.cat([starts, starts.new_full((1,), num_tokens)])


def mask_padding(scores: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Router scores with the rows of padding tokens (t ≥ starts[-1]) set to 0: the padding
    segment's union is then empty, it reads no expert weights and its output is exactly 0.
    `torch.where`, not a product, so garbage (NaN) scores of padding rows are dropped too.
    Three small device kernels, no host read of `starts`."""
    valid = torch.arange(scores.shape[0], device=scores.device, dtype=starts.dtype) < starts[-1:]
    return torch.where(valid.unsqueeze(1), scores, 0.0)
