"""int8 weights (issue 18): kernels against a dequantize-then-compute reference, the quantized
checkpoint against quantize-at-load, the engine against the PyTorch reference, and the errors.

Tolerances (relative max error, of the output's scale): fp32 activations — 1e-5 on the fp32 paths
(the kernel scales each W_up row's dot product and each W_down column instead of dequantizing
every weight first: fp32 rounding order only), 2e-4 on the VNNI path (avx512_bf16: the up dots run
on x rounded to int16 per token, a step of max|x| / 32767); bf16 activations — 1e-2 (bf16 inputs and
outputs, fp32 accumulation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, compare_to_reference, expert_scores, greedy_up_to_ties
from vllm_blockffn.kernels.quant import (
    check_expert_scales,
    dequantize_experts,
    dequantize_rows,
    quantize_experts,
    quantize_rows,
)
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.cpu import dense_ffn, sparse_ffn_cpu, sparse_ffn_grouped
from vllm_blockffn.kernels.sparse_ffn.naive import experts_naive, sparse_ffn_naive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "blockffn-tiny-trained")
needs_native = pytest.mark.skipif(not cpu_native.native_available(), reason="no native CPU kernel")


def _isas() -> list[str]:
    best = cpu_native.best_isa()
    return list(cpu_native.ISAS[: cpu_native.ISAS.index(best) + 1]) if best else []


def _integer_isas() -> list[str]:
    """The paths whose int8 dots are exact integers on x rounded to int16 (VPMADDWD on avx2 / avx512,
    VPDPBUSD from avx512_bf16): every path but the portable one."""
    return [i for i in _isas() if i != "portable"]


def _experts(E: int, D: int, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(E, D, H, generator=g) / H**0.5, torch.randn(E, D, H, generator=g) / D**0.5
    return quantize_experts(up, down)


def _tol(xdt: torch.dtype, isa: str | None = None) -> float:
    """The tolerance for int8 weights with x in ``xdt`` on ``isa`` (None: the path calls default to)."""
    if xdt == torch.bfloat16:
        return 1e-2
    return 2e-4 if cpu_native.isa_at_least("avx2", isa) else 1e-5


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def test_quantize_rows_round_trip_and_errors():
    w = torch.randn(6, 5, 33)
    w[1, 2] = 0.0  # an all-zero row: scale 1, q 0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6, 5)
    assert int(q.abs().max()) == 127 and float(s[1, 2]) == 1.0 and not q[1, 2].any()
    err = (dequantize_rows(q, s) - w).abs()
    assert bool((err <= s.unsqueeze(-1) / 2 + 1e-7).all())  # round to nearest: half a step per row
    w[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer.3.up_proj.*NaN or Inf"):
        quantize_rows(w, "layer.3.up_proj")
    with pytest.raises(ValueError, match="int32"):
        quantize_rows(torch.ones(2, 2, dtype=torch.int32), "w")


def test_expert_scale_checks_name_the_tensor():
    qu, su, qd, sd = _experts(4, 3, 16)
    assert check_expert_scales(qu, su, qd, sd)
    with pytest.raises(ValueError, match="down_proj_scale: missing"):
        check_expert_scales(qu, su, qd, None)
    with pytest.raises(ValueError, match=r"up_proj_scale: torch.float32 \[4, 16\]; expected torch.float32 \[4, 3\]"):
        check_expert_scales(qu, sd, qd, sd)
    with pytest.raises(ValueError, match="scales go with int8 weights only"):
        check_expert_scales(qu.float(), su, qd.float(), sd)


@needs_native
@pytest.mark.parametrize("isa", [i for i in _isas() if i in ("avx512", "avx512_bf16")])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int8_down_pass_group_major_over_spans(isa, threads):
    """Experts with more than 4 tokens take the down pass a group of 4 tokens at a time over a thread's units,
    inside each span of the int32 sums (VNNI: set up by the span's first unit for every token, flushed by its
    last): 13 tokens on the same 3 experts (groups 4 + 4 + 4 + 1), D = 530 (spans cut at 128 units), one to
    three threads. A group skipped, a span's sums set up again or flushed early would be off by whole terms."""
    E, D, H, T = 5, 530, 96, 13
    qu, su, qd, sd = _experts(E, D, H, seed=threads)
    up, down = dequantize_experts(qu, su, qd, sd)
    g = torch.Generator().manual_seed(threads)
    x = torch.randn(T, H, generator=g).bfloat16()
    s = torch.zeros(T, E)
    s[:, [0, 2, 3]] = torch.rand(T, 3, generator=g) + 0.1
    ref = experts_naive(x.float(), s, up, down)
    cu = torch.tensor([0, 5, T], dtype=torch.int32)
    y = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, isa=isa, num_threads=threads, up_scale=su, down_scale=sd)
    assert _rel(y, ref) < _tol(torch.bfloat16, isa)
    try:  # bit for bit the order of every unit taking all its groups at once
        cpu_native.set_group_major(False)
        y_units = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, isa=isa, num_threads=threads, up_scale=su,
                                               down_scale=sd)
    finally:
        cpu_native.set_group_major(True)
    assert torch.equal(y, y_units)
    was = cpu_native.set_prefetch(0)
    assert was == -1  # the default: by the units' size (2 blocks ahead for these small ones, else 1)
    try:  # the prefetch (off, or 1-3 blocks ahead, split over a unit's token groups) never changes a result
        for blocks in (0, 1, 2, 3):
            cpu_native.set_prefetch(blocks)
            y_pf = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, isa=isa, num_threads=threads, up_scale=su,
                                                down_scale=sd)
            assert torch.equal(y, y_pf), blocks
    finally:
        cpu_native.set_prefetch(was)


