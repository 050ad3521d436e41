"""Experts packed K-major at load (cpu_experts.py, layout.pack_experts_kmajor): the layout for both dtypes, and bf16
experts on the kernel (weight code 4, kx_run with the K-major bf16 linears' forms) against the plain-PyTorch
reference (naive.py) on every ISA path this CPU runs, the same bits across thread counts and paths, the CPU routes
on packed tensors, long steps in chunks, and an engine that packs them. (int8 packed experts on the kernel:
tests/test_int8.py.)

Tolerances (relative max error, of the output's scale): fp32 x 1e-5 (fp32 FMAs, another summation order than the
reference); bf16 x 1e-2 (bf16 x, h and y roundings; fp32 accumulation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPTS, expert_scores, greedy_up_to_ties
from vllm_blockffn.kernels.dispatch import NEVER, THRESHOLDS
from vllm_blockffn.kernels.layout import expert_dims, pack_experts_kmajor, pack_kmajor, unpack_experts
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.cpu import dense_ffn, grouped_min_tokens, sparse_ffn_cpu, sparse_ffn_grouped
from vllm_blockffn.kernels.sparse_ffn.naive import experts_naive, sparse_ffn_naive

needs_native = pytest.mark.skipif(not cpu_native.native_available(), reason="no native CPU kernel")


def _isas() -> list[str]:
    best = cpu_native.best_isa()
    return list(cpu_native.ISAS[: cpu_native.ISAS.index(best) + 1]) if best else []


def _int8_weights(wu: torch.Tensor, wd: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Experts and a linear weight quantized as served: (wu q, up scale, wd q, down scale, w q, w's fp32 row scales,
    w's row sums)."""
    from vllm_blockffn.kernels.quant import quantize_experts, quantize_rows

    wu, su, wd, sd = quantize_experts(wu.float(), wd.float())
    w, ws = quantize_rows(w)
    return wu, su, wd, sd, w, ws.float().contiguous(), cpu_native.int8_row_sums(w)


def _steps(rows: tuple[int, ...], H: int, E: int, xdt: torch.dtype):
    """Every ISA path this CPU runs × each row count: (isa, T, x [T, H], routed scores [T, E], one segment's cu)."""
    for isa in _isas():
        for T in rows:
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(xdt)
            yield isa, T, x, expert_scores(T, E, seed=T), torch.tensor([0, T], dtype=torch.int32)


def _experts(E: int, D: int, H: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(E, D, H, generator=g) / H**0.5).bfloat16(),
            (torch.randn(E, D, H, generator=g) / D**0.5).bfloat16())


