"""The CPU paths that make a whole decode step read at memory speed (issue 17), against plain PyTorch:
the streaming linear (attention projections, lm_head of BlockFFN models), the dense layer as the
kernel streaming every expert (the honest dense baseline), the grouped-GEMM path for long steps,
and the served engine with the streaming linears installed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import PROMPTS
from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.layout import pack_kmajor, unpack_kmajor
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.cpu import (
    dense_ffn,
    gemm_dtype,
    grouped_min_tokens,
    sparse_ffn_cpu,
    sparse_ffn_grouped,
)
from vllm_blockffn.kernels.sparse_ffn.cpu_ops import WIDEN_ROWS
from vllm_blockffn.kernels.sparse_ffn.naive import experts_reference

from vllm_blockffn.serving.layers.cpu_experts import kmajor_paths

pytestmark = pytest.mark.skipif(not cpu_native.native_available(), reason="native CPU kernel did not build")

BEST = cpu_native.best_isa() or "portable"
PATHS = [isa for isa in cpu_native.ISAS if cpu_native.ISAS.index(isa) <= cpu_native.ISAS.index(BEST)]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": dict(rtol=2e-5, atol=2e-5), "bf16": dict(rtol=2e-2, atol=2e-2)}
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "blockffn-tiny-trained")


@pytest.mark.parametrize("isa", PATHS)
def test_benchmark_probes_measure_each_path(isa):
    """The benchmarks' two ceilings: the read probe returns the tensor's sum (it really reads every element),
    the FMA probe a positive rate that grows with the rounds' work (it is not optimized away: 4x the rounds
    take longer)."""
    buf = torch.arange(1 << 16, dtype=torch.float32) % 7
    assert cpu_native.stream_read(buf, isa=isa) == pytest.approx(float(buf.sum()), rel=1e-6)
    rounds = 20_000 if isa == "portable" else 400_000
    cpu_native.fma_peak(isa=isa, rounds=rounds)  # the threads' start-up out of the timed calls
    t = time.perf_counter()
    rate = cpu_native.fma_peak(isa=isa, rounds=rounds)
    short = time.perf_counter() - t
    t = time.perf_counter()
    cpu_native.fma_peak(isa=isa, rounds=4 * rounds)
    assert 0 < rate < float("inf") and time.perf_counter() - t > 1.5 * short


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_floor_reads_each_calls_bytes_once(isa, threads):
    """The benchmarks' read floor (bench_memory_cpu.py): every byte of every call's ranges read exactly once, whatever
    the ranges' sizes and the threads' split of them (the sum of what it read is the ranges' sum), and a range it
    cannot read is refused by name."""
    g = torch.Generator().manual_seed(threads)
    calls = [[torch.randint(0, 5, (n,), generator=g).float() for n in sizes]
             for sizes in ([1], [17, 1000, 3], [4096, 16, 1, 250], [65, 64, 63])]
    want = sum(float(t.sum()) for ts in calls for t in ts)
    assert cpu_native.read_floor(calls, num_threads=threads, isa=isa)() == pytest.approx(want, rel=1e-6)
    if platform.machine() in ("x86_64", "AMD64"):  # denormals (bf16 / int8 bytes as floats) read as zero, no assists
        assert cpu_native.read_floor([[torch.full((100,), 1e-40)]], num_threads=threads, isa=isa)() == 0.0
    with pytest.raises(ValueError, match="read_floor: a tensor"):
        cpu_native.read_floor([[torch.ones(8, 8).t()]])
    with pytest.raises(ValueError, match="a multiple of 4 bytes"):
        cpu_native.read_floor([[torch.ones(3, dtype=torch.int8)]])


def test_call_timeline_build_splits_a_call():
    """benchmarks/expert_call_cpu.py on the kernel's timeline build (VLLM_BLOCKFFN_CPU_MARKS=1, its own process): every
    row's points are in call order and add up — the router, set-up and fork before the passes, both passes read
    bytes, the fixed part is the call minus the passes — and the served build reads no clock (no timeline)."""
    if os.environ.get(cpu_native.MARKS_ENV, "0") in ("0", ""):
        assert cpu_native.call_marks() is None
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "expert_call_cpu.py")
    r = subprocess.run([sys.executable, script, "--shapes", "Small", "--dtypes", "bf16", "int8", "--steps", "1 tok",
                        "verify 1x4", "--rounds", "1", "--pool-bytes", str(4 << 20)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.strip("| ").split(" | ") for line in r.stdout.splitlines() if line.startswith("| Small |")]
    timed = [row for row in rows if len(row) == 19]
    packed = [dt for dt in (torch.bfloat16, torch.int8) if cpu_native.cpu_isa() in kmajor_paths(dt)]
    assert len(timed) == 2 * len(packed) and len(rows) == 4 - (2 - len(packed)), r.stdout
    for row in timed:
        call, router, setup, fork, up, down, tail, fixed = (
            float(row[i].strip("*")) for i in (5, 8, 10, 11, 12, 14, 16, 17))
        assert 0 < router < call and setup >= 0 and fork >= 0 and tail >= 0, row
        assert up > 0 and down > 0 and float(row[13]) > 0 and float(row[15]) > 0, row
        assert fixed == pytest.approx(call - up - down, abs=0.15), row
        assert router + setup + fork + up + down + tail == pytest.approx(call, abs=0.3), row


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 7, 5), (3, 37, 129), (8, 300, 256), (5, 1030, 1792), (9, 64, 48),
                                   (6, 20, 600), (7, 33, 1100)])  # token groups 4+2, 4+2+1; chunk tails
def test_streaming_linear_equals_torch(isa, dtype, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DT[dtype])
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DT[dtype])
    y = cpu_native.linear_native(x, w, isa=isa, num_threads=2)
    assert y.dtype == x.dtype and y.shape == (M, N)
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), **TOL[dtype])


def test_streaming_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bad arguments"):
        cpu_native.linear_native(torch.randn(2, 0), torch.randn(3, 0))
    with pytest.raises(ValueError, match=r"x \[2, 19\] and weight \[3, 20\]; expected x \[M, 20\]"):
        cpu_native.linear_native(torch.randn(2, 19), torch.randn(3, 20))
    with pytest.raises(ValueError, match=r"weight torch.float16 \[3, 4\]; expected a 2-D"):
        cpu_native.linear_native(torch.randn(2, 4), torch.randn(3, 4).half())
    w = torch.randn(2, 3, 16)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x \[1, 8\] for experts \[E, D, H\] = \[2, 3, 16\]; expected x \[T, 16\]"):
        cpu_native.sparse_ffn_native(torch.randn(1, 8), torch.ones(1, 2), w, w, cu)
    with pytest.raises(ValueError, match=r"w_down_t \[2, 3, 8\]; expected both \[E, D, H\]"):
        cpu_native.sparse_ffn_native(torch.randn(1, 16), torch.ones(1, 2), w, w[..., :8], cu)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 16, 2), (3, 48, 130), (8, 64, 96), (9, 272, 256), (17, 32, 1792),
                                   (64, 80, 64), (300, 48, 40)])
# one 16-row block, panels of 2 and 4 blocks with tails, token passes 8 + 1, sweeps of 128 tokens
def test_kmajor_linear_paths_agree_bit_for_bit(dtype, M, N, K):
    """The outer-product linear on K-major bf16 weights (layout.pack_kmajor): every path this CPU runs gives the
    same bits, the dot form (one VDPBF16PS a line, AVX512_BF16) as the split FMA form, close to the fp64 product;
    with bf16 x each output is exactly the sequential fp32 chain over k = 1, 0, 3, 2, ... (bf16 x bf16 products
    are exact in fp32, so an FMA step is one fp32 addition), rounded to bf16 once."""
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DT[dtype])
    w = (torch.randn(N, K, generator=g) / K**0.5).bfloat16()
    packed = pack_kmajor(w)
    assert packed.shape == (N // 16, K // 2, 16, 2) and torch.equal(unpack_kmajor(packed), w)
    ys = {}
    was = cpu_native.set_kmajor_dot(0)
    try:
        for mode in (0, 1):  # the dot form only runs for bf16 x on AVX512_BF16 paths; elsewhere both are the split
            cpu_native.set_kmajor_dot(mode)
            for isa in PATHS:
                ys[isa, mode] = cpu_native.linear_kmajor_native(x, packed, isa=isa, num_threads=2)
    finally:
        cpu_native.set_kmajor_dot(was)
    for key, y in ys.items():
        assert y.dtype == x.dtype and y.shape == (M, N)
        assert torch.equal(y, ys["portable", 0]), key
    torch.testing.assert_close(ys["portable", 0].double(), x.double() @ w.double().t(), **TOL[dtype])
    if dtype == "bf16":
        prods = (x.float()[:, None, :] * w.float()[None, :, :]).numpy()  # exact
        acc = np.zeros((M, N), dtype=np.float32)
        for k in range(0, K, 2):
            acc = (acc + prods[:, :, k + 1]).astype(np.float32)
            acc = (acc + prods[:, :, k]).astype(np.float32)
        assert torch.equal(torch.from_numpy(acc).bfloat16(), ys["portable", 0])


@pytest.mark.parametrize("xdt", ["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 16, 1), (1, 112, 37), (2, 48, 130), (3, 64, 96), (4, 80, 33), (5, 272, 256),
                                   (9, 32, 1792), (300, 48, 40)])
# 1 token over 4 + 2 + 1 blocks side by side, 2 tokens over 2 + 1, 3-4 tokens a block at a time, passes of 4 tokens
# with tails, one-block panels from 5 rows, sweeps of 128 tokens; any K
def test_kmajor_fp32_linear_paths_agree_bit_for_bit(xdt, M, N, K):
    """The outer-product linear on K-major fp32 weights (layout.pack_kmajor [N / 16, K, 16, 1], the fp32 linears
    on AVX2): every output one FMA chain over k in order on every path (the portable form through fmaf), so every
    path this CPU runs gives the same bits, close to the fp64 product."""
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DT[xdt])
    w = torch.randn(N, K, generator=g) / K**0.5
    packed = pack_kmajor(w)
    assert packed.shape == (N // 16, K, 16, 1) and torch.equal(unpack_kmajor(packed), w)
    ys = {isa: cpu_native.linear_kmajor_native(x, packed, isa=isa, num_threads=2) for isa in PATHS}
    for isa, y in ys.items():
        assert y.dtype == x.dtype and y.shape == (M, N)
        assert torch.equal(y, ys["portable"]), isa
    torch.testing.assert_close(ys["portable"].double(), x.double() @ w.double().t(), **TOL[xdt])
    one = cpu_native.linear_kmajor_native(x, packed, num_threads=1)
    assert torch.equal(one, ys["portable"])  # the threads' split changes no sum


@pytest.mark.skipif(not cpu_native.isa_at_least("avx512_bf16", BEST), reason="the dot form needs AVX512_BF16")
def test_kmajor_dot_form_is_chosen_and_forced():
    """The dot form's switch: -1 asks the CPU (a probe, once: the same answer every call), 1 / 0 force it; the
    setter returns the mode it replaced; forcing changes the path taken (the dot form never widens x: with a
    subnormal product it flushes to zero where the split form keeps it, which shows which form ran) but not the
    bits of normal inputs (the test above)."""
    was = cpu_native.set_kmajor_dot(1)
    try:
        assert was == -1
        assert cpu_native.kmajor_dot() and not cpu_native.kmajor_dot("avx512")
        x = torch.zeros(1, 2, dtype=torch.bfloat16)
        x[0, 0] = 2.0**-65
        w = torch.zeros(16, 2, dtype=torch.bfloat16)
        w[:, 0] = 2.0**-65  # the product 2^-130: subnormal in fp32 and bf16, exact in both
        packed = pack_kmajor(w)
        assert torch.count_nonzero(cpu_native.linear_kmajor_native(x.float(), packed)) == 16  # fp32 x: split
        assert torch.count_nonzero(cpu_native.linear_kmajor_native(x, packed)) == 0  # flushed: the dot form ran
        assert cpu_native.set_kmajor_dot(0) == 1 and not cpu_native.kmajor_dot()
        y = cpu_native.linear_kmajor_native(x, packed)
        assert torch.count_nonzero(y) == 16 and float(y[0, 0]) > 0  # the split form keeps it
        cpu_native.set_kmajor_dot(-1)
        assert cpu_native.kmajor_dot() == cpu_native.kmajor_dot()
    finally:
        cpu_native.set_kmajor_dot(was)


def test_kmajor_linear_rejects_bad_input():
    with pytest.raises(ValueError, match=r"pack_kmajor: weight torch.bfloat16 \[20, 4\]; expected .*multiple of 16"):
        pack_kmajor(torch.zeros(20, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"pack_kmajor: weight torch.float16 \[16, 4\]"):
        pack_kmajor(torch.zeros(16, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"packed weight torch.float32 \[2, 4, 16, 2\]; expected a contiguous "
                                         r"torch.float32 \[N / 16, K, 16, 1\]"):
        cpu_native.linear_kmajor_native(torch.zeros(2, 4), torch.zeros(2, 4, 16, 2))
    packed = pack_kmajor(torch.zeros(32, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x torch.float32 \[2, 6\]; expected fp32/bf16 \[M, 8\] for the packed "
                                         r"weight \[32, 8\]"):
        cpu_native.linear_kmajor_native(torch.zeros(2, 6), packed)
    with pytest.raises(ValueError, match=r"packed weight torch.float32 \[2, 4, 16, 2\]; expected a contiguous"):
        cpu_native.linear_kmajor_native(torch.zeros(2, 8), packed.float())
    with pytest.raises(ValueError, match=r"unpack_kmajor: packed torch.float32 \[32, 8\]"):
        unpack_kmajor(torch.zeros(32, 8))


@pytest.mark.parametrize("isa", PATHS)
def test_kmajor_op_equals_the_kernel_or_its_widened_route(isa, monkeypatch):
    """torch.ops.blockffn_native.linear_kmajor (C++ where it builds) is the kernel call, the same bits, at every M,
    but bf16 x from the path's THRESHOLDS.cpu_linear_kmajor_widen_min_tokens (avx2: 128 rows): there oneDNN's fp32
    GEMMs on blocks unpacked and widened from the packed weight, the same bits as widened_linear on the row-major
    weight (two whole blocks of rows and a part); its Python implementation agrees."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(2 * cpu_ops.WIDEN_ROWS + 48, 64, generator=g) / 8).bfloat16()
    packed = pack_kmajor(w)
    wide = cpu_ops.kmajor_widen_from(isa)
    seen = set()
    for M in sorted({1, 8, 9, 300, *((wide - 1, wide) if wide <= 300 else ())}):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(M, 64, generator=g).to(dt)
            widened = dt == torch.bfloat16 and M > THRESHOLDS.cpu_linear_max_tokens and M >= wide
            assert cpu_ops.kmajor_widened_rows(M, dt) == widened, (M, dt)
            seen.add(widened)
            y = cpu_ops.linear_kmajor(x, packed)
            want = cpu_ops.widened_linear(x, w) if widened else cpu_native.linear_kmajor_native(x, packed)
            assert y.dtype == dt and torch.equal(y, want), (isa, M, dt)
            assert torch.equal(y, cpu_ops.linear_kmajor_python(x, packed)), (isa, M, dt)
            ref = x.float() @ w.float().t()
            assert float((y.float() - ref).norm() / ref.norm()) < (1e-5 if dt == torch.float32 else 8e-3), (isa, M, dt)
    assert (True in seen) == (wide <= 300), (isa, wide, seen)
    with pytest.raises(ValueError, match="linear_kmajor"):
        cpu_ops.linear_kmajor(torch.zeros(2, 63), packed)


@pytest.mark.parametrize("isa", PATHS)
def test_kmajor_fp32_op_runs_the_kernel_at_every_m(isa, monkeypatch):
    """linear_kmajor on an fp32 weight packed K-major: the kernel call at every M (past decode sizes too, where the
    row-major fp32 linear leaves for F.linear: the K-major kernel outran oneDNN there), the same bits; its Python
    implementation agrees."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(2 * cpu_ops.WIDEN_ROWS + 48, 64, generator=g) / 8
    packed = pack_kmajor(w)
    for M in (1, 4, 8, 9, 65, 300):
        x = torch.randn(M, 64, generator=g)
        assert not cpu_ops.kmajor_widened_rows(M, torch.float32, torch.float32)
        y = cpu_ops.linear_kmajor(x, packed)
        assert y.dtype == torch.float32 and torch.equal(y, cpu_native.linear_kmajor_native(x, packed)), (isa, M)
        assert torch.equal(y, cpu_ops.linear_kmajor_python(x, packed)), (isa, M)
        ref = x.double() @ w.double().t()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-6, (isa, M)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dense_layer_streams_every_expert(isa, dtype, monkeypatch):
    """dense_ffn at decode sizes is the kernel over all experts: the dense result, inactive and NaN
    scores weighted by exactly 0."""
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    T, E, D, H = THRESHOLDS.cpu_linear_max_tokens, 12, 21, 72
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g).to(DT[dtype])
    s = torch.relu(torch.randn(T, E, generator=g))
    s[0, 3] = float("nan")
    s[1, 4] = -2.0
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(DT[dtype])
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(DT[dtype])
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    torch.testing.assert_close(dense_ffn(x, s, w_up, w_down_t).float(), ref, **TOL[dtype])
    torch.testing.assert_close(dense_ffn(x[:1], s[:1], w_up, w_down_t).float(), ref[:1], **TOL[dtype])


@pytest.mark.skipif("avx512_bf16" not in PATHS, reason="the CPU has no AVX512_BF16")
@pytest.mark.parametrize("H,lengths", [(128, [1, 2]), (1792, [4]), (96, [1, 1, 1, 1, 1, 3]), (80, [2, 1]), (32, [9]),
                                       (1792, [8]), (96, [6, 6]), (80, [7])])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_down_pass_on_row_pairs(H, lengths, threads):
    """The bf16 down pass on AVX512_BF16 CPUs (VDPBF16PS on row pairs, y kept in a 32-column block order,
    h rounded to bf16 as a bf16 model carries it) equals the widening pass and the reference, NaN x rows
    included; H % 32 != 0 (80) takes the widening pass. With ~half the experts on for each token, 8 or more
    tokens give the experts >= 3 tokens each on average and groups of 3-4: the split FMA forms (bs_up, and
    bs_down with y in the even/odd column order), a masked tail on H = 80, several 32-column blocks on 1792."""
    T, E, D = sum(lengths), 9, 13  # D % 4 != 0: the last unit has one row (its pair partner reads zeros)
    g = torch.Generator().manual_seed(H + T)
    x = torch.randn(T, H, generator=g).bfloat16()
    x[T - 1, 5] = float("nan")
    s = torch.relu(torch.randn(T, E, generator=g))
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).bfloat16()
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).bfloat16()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    ys = {}
    was = cpu_native.set_split_tokens(-1)  # the default: by the CPU (3 tokens, or never where VDPBF16PS is fast)
    try:
        for on in (False, True):
            cpu_native.set_pairdown(on)
            ys[on] = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads,
                                                  isa="avx512_bf16").float()  # (AMX CPUs: tiles otherwise)
        for n, name in ((0, "no split"), (1, "split at every size")):  # VDPBF16PS at every size / never
            cpu_native.set_split_tokens(n)
            ys[name] = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads,
                                                    isa="avx512_bf16").float()
    finally:
        cpu_native.set_pairdown(True)
        assert cpu_native.set_split_tokens(was) == 1
    assert was == -1
    for y in ys.values():
        assert torch.equal(y.isnan(), ref.isnan()) and y[T - 1].isnan().any() == bool((s[T - 1] > 0).any())
        ok = ~ref.isnan()
        torch.testing.assert_close(y[ok], ref[ok], **TOL["bf16"])
    torch.testing.assert_close(ys[True][ok], ys[False][ok], **TOL["bf16"])
    for name in ("no split", "split at every size"):  # (their sums, in another order)
        torch.testing.assert_close(ys[True][ok], ys[name][ok], **TOL["bf16"])
    # the switch does change the path where it applies (h rounded to bf16 moves some outputs), not elsewhere
    assert torch.equal(ys[True][ok], ys[False][ok]) == (H % 32 != 0)



@pytest.mark.parametrize("isa", [p for p in PATHS if p in ("avx512", "avx512_bf16")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("H,lengths", [(1792, [13]), (96, [5, 3, 6]), (80, [1] * 9)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_down_pass_group_major_over_a_span(isa, dtype, H, lengths, threads):
    """Experts with more than 4 tokens on the AVX-512 units take the down pass a token group at a time over a
    thread's span of units (tokens 0-3 through every unit, then 4-7, ...): every token's output equals the
    reference — a group skipped or added twice would be off by whole expert terms — and, bit for bit, the same call
    with each unit taking all its groups at once (``set_group_major(False)``). Every token on the same 3 of
    7 experts (13 tokens: groups 4 + 4 + 4 + 1), D % 4 != 0 (the last unit has one row), one to three threads
    (spans cut inside an expert), H = 80 (masked tails, the widening down pass) and 1792."""
    T, E, D = sum(lengths), 7, 13
    g = torch.Generator().manual_seed(H + T + threads)
    x = torch.randn(T, H, generator=g).to(DT[dtype])
    s = torch.zeros(T, E)
    s[:, [1, 4, 6]] = torch.rand(T, 3, generator=g) + 0.1
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(DT[dtype])
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(DT[dtype])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    y = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads, isa=isa).float()
    torch.testing.assert_close(y, ref, **TOL[dtype])
    try:  # the same sums in the same order as every unit taking all its groups at once
        cpu_native.set_group_major(False)
        y_units = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads, isa=isa).float()
    finally:
        cpu_native.set_group_major(True)
    assert torch.equal(y, y_units)
    was = cpu_native.set_prefetch(0)
    assert was == -1  # the default: by the units' size (2 blocks ahead for these small ones, else 1)
    try:  # the prefetch (off, or 1-3 blocks ahead, split over a unit's token groups) never changes a result
        for blocks in (0, 1, 2, 3):
            cpu_native.set_prefetch(blocks)
            y_pf = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads, isa=isa).float()
            assert torch.equal(y, y_pf), blocks
    finally:
        cpu_native.set_prefetch(was)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("H,T", [(1792, 3), (1800, 5), (96, 1)])
def test_threads_reduce_their_shares_of_the_output(isa, dtype, H, T):
    """The threads' partial outputs are summed by every thread over its share of 32-element blocks (fp32: into
    thread 0's output, bf16: rounded and, on the paired bf16 down pass, put back in column order): with 2 and 3
    threads every element equals the reference, on T x H not a multiple of 32 (1800 x 5) and padding rows (0)."""
    E, D = 12, 24
    g = torch.Generator().manual_seed(H * T)
    x = torch.randn(T + 2, H, generator=g).to(DT[dtype])
    s = torch.relu(torch.randn(T + 2, E, generator=g))
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(DT[dtype])
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(DT[dtype])
    cu = torch.tensor([0, T], dtype=torch.int32)  # two padding rows past the last sequence
    ref = experts_reference(x[:T].float(), s[:T], w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    for threads in (2, 3):
        runs = [cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads, isa=isa)
                for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        torch.testing.assert_close(runs[0][:T].float(), ref, **TOL[dtype])
        assert (runs[0][T:] == 0).all()
        was = cpu_native.set_unit_floor(0)
        try:  # the work split without its floor (set_unit_floor(0)): other shares, the same outputs
            y0 = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, num_threads=threads, isa=isa)
        finally:
            cpu_native.set_unit_floor(was)
        torch.testing.assert_close(y0[:T].float(), ref, **TOL[dtype])
        assert (y0[T:] == 0).all()


def assert_route_close(y: torch.Tensor, ref: torch.Tensor, dtype: str, gemms: bool) -> None:
    """y of a CPU route against the fp32 reference: within TOL, or for bf16 GEMMs (``gemms`` and
    :func:`gemm_dtype` bf16: AMX, route_path ``avx512_bf16_dp``), which round each expert's h and output to bf16,
    within 2^-7 of the largest output."""
    if gemms and gemm_dtype(DT[dtype]) == torch.bfloat16:
        assert (y.float() - ref).abs().max() <= 2**-7 * ref.abs().max()
    else:
        torch.testing.assert_close(y.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_long_steps_run_grouped_gemms_per_expert(dtype):
    """From the path's grouped_min_tokens the auto CPU path gathers each expert's tokens into one GEMM pair
    (bit for bit sparse_ffn_grouped); padding tokens (past cu[-1]) get 0, and the counters are still added. bf16
    GEMMs (AMX, route_path avx512_bf16_dp) round each expert's output to bf16: within 2^-7 of the largest output."""
    import numpy as np

    T, E, D, H = grouped_min_tokens(torch.empty(0, dtype=DT[dtype])) + 40, 16, 24, 64
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=g).to(DT[dtype])
    s = torch.relu(torch.randn(T, E, generator=g)) * (torch.rand(T, E, generator=g) < 0.2)
    s[7] = float("nan")
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(DT[dtype])
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(DT[dtype])
    cu = torch.tensor([0, 50, T - 10], dtype=torch.int32)
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    ref[T - 10:] = 0
    stats = np.zeros(5, dtype=np.int64)
    y = sparse_ffn_cpu(x, s, w_up, w_down_t, cu, allow_dense=True, stats=stats)
    assert_route_close(y, ref, dtype, gemms=True)
    assert torch.equal(y, sparse_ffn_grouped(x, s, w_up, w_down_t, cu))
    assert stats[0] == T - 10 and stats[1] == int((s[: T - 10] > 0).sum())


