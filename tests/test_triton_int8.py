"""int8 weight-only experts in the GPU (Triton) sparse kernels, checked without a GPU.

The format is ``kernels/quant.py``'s: ``w_up`` / ``w_down_t`` int8 [E, D, H] with fp32 scales per
output row of W_up,e (``up_scale`` [E, D]) and of W_down,e (``down_scale`` [E, H]); activations
stay in x's dtype. The reference dequantizes (``dequantize_experts``, fp32) and runs the naive
functions of ``kernels/sparse_ffn/naive.py`` in fp32.

- Under TRITON_INTERPRET=1 (the module's fixture): the per-segment kernels (``sparse_ffn_triton``)
  and the expert-major path (vLLM's ``fused_moe_kernel`` with ``use_int8_w8a16``) equal that
  reference on decode (1 and 8 tokens), a 4-token verify chunk, mixed segments, tokens with no
  active expert and NaN scores. Tolerance (relative Frobenius error, ``testing.rel_err``): fp32 x
  1e-5 (only fp32 rounding order differs: the scale multiplies a sum instead of each weight);
  bf16 x 2.5e-2 and fp16 x 5e-3 (``testing.TOLERANCES``: h and the per-pair outputs are rounded to
  x's dtype between the GEMMs, as for float weights).
- Scales of the wrong shape, dtype or device, a missing scale, scales with float weights:
  ValueError naming the tensor, from both entry points, before any launch.
- ``kernels/dispatch.py``'s CUDA byte model counts int8 weights at 1 byte + their scales.
- Ahead-of-time compilation for sm_80 and sm_90 (Triton's bundled ptxas, no GPU) of every int8
  kernel variant at the tiles the code picks for the official shapes and the XLarge-sized model
  of the CPU benchmarks (E 48, d_e 149): no register spills (``ptxas -v``), shared memory within
  an SM's.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from vllm_blockffn.kernels.quant import dequantize_experts, quantize_experts  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn import triton_expert_major as em  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn.naive import active_scores, expert_major_naive, sparse_ffn_naive  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn.triton_sparse_ffn import sparse_ffn_triton  # noqa: E402
from vllm_blockffn.kernels.testing import (  # noqa: E402
    DTYPES,
    TOLERANCES,
    cu_seqlens_of,
    make_scores,
    make_weights,
    rel_err,
)

pytestmark = [
    pytest.mark.usefixtures("triton_interpreter"),  # conftest: Triton's CPU interpreter
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]
needs_vllm = pytest.mark.skipif(not em.vllm_kernels_available(), reason="vLLM's fused-MoE kernel sources not installed")

CASES = [
    # id, segment lengths, E, D, H, union fraction per segment, x dtype
    ("decode-1", [1], 56, 32, 64, 0.2, "fp32"),
    ("decode-8", [1] * 8, 24, 24, 40, 0.25, "bf16"),  # 8 requests of 1 token; partial D / H tiles
    ("verify-4", [4], 16, 24, 48, 0.4, "bf16"),  # one speculative verify chunk (k + 1 = 4)
    ("mixed", [0, 3, 1, 17, 5], 12, 16, 48, [0.0, 0.3, 0.2, 0.5, 0.4], "fp16"),  # empty, 2 token blocks
    ("mixed-fp32", [2, 1, 9], 10, 20, 36, [0.5, 0.3, 0.6], "fp32"),
    ("none-active", [6], 10, 16, 32, 0.0, "fp32"),  # no active expert anywhere
]


def _inputs(lengths, E, D, H, frac, dtype, seed=0):
    """x, scores (NaN / negative on experts no token uses), int8 experts + scales with NaN scales
    for those experts (a path that touches one returns NaN), dequantized fp32 reference weights,
    the active experts."""
    dt = DTYPES[dtype]
    scores, unions = make_scores(lengths, E, frac, seed=E + D + seed, zero_token_prob=0.2)
    w_up, w_down_t = make_weights(E, D, H, torch.float32, seed=H)
    q_up, s_up, q_down, s_down = quantize_experts(w_up, w_down_t)
    ref_up, ref_down = dequantize_experts(q_up, s_up, q_down, s_down)
    active = sorted({e for u in unions for e in u})
    off = [e for e in range(E) if e not in active]
    s_up[off], s_down[off] = float("nan"), float("nan")
    for e, bad in zip(off, (float("nan"), -1.0, float("-inf")), strict=False):
        scores[:, e] = bad
    x = torch.randn(sum(lengths), H, generator=torch.Generator().manual_seed(seed)).to(dt)
    return x, scores, (q_up, s_up, q_down, s_down), (ref_up, ref_down), active


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_per_segment_int8_matches_dequantized_reference(case):
    _, lengths, E, D, H, frac, dtype = case
    x, scores, (q_up, s_up, q_down, s_down), (ref_up, ref_down), _ = _inputs(lengths, E, D, H, frac, dtype)
    cu = cu_seqlens_of(lengths)
    # The per-segment kernels take scores with every inactive entry 0: the op layer
    # (ops._sparse_ffn_impl) applies active_scores, a device op, before them; so do we.
    scores = active_scores(scores)
    y = sparse_ffn_triton(x, scores, q_up, q_down, cu, s_up, s_down)
    ref = sparse_ffn_naive(x.float(), scores, ref_up, ref_down, cu)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all(), "an inactive expert's (NaN) scale was read"
    idle = (scores <= 0).all(dim=1)
    assert (y[idle] == 0).all(), "a token with no active expert must get exactly 0"
    assert rel_err(y, ref) < (1e-5 if x.dtype == torch.float32 else TOLERANCES[x.dtype])


@needs_vllm
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_expert_major_int8_matches_dequantized_reference(case):
    _, lengths, E, D, H, frac, dtype = case
    x, scores, (q_up, s_up, q_down, s_down), (ref_up, ref_down), _ = _inputs(lengths, E, D, H, frac, dtype, seed=1)
    idle = ~(scores > 0).any(dim=1)
    x[idle] = float("nan")  # vLLM's padding rows: never read by the expert-major path
    y = em.expert_major_ffn_triton(x, scores, q_up, q_down, s_up, s_down)  # raw scores: NaN / < 0 inactive
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert (y[idle] == 0).all(), "a token with no active expert must get exactly 0"
    ref = expert_major_naive(x.float(), scores, ref_up, ref_down)
    assert rel_err(y[~idle], ref[~idle]) < (1e-5 if x.dtype == torch.float32 else TOLERANCES[x.dtype])


@needs_vllm
def test_expert_major_int8_chunks():
    """Three chunks of ≤ 8 tokens (each re-reads its experts' int8 weights and scales): the same
    result as the reference."""
    x, scores, (q_up, s_up, q_down, s_down), (ref_up, ref_down), _ = _inputs(
        [10, 1, 9], 20, 24, 40, [0.5, 0.2, 0.4], "fp32", seed=3
    )
    cfg = em.ExpertMajorConfig(16, em.GemmConfig(16, 32, 1, 4, 2), em.GemmConfig(32, 16, 2, 4, 2), 8, 128, 4)
    y = em.expert_major_ffn_triton(x, scores, q_up, q_down, s_up, s_down, config=cfg)
    assert rel_err(y, expert_major_naive(x, scores, ref_up, ref_down)) < 1e-5


# ---------------------------------------------------------------- bad scales: one clear error, no launch
E_, D_, H_ = 6, 8, 16


def _q():
    w_up, w_down_t = make_weights(E_, D_, H_)
    return quantize_experts(w_up, w_down_t)


BAD = [
    # id, (w_up, up_scale, w_down_t, down_scale) → the bad variant, message fragment
    ("missing-up", lambda qu, su, qd, sd: (qu, None, qd, sd), "up_proj_scale: missing"),
    ("missing-down", lambda qu, su, qd, sd: (qu, su, qd, None), "down_proj_scale: missing"),
    ("up-shape", lambda qu, su, qd, sd: (qu, su[:, :-1], qd, sd), "up_proj_scale: torch.float32 [6, 7]"),
    ("down-shape-is-up", lambda qu, su, qd, sd: (qu, su, qd, su), "down_proj_scale: torch.float32 [6, 8]"),
    ("up-dtype", lambda qu, su, qd, sd: (qu, su.half(), qd, sd), "up_proj_scale: torch.float16"),
    ("down-dtype", lambda qu, su, qd, sd: (qu, su, qd, sd.double()), "down_proj_scale: torch.float64"),
    ("down-not-int8", lambda qu, su, qd, sd: (qu, su, qd.float(), sd), "down_proj: torch.float32; expected int8"),
    ("scales-on-float", lambda qu, su, qd, sd: (qu.float(), su, qd.float(), sd), "expert scales given"),
    ("down-device", lambda qu, su, qd, sd: (qu, su, qd, sd.to("meta")), "down_proj_scale: on meta; expected cpu"),
]


@pytest.mark.parametrize("path", ["per-segment", "expert-major"])
@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[0])
def test_bad_scales_raise_naming_the_tensor(path, bad):
    qu, su, qd, sd = bad[1](*_q())
    x, scores = torch.randn(2, H_), torch.rand(2, E_)
    with pytest.raises(ValueError, match=bad[2].replace("[", r"\[").replace("]", r"\]")):
        if path == "per-segment":
            sparse_ffn_triton(x, scores, qu, qd, cu_seqlens_of([2]), su, sd)
        else:
            em.expert_major_ffn_triton(x, scores, qu, qd, su, sd)


def test_a_config_where_the_scales_go_is_a_type_error():
    """``config`` used to be the 6th positional parameter of ``sparse_ffn_triton``; it is now
    keyword-only in practice (after the scales), and a config passed positionally says so."""
    from vllm_blockffn.kernels.sparse_ffn.triton_sparse_ffn import default_config

    w_up, w_down_t = make_weights(E_, D_, H_)
    with pytest.raises(TypeError, match="config=..."):
        sparse_ffn_triton(
            torch.randn(1, H_), torch.rand(1, E_), w_up, w_down_t, cu_seqlens_of([1]), default_config(1, 1, E_, D_, H_)
        )


# ---------------------------------------------------------------- ahead-of-time for sm_80 / sm_90
def _on_paper():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("gpu_on_paper")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover
        return False


AOT_SHAPES = {
    "0.1B Small": (768, 48, 64),
    "0.5B Medium": (1280, 40, 128),
    "1.2B XLarge": (1792, 56, 128),
    "XLarge-sized E48 d149": (1792, 48, 149),
}
_COMPILED: dict[tuple, dict] = {}


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend")
@pytest.mark.parametrize("arch", [80, 90])
def test_int8_kernels_compile_without_spills(arch, monkeypatch):
    """Every int8 variant (per-segment up / down with ``W_INT8``, vLLM's fused-MoE up / down with
    ``use_int8_w8a16``) at the tiles the code picks for 1 token, 8 tokens in 1 and in 8 segments,
    64 tokens in 8 segments (per-segment) and 1 / 64 / 2048 tokens (expert-major): compiled for
    sm_``arch`` with no spilled registers. (The float per-segment up kernel's known sm_80 spill at
    64 × 128 tiles is avoided for int8: ``default_config(w_int8=True)`` takes 64 × 64.)"""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiling, not interpreting
    gp = _on_paper()
    specs = []
    for H, E, D in AOT_SHAPES.values():
        specs += [
            s
            for T, S in gp.RESOURCE_POINTS
            for s in gp.kernel_specs(T, S, E, D, H, int8=True)
            if s[0].endswith("(int8)")
        ]
        if gp.em.vllm_kernels_available():
            specs += [s for T in gp.EM_RESOURCE_TOKENS for s in gp.expert_major_specs(T, E, D, H, int8=True)]
    labels = set()
    for label, lazy, ptrs, consts, opts in specs:
        key = (arch, label, tuple(sorted(consts.items(), key=str)), tuple(sorted(opts.items())))
        if key not in _COMPILED:
            _COMPILED[key] = gp.resource_usage(gp.compile_kernel(lazy, ptrs, consts, arch, **opts))
        use = _COMPILED[key]
        assert use["spill_stores"] == 0 and use["n_regs"] <= 255, (label, consts, opts, use)
        assert use["shared"] <= 227 * 1024, (label, consts, use)
        labels.add(label)
    want = {"sparse up (int8)", "sparse down (int8)"}
    if gp.em.vllm_kernels_available():
        want |= {"fused-MoE up (int8)", "fused-MoE down (int8)"}
    assert labels == want


# ---------------------------------------------------------------- the CUDA rule's byte model
def test_cuda_rule_counts_int8_weights_at_one_byte():
    """``cuda_costs(elt=1)``: int8 weights cost 1 byte each plus their fp32 scales (activations
    stay bf16), so both sparse paths get cheaper and dense (dequantize, then bf16 GEMMs) dearer;
    float calls are unchanged. At XLarge the int8 rule keeps the per-segment kernels for 8 decode
    requests (bf16: expert-major) and expert-major from 32 requests and for a prefill
    (benchmarks/gpu_on_paper.py int8_rows: the detailed model agrees)."""
    from vllm_blockffn.kernels.dispatch import cuda_costs, cuda_path

    H, E, D = 1792, 56, 128
    for T, S in ((1, 2), (8, 9), (32, 9), (2048, 1)):
        bf16, q = cuda_costs(T, S, E, D, H), cuda_costs(T, S, E, D, H, elt=1)
        assert bf16 == cuda_costs(T, S, E, D, H, 2, act_elt=2)
        assert q["expert_major"] < bf16["expert_major"]
        assert q["segments"] < bf16["segments"] or T > 512  # a 2048-token segment is FLOP-bound either way
        assert q["dense"] > bf16["dense"]
        # Activations are the x dtype's: int8 weights with fp32 activations move more than with bf16.
        assert cuda_costs(T, S, E, D, H, elt=1, act_elt=4)["expert_major"] > q["expert_major"]
    assert cuda_path(8, 9, E, D, H) == "expert_major" and cuda_path(8, 9, E, D, H, elt=1) == "segments"
    assert cuda_path(1, 2, E, D, H, elt=1) == "segments"
    assert cuda_path(32, 9, E, D, H, elt=1) == "expert_major"
    assert cuda_path(2048, 2, E, D, H, elt=1) == "expert_major"
    assert cuda_path(128, 129, E, D, H) == "dense" and cuda_path(128, 129, E, D, H, elt=1) == "expert_major"
