"""Which tokens of a forward pass share one expert union (a "segment").

vLLM lays a step's tokens out request by request; `query_start_loc` in the
attention metadata marks where each request's query tokens start. One segment per
request is what chunk-level sparsity is about: a decode token, a speculative verify
chunk of k+1 tokens, or a prefill chunk each reads only its own experts' union.
"""

from __future__ import annotations

import torch


def whole_batch(num_tokens: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, num_tokens], dtype=torch.int32, device=device)


def current_segments(num_tokens: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens [S+1] (int32, on `device`) for this step; padding tokens form a last segment."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return whole_batch(num_tokens, device)
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:  # profiling run or micro-batching
        return whole_batch(num_tokens, device)
    qsl = getattr(next(iter(metadata.values())), "query_start_loc", None)
    if qsl is None:
        return whole_batch(num_tokens, device)
    qsl = qsl.to(device=device, dtype=torch.int32)
    if qsl.shape[0] < 2 or qsl.shape[0] > num_tokens + 1:
        return whole_batch(num_tokens, device)
    # Tokens past the last request (CUDA-graph padding) go into one extra segment.
    return torch.cat([qsl, torch.tensor([num_tokens], dtype=torch.int32, device=device)])