@needs_native
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_native_int8_experts_equal_dequantized_reference(isa, xdt):
    for E, D, H in [(8, 21, 256), (6, 13, 37), (5, 4, 16)]:
        qu, su, qd, sd = _experts(E, D, H)
        up, down = dequantize_experts(qu, su, qd, sd)
        for T in (1, 3, 4, 8, 17):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(xdt)
            s = expert_scores(T, E, seed=T)
            ref = experts_naive(x.float(), s, up, down)
            for threads in (1, 2):
                y = cpu_native.sparse_ffn_native(x, s, qu, qd, torch.tensor([0, T], dtype=torch.int32), isa=isa,
                                                 num_threads=threads, up_scale=su, down_scale=sd)
                assert y.dtype == xdt and not y.isnan().any()
                assert _rel(y, ref) < _tol(xdt, isa), (E, D, H, T, threads)
            dense = cpu_native.sparse_ffn_native(x, s, qu, qd, torch.tensor([0, T], dtype=torch.int32), isa=isa,
                                                 all_experts=True, up_scale=su, down_scale=sd)
            assert _rel(dense, ref) < _tol(xdt, isa)


@pytest.mark.parametrize("isa", _integer_isas())
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_int8_down_pass_on_row_pairs(isa, xdt, monkeypatch):
    """The int8 down pass on the integer paths (VPDPWSSD / VPMADDWD on row pairs into int32 sums per span,
    h rounded to int16 per token and span) equals the widening pass and the dequantized reference within
    the integer paths' tolerance, column tails (H % 32, H % 16), one-row units and spans cut at 128 units
    (D = 530) included; the switch does change the path."""
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_ISA", isa)
    for E, D, H in [(7, 13, 256), (5, 6, 45), (4, 9, 1792), (2, 530, 72)]:
        qu, su, qd, sd = _experts(E, D, H, seed=H)
        up, down = dequantize_experts(qu, su, qd, sd)
        for T in (1, 4, 6):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T + H)).to(xdt)
            s = expert_scores(T, E, seed=T)
            ref = experts_naive(x.float(), s, up, down)
            ys = {}
            try:
                for on in (False, True):
                    cpu_native.set_pairdown(on)
                    ys[on] = cpu_native.sparse_ffn_native(x, s, qu, qd, torch.tensor([0, T], dtype=torch.int32),
                                                          num_threads=2, up_scale=su, down_scale=sd)
            finally:
                cpu_native.set_pairdown(True)
            for y in ys.values():
                assert _rel(y, ref) < _tol(xdt, isa), (E, D, H, T)
            if xdt == torch.float32:
                assert not torch.equal(ys[True], ys[False])


@needs_native
@pytest.mark.parametrize("isa", _isas())
def test_native_int8_linear_equals_dequantized_reference(isa):
    for N, K in [(37, 256), (5, 19), (130, 1792)]:
        q, s = quantize_rows(torch.randn(N, K))
        w = dequantize_rows(q, s)
        for M in (1, 3, 8):
            for xdt in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K).to(xdt)
                y = cpu_native.linear_native(x, q, isa=isa, weight_scale=s)
                assert _rel(y, x.float() @ w.t()) < _tol(xdt, isa), (N, K, M, xdt)
    with pytest.raises(ValueError, match="weight_scale"):
        cpu_native.linear_native(torch.randn(1, q.shape[1]), q)