def _tol(xdt: torch.dtype) -> float:
    return 1e-2 if xdt == torch.bfloat16 else 1e-5


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_pack_experts_kmajor_round_trip_and_errors(dtype):
    """Packed experts are each expert's W_up and W_down (the checkpoint's [H, D]) packed as pack_kmajor packs a
    linear of their dtype (fp32: one k a line, bf16: k pairs, int8: k quads); unpack_experts inverts it; shapes and
    dtypes that do not pack are named."""
    g = {torch.float32: 1, torch.bfloat16: 2, torch.int8: 4}[dtype]
    wu, wd = _experts(3, 32, 48)
    if dtype == torch.float32:
        wu, wd = wu.float(), wd.float()
    if dtype == torch.int8:
        wu, wd = (torch.randint(-127, 128, w.shape, dtype=torch.int8) for w in (wu, wd))
    pu, pd = pack_experts_kmajor(wu, wd)
    assert tuple(pu.shape) == (3, 2, 48 // g, 16, g) and tuple(pd.shape) == (3, 3, 32 // g, 16, g)
    assert expert_dims(pu) == (3, 32, 48) == expert_dims(wu)
    for e in range(3):
        assert torch.equal(pu[e], pack_kmajor(wu[e])) and torch.equal(pd[e], pack_kmajor(wd[e].t().contiguous()))
    uu, dd = unpack_experts(pu, pd)
    assert torch.equal(uu, wu) and torch.equal(dd, wd)
    odd = torch.zeros(2, 24, 40, dtype=dtype)
    with pytest.raises(ValueError, match=rf"pack_experts_kmajor: experts {dtype} \[2, 24, 40\].*multiples of 16"):
        pack_experts_kmajor(odd, odd)
    with pytest.raises(ValueError, match=r"experts torch.float16"):
        pack_experts_kmajor(wu.half(), wd.half())


@needs_native
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_kmajor_bf16_experts_equal_the_reference_on_every_path(xdt):
    """Packed bf16 experts = the reference on every path (portable, avx2, avx512: FMAs over the widened lines;
    avx512_bf16: VDPBF16PS on x as stored where this CPU runs it fast), the same bits whatever the thread count
    (each h element and each output column summed by one thread) and on every path (each form adds a pair's odd
    product, then its even one); the dense layer (all experts) on them too."""
    for E, D, H in [(8, 64, 96), (6, 16, 256), (5, 32, 16)]:
        wu, wd = _experts(E, D, H)
        pu, pd = pack_experts_kmajor(wu, wd)
        for T in (1, 3, 4, 5, 8, 9, 17):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(xdt)
            s = expert_scores(T, E, seed=T)
            ref = experts_naive(x.float(), s, wu.float(), wd.float())
            cu = torch.tensor([0, T], dtype=torch.int32)
            first = None
            for isa in _isas():
                ys = [cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, num_threads=n) for n in (1, 2)]
                assert ys[0].dtype == xdt and not ys[0].isnan().any()
                assert torch.equal(ys[0], ys[1]), (E, D, H, T, isa)
                assert _rel(ys[0], ref) < _tol(xdt), (E, D, H, T, isa, _rel(ys[0], ref))
                if first is None:
                    first = ys[0]
                assert torch.equal(ys[0], first), (E, D, H, T, isa)  # random normal data: no subnormal products
                dense = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, all_experts=True)
                assert _rel(dense, ref) < _tol(xdt)


@needs_native
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_kmajor_fp32_experts_equal_the_reference_on_every_path(xdt):
    """Packed fp32 experts (weight code 5: kx_run with the K-major fp32 forms, what an fp32 model serves on AVX2) =
    the reference on every path, the same bits whatever the thread count and on every path (each output one FMA
    chain in k order), the dense layer (all experts) too; and through the CPU routes (the grouped GEMMs, the dense
    layer's GEMMs and the PyTorch fallback unpack them: quant.float_experts)."""
    for E, D, H in [(8, 64, 96), (6, 16, 256), (5, 32, 16)]:
        wu, wd = (w.float() for w in _experts(E, D, H))
        pu, pd = pack_experts_kmajor(wu, wd)
        assert pu.dtype == torch.float32 and tuple(pu.shape) == (E, D // 16, H, 16, 1)
        for T in (1, 2, 3, 4, 5, 8, 9, 17):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(xdt)
            s = expert_scores(T, E, seed=T)
            ref = experts_naive(x.float(), s, wu, wd)
            cu = torch.tensor([0, T], dtype=torch.int32)
            first = None
            for isa in _isas():
                ys = [cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, num_threads=n) for n in (1, 2, 3)]
                assert ys[0].dtype == xdt and not ys[0].isnan().any()
                assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), (E, D, H, T, isa)
                assert _rel(ys[0], ref) < _tol(xdt), (E, D, H, T, isa, _rel(ys[0], ref))
                first = ys[0] if first is None else first
                assert torch.equal(ys[0], first), (E, D, H, T, isa)
                dense = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa=isa, all_experts=True)
                assert _rel(dense, ref) < _tol(xdt)
            if T == 9 and xdt == torch.float32:
                for got in (sparse_ffn_grouped(x, s, pu, pd, cu), dense_ffn(x, s, pu, pd),
                            sparse_ffn_cpu(x, s, pu, pd, cu, native=False)):
                    assert _rel(got, ref) < 1e-5


