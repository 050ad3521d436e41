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


def current_segments(num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens [S+1] (int32, on `device`) for this step, or None outside a real step.

    None means no request layout is known (profiling and warm-up runs, micro-batching):
    the caller treats the batch as one segment. Padding tokens past the last request
    (CUDA-graph padding) form one extra segment.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    qsl = getattr(next(iter(metadata.values())), "query_start_loc", None)
    if qsl is None or qsl.shape[0] < 2 or qsl.shape[0] > num_tokens + 1:
        return None
    qsl = qsl.to(device=device, dtype=torch.int32)
    return torch.cat([qsl, torch.tensor([num_tokens], dtype=torch.int32, device=device)])