@needs_native
@pytest.mark.parametrize("isa", _isas())
def test_int8_kmajor_linear_equals_the_row_major_kernel(isa):
    """int8 weights packed K-major ([N / 16, K / 4, 16, 4], layout.pack_kmajor): on the integer paths (VPDPBUSD on
    avx512_bf16, VPMADDWD on avx2 / avx512) the outer-product kernel makes the row-major int8 linear's integers,
    scaled in the same order: the same bits, for 1-130 tokens (passes of 8, panels of 1-4 blocks, sweeps of 128
    tokens) and K up to 16384 (int8 extremes times x at its clamp included); portable: fp32 FMAs within the
    tolerance. A token whose x is not finite takes fp32 and stays the only non-finite row. The C++ op is
    the kernel call."""
    from vllm_blockffn.kernels.layout import pack_kmajor, unpack_kmajor
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    ints = cpu_native.isa_at_least("avx2", isa)
    for N, K in [(16, 4), (48, 132), (160, 1792), (32, 16384)]:
        q, s = quantize_rows(torch.randn(N, K))
        rs = cpu_native.int8_row_sums(q)
        packed = pack_kmajor(q)
        assert packed.shape == (N // 16, K // 4, 16, 4) and torch.equal(unpack_kmajor(packed), q)
        for M in (1, 2, 3, 5, 8, 9, 130):
            for xdt in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K).to(xdt)
                y = cpu_native.linear_kmajor_native(x, packed, isa=isa, weight_scale=s, row_sums=rs)
                assert y.dtype == xdt and y.shape == (M, N)
                if ints:
                    assert torch.equal(y, cpu_native.linear_native(x, q, isa=isa, weight_scale=s)), (N, K, M, xdt)
                assert _rel(y, x.float() @ dequantize_rows(q, s).t()) < _tol(xdt, isa), (N, K, M, xdt)
    extreme = torch.full((N, K), 127, dtype=torch.int8)  # every int32 lane at its largest sums
    extreme[1::2] = -127
    s_ext = torch.rand(N) + 0.5
    x_ext = torch.ones(3, K)
    y = cpu_native.linear_kmajor_native(x_ext, pack_kmajor(extreme), isa=isa, weight_scale=s_ext,
                                        row_sums=cpu_native.int8_row_sums(extreme))
    if ints:
        assert torch.equal(y, cpu_native.linear_native(x_ext, extreme, isa=isa, weight_scale=s_ext))
    assert _rel(y, x_ext @ dequantize_rows(extreme, s_ext).t()) < 2e-4  # fp32 sums of 16384 equal-sized terms
    x = torch.randn(5, K)
    x[2, 7] = float("nan")
    y = cpu_native.linear_kmajor_native(x, packed, isa=isa, weight_scale=s, row_sums=rs)
    assert not torch.isfinite(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    if isa == cpu_native.best_isa():
        op = cpu_ops.int8_linear_kmajor(x, packed, s, rs)
        assert torch.equal(op.isnan(), y.isnan()) and torch.equal(op[~y.isnan()], y[~y.isnan()])


def test_int8_kmajor_bad_input_is_named():
    from vllm_blockffn.kernels.layout import pack_kmajor

    with pytest.raises(ValueError, match=r"pack_kmajor: weight torch.int8 \[16, 16388\]; expected .*up to 16384"):
        pack_kmajor(torch.zeros(16, 16388, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"pack_kmajor: weight torch.int8 \[16, 6\]"):
        pack_kmajor(torch.zeros(16, 6, dtype=torch.int8))
    if cpu_native.native_available():
        packed = pack_kmajor(torch.zeros(32, 8, dtype=torch.int8))
        with pytest.raises(ValueError, match=r"weight_scale None, row_sums None for a torch.int8 weight; expected "
                                             r"contiguous float32 \[32\] and int32 \[32\]"):
            cpu_native.linear_kmajor_native(torch.zeros(2, 8), packed)
        with pytest.raises(ValueError, match=r"x torch.float32 \[2, 6\]; expected fp32/bf16 \[M, 8\]"):
            cpu_native.linear_kmajor_native(torch.zeros(2, 6), packed, weight_scale=torch.ones(32),
                                            row_sums=torch.zeros(32, dtype=torch.int32))


@pytest.mark.parametrize("isa", _integer_isas())
def test_int8_dot_products_are_exact_integers(isa):
    """The integer dots (x rounded to int16 per token; VPDPBUSD on two byte planes corrected by the row
    sums, or VPMADDWD on int16) are the exact integer dot product, rounded once: bit-equal to an int64
    reference, for extreme weights and x (all ±127, one sign), rows longer than the kernels' int32
    blocks (16384 / 4096 elements), tails shorter than 64 and 16, 1-3 tokens (pairs and a single)."""
    g = torch.Generator().manual_seed(5)
    for N, K in [(9, 20000), (6, 63), (5, 64 * 3 + 1)]:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        q[0] = 127
        q[1] = -127
        s = torch.rand(N, generator=g) + 0.5
        x = torch.randn(3, K, generator=g)
        x[0] = x[0].abs() + 1.0  # all positive: the largest sums
        y = cpu_native.linear_native(x, q, isa=isa, weight_scale=s)
        xs = x.abs().amax(-1) / 32767
        xq = torch.round(x / xs[:, None])
        exact = (xq.double() @ q.double().t()).float()
        assert torch.equal(y, exact * xs[:, None] * s[None, :]), (N, K)
    bound = cpu_native.bound_linear(q, s)
    assert bound is cpu_native.bound_linear(q, s)  # bound once: the row sums are made once
    assert torch.equal(bound.tensors[2], q.sum(-1, dtype=torch.int32))


@pytest.mark.skipif(len(_integer_isas()) < 2, reason="one integer int8 path on this CPU")
def test_int8_integer_paths_agree_bit_for_bit(monkeypatch):
    """Every integer int8 path (avx2, avx512, avx512_bf16, amx) computes the same integers with the same
    roundings: experts (decode, verify chunks, spans cut at 128 units, H % 32 tails) and linears are
    equal bit for bit across them, so quality measured on one path holds on the others."""
    outs: dict[str, list[torch.Tensor]] = {}
    for isa in _integer_isas():
        monkeypatch.setenv("VLLM_BLOCKFFN_CPU_ISA", isa)
        got = []
        for E, D, H in [(7, 13, 256), (2, 530, 72), (4, 9, 1800)]:
            qu, su, qd, sd = _experts(E, D, H, seed=H)
            for T, cu in [(1, [0, 1]), (8, [0, 4, 8]), (6, [0, 6])]:
                x = torch.randn(T, H, generator=torch.Generator().manual_seed(T + H))
                s = expert_scores(T, E, seed=T)
                got.append(cpu_native.sparse_ffn_native(x, s, qu, qd, torch.tensor(cu, dtype=torch.int32),
                                                        num_threads=2, up_scale=su, down_scale=sd))
            q, sc = quantize_rows(torch.randn(3 * D, H, generator=torch.Generator().manual_seed(D)))
            for M in (1, 2, 5, 8):
                got.append(cpu_native.linear_native(torch.randn(M, H, generator=torch.Generator().manual_seed(M)), q,
                                                    weight_scale=sc))
        outs[isa] = got
    first, *others = outs
    for isa in others:
        for i, (a, b) in enumerate(zip(outs[first], outs[isa])):
            assert torch.equal(a, b), (first, isa, i)


@needs_native
def test_int8_linear_takes_the_native_kernel_at_every_size(monkeypatch):
    """int8_linear (the quantized layers' op, C++ and its Python implementation): the native kernel at every
    M on every path, fp32 and bf16 x (torch's int8 GEMM was 25-32x slower with fp32 x past decode sizes on
    AVX2, ~1.4x with bf16 x); both within the tolerance of the dequantized reference."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    q, s = quantize_rows(torch.randn(96, 256))
    sums = cpu_native.int8_row_sums(q)
    ref_w = dequantize_rows(q, s)
    for isa in _isas():
        monkeypatch.setenv("VLLM_BLOCKFFN_CPU_ISA", isa)
        for M, xdt in ((3, torch.bfloat16), (40, torch.bfloat16), (40, torch.float32)):
            x = torch.randn(M, 256).to(xdt)
            y = cpu_ops.int8_linear(x, q, s, sums)
            assert torch.equal(y, cpu_ops.int8_linear_python(x, q, s, sums)), (isa, M, xdt)
            assert _rel(y, x.float() @ ref_w.t()) < _tol(xdt, isa), (isa, M, xdt)
            assert torch.equal(y, cpu_native.linear_native(x, q, weight_scale=s)), (isa, M, xdt)


@pytest.mark.parametrize("native", [True, False])
def test_int8_cpu_paths_equal_reference(native):
    """Per-segment decode, verify chunks, a long (grouped-GEMM) step, dense, and the PyTorch fallback."""
    E, D, H = 12, 16, 64
    qu, su, qd, sd = _experts(E, D, H)
    up, down = dequantize_experts(qu, su, qd, sd)
    for lengths in ([1], [4, 4, 1], [160]):
        T = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        x = torch.randn(T, H)
        s = expert_scores(T, E, seed=T)
        ref = sparse_ffn_naive(x, s, up, down, cu)
        y = sparse_ffn_cpu(x, s, qu, qd, cu, native=native, up_scale=su, down_scale=sd)
        tol = _tol(x.dtype) if native else 1e-5
        assert _rel(y, ref) < tol, lengths
        assert _rel(dense_ffn(x, s, qu, qd, su, sd), ref) < _tol(x.dtype)
    if native and cpu_native.native_available():
        assert _rel(sparse_ffn_grouped(x, s, qu, qd, cu, su, sd), ref) < 1e-5


@needs_native
def test_long_int8_steps_stay_native_where_it_is_faster(monkeypatch):
    """A 200-token step (prefill) with int8 experts: the native kernel on the paths whose int8 entry of
    cpu_grouped_min_tokens_by_path is above it (every measured one), the grouped dequantize-then-GEMM path on the
    others; both equal the reference."""
    from vllm_blockffn.kernels.dispatch import THRESHOLDS

    E, D, H, T = 12, 16, 64, 200
    assert THRESHOLDS.cpu_grouped_min_tokens <= T
    qu, su, qd, sd = _experts(E, D, H)
    up, down = dequantize_experts(qu, su, qd, sd)
    x = torch.randn(T, H)
    s = expert_scores(T, E, seed=3)
    cu = torch.tensor([0, 120, T], dtype=torch.int32)
    ref = sparse_ffn_naive(x, s, up, down, cu)
    for isa in _isas():
        monkeypatch.setenv("VLLM_BLOCKFFN_CPU_ISA", isa)
        y = sparse_ffn_cpu(x, s, qu, qd, cu, up_scale=su, down_scale=sd)
        assert _rel(y, ref) < _tol(x.dtype, isa), isa
        native = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, up_scale=su, down_scale=sd)
        stays = T < THRESHOLDS.cpu_grouped_min_tokens_by_path[cpu_native.route_path()][2]
        assert torch.equal(y, native) == stays, isa
        if not stays:
            assert torch.equal(y, sparse_ffn_grouped(x, s, qu, qd, cu, su, sd)), isa


# ---------------------------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("int8") / "blockffn-tiny-trained-int8")
    proc = subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "quantize", MODEL, out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _expert_dtypes(engine) -> list[tuple]:
    def get(model):
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        ffn = next(m for m in model.modules() if isinstance(m, BlockFFN))
        attn = model.model.layers[0].self_attn
        return (ffn.up_proj.dtype, ffn.down_proj.dtype, ffn.up_proj_scale.shape, attn.qkv_proj.weight.dtype,
                attn.o_proj.weight.dtype, model.lm_head.weight.dtype, ffn.router_proj.weight.dtype)

    return engine.llm.apply_model(get)


def _kmajor_int8_linears(model) -> int:
    """The model's int8 linears packed K-major (4-D int8 weights marked blockffn_kmajor)."""
    n = 0
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if getattr(m, "blockffn_kmajor", False) and isinstance(w, torch.Tensor) and w.dtype == torch.int8:
            assert w.dim() == 4 and m.blockffn_out_features == w.shape[0] * 16
            n += 1
    return n


@pytest.mark.slow
def test_int8_engine_matches_reference_and_checkpoint(engine_factory, int8_checkpoint, record_figure, monkeypatch):
    """--quantization blockffn_int8 (quantize at load) = the saved int8 checkpoint (same int8 weights and
    scales, so identical logprobs) = the PyTorch reference on the dequantized weights; greedy stable."""
    from vllm_blockffn.reference import load_reference

    online = engine_factory(MODEL, dtype="float32", quantization="blockffn_int8")
    dtypes = _expert_dtypes(online)[0]
    assert dtypes[:2] == (torch.int8, torch.int8) and dtypes[3:6] == (torch.int8,) * 3, dtypes
    assert dtypes[6] == torch.float32, "the router stays in the model's dtype"
    first = online.greedy(PROMPTS, max_tokens=32, prompt_logprobs=True)
    again = online.greedy(PROMPTS, max_tokens=32, prompt_logprobs=True)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    worst, same = compare_to_reference(first, load_reference(int8_checkpoint), max_tokens=32)
    record_figure("int8 engine vs dequantized reference: max |d logprob|", f"{worst:.2e}")
    assert worst <= 1e-3 and all(same), (worst, same)
    packed = online.llm.apply_model(_kmajor_int8_linears)[0]
    online.close()
    # int8 linears packed K-major where the rule says (THRESHOLDS.cpu_linear_kmajor_int8): the VNNI path's integers,
    # so the same logprobs as the row-major kernel (VLLM_BLOCKFFN_CPU_LINEAR=rowmajor)
    from vllm_blockffn.kernels.dispatch import THRESHOLDS

    assert packed == (9 if cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor_int8 else 0), packed
    if packed:
        with monkeypatch.context() as m:
            m.setenv("VLLM_BLOCKFFN_CPU_LINEAR", "rowmajor")
            rowmajor = engine_factory(MODEL, dtype="float32", quantization="blockffn_int8")
            assert rowmajor.llm.apply_model(_kmajor_int8_linears)[0] == 0
            plain = rowmajor.greedy(PROMPTS, max_tokens=32, prompt_logprobs=True)
            rowmajor.close()
        for a, b in zip(first, plain):
            assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
            assert [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]] == \
                [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]

    saved = engine_factory(int8_checkpoint, dtype="float32")
    assert _expert_dtypes(saved)[0] == dtypes
    loaded = saved.greedy(PROMPTS, max_tokens=32, prompt_logprobs=True)
    for a, b in zip(first, loaded):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        la = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lb = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        assert la == lb  # bit-identical: the same int8 weights and scales


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_int8_checkpoint_errors_name_the_tensor(int8_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    ok = _cli("check", int8_checkpoint)
    assert ok.returncode == 0 and "int8 weights (experts and linears)" in ok.stdout, ok.stderr
    tensors = load_file(os.path.join(int8_checkpoint, "model.safetensors"))
    cases = {
        "missing": ("model.layers.1.mlp.down_proj_scale", None,
                    r"weight 'model.layers.1.mlp.down_proj_scale' is missing; expected float32 \[48, 256\]"),
        "shape": ("model.layers.0.mlp.up_proj_scale", torch.ones(48, 20),
                  r"weight 'model.layers.0.mlp.up_proj_scale' is float32 \[48, 20\]; expected float32 \[48, 21\]"),
        "dtype": ("model.layers.2.self_attn.q_proj.weight", torch.zeros(256, 256, dtype=torch.bfloat16),
                  r"weight 'model.layers.2.self_attn.q_proj.weight' is bfloat16 \[256, 256\]; expected int8"),
    }
    for case, (name, value, pattern) in cases.items():
        bad = tmp_path / case
        shutil.copytree(int8_checkpoint, bad)
        t = dict(tensors)
        if value is None:
            del t[name]
        else:
            t[name] = value
        save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
        r = _cli("check", str(bad))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (case, r.stderr)
        assert str(bad) in lines[0] and re.search(pattern, lines[0]), (case, lines[0])

    cfg_bad = tmp_path / "method"
    shutil.copytree(int8_checkpoint, cfg_bad)
    cfg = json.loads((cfg_bad / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "blockffn_int4"
    (cfg_bad / "config.json").write_text(json.dumps(cfg))
    r = _cli("check", str(cfg_bad))
    assert r.returncode == 2 and "quantization_config" in r.stderr and "blockffn_int4" in r.stderr, r.stderr


def test_quantize_refuses_bad_sources(int8_checkpoint, tmp_path):
    r = _cli("quantize", int8_checkpoint, str(tmp_path / "again"))
    assert r.returncode == 2 and "already a blockffn_int8 checkpoint" in r.stderr, r.stderr


@pytest.mark.slow
def test_bad_int8_checkpoint_stops_the_engine_before_workers(int8_checkpoint, tmp_path):
    """`LLM(...)` on an int8 checkpoint with a missing scale: the named error, from the preflight."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(int8_checkpoint, bad)
    t = load_file(str(bad / "model.safetensors"))
    del t["model.layers.3.mlp.up_proj_scale"]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    script = ("from vllm import LLM\n"
              f"LLM({str(bad)!r}, enforce_eager=True, max_model_len=128)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "weight 'model.layers.3.mlp.up_proj_scale' is missing" in r.stderr, r.stderr[-3000:]
    assert "Initializing a V1 LLM engine" not in r.stderr  # stopped before any engine process started


@pytest.mark.slow
def test_vllm_serve_int8_mla_matches_reference(tiny_factory, tmp_path):
    """`vllm serve --quantization blockffn_int8` on an MLA checkpoint (kv_b_proj stays float), queried
    with the OpenAI client: the completion is the dequantized reference's greedy continuation, up to near-ties (the
    kernels round x and h to int16 steps, the fp32 reference does not: a tie within 1e-3 in the logits of this
    random tiny model may go either way), and its text is those tokens'."""
    from openai import OpenAI
    from transformers import PreTrainedTokenizerFast

    from vllm_blockffn.reference import load_reference
    from vllm_blockffn.tools.demo import VLLMServer

    path = tiny_factory(attention="mla")
    quantized = str(tmp_path / "mla-int8")
    r = _cli("quantize", path, quantized)
    assert r.returncode == 0, r.stderr
    reference = load_reference(quantized)
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json")
    with VLLMServer(path, 18761, extra_args=["--dtype", "float32", "--quantization", "blockffn_int8"],
                    env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="none", timeout=120)
        for prompt in PROMPTS[:3]:
            out = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
            got = list(out.choices[0].model_extra["token_ids"])
            assert len(got) == 12 and out.choices[0].text == tok.decode(got, skip_special_tokens=True)
            greedy_up_to_ties(reference, tok(prompt)["input_ids"], got)


@needs_native
@pytest.mark.parametrize("isa", _isas())
def test_native_int8_nonfinite_x_propagates_only_to_its_token(isa):
    """A token with NaN/Inf in x (the VNNI path cannot round it to int16) takes the fp32 path: its output
    row is not finite, the other tokens' rows are exact."""
    E, D, H, T = 8, 21, 256, 4
    qu, su, qd, sd = _experts(E, D, H)
    up, down = dequantize_experts(qu, su, qd, sd)
    s = torch.zeros(T, E)
    s[:, :3] = 0.5
    for bad in (float("nan"), float("inf")):
        x = torch.randn(T, H)
        x[1, 7] = bad
        y = cpu_native.sparse_ffn_native(x, s, qu, qd, torch.tensor([0, T], dtype=torch.int32), isa=isa,
                                         up_scale=su, down_scale=sd)
        assert not torch.isfinite(y[1]).all()
        clean = [0, 2, 3]
        assert _rel(y[clean], experts_naive(x[clean], s[clean], up, down)) < _tol(torch.float32, isa)
        lin = cpu_native.linear_native(x, qu.reshape(E * D, H), isa=isa, weight_scale=su.reshape(-1))
        assert not torch.isfinite(lin[1]).all() and torch.isfinite(lin[clean]).all()


@pytest.mark.slow
def test_int8_checkpoint_tp2_equals_tp1(tiny_factory, tmp_path, monkeypatch):
    """An int8 checkpoint under tensor parallelism (mp executor): every rank holds a D/2 slice of the int8
    experts with their up scales, the whole down scales, and its shards of the int8 q/k/v/o weights and
    scales; greedy tokens equal TP=1's."""
    from conftest import Engine
    from test_distributed import MAX_TOKENS, _close, omp_bind_for

    path = str(tmp_path / "tiny-int8")
    r = _cli("quantize", tiny_factory(), path)
    assert r.returncode == 0, r.stderr
    tokens = {}
    for tp in (1, 2):
        kwargs = dict(tensor_parallel_size=2, distributed_executor_backend="mp") if tp == 2 else {}
        if tp == 2:
            monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", omp_bind_for(2))
        engine = Engine(path, **kwargs)
        try:
            tokens[tp] = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, MAX_TOKENS)]
        finally:
            _close(engine)
    assert tokens[2] == tokens[1]


@pytest.mark.parametrize("layout", ["block", "block_linear"])
def test_quantized_checkpoint_holds_kernels_quant_weights(tiny_factory, tmp_path, layout):
    """`vllm-blockffn quantize` + the reference's dequantization, in both checkpoint layouts, give exactly
    kernels/quant.py's int8 experts (quantize_experts on the internal layout), dequantized."""
    from vllm_blockffn.kernels.layout import to_internal_layout

    from vllm_blockffn.reference import load_reference
    from vllm_blockffn.serving.checkpoint import iter_tensors

    src = tiny_factory(layout=layout)
    out = str(tmp_path / f"{layout}-int8")
    r = _cli("quantize", src, out)
    assert r.returncode == 0, r.stderr
    ref = load_reference(out)
    float_tensors = dict(iter_tensors(src))
    E = ref.spec.num_experts
    params = dict(ref.named_parameters())
    for i in range(ref.spec.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        w_up, w_down_t = to_internal_layout(float_tensors[p + "up_proj"], float_tensors[p + "down_proj"], layout, E)
        up, down = dequantize_experts(*quantize_experts(w_up, w_down_t))
        assert torch.equal(params[f"layers.{i}.mlp.up"], up)
        assert torch.equal(params[f"layers.{i}.mlp.down"], down.transpose(1, 2))


# ------------------------------------------------------------------ experts packed K-major (kx_run)
def _kmajor(qu: torch.Tensor, qd: torch.Tensor):
    from vllm_blockffn.kernels.layout import pack_experts_kmajor

    return pack_experts_kmajor(qu, qd)


@needs_native
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_kmajor_int8_experts_equal_dequantized_reference(isa, xdt):
    """Packed experts (two K-major linears an expert: x and h rounded to int16, VPDPBUSD where the path has VNNI,
    VPMADDWD on avx2 / avx512, fp32 FMAs over the same lines on the portable path) = the dequantized reference
    within the row-major kernel's tolerance; the same bits whatever the thread count (each output column summed by
    one thread, in expert order); the dense layer (all experts) on them too."""
    for E, D, H in [(8, 64, 96), (6, 16, 256), (5, 32, 16)]:
        qu, su, qd, sd = _experts(E, D, H)
        pu, pd = _kmajor(qu, qd)
        up, down = dequantize_experts(qu, su, qd, sd)
        for T in (1, 3, 4, 8, 9, 17):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(xdt)
            s = expert_scores(T, E, seed=T)
            ref = experts_naive(x.float(), s, up, down)
            cu = torch.tensor([0, T], dtype=torch.int32)
            ys = [cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, num_threads=n, up_scale=su, down_scale=sd)
                  for n in (1, 2)]
            assert ys[0].dtype == xdt and not ys[0].isnan().any()
            assert torch.equal(ys[0], ys[1]), (E, D, H, T)
            assert _rel(ys[0], ref) < _tol(xdt, isa), (E, D, H, T, _rel(ys[0], ref))
            dense = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, all_experts=True, up_scale=su,
                                                 down_scale=sd)
            assert _rel(dense, ref) < _tol(xdt, isa)