@pytest.mark.parametrize("isa", [p for p in PATHS if p != "portable"])
def test_long_steps_take_each_paths_measured_route(isa, monkeypatch):
    """Each path keeps fp32 and bf16 steps on the kernel below its cpu_grouped_min_tokens_by_path entry and takes
    the grouped GEMMs from there, bit for bit each route's result (bf16 ones in fp32 GEMMs on CPUs without AMX:
    within fp32 rounding of the fp32 reference); both routes equal the reference."""
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    # the floor sparse_ffn_cpu checks before looking the path up may not hide any path's entry
    assert all(THRESHOLDS.cpu_grouped_min_tokens <= n for e in THRESHOLDS.cpu_grouped_min_tokens_by_path.values()
               for n in e)
    E, D, H = 16, 24, 64
    g = torch.Generator().manual_seed(12)
    for dtype, lim in zip(("fp32", "bf16"), THRESHOLDS.cpu_grouped_min_tokens_by_path[cpu_native.route_path()]):
        for T in (max(THRESHOLDS.cpu_grouped_min_tokens, lim - 40), lim + 40):
            s = torch.relu(torch.randn(T, E, generator=g)) * (torch.rand(T, E, generator=g) < 0.2)
            cu = torch.tensor([0, 60, T], dtype=torch.int32)
            x = torch.randn(T, H, generator=g).to(DT[dtype])
            w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(DT[dtype])
            w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(DT[dtype])
            y = sparse_ffn_cpu(x, s, w_up, w_down_t, cu, allow_dense=True)
            ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
            kernel = T < lim
            assert_route_close(y, ref, dtype, gemms=not kernel)
            other = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu) if kernel else \
                sparse_ffn_grouped(x, s, w_up, w_down_t, cu)
            assert torch.equal(y, other), (dtype, T)


