"""The Triton kernels on a real GPU: correctness, no host sync, CUDA-graph capture.

Skipped where ``torch.cuda.is_available()`` is False. On the GPU machine (torch + triton, no
vLLM, package not installed), from the repository root:
``python -m pytest --noconftest -m gpu tests/test_kernels_gpu.py tests/test_kernels_compile.py``
(``--noconftest``: the suite's conftest.py needs the installed package).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

try:
    import vllm_blockffn.kernels as K
except ImportError:  # a bare checkout (the GPU machine): import the folder itself
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels as K

_testing = importlib.import_module(K.__name__ + ".testing")
TOLERANCES, cu_seqlens_of, make_scores = _testing.TOLERANCES, _testing.cu_seqlens_of, _testing.make_scores
make_weights, poison_inactive, rel_err = _testing.make_weights, _testing.poison_inactive, _testing.rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEV = "cuda"


def _case(lengths, E, D, H, frac, dtype, seed=0):
    dt = DTYPES[dtype]
    scores, unions = make_scores(lengths, E, frac, seed=seed, zero_token_prob=0.1)
    w_up, w_down_t = make_weights(E, D, H, dt, seed=seed + 1, device=DEV)
    x = torch.randn(sum(lengths), H, generator=torch.Generator().manual_seed(seed + 2)).to(device=DEV, dtype=dt)
    scores = scores.to(DEV)
    ref = K.experts_reference(x.float(), scores, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    return x, scores, w_up, w_down_t, cu_seqlens_of(lengths, DEV), unions, ref


GPU_CASES = [
    ([1], 56, 128, 1792, 0.2, "bf16"),
    ([8], 56, 128, 1792, 0.3, "bf16"),
    ([1, 1, 1, 1], 128, 128, 4096, 0.2, "bf16"),
    ([0, 3, 0, 5, 1, 17], 56, 96, 1000, 0.3, "fp16"),
    ([64], 256, 64, 512, 0.1, "bf16"),
    ([300, 7], 40, 128, 1024, [0.8, 0.3], "bf16"),
    ([5], 24, 16, 256, 1.0, "fp32"),
    ([4, 4], 32, 64, 256, 0.0, "bf16"),
]


@pytest.mark.parametrize("lengths,E,D,H,frac,dtype", GPU_CASES)
def test_sparse_ffn_triton_on_gpu(lengths, E, D, H, frac, dtype):
    x, scores, w_up, w_down_t, cu, unions, ref = _case(lengths, E, D, H, frac, dtype)
    y = K.sparse_ffn_triton(x, scores, w_up, w_down_t, cu)
    assert rel_err(y, ref) < TOLERANCES[x.dtype]
    zero_tokens = (scores == 0).all(dim=1)
    assert (y[zero_tokens] == 0).all()
    active = sorted({e for u in unions for e in u})
    w_up_p, w_down_p = poison_inactive(w_up, w_down_t, active)
    y_p = K.sparse_ffn_triton(x, scores, w_up_p, w_down_p, cu)
    assert torch.isfinite(y_p).all() and rel_err(y_p, ref) < TOLERANCES[x.dtype]
    assert rel_err(K.dense_ffn(x, scores, w_up, w_down_t), ref) < TOLERANCES[x.dtype]


@pytest.mark.parametrize("mode", ["rms", "sum", "none"])
@pytest.mark.parametrize("T,E,H", [(1, 56, 1792), (64, 128, 4096), (300, 256, 1024)])
def test_router_triton_on_gpu(mode, T, E, H):
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    w_r = (torch.randn(E, H, device=DEV) / H**0.5).to(torch.bfloat16)
    nw = torch.rand(E, device=DEV) + 0.5
    ref, ref_mask = K.router_naive(x, w_r, nw, mode)
    out, mask = K.router_triton(x, w_r, nw, mode)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    z = x.float() @ w_r.float().t()
    assert not ((mask != ref_mask) & (z.abs() > 1e-3)).any()


def test_segment_union_on_gpu():
    lengths = [0, 1, 7, 64, 200, 3]
    cu = cu_seqlens_of(lengths, DEV)
    active = torch.rand(sum(lengths), 56, device=DEV) < 0.05
    ids, counts, _, _ = K.segment_union_triton(active, cu)
    ref_ids, ref_counts = K.segment_union_naive(active.cpu(), cu.cpu())
    assert torch.equal(ids.cpu(), ref_ids) and torch.equal(counts.cpu(), ref_counts)


def test_ops_do_not_sync_the_host():
    x, scores, w_up, w_down_t, cu, _, ref = _case([1, 8], 56, 128, 1792, 0.3, "bf16")
    w_r = torch.randn(56, 1792, device=DEV, dtype=torch.bfloat16)
    K.router(x, w_r, None, "sum")  # compile outside the check
    K.sparse_ffn(x, scores, w_up, w_down_t, cu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s, m = K.router(x, w_r, None, "sum")
        y = K.sparse_ffn(x, scores, w_up, w_down_t, cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(y, ref) < TOLERANCES[torch.bfloat16]


def test_cuda_graph_replays_with_new_routing():
    lengths, E, D, H = [1, 8], 56, 128, 1792
    x, scores, w_up, w_down_t, cu, _, _ = _case(lengths, E, D, H, 0.3, "bf16")
    static_x, static_s = x.clone(), scores.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.sparse_ffn(static_x, static_s, w_up, w_down_t, cu)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = K.sparse_ffn(static_x, static_s, w_up, w_down_t, cu)
    for seed, frac in [(1, 0.1), (2, 0.5), (3, 0.0), (4, 1.0)]:
        new_scores, _ = make_scores(lengths, E, frac, seed=seed)
        new_x = torch.randn(sum(lengths), H, device=DEV, dtype=torch.bfloat16)
        static_s.copy_(new_scores)
        static_x.copy_(new_x)
        graph.replay()
        ref = K.experts_reference(new_x.float(), static_s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
        assert rel_err(static_y, ref) < TOLERANCES[torch.bfloat16]


def test_dispatch_on_gpu_picks_dense_for_prefill():
    T = K.THRESHOLDS.cuda_max_tokens + 16
    x, scores, w_up, w_down_t, cu, _, ref = _case([T], 16, 64, 256, 0.5, "bf16")
    assert K.cuda_prefers_dense(T, 1, 16, 64, 256)
    assert rel_err(K.sparse_ffn(x, scores, w_up, w_down_t, cu), ref) < TOLERANCES[torch.bfloat16]


def test_torch_compile_on_gpu():
    x, scores, w_up, w_down_t, cu, _, ref = _case([1, 4], 56, 128, 1792, 0.3, "bf16")
    w_r = torch.randn(56, 1792, device=DEV, dtype=torch.bfloat16)

    def f(x, cu):
        s, _ = K.router(x, w_r, None, "sum")
        return K.sparse_ffn(x, s, w_up, w_down_t, cu)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, cu), f(x, cu))