@needs_native
def test_kmajor_bf16_dot_form_equals_the_split_form():
    """On CPUs with AVX512_BF16 the dot form (VDPBF16PS) and the split FMA form are forced in turn: the same bits
    (bf16 x; h rounded to bf16 in both)."""
    if not cpu_native.isa_at_least("avx512_bf16"):
        pytest.skip("no AVX512_BF16")
    E, D, H, T = 8, 32, 64, 6
    wu, wd = _experts(E, D, H)
    pu, pd = pack_experts_kmajor(wu, wd)
    x = torch.randn(T, H).bfloat16()
    s = expert_scores(T, E)
    cu = torch.tensor([0, T], dtype=torch.int32)
    was = cpu_native.set_kmajor_dot(1)
    try:
        dot = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa="avx512_bf16")
        cpu_native.set_kmajor_dot(0)
        split = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, isa="avx512_bf16")
    finally:
        cpu_native.set_kmajor_dot(was)
    assert torch.equal(dot, split)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_packed_down_pass_waits_per_expert_or_at_a_barrier_with_the_same_bits(dtype):
    """The packed down pass starts an expert once its up blocks are done (per-expert counters, the default) or after
    the whole up pass (a barrier): the same bits, for 2 and 3 threads (whose up shares end inside experts), 1 to 17
    tokens, and the reference within tolerance."""
    from vllm_blockffn.kernels.quant import dequantize_experts, quantize_experts

    for E, D, H in [(8, 32, 64), (5, 48, 96)]:
        wu, wd = _experts(E, D, H, seed=E)
        su = sd = None
        if dtype == torch.int8:
            wu, su, wd, sd = quantize_experts(wu.float(), wd.float())
            up, down = dequantize_experts(wu, su, wd, sd)
        else:
            wu, wd = wu.to(dtype), wd.to(dtype)
            up, down = wu.float(), wd.float()
        pu, pd = pack_experts_kmajor(wu, wd)
        for T in (1, 4, 17):
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16()
            s = expert_scores(T, E, seed=T)
            cu = torch.tensor([0, T], dtype=torch.int32)
            ref = experts_naive(x.float(), s, up, down)
            for n in (2, 3):
                ys = []
                for flags in (1, 0):
                    was = cpu_native.set_expert_flags(flags)
                    try:
                        ys.append(cpu_native.sparse_ffn_native(x, s, pu, pd, cu, num_threads=n, up_scale=su,
                                                               down_scale=sd))
                    finally:
                        cpu_native.set_expert_flags(was)
                assert torch.equal(ys[0], ys[1]), (dtype, E, D, H, T, n)
                assert _rel(ys[0], ref) < 2e-2, (dtype, E, D, H, T, n, _rel(ys[0], ref))


@needs_native
def test_kmajor_bf16_experts_segments_padding_and_routes():
    """Packed bf16 experts through the CPU routes: segments with padding past cu[-1] (y = 0 there), the counters (the
    row-major kernel's), the dense layer's GEMMs, the grouped GEMMs and the PyTorch fallback (all unpacking the
    packed tensors: quant.float_experts)."""
    E, D, H, T = 8, 32, 64, 12
    wu, wd = _experts(E, D, H)
    pu, pd = pack_experts_kmajor(wu, wd)
    x = torch.randn(T, H)
    s = expert_scores(T, E)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ref = sparse_ffn_naive(x, s, wu.float(), wd.float(), cu)
    st_p, st_r = np.zeros(5, np.int64), np.zeros(5, np.int64)
    y = sparse_ffn_cpu(x, s, pu, pd, cu, allow_dense=False, stats=st_p)
    sparse_ffn_cpu(x, s, wu, wd, cu, allow_dense=False, stats=st_r)
    assert torch.equal(y[10:], torch.zeros(2, H)) and _rel(y, ref) < _tol(torch.float32)
    assert st_p.tolist() == st_r.tolist() and st_p[0] == 10
    whole = torch.tensor([0, T], dtype=torch.int32)
    full = experts_naive(x, s, wu.float(), wd.float())
    for got in (sparse_ffn_grouped(x, s, pu, pd, whole), dense_ffn(x, s, pu, pd),
                sparse_ffn_cpu(x, s, pu, pd, whole, native=False)):
        assert _rel(got, full) < 1e-5