@needs_native
def test_kmajor_int8_experts_segments_padding_and_routes():
    """Packed experts through the CPU routes: segments with padding past cu[-1] (y = 0 there), the dense layer's
    GEMMs and the grouped GEMMs of long steps (both dequantize from the packed layout), the PyTorch fallback, and
    the counters (the same as the row-major kernel's)."""
    import numpy as np

    E, D, H, T = 8, 32, 64, 12
    qu, su, qd, sd = _experts(E, D, H)
    pu, pd = _kmajor(qu, qd)
    up, down = dequantize_experts(qu, su, qd, sd)
    x = torch.randn(T, H)
    s = expert_scores(T, E)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ref = sparse_ffn_naive(x, s, up, down, cu)
    st_p, st_r = np.zeros(5, np.int64), np.zeros(5, np.int64)
    y = sparse_ffn_cpu(x, s, pu, pd, cu, allow_dense=False, stats=st_p, up_scale=su, down_scale=sd)
    sparse_ffn_cpu(x, s, qu, qd, cu, allow_dense=False, stats=st_r, up_scale=su, down_scale=sd)
    assert torch.equal(y[10:], torch.zeros(2, H)) and _rel(y, ref) < _tol(torch.float32)
    assert st_p.tolist() == st_r.tolist() and st_p[0] == 10
    whole = torch.tensor([0, T], dtype=torch.int32)
    full = experts_naive(x, s, up, down)
    for got in (sparse_ffn_grouped(x, s, pu, pd, whole, su, sd), dense_ffn(x, s, pu, pd, su, sd),
                sparse_ffn_cpu(x, s, pu, pd, whole, native=False, up_scale=su, down_scale=sd)):
        assert _rel(got, full) < 1e-5


