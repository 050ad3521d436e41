"""The kernels as torch custom ops (namespace ``blockffn``), for the vLLM model to call.

Custom ops are opaque to torch.compile (Dynamo traces them through their fake
implementations and never looks inside) and to CUDA graphs (the Triton launches inside
have shape-only grids and never sync the host), so the model's forward stays one graph.

Device rule for ``impl="auto"``:
- CUDA tensors → the per-segment Triton kernels, the expert-major path through vLLM's fused-MoE
  kernel, or dense GEMMs, as :func:`~.dispatch.cuda_path` chooses from static shapes;
- CPU tensors → ``sparse_ffn_cpu``: the native expert-major kernel (fp32/bf16, when it could be
  compiled; else the plain-PyTorch path), or dense GEMMs when
  :func:`~.dispatch.cpu_native_prefers_dense` says so (vLLM runs no Triton on CPUs).
``impl="triton"`` forces the Triton kernels (the cheaper sparse path), also on CPU tensors when
``TRITON_INTERPRET=1`` is set (how the tests run them); ``impl="torch"`` forces the CPU
sparse path (native kernel or PyTorch), never falling back to dense; ``impl="dense"`` the dense GEMMs.
"""

from __future__ import annotations

import numpy as np
import torch

from ._triton import HAS_TRITON, interpret_mode, triton_usable
from .dispatch import cuda_path
from .router.naive import ROUTER_MODES, router_naive
from .segments.naive import segment_union_naive
from .sparse_ffn.cpu import dense_ffn as _dense_ffn_torch
from .sparse_ffn.cpu import sparse_ffn_cpu

IMPLS = ("auto", "triton", "torch", "dense")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def _need_triton(device: torch.device) -> None:
    if not triton_usable(device):
        why = "Triton is not installed" if not HAS_TRITON else f"{device} tensors need TRITON_INTERPRET=1"
        raise RuntimeError(f"impl='triton' is unavailable: {why}")