@needs_native
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_kmajor_bf16_long_step_runs_in_chunks(xdt):
    """A packed step longer than the kernel's chunk (2048 tokens, cpu_native.c KX_CHUNK) runs chunk by chunk: the
    reference's outputs, zeros outside the segments, the counters once."""
    E, D, H, T = 8, 16, 32, 4200
    wu, wd = _experts(E, D, H)
    pu, pd = pack_experts_kmajor(wu, wd)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(xdt)
    s = expert_scores(T, E)
    cu = torch.tensor([5, 1000, 4190], dtype=torch.int32)
    st_p, st_r = np.zeros(5, np.int64), np.zeros(5, np.int64)
    y = cpu_native.sparse_ffn_native(x, s, pu, pd, cu, stats=st_p)
    cpu_native.sparse_ffn_native(x, s, wu, wd, cu, stats=st_r)
    ref = sparse_ffn_naive(x.float(), s, wu.float(), wd.float(), cu)
    assert y.dtype == xdt and not y[:5].float().any() and not y[4190:].float().any()
    assert _rel(y, ref) < _tol(xdt), _rel(y, ref)
    assert st_p.tolist() == st_r.tolist() and st_p[0] == 4185


@needs_native
def test_long_packed_bf16_steps_take_the_route_of_their_entry():
    """Packed bf16 experts: a step past the path's bf16 grouped-GEMM size stays on the kernel where the packed entry
    says never (cpu_grouped_min_tokens_kmajor_bf16), else takes the grouped GEMMs from the packed entry's size; both
    equal the reference."""
    E, D, H = 8, 16, 32
    wu, wd = _experts(E, D, H)
    pu, pd = pack_experts_kmajor(wu, wd)
    lim = grouped_min_tokens(pu)
    rows_lim = THRESHOLDS.cpu_grouped_min_tokens_by_path[cpu_native.route_path()][1]
    assert grouped_min_tokens(wu) == rows_lim
    assert lim == THRESHOLDS.cpu_grouped_min_tokens_kmajor_bf16.get(cpu_native.route_path(), rows_lim)
    T = (rows_lim if lim == NEVER else lim) + 40
    x = torch.randn(T, H)
    s = expert_scores(T, E, seed=5)
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
    y = sparse_ffn_cpu(x, s, pu, pd, cu)
    assert _rel(y, sparse_ffn_naive(x, s, wu.float(), wd.float(), cu)) < _tol(x.dtype)
    other = (cpu_native.sparse_ffn_native(x, s, pu, pd, cu) if lim == NEVER
             else sparse_ffn_grouped(x, s, pu, pd, cu))
    assert torch.equal(y, other)


def test_packing_rule_by_dtype(monkeypatch):
    """cpu_experts.packs_experts: bf16 on the paths of THRESHOLDS.cpu_experts_kmajor_bf16, fp32 on
    cpu_experts_kmajor_fp32 (int8: cpu_experts_kmajor_int8, tests/test_int8.py), never fp16 or shapes that do not
    pack, never with VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor."""
    from vllm_blockffn.serving.layers.cpu_experts import packs_experts

    wu, wd = _experts(4, 32, 64)
    odd = _experts(4, 24, 40)
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "auto")
    on = cpu_native.native_available() and cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_bf16
    on32 = cpu_native.native_available() and cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_fp32
    assert packs_experts(wu, wd) == on and packs_experts(wu.float(), wd.float()) == on32
    assert not packs_experts(*odd) and not packs_experts(wu.half(), wd.half())
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "rowmajor")
    assert not packs_experts(wu, wd) and not packs_experts(wu.float(), wd.float())


def test_unpacked_experts_say_why(monkeypatch):
    """cpu_experts.unpacked_reason names what keeps experts as loaded (the load log and the benchmarks print it):
    a d_e off the 16-row grain (an inflated XLarge with d_e 149), fp16, a path without the dtype's packed kernel,
    the switch; None for experts that pack."""
    from vllm_blockffn.serving.layers.cpu_experts import unpacked_reason

    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "auto")
    on = cpu_native.native_available() and cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_bf16
    wu, wd = _experts(4, 32, 64)
    assert (unpacked_reason(wu, wd) is None) == on
    assert unpacked_reason(*pack_experts_kmajor(wu, wd)) is None
    if on:
        assert unpacked_reason(*_experts(4, 24, 64)) == "d_e 24 and H 64 must be multiples of 16"
    assert unpacked_reason(wu.half(), wd.half()) == "float16 experts have no packed layout"
    on32 = cpu_native.native_available() and cpu_native.cpu_isa() in THRESHOLDS.cpu_experts_kmajor_fp32
    why32 = unpacked_reason(wu.float(), wd.float())
    assert (why32 is None) == on32 and (on32 or not cpu_native.native_available() or why32.startswith("path ")), why32
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", "rowmajor")
    assert unpacked_reason(wu, wd) == "VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor"


