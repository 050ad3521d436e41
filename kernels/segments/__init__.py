"""Per-segment unions of active experts, compacted on the device (no host sync)."""

from .._triton import HAS_TRITON
from .naive import segment_union_naive, token_blocks_naive

if HAS_TRITON:
    from .triton_segments import num_token_blocks, segment_union_triton
else:  # pragma: no cover
    segment_union_triton = None

    def num_token_blocks(num_tokens: int, num_segments: int, block_t: int) -> int:
        return max(1, min(num_tokens, -(-num_tokens // block_t) + num_segments))


__all__ = ["num_token_blocks", "segment_union_naive", "segment_union_triton", "token_blocks_naive"]