@pytest.mark.parametrize("isa", [p for p in PATHS if p in ("avx2", "avx512", "avx512_bf16")])
def test_dense_bf16_gemm_dtype_by_path(isa, monkeypatch):
    """The dense layer (the `dense` backend, and `auto` on too-dense steps) of bf16 experts on the paths of CPUs
    without AMX runs fp32 GEMMs over blocks of widened experts (no oneDNN bf16 GEMM on AVX2, where torch's fallback
    was ~7x slower; half the fp32 rate with AVX512_BF16 on the Xeon): h stays fp32, so it is within fp32
    accumulation order of the fp32 reference rounded to bf16 once, closer than the bf16 GEMMs' result (h rounded
    to bf16); the blocks split the experts with a tail. Except where VDPBF16PS is as fast as an FMA (route_path
    ``avx512_bf16_dp``, AMD Zen 4: oneDNN's bf16 GEMM at twice its fp32 rate): there the bf16 GEMMs' result, bit
    for bit."""
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    assert (gemm_dtype(torch.bfloat16) == torch.bfloat16) == (cpu_native.route_path() == "avx512_bf16_dp")
    D, H = 48, 64
    E = 2 * (WIDEN_ROWS // D) + 3  # two full blocks of experts and a tail
    g = torch.Generator().manual_seed(21)
    T = 40
    x = torch.randn(T, H, generator=g).bfloat16()
    s = (torch.relu(torch.randn(T, E, generator=g)) * (torch.rand(T, E, generator=g) < 0.3)).bfloat16()
    s[3, 5] = float("nan")  # inactive, as everywhere
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).bfloat16()
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).bfloat16()
    y = dense_ffn(x, s, w_up, w_down_t)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    ref = experts_reference(x.float(), s.float(), w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    err = (y.float() - ref).norm() / ref.norm()
    h_t = torch.nn.functional.silu(w_up.reshape(E * D, H) @ x.t())  # the bf16 GEMMs' route
    h_t.view(E, D, T).mul_(torch.nan_to_num(s, nan=0.0).t().unsqueeze(1))
    y16 = h_t.t() @ w_down_t.reshape(E * D, H)
    if gemm_dtype(torch.bfloat16) == torch.bfloat16:
        assert torch.equal(y, y16)
        assert_route_close(y, ref, "bf16", gemms=True)
    else:
        torch.testing.assert_close(y.float(), ref.bfloat16().float(), rtol=2**-7, atol=1e-5)
        assert err < (y16.float() - ref).norm() / ref.norm()


@pytest.mark.slow
def test_engine_serves_with_streaming_linears(engine_factory, monkeypatch):
    """bf16 engine on the bundled model: every attention projection, router and the lm_head use the
    streaming method (weights kept, no oneDNN copy; on the paths of THRESHOLDS.cpu_linear_kmajor the projections
    and lm_head packed K-major, the routers never: the expert kernel reads them [E, H]), and greedy tokens equal
    vLLM's own CPU GEMMs."""
    engine = engine_factory(MODEL, dtype="bfloat16")

    def methods(model):
        from vllm_blockffn.serving.layers.cpu_linear import StreamingLinearMethod, StreamingLMHeadMethod

        out = {"streaming": 0, "other": 0, "kmajor": 0}
        for name, m in model.named_modules():
            qm = getattr(m, "quant_method", None)
            if isinstance(qm, (StreamingLinearMethod, StreamingLMHeadMethod)):
                packed = getattr(m, "blockffn_kmajor", False)
                assert m.weight.numel() > 0 and m.weight.dim() == (4 if packed else 2)
                assert getattr(m, "cpu_linear", None).__name__ == ("_cpu_linear_kmajor" if packed else "_cpu_linear")
                assert not (packed and "router" in name), name
                out["streaming"] += 1
                out["kmajor"] += packed
            elif qm is not None and type(qm).__name__.startswith("Unquantized"):
                out["other"] += 1
        return out

    counts = engine.llm.apply_model(methods)[0]
    assert counts["streaming"] >= 13, counts  # 4 layers × (qkv, o, router) + lm_head
    assert counts["kmajor"] == (9 if cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor else 0), counts
    got = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, max_tokens=24)]
    engine.close()
    monkeypatch.setenv("VLLM_BLOCKFFN_CPU_LINEAR", "vllm")
    stock = engine_factory(MODEL, dtype="bfloat16")
    assert stock.llm.apply_model(methods)[0]["streaming"] == 0
    want = [list(o.outputs[0].token_ids) for o in stock.greedy(PROMPTS, max_tokens=24)]
    same = sum(a == b for a, b in zip(got, want))
    assert same >= len(PROMPTS) - 1, (got, want)  # bf16 rounding may flip one near-tie