def _packed_layers(model) -> int:
    from vllm_blockffn.serving.layers.blockffn import BlockFFN

    return sum(1 for m in model.modules() if isinstance(m, BlockFFN) and m.up_proj.dim() == 5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_packs_experts_where_the_rule_says(dtype, engine_factory, tiny_factory, monkeypatch):
    """A bf16 / fp32 engine on a model whose experts pack (D, H multiples of 16): every layer's experts packed
    K-major on the paths of THRESHOLDS.cpu_experts_kmajor_bf16 / _fp32 (none with VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor);
    prompt logprobs within bf16 rounding of the row-major units', and each run's greedy tokens the fp32 reference's
    up to near-ties
    (within 0.01 in its logits: on this random tiny model such a tie may go either way under bf16 rounding; the
    packed experts round h to bf16, the row-major units keep it in fp32, and on the AVX2 EPYC the two layouts' tokens
    differed on 2 of 5 prompts, each run taking 2 ties of < 0.005 the other way)."""
    from vllm_blockffn.reference import load_reference
    from vllm_blockffn.serving.layers.cpu_experts import describe

    path = tiny_factory()
    runs = {}
    for mode in ("auto", "rowmajor"):
        with monkeypatch.context() as m:
            m.setenv("VLLM_BLOCKFFN_CPU_EXPERTS", mode)
            engine = engine_factory(path, dtype=dtype)
            packed = engine.llm.apply_model(_packed_layers)[0]
            said = engine.llm.apply_model(describe)[0]
            assert said.startswith(f"experts ({dtype}) of {packed}/2 layers packed K-major"), said
            assert (packed == 2) == ("as loaded" not in said), said
            runs[mode] = (packed, engine.greedy(PROMPTS, max_tokens=24, prompt_logprobs=True))
            engine.close()
    paths = THRESHOLDS.cpu_experts_kmajor_bf16 if dtype == "bfloat16" else THRESHOLDS.cpu_experts_kmajor_fp32
    on = cpu_native.native_available() and cpu_native.cpu_isa() in paths
    assert runs["auto"][0] == (2 if on else 0) and runs["rowmajor"][0] == 0, runs
    reference = load_reference(path)
    for a, b in zip(runs["auto"][1], runs["rowmajor"][1]):
        la = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lb = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        assert max(abs(p - q) for p, q in zip(la, lb)) <= 0.1
        for out in (a, b):
            assert len(out.outputs[0].token_ids) == 24
            greedy_up_to_ties(reference, list(out.prompt_token_ids), list(out.outputs[0].token_ids), margin=0.01)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float32])
