"""Sparse-execution kernels for BlockFFN layers (arXiv 2507.08771).

A BlockFFN token activates a few of E experts (ReLU router); consecutive tokens share
most of them. Decoding is memory-bound, so reading only the experts a step needs makes
the FFN's time fall towards the fraction of experts active in each *segment* (the tokens
one request runs in a step: 1 when decoding, k+1 when verifying k draft tokens).

Layout: ``w_up`` [E, D, H] and ``w_down_t`` [E, D, H] (see :func:`to_internal_layout`).
Each op has a plain-PyTorch reference (``*_naive``), a Triton implementation (GPU; CPU
under ``TRITON_INTERPRET=1``) and, for the experts, a plain-PyTorch CPU path.
No vLLM imports here: the package runs with torch (and, for GPUs, triton) alone.

Note: the names ``router`` and ``sparse_ffn`` below are the op entry points; the
folders of the same names stay importable as ``<package>.router.naive`` etc.
"""

from __future__ import annotations

from ._triton import HAS_TRITON, interpret_mode
from .dispatch import THRESHOLDS, DispatchThresholds, cpu_prefers_dense, cuda_prefers_dense
from .layout import LAYOUTS, from_internal_layout, to_internal_layout

# The functions ``router`` / ``sparse_ffn`` take these attribute names from the subpackages of
# the same names; the subpackages and their modules stay importable by their dotted paths.
from .ops import IMPLS, dense_ffn, router, segment_union, sparse_ffn
from .router import ROUTER_MODES, router_naive, router_triton
from .segments import num_token_blocks, segment_union_naive, segment_union_triton
from .sparse_ffn import (
    SparseFFNConfig,
    default_config,
    experts_naive,
    experts_reference,
    sparse_ffn_cpu,
    sparse_ffn_naive,
    sparse_ffn_triton,
)
from .sparse_ffn import dense_ffn as dense_ffn_torch

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "LAYOUTS",
    "ROUTER_MODES",
    "THRESHOLDS",
    "DispatchThresholds",
    "SparseFFNConfig",
    "cpu_prefers_dense",
    "cuda_prefers_dense",
    "default_config",
    "dense_ffn",
    "dense_ffn_torch",
    "experts_naive",
    "experts_reference",
    "from_internal_layout",
    "interpret_mode",
    "num_token_blocks",
    "router",
    "router_naive",
    "router_triton",
    "segment_union",
    "segment_union_naive",
    "segment_union_triton",
    "sparse_ffn",
    "sparse_ffn_cpu",
    "sparse_ffn_naive",
    "sparse_ffn_triton",
    "to_internal_layout",
]