@needs_native
def test_kmajor_int8_nonfinite_x_and_h_propagate_only_to_their_token():
    """Packed experts: a token with NaN/Inf in x, or whose h overflows to Inf (a huge x), takes fp32 FMAs over the
    packed lines; its row is not finite, the other tokens' rows are as without it."""
    E, D, H, T = 8, 32, 64, 4
    qu, su, qd, sd = _experts(E, D, H)
    pu, pd = _kmajor(qu, qd)
    up, down = dequantize_experts(qu, su, qd, sd)
    s = torch.zeros(T, E)
    s[:, :3] = 0.5
    cu = torch.tensor([0, T], dtype=torch.int32)
    for bad in (float("nan"), float("inf"), 3e38):
        x = torch.randn(T, H)
        x[1, 7] = bad
        y = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, up_scale=su, down_scale=sd)
        assert not torch.isfinite(y[1]).all(), bad
        clean = [0, 2, 3]
        assert _rel(y[clean], experts_naive(x[clean], s[clean], up, down)) < _tol(torch.float32)


def _packed_experts(model) -> int:
    """The model's BlockFFN layers whose int8 experts are packed K-major (5-D)."""
    from vllm_blockffn.serving.layers.blockffn import BlockFFN

    return sum(1 for m in model.modules() if isinstance(m, BlockFFN) and m.up_proj.dim() == 5)


