"""BlockFFN experts on CPUs (vLLM runs no Triton on CPUs).

:func:`sparse_ffn_cpu` runs the native expert-major kernel (``cpu_native.py``: each active
expert of the whole step read once, only the active (token, expert) pairs computed, at
memory speed) for fp32 / bf16 tensors when it could be built, and otherwise the
plain-PyTorch path below (:func:`sparse_ffn_cpu_torch`), kept as the fallback without a C
compiler, for fp16, and as a baseline in the benchmarks.

PyTorch path: per segment, the union of its tokens' active experts is found on the host
(free on a CPU: the data is already there) and cut into *runs* of consecutive expert ids.
Because ``w_up`` / ``w_down_t`` are [E, D, H] with each expert a contiguous [D, H] slab, a
run e0..e1-1 is one contiguous [(e1-e0)·D, H] view, so every run costs two BLAS calls on
weight views: no gather copies, and only the active experts' bytes are read. The SiLU and
the per-token router scores are applied once over the segment's whole intermediate.

Alternatives measured with ``benchmarks/bench_kernels_cpu.py --alternatives`` at 16abe25 (1 thread,
H=1792, E=56, D=128, 1 and 8 tokens, 70-80% union sparsity): gathering the active weights
with ``index_select`` before two GEMMs, or ``bmm`` on gathered weights, is 2-5× slower (the
gather copies the active weights every call, which costs as much as reading them); a loop
over single experts or over runs computing x·W^T then h·W is as fast in fp32 but 3-8×
slower in bf16, where oneDNN's GEMM with a row-major right-hand weight is very slow on AVX2
CPUs; upcasting each run to fp32 is on par at 8 tokens and slower at 1. Hence the layout
here: h^T = W_run x^T (weights as the left operand), y += (h^T)^T W_run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..dispatch import THRESHOLDS, cpu_prefers_dense
from ..layout import experts_kmajor
from ..quant import check_expert_scales, float_experts
from .cpu_native import count_native, native_supports, route_path, sparse_ffn_native
from .cpu_ops import WIDEN_ROWS
from .naive import active_scores

Scale = torch.Tensor | None


def dense_ffn(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
              up_scale: Scale = None, down_scale: Scale = None) -> torch.Tensor:
    """All experts: y = (SiLU(x W_up^T) ⊙ r) W_down^T. Any device.

    The reference the sparse paths must beat, and the fallback when a step is too dense for
    sparsity to pay (long prefill segments, large batches). At decode sizes on a CPU (T ≤
    ``cpu_linear_max_tokens``) it is the native kernel streaming every expert: the fastest dense
    layer this machine has (benchmarks/RESULTS.md), so that sparse-vs-dense ratios are not
    inflated by a slow baseline. Otherwise :func:`dense_ffn_gemm`. int8 experts: their scales
    (``kernels/quant.py``); the GEMM path dequantizes them first.
    """
    T = x.shape[0]
    if 0 < T <= THRESHOLDS.cpu_linear_max_tokens and native_supports(x, w_up, w_down_t):
        return sparse_ffn_native(x, scores, w_up, w_down_t, torch.tensor([0, T], dtype=torch.int32),
                                 all_experts=True, up_scale=up_scale, down_scale=down_scale)
    return dense_ffn_gemm(x, scores, *float_experts(w_up, up_scale, w_down_t, down_scale, x.dtype))


def dense_ffn_gemm(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """:func:`dense_ffn` as two GEMMs (torch: oneDNN/MKL on CPUs, cuBLAS on GPUs).

    On CPUs the intermediate is computed transposed, h^T = W_up x^T, so that both GEMMs take the
    weights as their row-major left / transposed right operand: with the weights as a plain
    row-major right operand (h @ W_down), oneDNN's bf16 GEMM on AVX2 CPUs measured ~10× slower here.
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    scores = active_scores(scores)  # NaN / negative scores: inactive (naive.py)
    if x.device.type == "cpu" and gemm_dtype(x.dtype) != x.dtype:
        return _dense_ffn_widened(x, scores, w_up, w_down_t)
    if x.device.type == "cpu":
        h_t = F.silu(w_up.reshape(E * D, H) @ x.t())
        h_t.view(E, D, T).mul_(scores.t().to(h_t.dtype).unsqueeze(1))
        return h_t.t() @ w_down_t.reshape(E * D, H)
    h = F.silu(x @ w_up.reshape(E * D, H).t())
    h.view(T, E, D).mul_(scores.to(h.dtype).unsqueeze(-1))
    return h @ w_down_t.reshape(E * D, H)


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU GEMMs of long steps run in: fp32 for bf16 on the ``avx2``, ``avx512`` and ``avx512_bf16``
    paths, where oneDNN's bf16 GEMM is torch's fallback (no bf16 GEMM on AVX2: 4-20x slower) or runs at half its
    fp32 rate (AVX512_BF16 on the Intel Xeon without AMX: 168 vs 312 GFLOP/s, RESULTS.md 2026-12-04 16:43 UTC);
    bf16 products are exact in fp32. Else ``dtype``: AMX tiles for bf16, and on ``avx512_bf16_dp``
    (:func:`~.cpu_native.route_path`: VDPBF16PS as fast as an FMA) oneDNN's bf16 GEMM at twice its fp32 rate
    (AMD Zen 4: 412 vs 186 GFLOP/s, RESULTS.md 2026-12-06 00:43 UTC)."""
    return torch.float32 if dtype == torch.bfloat16 and route_path() in ("avx2", "avx512", "avx512_bf16") else dtype


def _dense_ffn_widened(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor
                       ) -> torch.Tensor:
    """:func:`dense_ffn_gemm` for bf16 where :func:`gemm_dtype` says fp32 (torch's bf16 fallback on the ``avx2`` path
    was 6.4-7.3x slower than this from 256 to 1024 tokens, XLarge shape; RESULTS.md 2026-12-04): fp32 GEMMs over
    blocks of whole experts widened to fp32 (bf16 products are exact in fp32), y accumulated in fp32 and rounded
    to bf16 once. ``scores`` already passed through :func:`active_scores`."""
    T, H = x.shape
    E, D, _ = w_up.shape
    xf_t = x.float().t()
    s_t = scores.t().float()  # [E, T]
    y = torch.zeros((T, H), dtype=torch.float32)
    per = max(1, WIDEN_ROWS // D)  # experts per block: about the widened linear's block
    for e0 in range(0, E, per):
        e1 = min(E, e0 + per)
        h_t = F.silu(w_up[e0:e1].reshape(-1, H).float() @ xf_t)  # [(e1 - e0)·D, T]
        h_t.view(e1 - e0, D, T).mul_(s_t[e0:e1].unsqueeze(1))
        y.addmm_(h_t.t(), w_down_t[e0:e1].reshape(-1, H).float())
    return y.to(x.dtype)


def dense_ffn_plain(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """:func:`dense_ffn` as the formula reads (x W_up^T, then h W_down), whatever the device.

    Kept for the benchmarks: the baseline a straightforward dense implementation would be.
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    h = F.silu(x @ w_up.reshape(E * D, H).t())
    h.view(T, E, D).mul_(scores.to(h.dtype).unsqueeze(-1))
    return h @ w_down_t.reshape(E * D, H)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids → maximal runs [e0, e1) of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def segment_unions_cpu(scores: torch.Tensor, cu: list[int]) -> list[list[int]]:
    """Sorted active-expert ids of every segment (host lists); active: score > 0 (naive.py)."""
    active = scores > 0
    S = len(cu) - 1
    if S == 1:
        return [active.any(dim=0).nonzero().flatten().tolist()] if cu[1] > cu[0] else [[]]
    lens = torch.tensor([cu[s + 1] - cu[s] for s in range(S)])
    seg_of_token = torch.repeat_interleave(torch.arange(S), lens)
    union = torch.zeros((S, active.shape[1]), dtype=torch.int32)
    union.index_add_(0, seg_of_token, active.to(torch.int32))
    pairs = union.nonzero().tolist()  # row-major: sorted by segment, then expert
    out: list[list[int]] = [[] for _ in range(S)]
    for s, e in pairs:
        out[s].append(e)
    return out


