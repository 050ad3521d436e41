"""The plain-PyTorch parts of the kernels: references, layouts, the CPU sparse path,
the dispatch rule and the torch custom ops (incl. torch.compile). No Triton involved."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import vllm_blockffn.kernels as K
from vllm_blockffn.kernels import (
    THRESHOLDS,
    cpu_prefers_dense,
    cuda_prefers_dense,
    dense_ffn_torch,
    experts_naive,
    experts_reference,
    from_internal_layout,
    router_naive,
    segment_union_naive,
    sparse_ffn_cpu,
    sparse_ffn_naive,
    to_internal_layout,
)
from vllm_blockffn.kernels.dispatch import cpu_native_prefers_dense
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.cpu import _runs, dense_ffn_plain, segment_unions_cpu, sparse_ffn_cpu_torch
from vllm_blockffn.kernels.sparse_ffn.cpu_native import native_available, sparse_ffn_native
from vllm_blockffn.kernels.testing import (
    DTYPES,
    TOLERANCES,
    cu_seqlens_of,
    make_scores,
    make_weights,
    poison_inactive,
    rel_err,
)


def _case(lengths, E, D, H, frac, dtype, seed=0, zero_token_prob=0.15):
    dt = DTYPES[dtype]
    scores, unions = make_scores(lengths, E, frac, seed=seed, zero_token_prob=zero_token_prob)
    w_up, w_down_t = make_weights(E, D, H, dt, seed=seed + 1)
    x = torch.randn(sum(lengths), H, generator=torch.Generator().manual_seed(seed + 2)).to(dt)
    ref = experts_reference(x.float(), scores, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    return x, scores, w_up, w_down_t, cu_seqlens_of(lengths), unions, ref


# ---------------------------------------------------------------- references and layouts
@pytest.mark.parametrize("layout", ["block", "block_linear"])
def test_layout_round_trip_and_references_agree(layout):
    E, D, H = 5, 8, 24
    w_up, w_down_t = make_weights(E, D, H)
    up, down = from_internal_layout(w_up, w_down_t, layout)
    if layout == "block":
        assert up.shape == (E, D, H) and down.shape == (E, H, D)
    else:
        assert up.shape == (E * D, H) and down.shape == (H, E * D)
    w_up2, w_down2 = to_internal_layout(up, down, layout, num_experts=E)
    assert torch.equal(w_up2, w_up) and torch.equal(w_down2, w_down_t)
    assert w_up2.is_contiguous() and w_down2.is_contiguous()
    scores, _ = make_scores([3, 2], E, 0.6, seed=1)
    x = torch.randn(5, H)
    ref = experts_reference(x, scores, up, down, layout)
    torch.testing.assert_close(experts_naive(x, scores, w_up, w_down_t), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_ffn_naive(x, scores, w_up, w_down_t, cu_seqlens_of([3, 2])), ref)


def test_layout_errors():
    with pytest.raises(ValueError, match="num_experts"):
        to_internal_layout(torch.zeros(16, 4), torch.zeros(4, 16), "block_linear")
    with pytest.raises(ValueError, match="does not match"):
        to_internal_layout(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), "block")
    with pytest.raises(ValueError, match="split"):
        to_internal_layout(torch.zeros(15, 4), torch.zeros(4, 15), "block_linear", num_experts=4)
    with pytest.raises(ValueError, match="unknown"):
        to_internal_layout(torch.zeros(2, 3, 4), torch.zeros(2, 4, 3), "fastmoe")


@pytest.mark.parametrize("mode", ["rms", "sum", "none"])
def test_router_naive_follows_the_formulas(mode):
    x, w_r, nw = torch.randn(6, 32), torch.randn(10, 32), torch.rand(10)
    r, mask = router_naive(x, w_r, nw, mode, norm_scale=2.0, eps=1e-6)
    z = x @ w_r.t()
    a = z.clamp_min(0)
    if mode == "rms":
        want = a / torch.sqrt((a * a).mean(-1, keepdim=True) + 1e-6) * nw
    elif mode == "sum":
        want = a / (a.sum(-1, keepdim=True) * 2.0 + 1e-5)
    else:
        want = a
    torch.testing.assert_close(r, want)
    assert torch.equal(mask, z > 0)
    assert r.dtype == torch.float32


# ---------------------------------------------------------------- CPU sparse path
CPU_CASES = [
    ([1], 56, 32, 64, 0.2, "fp32"),
    ([1], 56, 32, 64, 0.2, "bf16"),
    ([1], 256, 16, 32, 0.05, "fp16"),
    ([8], 56, 32, 96, 0.3, "bf16"),
    ([0, 3, 0, 5, 1, 17], 12, 16, 48, 0.3, "fp32"),
    ([9], 10, 24, 40, 1.0, "fp16"),
    ([8, 8], 16, 16, 64, 0.0, "fp32"),
    ([64], 8, 16, 32, 0.5, "bf16"),
    ([300, 3, 1], 24, 16, 32, [0.7, 0.4, 0.1], "fp32"),
]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("allow_dense", [False, True])
@pytest.mark.parametrize("lengths,E,D,H,frac,dtype", CPU_CASES)
def test_sparse_ffn_cpu_matches_reference(lengths, E, D, H, frac, dtype, allow_dense, native):
    x, scores, w_up, w_down_t, cu, _, ref = _case(lengths, E, D, H, frac, dtype)
    y = sparse_ffn_cpu(x, scores, w_up, w_down_t, cu, allow_dense=allow_dense, native=native)
    assert y.dtype == x.dtype and y.shape == x.shape[:1] + (H,)
    assert rel_err(y, ref) < TOLERANCES[x.dtype]
    zero_tokens = (scores == 0).all(dim=1)
    assert (y[zero_tokens] == 0).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dense_ffn_matches_reference(dtype):
    x, scores, w_up, w_down_t, cu, _, ref = _case([4, 3], 12, 16, 48, [0.4, 0.7], dtype)
    assert rel_err(dense_ffn_torch(x, scores, w_up, w_down_t), ref) < TOLERANCES[x.dtype]
    assert rel_err(dense_ffn_plain(x, scores, w_up, w_down_t), ref) < TOLERANCES[x.dtype]


@pytest.mark.parametrize("native", [True, False])
def test_sparse_ffn_cpu_never_reads_inactive_experts(native):
    x, scores, w_up, w_down_t, cu, unions, ref = _case([1, 4, 0, 3], 24, 16, 32, [0.25, 0.3, 0.0, 0.2], "fp32")
    active = sorted({e for u in unions for e in u})
    w_up_p, w_down_p = poison_inactive(w_up, w_down_t, active)
    y = sparse_ffn_cpu(x, scores, w_up_p, w_down_p, cu, allow_dense=False, native=native)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


# ---------------------------------------------------------------- native expert-major kernel
needs_native = pytest.mark.skipif(not native_available(), reason="no C compiler: native kernel not built")


def _random_lengths(rng: random.Random) -> list[int]:
    kind = rng.choice(["decode", "verify", "mixed", "prefill"])
    S = rng.randint(1, 8)
    if kind == "decode":
        return [1] * S
    if kind == "verify":
        return [rng.choice([0, 2, 4, 5]) for _ in range(S)]
    if kind == "mixed":
        return [rng.choice([0, 1, 1, 4, 9, 33]) for _ in range(S)]
    return [rng.randint(20, 150)]


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(6))
def test_native_matches_reference_on_random_segmentations(seed, dtype):
    """Expert-major over the whole step = the per-segment semantics; padding rows get 0;
    poisoned (NaN) inactive experts are never read; 1 and 2 threads agree."""
    rng = random.Random(seed)
    lengths = _random_lengths(rng)
    E, D, H = rng.choice([(48, 16, 64), (40, 12, 40), (56, 8, 48), (9, 5, 24)])
    fracs = [rng.choice([0.0, 0.15, 0.3]) for _ in lengths]
    x, scores, w_up, w_down_t, cu, unions, ref = _case(lengths, E, D, H, fracs, dtype, seed=seed)
    pad = rng.choice([0, 0, 3])  # vLLM pads the token dimension past cu_seqlens[-1]
    if pad:
        x = torch.cat([x, torch.randn(pad, H).to(x.dtype)])
        scores = torch.cat([scores, torch.rand(pad, E) + 0.1])  # garbage router rows
    active = sorted({e for u in unions for e in u})
    w_up_p, w_down_p = poison_inactive(w_up, w_down_t, active)
    T = ref.shape[0]
    for threads in (1, 2):
        y = sparse_ffn_native(x, scores, w_up_p, w_down_p, cu, num_threads=threads)
        assert y.dtype == x.dtype and y.shape == (T + pad, H)
        assert torch.isfinite(y).all()
        assert rel_err(y[:T], ref) < TOLERANCES[x.dtype]
        assert (y[T:] == 0).all()
        assert (y[:T][(scores[:T] == 0).all(dim=1)] == 0).all()


@needs_native
def test_native_batch_reads_union_once_and_matches_old_path():
    # 8 decode requests, each on 25% of the experts: the step union is large but every
    # token computes only its own pairs; same result as the per-segment PyTorch path.
    x, scores, w_up, w_down_t, cu, _, ref = _case([1] * 8, 48, 16, 64, 0.25, "fp32", zero_token_prob=0.0)
    y_new = sparse_ffn_native(x, scores, w_up, w_down_t, cu)
    y_old = sparse_ffn_cpu_torch(x, scores, w_up, w_down_t, cu, allow_dense=False)
    assert rel_err(y_new, ref) < 1e-5 and rel_err(y_old, ref) < 1e-5


@needs_native
def test_native_strided_inputs_and_fallbacks():
    x, scores, w_up, w_down_t, cu, _, ref = _case([3, 2], 12, 8, 32, 0.4, "fp32")
    wide = torch.zeros(5, 48)
    wide[:, :32] = x
    assert rel_err(sparse_ffn_native(wide[:, :32], scores, w_up, w_down_t, cu), ref) < 1e-5  # row stride 48
    y = sparse_ffn_native(x, scores.double(), w_up, w_down_t, cu.long())  # converted on the way in
    assert rel_err(y, ref) < 1e-5
    assert not cpu_native.native_supports(x.half(), w_up.half(), w_down_t.half())  # fp16 → PyTorch path
    y16 = sparse_ffn_cpu(x.half(), scores, w_up.half(), w_down_t.half(), cu)
    assert rel_err(y16, ref) < TOLERANCES[torch.float16]


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_native_is_deterministic_for_a_thread_count(dtype):
    x, scores, w_up, w_down_t, cu, _, _ = _case([1, 4, 1, 2], 24, 16, 64, 0.4, dtype)
    for threads in (1, 2):
        runs = [sparse_ffn_native(x, scores, w_up, w_down_t, cu, num_threads=threads) for _ in range(3)]
        assert all(torch.equal(r, runs[0]) for r in runs)


def test_native_build_without_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_native.shutil, "which", lambda name: None)
    assert cpu_native._build() is None
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setattr(cpu_native, "_tried", True)
    assert not cpu_native.native_available()
    x, scores, w_up, w_down_t, cu, _, ref = _case([1, 4], 12, 8, 32, 0.3, "fp32")
    assert rel_err(sparse_ffn_cpu(x, scores, w_up, w_down_t, cu), ref) < 1e-5  # the PyTorch path


@needs_native
def test_native_dense_rule_matches_python_mirror():
    E, D, H = 8, 4, 16
    w_up, w_down_t = make_weights(E, D, H)
    n = THRESHOLDS.cpu_min_dense_tokens
    for T, frac in [(n, 1.0), (n, 0.5), (n - 1, 1.0), (1, 1.0)]:
        x = torch.randn(T, H)
        scores = (torch.rand(T, E) < frac).float() * (torch.rand(T, E) + 0.1)
        pairs = int((scores != 0).sum())
        want_dense = cpu_native_prefers_dense(pairs, T, E)
        y = sparse_ffn_native(x, scores, w_up, w_down_t, cu_seqlens_of([T]), allow_dense=True)
        assert (y is None) == want_dense, (T, frac, pairs)
        ref = dense_ffn_torch(x, scores, w_up, w_down_t)
        assert rel_err(sparse_ffn_cpu(x, scores, w_up, w_down_t, cu_seqlens_of([T])), ref) < 1e-5
    assert cpu_native_prefers_dense(n * E, n, E) and not cpu_native_prefers_dense(n * E // 2, n, E)
    assert not cpu_native_prefers_dense(E, 1, E)  # one token on every expert: still sparse


def test_crowded_decode_batch_runs_one_batch_union():
    # 8 one-token segments on the same 3 of 12 experts: per-segment unions add up to 24 > 0.8·E,
    # so "auto" falls back — to the batch union (3 experts), not to dense: the poisoned
    # inactive experts are never read.
    E, D, H = 12, 16, 32
    w_up, w_down_t = make_weights(E, D, H)
    x = torch.randn(8, H)
    scores = torch.zeros(8, E)
    scores[:, [2, 3, 7]] = torch.rand(8, 3) + 0.1
    ref = dense_ffn_torch(x, scores, w_up, w_down_t)
    w_up_p, w_down_p = poison_inactive(w_up, w_down_t, [2, 3, 7])
    y = sparse_ffn_cpu(x, scores, w_up_p, w_down_p, cu_seqlens_of([1] * 8), allow_dense=True)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


def test_empty_inputs():
    w_up, w_down_t = make_weights(4, 8, 16)
    x = torch.zeros(0, 16)
    y = sparse_ffn_cpu(x, torch.zeros(0, 4), w_up, w_down_t, cu_seqlens_of([0, 0]))
    assert y.shape == (0, 16)
    y = K.sparse_ffn(x, torch.zeros(0, 4), w_up, w_down_t, cu_seqlens_of([0]))
    assert y.shape == (0, 16)


def test_runs_and_unions_helpers():
    assert _runs([]) == []
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    scores = torch.zeros(6, 5)
    scores[0, 1] = scores[1, 3] = scores[5, 0] = scores[5, 4] = 1.0
    assert segment_unions_cpu(scores, [0, 2, 2, 5, 6]) == [[1, 3], [], [], [0, 4]]
    assert segment_unions_cpu(scores, [0, 6]) == [[0, 1, 3, 4]]


def test_segment_union_naive():
    active = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ids, counts = segment_union_naive(active, cu_seqlens_of([2, 0, 1]))
    assert counts.tolist() == [3, 0, 0]
    assert ids.tolist() == [[0, 2, 3, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert ids.dtype == counts.dtype == torch.int32


# ---------------------------------------------------------------- dispatch rule
def test_cuda_dispatch_uses_static_shapes_only():
    assert not cuda_prefers_dense(1, 1, 56, 128, 1792)  # decode
    assert not cuda_prefers_dense(8, 1, 56, 128, 1792)  # one verify chunk
    assert not cuda_prefers_dense(3 * 8, 3, 56, 128, 1792)  # three verify chunks
    assert not cuda_prefers_dense(THRESHOLDS.cuda_max_tokens + 1, 1, 56, 128, 1792)  # prefill: expert-major
    assert not cuda_prefers_dense(32, 32, 56, 128, 1792)  # 32 decode requests: expert-major
    # without vLLM's fused-MoE kernels (expert_major=False): the per-segment-or-dense rule
    assert cuda_prefers_dense(THRESHOLDS.cuda_max_tokens + 1, 1, 56, 128, 1792, expert_major=False)
    assert cuda_prefers_dense(300, 1, 56, 128, 1792, expert_major=False)  # one long segment
    assert cuda_prefers_dense(64, 16, 56, 128, 1792, expert_major=False)  # a batch of 16 requests
    assert cuda_prefers_dense(1, 1, 512, 128, 1792)  # more experts than the kernels take
    assert cuda_prefers_dense(0, 0, 56, 128, 1792)


def test_cpu_dispatch_uses_union_sizes():
    E = 56
    assert not cpu_prefers_dense([11], [1], E)
    assert not cpu_prefers_dense([17], [8], E)
    assert cpu_prefers_dense([50], [8], E)
    assert cpu_prefers_dense([20, 20, 20], [1, 1, 1], E)  # many segments: shared experts reread
    assert cpu_prefers_dense([5], [THRESHOLDS.cpu_max_tokens_per_segment + 1], E)
    assert not cpu_prefers_dense([], [], E)


# ---------------------------------------------------------------- custom ops
def test_ops_match_references_on_cpu():
    lengths, E, D, H = [1, 6, 0, 2], 20, 16, 48
    x, scores, w_up, w_down_t, cu, _, ref = _case(lengths, E, D, H, [0.2, 0.4, 0.0, 0.1], "fp32")
    for impl in ("auto", "torch", "dense"):
        assert rel_err(K.sparse_ffn(x, scores, w_up, w_down_t, cu, impl=impl), ref) < 1e-5
    assert rel_err(K.dense_ffn(x, scores, w_up, w_down_t), ref) < 1e-5
    w_r, nw = torch.randn(E, H), torch.rand(E)
    for mode in ("rms", "sum", "none"):
        s1, m1 = K.router(x, w_r, nw, mode, 1.5, 1e-5)
        s2, m2 = router_naive(x, w_r, nw, mode, 1.5, 1e-5)
        torch.testing.assert_close(s1, s2)
        assert torch.equal(m1, m2)
    ids, counts = K.segment_union(m1, cu)
    ref_ids, ref_counts = segment_union_naive(m1, cu)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)


def test_ops_reject_bad_arguments(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w_up, w_down_t = make_weights(4, 8, 16)
    x, scores, cu = torch.randn(2, 16), torch.rand(2, 4), cu_seqlens_of([2])
    with pytest.raises(ValueError, match="impl"):
        K.sparse_ffn(x, scores, w_up, w_down_t, cu, impl="magic")
    with pytest.raises(RuntimeError, match="triton"):  # CPU tensors without the interpreter
        K.sparse_ffn(x, scores, w_up, w_down_t, cu, impl="triton")
    with pytest.raises(ValueError, match="router norm"):
        K.router(x, torch.randn(4, 16), None, "softmax")


def test_ops_pass_opcheck():
    x, scores, w_up, w_down_t, cu, _, _ = _case([2, 3], 6, 8, 16, 0.5, "fp32")
    w_r = torch.randn(6, 16)
    torch.library.opcheck(torch.ops.blockffn.sparse_ffn.default, (x, scores, w_up, w_down_t, cu, "auto"))
    torch.library.opcheck(torch.ops.blockffn.dense_ffn.default, (x, scores, w_up, w_down_t))
    torch.library.opcheck(torch.ops.blockffn.router.default, (x, w_r, None, "rms", 1.0, 1e-5, "auto"))
    torch.library.opcheck(torch.ops.blockffn.segment_union.default, (scores != 0, cu, "auto"))


def test_torch_compile_fullgraph_smoke():
    E, D, H = 12, 16, 32
    w_up, w_down_t = make_weights(E, D, H)
    w_r, nw = torch.randn(E, H), torch.rand(E) + 0.5

    def layer(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        scores, _ = K.router(x, w_r, nw, "rms", 1.0, 1e-5)
        return x + K.sparse_ffn(x, scores, w_up, w_down_t, cu) * 0.5

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for lengths in ([2, 3], [1], [4, 0, 4]):
        x, cu = torch.randn(sum(lengths), H), cu_seqlens_of(lengths)
        torch.testing.assert_close(compiled(x, cu), layer(x, cu))


def test_package_imports_without_vllm():
    """kernels/ must import without vLLM (the GPU benchmark machine has none): no import statement
    of vLLM (the expert-major path finds vLLM's kernels by module name, optionally, at run time)."""
    import re

    stmt = re.compile(r"^\s*(import vllm(\.|\s|$)|from vllm(\.|\s))", re.M)
    root = os.path.dirname(K.__file__)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    src = f.read()
                assert not stmt.search(src), name


@pytest.mark.skipif(not native_available(), reason="native kernel unavailable")
def test_native_binding_is_made_once_per_weight_and_follows_new_storage():
    """A served model's experts are bound once (kept on the weight); new storage rebinds."""
    g = torch.Generator().manual_seed(5)
    E, D, H = 6, 8, 32
    w_up = torch.nn.Parameter(torch.randn(E, D, H, generator=g), requires_grad=False)
    w_down_t = torch.randn(E, D, H, generator=g)
    x, cu = torch.randn(3, H, generator=g), cu_seqlens_of([1, 2])
    scores = torch.relu(torch.randn(3, E, generator=g))
    first = cpu_native.bound_experts(w_up, w_down_t)
    assert cpu_native.bound_experts(w_up, w_down_t) is first
    torch.testing.assert_close(sparse_ffn_native(x, scores, w_up, w_down_t, cu),
                               sparse_ffn_naive(x, scores, w_up, w_down_t, cu), rtol=1e-5, atol=1e-5)
    w_up.data = torch.randn(E, D, H, generator=g)  # new storage: the old pointers must not be used
    assert cpu_native.bound_experts(w_up, w_down_t) is not first
    torch.testing.assert_close(sparse_ffn_native(x, scores, w_up, w_down_t, cu),
                               sparse_ffn_naive(x, scores, w_up, w_down_t, cu), rtol=1e-5, atol=1e-5)
    other_down = torch.randn(E, D, H, generator=g)
    assert cpu_native.bound_experts(w_up, other_down).tensors[1] is other_down


@pytest.mark.skipif(not native_available(), reason="native kernel unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_fused_into_the_expert_kernel_equals_router_then_experts(dtype):
    """blockffn_router_sparse_ffn: z = x W_rᵀ (in x's dtype), ReLU + RMS norm, experts -- against the
    model's own router math (BlockFFN.router_scores) and the naive experts. A NaN x row has NaN
    router logits, so no active expert (as in the separate router): its output is exactly 0."""
    from vllm_blockffn.serving.layers.blockffn import router_scores

    g = torch.Generator().manual_seed(7)
    E, D, H, T = 12, 8, 64, 5
    x = torch.randn(T, H, generator=g).to(dtype)
    x[3] = float("nan")
    w_r = (torch.randn(E, H, generator=g) * 0.3).to(dtype)
    norm_w = (torch.rand(E, generator=g) + 0.5).to(dtype)
    w_up, w_down_t = (torch.randn(E, D, H, generator=g).to(dtype) for _ in range(2))
    cu = cu_seqlens_of([1, 2, 2])
    stats = np.zeros(5, dtype=np.int64)
    y = cpu_native.bound_experts(w_up, w_down_t).with_router(x, w_r, norm_w, 1e-5, cu, stats)
    scores = router_scores(torch.nn.functional.linear(x, w_r), "rms", 1e-5, 1.0, norm_w)
    ref = sparse_ffn_naive(x.float(), scores, w_up.float(), w_down_t.float(), cu)
    assert rel_err(y, ref) < TOLERANCES[dtype]
    # the same kernel on the separately computed scores: only the router's rounding differs
    separate = sparse_ffn_native(x, scores, w_up, w_down_t, cu)
    assert rel_err(y, separate) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(y[3], torch.zeros_like(y[3]))
    assert stats[0] == T and stats[1] == int((scores[torch.arange(T) != 3] > 0).sum())  # tokens, active pairs
    with pytest.raises(ValueError, match=r"router: w_router"):
        cpu_native.bound_experts(w_up, w_down_t).with_router(x, w_r[:, :8], norm_w, 1e-5, cu)