def test_kmajor_prefetch_rule_changes_no_bits(dtype):
    """Which K-major streams prefetch and where to (``set_kmajor_prefetch``: the CPU's rule, every stream, from 5
    tokens, none; ``set_int8_experts_l2``: the int8 experts into L2 by the rule, from 1 token, never;
    ``set_kmajor_ahead``: the AVX2 forms' later token passes prefetching the next piece, or not) changes only
    timing: packed experts (1, 4, 5, 9 tokens, 2 threads) and K-major linears (the same rows; K = 160: fp32 in two
    chunks of k, int8 spans reaching into the next block) give the same bits under each setting, on every ISA path
    this CPU runs."""
    E, D, H, N = 6, 32, 160, 48
    wu, wd = _experts(E, D, H, seed=3)
    su = sd = None
    w = torch.randn(N, H, generator=torch.Generator().manual_seed(4)) / H**0.5
    ws = rs = None
    if dtype == torch.int8:
        wu, su, wd, sd, w, ws, rs = _int8_weights(wu, wd, w)
    elif dtype == torch.float32:
        wu, wd = wu.float(), wd.float()
    else:
        w = w.bfloat16()
    pu, pd = pack_experts_kmajor(wu, wd)
    pw = pack_kmajor(w)
    xdt = torch.float32 if dtype == torch.float32 else torch.bfloat16
    settings = ((-1, -1, 1), (-1, 1, 1), (-1, 0, 1), (0, -1, 1), (5, -1, 1), (1000, -1, 1), (-1, -1, 0), (0, -1, 0))
    was = cpu_native.set_kmajor_prefetch(-1)
    try:
        for isa, T, x, s, cu in _steps((1, 4, 5, 9), H, E, xdt):
            outs = []
            for setting, l2, ahead in settings:
                cpu_native.set_kmajor_prefetch(setting)
                cpu_native.set_int8_experts_l2(l2)
                cpu_native.set_kmajor_ahead(ahead)
                outs.append((cpu_native.sparse_ffn_native(x, s, pu, pd, cu, num_threads=2, up_scale=su,
                                                          down_scale=sd, isa=isa),
                             cpu_native.linear_kmajor_native(x, pw, isa=isa, weight_scale=ws, row_sums=rs)))
            for y, lin in outs[1:]:
                assert torch.equal(y, outs[0][0]) and torch.equal(lin, outs[0][1]), (dtype, isa, T)
    finally:
        cpu_native.set_kmajor_prefetch(was)
        cpu_native.set_int8_experts_l2(-1)
        cpu_native.set_kmajor_ahead(1)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float32])