def _segment_sparse(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up_2d: torch.Tensor,
    w_down_2d: torch.Tensor,
    ids: list[int],
    D: int,
    out: torch.Tensor,
) -> None:
    """out (n × H, zeroed or not) ← the segment's output from its union ``ids`` (sorted)."""
    n = x.shape[0]
    runs = _runs(ids)
    k = len(ids)
    # Intermediate laid out [k·D, n] so that every run writes a contiguous row block.
    h_t = torch.empty((k * D, n), dtype=x.dtype)
    row = 0
    for e0, e1 in runs:
        m = (e1 - e0) * D
        torch.mm(w_up_2d[e0 * D : e1 * D], x.t(), out=h_t[row : row + m])
        row += m
    F.silu(h_t, inplace=True)
    idx = torch.tensor(ids)
    h_t.view(k, D, n).mul_(scores.index_select(1, idx).t().to(h_t.dtype).unsqueeze(1))
    row = 0
    first = True
    for e0, e1 in runs:
        m = (e1 - e0) * D
        if first:
            torch.mm(h_t[row : row + m].t(), w_down_2d[e0 * D : e1 * D], out=out)
            first = False
        else:
            out.addmm_(h_t[row : row + m].t(), w_down_2d[e0 * D : e1 * D])
        row += m