@pytest.mark.slow
def test_int8_engine_packs_experts_where_the_rule_says(engine_factory, tiny_factory, monkeypatch):
    """--quantization blockffn_int8 on a model whose experts pack (D, H multiples of 16): every layer's experts
    packed K-major on the paths of THRESHOLDS.cpu_experts_kmajor_int8 (none elsewhere, none with
    VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor); greedy tokens and prompt logprobs as the row-major units give them (the
    same up integers; the down pass rounds once per expert instead of per span: within 1e-3)."""
    from vllm_blockffn.kernels.dispatch import THRESHOLDS

    path = tiny_factory()
    runs = {}
    for mode in ("auto", "rowmajor"):
        with monkeypatch.context() as m:
            m.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", mode)
            engine = engine_factory(path, dtype="float32", quantization="blockffn_int8")
            packed = engine.llm.apply_model(_packed_experts)[0]
            runs[mode] = (packed, engine.greedy(PROMPTS, max_tokens=24, prompt_logprobs=True))
            engine.close()
    want = 2 if cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_int8 else 0
    assert runs["auto"][0] == want and runs["rowmajor"][0] == 0, runs
    for a, b in zip(runs["auto"][1], runs["rowmajor"][1]):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        la = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lb = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        assert max(abs(p - q) for p, q in zip(la, lb)) <= 1e-3