def _router_impl(
    x: torch.Tensor,
    w_r: torch.Tensor,
    norm_w: torch.Tensor | None,
    mode: str,
    norm_scale: float,
    eps: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_impl(impl)
    if mode not in ROUTER_MODES:
        raise ValueError(f"unknown router norm {mode!r}; expected one of {ROUTER_MODES}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda and HAS_TRITON and w_r.shape[0] <= 256)
    if use_triton:
        _need_triton(x.device)
        from .router.triton_router import router_triton

        return router_triton(x, w_r, norm_w, mode, norm_scale, eps)
    return router_naive(x, w_r, norm_w, mode, norm_scale, eps)


def _sparse_ffn_impl(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    impl: str,
    stats: np.ndarray | None = None,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_impl(impl)
    T = x.shape[0]
    E, D, H = w_up.shape
    S = cu_seqlens.shape[0] - 1
    # int8 experts' scales (quant.py): passed on only when present
    q = {} if up_scale is None and down_scale is None else {"up_scale": up_scale, "down_scale": down_scale}
    if impl == "auto":
        if x.is_cuda:
            impl = "dense" if (not HAS_TRITON or _cuda_path(x, T, S, E, D, H, w=w_up) == "dense") else "triton"
    if impl == "dense":
        return _dense_ffn_torch(x, scores, w_up, w_down_t, **q)
    if impl == "triton":
        _need_triton(x.device)
        if _cuda_path(x, T, S, E, D, H, allow_dense=False, w=w_up) == "expert_major":
            from .sparse_ffn.triton_expert_major import expert_major_ffn_triton

            return expert_major_ffn_triton(x, scores, w_up, w_down_t, **q)  # no segments needed
        from .sparse_ffn.naive import active_scores
        from .sparse_ffn.triton_sparse_ffn import sparse_ffn_triton

        scores = active_scores(scores)  # NaN / negative scores: inactive (naive.py); a device op
        return sparse_ffn_triton(x, scores, w_up, w_down_t, cu_seqlens, **q)
    # "torch": the CPU sparse path (native kernel, else PyTorch), always sparse; "auto" on a CPU
    # lets it choose dense on the actual counts (host-side data on a CPU).
    allow_dense = impl == "auto"
    if x.is_cuda:
        q = {k: None if v is None else v.cpu() for k, v in q.items()}
        return sparse_ffn_cpu(x.cpu(), scores.cpu(), w_up.cpu(), w_down_t.cpu(), cu_seqlens.cpu(),
                              allow_dense=False, **q).to(x.device)
    return sparse_ffn_cpu(x, scores, w_up, w_down_t, cu_seqlens, allow_dense=allow_dense, stats=stats, **q)


def _cuda_path(x: torch.Tensor, T: int, S: int, E: int, D: int, H: int, allow_dense: bool = True,
               w: torch.Tensor | None = None) -> str:
    """:func:`~.dispatch.cuda_path` for these shapes; expert-major only where vLLM's kernels exist.
    ``w``: the expert weights (their element size: 1 for int8), else x's."""
    from .sparse_ffn.triton_expert_major import vllm_kernels_available

    return cuda_path(T, S, E, D, H, expert_major=vllm_kernels_available(),
                     elt=(w if w is not None else x).element_size(), allow_dense=allow_dense,
                     act_elt=x.element_size())


def _segment_union_impl(active: torch.Tensor, cu_seqlens: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_impl(impl)
    if impl == "triton" or (impl == "auto" and active.is_cuda and HAS_TRITON):
        _need_triton(active.device)
        from .segments.triton_segments import segment_union_triton

        ids, counts, _, _ = segment_union_triton(active, cu_seqlens.to(active.device))
        return ids, counts
    return segment_union_naive(active, cu_seqlens)


def _op_registered(name: str) -> bool:
    try:
        getattr(torch.ops.blockffn, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register() -> None:
    """Define the ops once per process (this file may be imported as two packages)."""
    if not _op_registered("router"):

        @torch.library.custom_op("blockffn::router", mutates_args=())
        def _router_op(
            x: torch.Tensor,
            w_r: torch.Tensor,
            norm_w: torch.Tensor | None,
            mode: str,
            norm_scale: float,
            eps: float,
            impl: str,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return _router_impl(x, w_r, norm_w, mode, norm_scale, eps, impl)

        @_router_op.register_fake
        def _router_fake(x, w_r, norm_w, mode, norm_scale, eps, impl):
            T, E = x.shape[0], w_r.shape[0]
            return x.new_empty((T, E), dtype=torch.float32), x.new_empty((T, E), dtype=torch.bool)

    if not _op_registered("sparse_ffn"):

        @torch.library.custom_op("blockffn::sparse_ffn", mutates_args=())
        def _sparse_ffn_op(
            x: torch.Tensor,
            scores: torch.Tensor,
            w_up: torch.Tensor,
            w_down_t: torch.Tensor,
            cu_seqlens: torch.Tensor,
            impl: str,
            up_scale: torch.Tensor | None = None,
            down_scale: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return _sparse_ffn_impl(x, scores, w_up, w_down_t, cu_seqlens, impl, None, up_scale, down_scale)

        @_sparse_ffn_op.register_fake
        def _sparse_ffn_fake(x, scores, w_up, w_down_t, cu_seqlens, impl, up_scale=None, down_scale=None):
            return x.new_empty((x.shape[0], w_up.shape[2]))

    if not _op_registered("dense_ffn"):

        @torch.library.custom_op("blockffn::dense_ffn", mutates_args=())
        def _dense_ffn_op(
            x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
            up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return _dense_ffn_torch(x, scores, w_up, w_down_t, up_scale, down_scale)

        @_dense_ffn_op.register_fake
        def _dense_ffn_fake(x, scores, w_up, w_down_t, up_scale=None, down_scale=None):
            return x.new_empty((x.shape[0], w_up.shape[2]))

    if not _op_registered("segment_union"):

        @torch.library.custom_op("blockffn::segment_union", mutates_args=())
        def _segment_union_op(
            active: torch.Tensor, cu_seqlens: torch.Tensor, impl: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return _segment_union_impl(active, cu_seqlens, impl)

        @_segment_union_op.register_fake
        def _segment_union_fake(active, cu_seqlens, impl):
            S, E = cu_seqlens.shape[0] - 1, active.shape[1]
            return active.new_empty((S, E), dtype=torch.int32), active.new_empty((S,), dtype=torch.int32)


_register()


# ---------------------------------------------------------------- typed Python entry points
def router(
    x: torch.Tensor,
    w_r: torch.Tensor,
    norm_w: torch.Tensor | None = None,
    mode: str = "rms",
    norm_scale: float = 1.0,
    eps: float = 1e-5,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores (fp32 [T, E]) and active mask (bool [T, E], z > 0) in one fused pass.

    ``mode`` is the checkpoint's ``norm_after_router``; ``norm_w`` its ``router_norm.weight``
    ("rms"), ``norm_scale`` its ``norm_scale`` ("sum"), ``eps`` its ``rms_norm_eps``.
    """
    return torch.ops.blockffn.router(x, w_r, norm_w, mode, float(norm_scale), float(eps), impl)


def sparse_ffn(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    impl: str = "auto",
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts' output y [T, H], running per segment only the union of active experts.

    Segments are given by ``cu_seqlens`` (int32 [S+1]); an expert with score 0 for a token
    contributes exactly 0 to it, so the result equals the dense layer up to rounding. Pass
    one segment per request (its tokens of this step) to make a speculative verify chunk
    read only its union's weights. int8 experts: ``up_scale`` / ``down_scale`` (quant.py).
    """
    return torch.ops.blockffn.sparse_ffn(x, scores, w_up, w_down_t, cu_seqlens, impl, up_scale, down_scale)


def sparse_ffn_eager(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    impl: str = "auto",
    stats: np.ndarray | None = None,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sparse_ffn` without the custom-op wrapper, for callers already inside an opaque op
    (vLLM's ``blockffn_experts``): ``torch.library.custom_op``'s Python dispatch costs 30–60 µs
    per call on a CPU, as much as a decode step's expert reads. ``stats``: the CPU native
    kernel adds its live counters there (see ``sparse_ffn_cpu``)."""
    return _sparse_ffn_impl(x, scores, w_up, w_down_t, cu_seqlens, impl, stats, up_scale, down_scale)


dense_ffn_eager = _dense_ffn_torch
"""The body of :func:`dense_ffn` (two GEMMs) without the custom-op wrapper: see :func:`sparse_ffn_eager`."""


def dense_ffn(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
              up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """All experts with two dense GEMMs (the baseline, and the fallback for dense steps)."""
    return torch.ops.blockffn.dense_ffn(x, scores, w_up, w_down_t, up_scale, down_scale)


def segment_union(
    active: torch.Tensor, cu_seqlens: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment compacted active experts: ``(expert_ids [S, E], counts [S])``, int32.

    ``expert_ids[s]`` lists the active experts first (ascending), then the inactive ones;
    useful for chunk-sparsity statistics (CLS) and for debugging routing.
    """
    return torch.ops.blockffn.segment_union(active, cu_seqlens, impl)


__all__ = ["IMPLS", "dense_ffn", "dense_ffn_eager", "interpret_mode", "router", "segment_union", "sparse_ffn",
           "sparse_ffn_eager"]
