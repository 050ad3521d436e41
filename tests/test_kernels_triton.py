"""Triton kernels vs the plain-PyTorch references, run in the Triton CPU interpreter.

TRITON_INTERPRET=1 is set by a module-scoped fixture and removed afterwards. Our kernels
are decorated with ``triton.jit`` at launch time (kernels/_triton.py), so the switch is
local to this module: nothing leaks into tests that start vLLM, whatever the order.
Sizes are small: the interpreter runs every program of a grid in Python.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vllm_blockffn.kernels import (  # noqa: E402
    experts_reference,
    from_internal_layout,
    router_naive,
    router_triton,
    segment_union_naive,
    segment_union_triton,
    sparse_ffn,
    sparse_ffn_naive,
    sparse_ffn_triton,
    to_internal_layout,
)
from vllm_blockffn.kernels.segments.naive import token_blocks_naive  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn.naive import sparse_down_naive, sparse_up_naive  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn.triton_sparse_ffn import (  # noqa: E402
    SparseFFNConfig,
    default_config,
    sparse_down_triton,
    sparse_up_triton,
)
from vllm_blockffn.kernels.testing import (  # noqa: E402
    DTYPES,
    TOLERANCES,
    cu_seqlens_of,
    make_scores,
    make_weights,
    poison_inactive,
    rel_err,
)

pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest: Triton's CPU interpreter


# ---------------------------------------------------------------- router
@pytest.mark.parametrize("mode", ["rms", "sum", "none"])
@pytest.mark.parametrize(
    "T,E,H,dtype",
    [(1, 56, 96, "fp32"), (37, 13, 200, "bf16"), (5, 256, 64, "fp16"), (17, 24, 1000, "bf16"), (0, 8, 32, "fp32")],
)
def test_router_matches_naive(mode, T, E, H, dtype):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(T * 1000 + E)
    x = torch.randn(T, H, generator=g).to(dt)
    w_r = (torch.randn(E, H, generator=g) / H**0.5).to(dt)
    norm_w = torch.rand(E, generator=g) + 0.5
    ref, ref_mask = router_naive(x, w_r, norm_w, mode, 0.7, 1e-5)
    out, mask = router_triton(x, w_r, norm_w, mode, 0.7, 1e-5)
    assert out.dtype == torch.float32 and out.shape == (T, E)
    assert mask.dtype == torch.bool and mask.shape == (T, E)
    if T:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        z = x.float() @ w_r.float().t()
        # Masks agree except (possibly) on logits within rounding of zero.
        assert not ((mask != ref_mask) & (z.abs() > 1e-4)).any()
        assert ((out != 0) <= mask).all()


def test_router_all_inactive_and_no_norm_weight():
    x = torch.randn(3, 64)
    w_r = -x[:1] * torch.rand(8, 1)  # z = -c·|x_0|² < 0 for token 0: no active expert
    scores, mask = router_triton(x[:1], w_r, None, "rms")
    assert not mask.any() and (scores == 0).all()
    for mode in ("rms", "sum"):
        ref, ref_mask = router_naive(x, w_r, None, mode)
        out, mask = router_triton(x, w_r, None, mode)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(mask, ref_mask)


# ---------------------------------------------------------------- segments
@pytest.mark.parametrize(
    "lengths,E,p",
    [([1], 56, 0.3), ([0, 3, 0, 5, 1, 40], 56, 0.1), ([7], 256, 0.0), ([2, 2, 2], 13, 1.0), ([0], 8, 0.5),
     ([130, 1, 17], 200, 0.02), ([1] * 40, 24, 0.2), ([5, 0, 0], 6, 0.5)],
)  # fmt: skip
@pytest.mark.parametrize("block_t", [16, 64])
def test_segment_union_matches_naive(lengths, E, p, block_t):
    T = sum(lengths)
    cu = cu_seqlens_of(lengths)
    g = torch.Generator().manual_seed(T + E)
    active = torch.rand(T, E, generator=g) < p
    ref_ids, ref_counts = segment_union_naive(active, cu)
    for src in (active, active.to(torch.uint8), active.float() * (torch.rand(T, E, generator=g) + 0.1)):
        ids, counts, block_seg, block_t0 = segment_union_triton(src, cu, block_t)
        assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)
        ref_seg, ref_t0 = token_blocks_naive(cu, block_t, block_seg.numel())
        assert torch.equal(block_seg, ref_seg)
        real = ref_seg >= 0
        assert torch.equal(block_t0[real], ref_t0[real])
        # Every row is a permutation of the experts: padding slots are valid ids.
        assert torch.equal(ids.sort(dim=1).values, torch.arange(E, dtype=torch.int32).expand(len(lengths), E))


def test_segment_union_no_segments():
    ids, counts, block_seg, _ = segment_union_triton(torch.zeros(0, 8, dtype=torch.bool), cu_seqlens_of([]))
    assert ids.shape == (0, 8) and counts.shape == (0,) and (block_seg == -1).all()
    ids, counts, block_seg, _ = segment_union_triton(torch.zeros(0, 8, dtype=torch.bool), cu_seqlens_of([0, 0]))
    assert counts.tolist() == [0, 0] and (block_seg == -1).all()


# ---------------------------------------------------------------- sparse FFN
FFN_CASES = [
    # lengths, E, D, H, union fraction, dtype
    ([1], 56, 32, 64, 0.2, "fp32"),  # decode, E not a power of two
    ([1], 256, 16, 32, 0.05, "bf16"),  # the largest E
    ([0, 3, 0, 5, 1, 17], 12, 16, 48, 0.3, "bf16"),  # empty, 1-token and odd segments
    ([9], 10, 24, 40, 1.0, "fp16"),  # 100% active, D and H not powers of two
    ([8, 8], 16, 16, 64, 0.0, "fp32"),  # all-zero router
    ([64], 8, 16, 32, 0.5, "fp16"),  # verify chunk of 64 tokens
    ([100, 3], 6, 16, 32, [0.7, 0.4], "bf16"),  # prefill-length segment + a short one
]


@pytest.mark.parametrize("lengths,E,D,H,frac,dtype", FFN_CASES)
def test_sparse_ffn_matches_reference(lengths, E, D, H, frac, dtype):
    dt = DTYPES[dtype]
    cu = cu_seqlens_of(lengths)
    scores, unions = make_scores(lengths, E, frac, seed=E + D, zero_token_prob=0.15)
    w_up, w_down_t = make_weights(E, D, H, dt, seed=H)
    x = torch.randn(sum(lengths), H, generator=torch.Generator().manual_seed(1)).to(dt)
    ref = experts_reference(x.float(), scores, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    y = sparse_ffn_triton(x, scores, w_up, w_down_t, cu)
    assert y.dtype == dt and y.shape == (sum(lengths), H)
    assert rel_err(y, ref) < TOLERANCES[dt]
    # Tokens with no active expert get exactly 0.
    zero_tokens = (scores == 0).all(dim=1)
    assert (y[zero_tokens] == 0).all()
    # The segment-union reference agrees too.
    assert rel_err(sparse_ffn_naive(x, scores, w_up, w_down_t, cu), ref) < TOLERANCES[dt]


def test_sparse_ffn_never_reads_inactive_experts():
    lengths, E, D, H = [1, 4, 0, 3], 24, 16, 32
    scores, unions = make_scores(lengths, E, [0.25, 0.3, 0.0, 0.2], seed=3)
    w_up, w_down_t = make_weights(E, D, H, torch.float32)
    x = torch.randn(sum(lengths), H)
    ref = experts_reference(x, scores, w_up, w_down_t.transpose(1, 2), "block")
    active = sorted({e for u in unions for e in u})
    w_up_p, w_down_p = poison_inactive(w_up, w_down_t, active)
    y = sparse_ffn_triton(x, scores, w_up_p, w_down_p, cu_seqlens_of(lengths))
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        SparseFFNConfig(block_t=16, up_block_d=16, up_block_h=32, down_block_d=16, down_block_n=16, split_k=1),
        SparseFFNConfig(block_t=32, up_block_d=32, up_block_h=64, down_block_d=32, down_block_n=32, split_k=3),
        SparseFFNConfig(block_t=64, up_block_d=64, up_block_h=16, down_block_d=64, down_block_n=64, split_k=2),
    ],
)
def test_sparse_ffn_tile_configs(config):
    lengths, E, D, H = [5, 40, 1], 9, 48, 80
    scores, _ = make_scores(lengths, E, [0.4, 0.6, 0.3], seed=5, zero_token_prob=0.1)
    w_up, w_down_t = make_weights(E, D, H, torch.float32)
    x = torch.randn(sum(lengths), H)
    ref = experts_reference(x, scores, w_up, w_down_t.transpose(1, 2), "block")
    y = sparse_ffn_triton(x, scores, w_up, w_down_t, cu_seqlens_of(lengths), config=config)
    assert rel_err(y, ref) < 1e-5


def test_sparse_up_and_down_kernels_separately():
    lengths, E, D, H = [3, 0, 6], 10, 16, 48
    cu = cu_seqlens_of(lengths)
    scores, _ = make_scores(lengths, E, [0.3, 0.0, 0.5], seed=7)
    w_up, w_down_t = make_weights(E, D, H, torch.float32)
    x = torch.randn(sum(lengths), H)
    cfg = default_config(sum(lengths), len(lengths), E, D, H)
    ids, counts, block_seg, block_t0 = segment_union_triton(scores, cu, cfg.block_t)
    h = sparse_up_triton(x, scores, w_up, ids, counts, block_seg, block_t0, cu, cfg)
    h_ref = sparse_up_naive(x, scores, w_up, ids, counts, cu)
    slot = torch.arange(E)
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        live = slot < counts[s]
        torch.testing.assert_close(h[a:b, live], h_ref[a:b, live], rtol=1e-5, atol=1e-6)
        # Slots past the count are garbage: the down kernel must not read them.
        h[a:b, ~live] = float("nan")
    y = sparse_down_triton(h, w_down_t, ids, counts, block_seg, block_t0, cu, cfg)
    y_ref = sparse_down_naive(h_ref, w_down_t, ids, counts, cu)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["block", "block_linear"])
def test_both_checkpoint_layouts(layout):
    lengths, E, D, H = [1, 6], 7, 16, 40
    scores, _ = make_scores(lengths, E, [0.3, 0.6], seed=11)
    w_up, w_down_t = make_weights(E, D, H, torch.bfloat16, seed=2)
    up, down = from_internal_layout(w_up, w_down_t, layout)
    x = torch.randn(sum(lengths), H).to(torch.bfloat16)
    ref = experts_reference(x.float(), scores, up.float(), down.float(), layout)
    w_up2, w_down2 = to_internal_layout(up, down, layout, num_experts=E)
    y = sparse_ffn_triton(x, scores, w_up2, w_down2, cu_seqlens_of(lengths))
    assert rel_err(y, ref) < TOLERANCES[torch.bfloat16]


def test_custom_op_routes_cpu_tensors_to_triton_when_asked():
    lengths, E, D, H = [2, 1], 12, 16, 32
    scores, _ = make_scores(lengths, E, 0.3, seed=4)
    w_up, w_down_t = make_weights(E, D, H)
    x = torch.randn(3, H)
    cu = cu_seqlens_of(lengths)
    ref = experts_reference(x, scores, w_up, w_down_t.transpose(1, 2), "block")
    assert rel_err(sparse_ffn(x, scores, w_up, w_down_t, cu, impl="triton"), ref) < 1e-5
    w_r = torch.randn(E, H)
    s1, m1 = torch.ops.blockffn.router(x, w_r, None, "sum", 1.0, 1e-5, "triton")
    s2, m2 = router_naive(x, w_r, None, "sum")
    torch.testing.assert_close(s1, s2)
    ids, counts = torch.ops.blockffn.segment_union(m1, cu, "triton")
    ref_ids, ref_counts = segment_union_naive(m2, cu)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)


def test_interpreted_launches_leave_triton_language_untouched():
    import triton.language as tl

    objs = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype]
    before = [dict(vars(o)) for o in objs]
    router_triton(torch.randn(2, 32), torch.randn(8, 32), None, "sum")
    segment_union_triton(torch.rand(3, 8) < 0.5, cu_seqlens_of([1, 2]))
    for obj, attrs in zip(objs, before, strict=True):
        now = vars(obj)
        assert all(now.get(name) is value for name, value in attrs.items()), obj


# ---------------------------------------------------------------- expert-major (vLLM's fused-MoE kernel)
from vllm_blockffn.kernels.sparse_ffn import triton_expert_major as em  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn.naive import expert_major_naive, moe_align_block_size_naive  # noqa: E402

needs_vllm = pytest.mark.skipif(not em.vllm_kernels_available(), reason="vLLM's fused-MoE kernel sources not installed")

EM_CASES = [
    # lengths (segments: only for make_scores' unions; the path ignores them), E, D, H, union fraction, dtype
    ([1], 56, 32, 64, 0.3, "fp32"),  # one decode token
    ([1] * 8, 48, 24, 40, 0.25, "bf16"),  # a decode batch of 8, partial D / H tiles
    ([1] * 32, 16, 16, 48, 0.4, "fp16"),  # a decode batch of 32
    ([4] * 8, 24, 16, 32, 0.3, "bf16"),  # 8 verify chunks of k+1 = 4
    ([37, 1, 1, 6], 12, 32, 64, [0.8, 0.3, 0.2, 0.5], "fp32"),  # mixed prefill + decode
    ([3, 2], 256, 16, 32, 0.05, "fp16"),  # the largest E
    ([6], 10, 16, 32, 0.0, "fp32"),  # no active expert anywhere
]


def _em_inputs(lengths, E, D, H, frac, dtype, seed=0):
    dt = DTYPES[dtype]
    scores, unions = make_scores(lengths, E, frac, seed=E + D + seed, zero_token_prob=0.2)
    w_up, w_down_t = make_weights(E, D, H, dt, seed=H)
    x = torch.randn(sum(lengths), H, generator=torch.Generator().manual_seed(seed)).to(dt)
    return x, scores, w_up, w_down_t, unions


@needs_vllm
@pytest.mark.parametrize("lengths,E,D,H,frac,dtype", EM_CASES)
def test_expert_major_matches_reference(lengths, E, D, H, frac, dtype):
    x, scores, w_up, w_down_t, unions = _em_inputs(lengths, E, D, H, frac, dtype)
    T = x.shape[0]
    # Garbage that must never be read: NaN weights of experts no token uses, NaN / negative
    # scores (inactive), and NaN rows of x for tokens with no active expert (vLLM's padding).
    active = sorted({e for u in unions for e in u})
    w_up, w_down_t = poison_inactive(w_up, w_down_t, active)
    idle = (scores <= 0).all(dim=1)
    x[idle] = float("nan")
    off = [e for e in range(E) if e not in active]
    for e, bad in zip(off, (float("nan"), -1.0)):
        scores[:, e] = bad
    y = em.expert_major_ffn_triton(x, scores, w_up, w_down_t)
    assert y.dtype == x.dtype and y.shape == (T, H)
    assert torch.isfinite(y).all()
    assert (y[idle] == 0).all(), "a token with no active expert must get exactly 0"
    ref = expert_major_naive(x.float(), scores, w_up.float(), w_down_t.float())
    assert rel_err(y[~idle], ref[~idle]) < TOLERANCES[x.dtype]


@needs_vllm
def test_expert_major_chunks_and_tiles():
    """Chunked (3 chunks, the last partial) with other tiles: the same result as one chunk."""
    x, scores, w_up, w_down_t, _ = _em_inputs([10, 1, 9], 20, 24, 40, [0.5, 0.2, 0.4], "fp32", seed=3)
    ref = expert_major_naive(x, scores, w_up, w_down_t)
    for cfg in (
        em.ExpertMajorConfig(16, em.GemmConfig(16, 32, 1, 4, 2), em.GemmConfig(32, 16, 2, 4, 2), 8, 128, 4),
        em.ExpertMajorConfig(32, em.GemmConfig(32, 64, 2, 4, 3), em.GemmConfig(64, 32, 1, 4, 3), 32, 128, 4),
    ):
        y = em.expert_major_ffn_triton(x, scores, w_up, w_down_t, config=cfg)
        assert rel_err(y, ref) < 1e-5, cfg


@pytest.mark.parametrize("T,E,block,frac", [(1, 56, 16, 0.3), (7, 12, 4, 0.5), (40, 8, 16, 0.9), (5, 256, 16, 0.02),
                                            (3, 6, 16, 0.0)])
def test_alignment_matches_reference(T, E, block, frac):
    g = torch.Generator().manual_seed(T * E)
    scores = torch.where(torch.rand(T, E, generator=g) < frac, torch.rand(T, E, generator=g), 0.0)
    ids = em.route(scores, torch.arange(E, dtype=torch.int32))
    got = em.align_block_size(ids, block, E)
    ref = moe_align_block_size_naive(ids, block, E)
    for a, b, name in zip(got, ref, ("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), strict=True):
        assert a.dtype == torch.int32 and torch.equal(a, b), name
    assert got[0].numel() == em.max_num_tokens_padded(T * E, E + 1, block)  # vLLM's static length


@needs_vllm
def test_expert_major_through_the_op_and_the_rule(monkeypatch):
    """impl="triton" takes the expert-major path when the static rule says so. The op's body is
    called directly: torch.ops.blockffn.sparse_ffn is registered by whichever copy of ops.py was
    imported first (`kernels` from the repository root, as the benchmarks import it, or
    `vllm_blockffn.kernels`), so patching one module's globals would depend on test order."""
    from vllm_blockffn.kernels import ops

    x, scores, w_up, w_down_t, _ = _em_inputs([1, 1, 1, 1], 16, 16, 32, 0.3, "fp32")
    calls = []
    real = em.expert_major_ffn_triton
    monkeypatch.setattr(em, "expert_major_ffn_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ops, "_cuda_path", lambda *a, **k: "expert_major")
    y = ops._sparse_ffn_impl(x, scores, w_up, w_down_t, cu_seqlens_of([1, 1, 1, 1]), "triton")
    assert calls and rel_err(y, expert_major_naive(x, scores, w_up, w_down_t)) < 1e-5


@needs_vllm
def test_vllm_kernels_stay_in_vllm():
    """The kernels are vLLM's own functions (same code objects), jitted with real triton globals;
    interpreted launches leave the interpreter's builder as they found it."""
    import importlib

    from triton.runtime.interpreter import InterpreterBuilder

    mod = importlib.import_module(em.VLLM_FUSED_MOE)
    assert em.fused_moe_kernel.fn.__code__ is em._raw(mod.fused_moe_kernel).__code__
    before = dict(vars(InterpreterBuilder))
    x, scores, w_up, w_down_t, _ = _em_inputs([2], 8, 16, 32, 0.5, "bf16")
    em.expert_major_ffn_triton(x, scores, w_up, w_down_t)
    assert dict(vars(InterpreterBuilder)) == before