def test_experts_layout_switch_is_checked(monkeypatch):
    """VLLM_BLOCKFFN_CPU_EXPERTS: auto packs int8 experts whose shapes pack on the paths of the rule, rowmajor never;
    another value is named with the ones expected."""
    from vllm_blockffn.kernels.dispatch import THRESHOLDS

    from vllm_blockffn.serving.layers.cpu_experts import packs_experts

    qu, _, qd, _ = _experts(4, 32, 64)
    odd, _, odd_d, _ = _experts(4, 21, 64)
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "auto")
    assert packs_experts(qu, qd) == (cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_int8)
    assert not packs_experts(odd, odd_d) and not packs_experts(qu.half(), qd.half())  # fp16: no packed layout
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "rowmajor")
    assert not packs_experts(qu, qd)
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "kmajor")
    with pytest.raises(ValueError, match="VLLM_BLOCKFFN_CPU_EXPERTS.*kmajor"):
        packs_experts(qu, qd)


@needs_native
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_kmajor_int8_long_step_runs_in_chunks(xdt):
    """A packed-experts step longer than the kernel's chunk (2048 tokens, cpu_native.c KX_CHUNK) runs chunk by chunk:
    the same outputs as one piece would give (the reference), zeros outside the segments, the counters once."""
    import numpy as np

    E, D, H, T = 8, 16, 32, 4200
    qu, su, qd, sd = _experts(E, D, H)
    pu, pd = _kmajor(qu, qd)
    up, down = dequantize_experts(qu, su, qd, sd)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(xdt)
    s = expert_scores(T, E)
    cu = torch.tensor([5, 1000, 4190], dtype=torch.int32)
    st_p, st_r = np.zeros(5, np.int64), np.zeros(5, np.int64)
    y = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, stats=st_p, up_scale=su, down_scale=sd)
    cpu_native.sparse_ffn_native(x, s, qu, qd, cu, stats=st_r, up_scale=su, down_scale=sd)
    ref = sparse_ffn_naive(x.float(), s, up, down, cu)
    assert y.dtype == xdt and torch.equal(y[:5].float(), torch.zeros(5, H)) and torch.equal(y[4190:].float(),
                                                                                          torch.zeros(10, H))
    assert _rel(y, ref) < _tol(xdt), _rel(y, ref)
    assert st_p.tolist() == st_r.tolist() and st_p[0] == 4185