def uses_native(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Whether :func:`sparse_ffn_cpu` runs the native kernel for these tensors (and fills ``stats``)."""
    return native_supports(x, w_up, w_down_t)


def grouped_min_tokens(w_up: torch.Tensor) -> int:
    """Steps of at least this many tokens run :func:`sparse_ffn_grouped` (the auto backend): the path's entry of
    ``cpu_grouped_min_tokens_by_path`` for the experts' dtype (measured per path, dispatch.py;
    :func:`~.cpu_native.route_path` names the entry; experts packed K-major:
    ``cpu_grouped_min_tokens_kmajor_int8`` / ``_bf16`` / ``_fp32``)."""
    path = route_path()
    fp32, bf16, int8 = THRESHOLDS.cpu_grouped_min_tokens_by_path[path]
    if experts_kmajor(w_up):  # packed K-major: the kernel's long steps run at GEMM speed (dispatch.py)
        if w_up.dtype == torch.int8:
            return THRESHOLDS.cpu_grouped_min_tokens_kmajor_int8.get(path, int8)
        if w_up.dtype == torch.float32:
            return THRESHOLDS.cpu_grouped_min_tokens_kmajor_fp32.get(path, fp32)
        return THRESHOLDS.cpu_grouped_min_tokens_kmajor_bf16.get(path, bf16)
    return int8 if w_up.dtype == torch.int8 else bf16 if w_up.dtype == torch.bfloat16 else fp32


def sparse_ffn_cpu(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    allow_dense: bool = True,
    native: bool = True,
    stats: np.ndarray | None = None,
    up_scale: Scale = None,
    down_scale: Scale = None,
) -> torch.Tensor:
    """y [T, H] reading only the experts the step's tokens use (sparse: tokens past cu[-1] get 0).

    Native kernel when available (``native`` and fp32/bf16): each expert in the step's
    union is read once and only active (token, expert) pairs are computed — exact for the
    per-segment semantics, since an inactive pair contributes exactly 0. With
    ``allow_dense`` it runs :func:`dense_ffn` where :func:`~..dispatch.cpu_native_prefers_dense`
    says dense wins. Otherwise :func:`sparse_ffn_cpu_torch`. ``stats`` (int64 [5] live
    counters) is filled by the native kernel only: check :func:`uses_native` first. int8 experts:
    ``up_scale`` / ``down_scale`` (``kernels/quant.py``), read by the native kernel; the PyTorch
    fallback dequantizes the weights first.
    """
    if x.shape[0] == 0:
        return x.new_empty((0, x.shape[1]))
    if native and native_supports(x, w_up, w_down_t):
        long = x.shape[0] >= THRESHOLDS.cpu_grouped_min_tokens and x.shape[0] >= grouped_min_tokens(w_up)
        if allow_dense and long:
            # a long step (prefill): compute-bound, so each active expert's tokens as one GEMM
            if stats is not None:
                count_native(scores, cu_seqlens, stats)
            return sparse_ffn_grouped(x, scores, w_up, w_down_t, cu_seqlens, up_scale, down_scale)
        y = sparse_ffn_native(x, scores, w_up, w_down_t, cu_seqlens, allow_dense=allow_dense, stats=stats,
                              up_scale=up_scale, down_scale=down_scale)
        return dense_ffn(x, scores, w_up, w_down_t, up_scale, down_scale) if y is None else y
    w_up, w_down_t = float_experts(w_up, up_scale, w_down_t, down_scale, x.dtype)  # (the kernel checks its own)
    return sparse_ffn_cpu_torch(x, scores, w_up, w_down_t, cu_seqlens, allow_dense=allow_dense)


def sparse_ffn_grouped(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    up_scale: Scale = None,
    down_scale: Scale = None,
) -> torch.Tensor:
    """y [T, H] for long steps: each active expert's tokens gathered into one GEMM pair.

    FLOPs ∝ active (token, expert) pairs, at the GEMM library's speed (oneDNN: AMX tiles for bf16
    where the CPU has them), which a per-token register-blocked kernel cannot match once a step is
    compute-bound (prefill chunks). Tokens outside [cu[0], cu[-1]) get 0. Dense (all pairs) when
    :func:`~..dispatch.cpu_native_prefers_dense` says so. int8 experts: each active expert is
    dequantized to x's dtype before its GEMMs (compute-bound here: the dequantization is O(D·H)
    against O(n·D·H) FLOPs). bf16 x where :func:`gemm_dtype` says fp32 (no AMX, VDPBF16PS slow or absent): the
    GEMMs run in fp32, each active expert widened once (bf16 products are exact in fp32), y rounded to bf16 at the
    end."""
    T, H = x.shape
    E = w_up.shape[0]
    q = check_expert_scales(w_up, up_scale, w_down_t, down_scale)
    t0, t1 = int(cu_seqlens[0]), int(cu_seqlens[-1])
    t0, t1 = max(0, t0), min(T, max(t1, t0))
    act = scores[t0:t1] > 0
    pairs = int(act.sum())
    from ..dispatch import cpu_native_prefers_dense

    if cpu_native_prefers_dense(pairs, t1 - t0, E):
        y = dense_ffn(x, scores, w_up, w_down_t, up_scale, down_scale)
        if t0 > 0 or t1 < T:
            y[:t0].zero_()
            y[t1:].zero_()
        return y
    y = torch.zeros((T, H), dtype=torch.float32)
    cdt = gemm_dtype(x.dtype)
    counts = act.sum(0).tolist()
    order = torch.argsort(act.t().to(torch.int8), dim=1, descending=True, stable=True)  # tokens of e first
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[e, :n] + t0
        xe = x.index_select(0, idx).to(cdt)
        wu, wd = (w[0] for w in float_experts(w_up[e : e + 1], up_scale[e : e + 1] if q else None,
                                               w_down_t[e : e + 1], down_scale[e : e + 1] if q else None, cdt))
        h = F.silu(torch.mm(xe, wu.t()).float())
        h.mul_(scores.index_select(0, idx)[:, e : e + 1])
        y.index_add_(0, idx, torch.mm(h.to(cdt), wd).float())
    return y.to(x.dtype)


def sparse_ffn_cpu_torch(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    allow_dense: bool = True,
) -> torch.Tensor:
    """y [T, H] with PyTorch ops: each segment runs only the union of its tokens' active experts.

    With ``allow_dense``, when the unions together cover too much of the experts to win
    (:func:`~..dispatch.cpu_prefers_dense`), the call runs one union over the whole batch,
    or :func:`dense_ffn` when even that union is too dense. Tokens past cu[-1] get 0.
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    cu = [int(c) for c in cu_seqlens.tolist()]
    if T == 0:
        return x.new_empty((0, H))
    scores = active_scores(scores)  # NaN / negative scores: inactive (naive.py)
    unions = segment_unions_cpu(scores, cu)
    if allow_dense and cpu_prefers_dense([len(u) for u in unions], [cu[s + 1] - cu[s] for s in range(len(unions))], E):
        # Per-segment unions together read too much (many requests in a decode batch): one
        # union over the whole batch reads each active expert once, which still wins while
        # that union is small; otherwise all experts, densely.
        batch_union = segment_unions_cpu(scores, [0, T])
        if len(cu) == 2 or cpu_prefers_dense([len(batch_union[0])], [T], E):
            return dense_ffn(x, scores, w_up, w_down_t)
        unions, cu = batch_union, [0, T]
    if x.stride(-1) != 1:
        x = x.contiguous()
    w_up_2d = w_up.reshape(E * D, H)
    w_down_2d = w_down_t.reshape(E * D, H)
    y = torch.empty((T, H), dtype=x.dtype)
    if cu[-1] < T:  # padding tokens past the last segment
        y[max(cu[-1], 0) :].zero_()
    for s, ids in enumerate(unions):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        if not ids:
            y[a:b].zero_()
            continue
        out = y[a:b]  # contiguous rows: a valid out= target
        _segment_sparse(x[a:b], scores[a:b], w_up_2d, w_down_2d, ids, D, out)
    return y
