"""Sparse BlockFFN experts: naive reference, Triton kernels (GPU), plain-PyTorch CPU path."""

from .._triton import HAS_TRITON
from .cpu import dense_ffn, dense_ffn_plain, segment_unions_cpu, sparse_ffn_cpu, sparse_ffn_cpu_torch
from .cpu_native import native_available, sparse_ffn_native
from .naive import (
    experts_naive,
    experts_reference,
    sparse_down_naive,
    sparse_ffn_naive,
    sparse_up_naive,
)

if HAS_TRITON:
    from .triton_sparse_ffn import (
        SparseFFNConfig,
        default_config,
        sparse_down_triton,
        sparse_ffn_triton,
        sparse_up_triton,
    )
else:  # pragma: no cover
    SparseFFNConfig = default_config = sparse_down_triton = sparse_ffn_triton = sparse_up_triton = None

__all__ = [
    "SparseFFNConfig",
    "default_config",
    "dense_ffn",
    "dense_ffn_plain",
    "experts_naive",
    "experts_reference",
    "native_available",
    "segment_unions_cpu",
    "sparse_down_naive",
    "sparse_down_triton",
    "sparse_ffn_cpu",
    "sparse_ffn_cpu_torch",
    "sparse_ffn_native",
    "sparse_ffn_naive",
    "sparse_ffn_triton",
    "sparse_up_naive",
    "sparse_up_triton",
]