@needs_native
def test_long_packed_int8_steps_take_the_route_of_their_entry():
    """Packed int8 experts: a step past the path's int8 grouped-GEMM size stays on the kernel where the packed entry
    says never (cpu_grouped_min_tokens_kmajor_int8: the kernel's long steps are faster there), else takes the grouped
    GEMMs from the packed entry's size; both equal the reference."""
    from vllm_blockffn.kernels.dispatch import NEVER, THRESHOLDS
    from vllm_blockffn.kernels.sparse_ffn.cpu import grouped_min_tokens

    E, D, H = 8, 16, 32
    qu, su, qd, sd = _experts(E, D, H)
    pu, pd = _kmajor(qu, qd)
    up, down = dequantize_experts(qu, su, qd, sd)
    lim = grouped_min_tokens(pu)
    rows_lim = THRESHOLDS.cpu_grouped_min_tokens_by_path[cpu_native.route_path()][2]
    assert grouped_min_tokens(qu) == rows_lim
    T = (rows_lim if lim == NEVER else lim) + 40
    x = torch.randn(T, H)
    s = expert_scores(T, E, seed=5)
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
    y = sparse_ffn_cpu(x, s, pu, pd, cu, up_scale=su, down_scale=sd)
    assert _rel(y, sparse_ffn_naive(x, s, up, down, cu)) < _tol(x.dtype)
    other = (cpu_native.sparse_ffn_native(x, s, pu, pd, cu, up_scale=su, down_scale=sd) if lim == NEVER
             else sparse_ffn_grouped(x, s, pu, pd, cu, su, sd))
    assert torch.equal(y, other)