def test_kmajor_work_split_changes_no_bits(dtype):
    """The K-major linears' and the packed experts' down pass's work split (``set_work_stealing``: threads taking the
    rest of the others' panels or column blocks, in each mode 0-3, with and without the experts' per-expert flags)
    changes only who computes what: 1-5 threads (more than this CPU's cores, so that threads fall behind and others
    take their work), 1-9 rows and 130 (two sweeps of 128 tokens: a linear's panel is claimed once a sweep) give the
    same bits under each setting, on every ISA path this CPU runs, and every output is computed (the result matches
    the reference; an unclaimed piece would leave torch.empty's garbage)."""
    from vllm_blockffn.kernels.quant import dequantize_experts

    N, K = 208, 640  # 13 blocks of 16 rows: panels of 1, 2 and 4 blocks with a short last one
    E, D = 6, 32  # experts [E, D, K]: the down pass's 40 column blocks, several a claim
    wu, wd = _experts(E, D, K, seed=3)
    su = sd = None
    eu, ed = wu.float(), wd.float()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(5)) / K**0.5
    ws = rs = None
    if dtype == torch.int8:
        wu, su, wd, sd, w, ws, rs = _int8_weights(wu, wd, w)
        eu, ed = dequantize_experts(wu, su, wd, sd)
        dense = w.float() * ws[:, None]
    else:
        if dtype == torch.float32:
            wu, wd = wu.float(), wd.float()
        w = w.to(dtype)
        dense = w.float()
    pu, pd = pack_experts_kmajor(wu, wd)
    pw = pack_kmajor(w)
    xdt = torch.float32 if dtype == torch.float32 else torch.bfloat16
    was = cpu_native.set_work_stealing(cpu_native.WORK_STEALING_ALL)
    try:
        for isa, M, x, s, cu in _steps((1, 4, 9, 130), K, E, xdt):
            ref = x.float() @ dense.T
            outs = []
            for steal, flags in ((0, 1), (1, 1), (2, 1), (3, 1), (3, 0), (0, 0)):
                cpu_native.set_work_stealing(steal)
                cpu_native.set_expert_flags(flags)  # the down pass after each expert's up blocks, or a barrier
                for threads in (1, 2, 3, 5):
                    for _ in range(3 if threads > 2 else 1):
                        outs.append((cpu_native.linear_kmajor_native(x, pw, num_threads=threads, isa=isa,
                                                                     weight_scale=ws, row_sums=rs),
                                     cpu_native.sparse_ffn_native(x, s, pu, pd, cu, num_threads=threads,
                                                                  up_scale=su, down_scale=sd, isa=isa)))
            for lin, y in outs:
                assert torch.equal(lin, outs[0][0]) and torch.equal(y, outs[0][1]), (dtype, isa, M)
            torch.testing.assert_close(outs[0][0].float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
            assert _rel(outs[0][1], experts_naive(x.float(), s, eu, ed)) < 0.02, (dtype, isa, M)
    finally:
        cpu_native.set_work_stealing(was)
        cpu_native.set_expert_flags(True)


@needs_native
def test_kmajor_prefetch_rule_and_switch(monkeypatch):
    """The rule ``check --env`` reports: on AMD's AVX-512 cores bf16 streams in the dot form from 8 tokens, int8
    and bf16 in the widening FMA form (the ``avx512`` path) from 5, every stream elsewhere and on the AVX2 path;
    there the int8 K-major VNNI linears prefetch into L2 from 2 rows (the VPMADDWD ones as the bf16 streams);
    ``set_kmajor_prefetch(n)`` and $VLLM_BLOCKFFN_CPU_PREFETCH override both (into L1 from n rows), and a bad value
    names the variable."""
    amd = "AuthenticAMD" in open("/proc/cpuinfo").read()
    was = cpu_native.set_kmajor_prefetch(-1)
    try:
        wide = cpu_native.isa_at_least("avx512")
        bf16 = 8 if cpu_native.kmajor_dot() else 5
        assert [cpu_native.kmajor_prefetch_tokens(i8) for i8 in (False, True)] == ([bf16, 5] if amd and wide
                                                                                   else [0, 0])
        if wide:
            assert cpu_native.kmajor_prefetch_tokens(False, isa="avx512") == (5 if amd else 0)
        if cpu_native.isa_at_least("avx2"):
            assert cpu_native.kmajor_prefetch_tokens(True, isa="avx2") == 0
        # int8 K-major linears: on the VNNI path into L2 from 2 rows under the AMD rule, else into L1 from the
        # rule's rows (the VPMADDWD kernel of avx2 / avx512 as the bf16 streams of its path: every row on avx2)
        vnni = cpu_native.isa_at_least("avx512_bf16")
        assert [cpu_native.kmajor_i8_linear_prefetch(m) for m in (1, 2, 5, 9)] == (
            ([0] + [2] * 3 if amd else [1] * 4) if vnni else [0, 0, 1, 1] if amd and wide else [1] * 4)
        if cpu_native.isa_at_least("avx2"):
            assert [cpu_native.kmajor_i8_linear_prefetch(m, isa="avx2") for m in (1, 8)] == [1, 1]
        # int8 experts: into L2 from 3 tokens an expert under the AMD rule, into L1 from the rule's tokens else
        i8x = [cpu_native.int8_experts_prefetch(m) for m in (1, 2, 3, 4, 5, 9)]
        assert i8x == ([0, 0, 2, 2, 2, 2] if amd and vnni else [0, 0, 0, 0, 1, 1] if amd and wide else [1] * 6)
        cpu_native.set_int8_experts_l2(2)
        assert cpu_native.int8_experts_prefetch(2) == (2 if vnni else 1 if not (amd and wide) else 0)
        cpu_native.set_int8_experts_l2(-1)
        cpu_native.set_kmajor_prefetch(3)
        assert cpu_native.kmajor_prefetch_tokens(False) == cpu_native.kmajor_prefetch_tokens(True) == 3
        assert [cpu_native.kmajor_i8_linear_prefetch(m) for m in (1, 2, 3, 9)] == [0, 0, 1, 1]
        assert [cpu_native.int8_experts_prefetch(m) for m in (2, 3)] == [0, 1]
    finally:
        cpu_native.set_kmajor_prefetch(was)
        cpu_native.set_int8_experts_l2(-1)
    for raw, want in (("", -1), ("auto", -1), ("ALL", 0), ("6", 6)):
        monkeypatch.setenv(cpu_native.PREFETCH_ENV, raw)
        assert cpu_native.prefetch_env() == want
    for raw in ("0", "-2", "some"):
        monkeypatch.setenv(cpu_native.PREFETCH_ENV, raw)
        with pytest.raises(ValueError, match=cpu_native.PREFETCH_ENV):
            cpu_native.prefetch_env()
