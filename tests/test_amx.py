"""The AMX path (kernel ISA ``amx``): linears and expert units on AMX tiles against the references and the
AVX512_BF16 path beside it (forced with the ISA switch). Skipped where the CPU (or the OS) has no AMX."""

from __future__ import annotations

import pytest
import torch
from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.quant import dequantize_experts, quantize_experts, quantize_rows
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.naive import experts_reference

pytestmark = pytest.mark.skipif(not cpu_native.native_available() or cpu_native.best_isa() != "amx",
                                reason="no AMX (amx-tile/bf16/int8 and the OS's tile state) on this CPU")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("N,K", [(64, 1792), (70, 1856), (37, 100), (33, 64), (20, 40)])
def test_amx_linears_equal_the_reference_and_int8_equals_the_vnni_path_bit_for_bit(N, K):
    """bf16: fp32 sums of exact products (rows past the last 16-row block and k past the last 32 on the
    GEMV). int8: the same exact integers as the VPDPBUSD path, so the same floats; 1-2 rows read super rows
    of two weight rows per A tile row (K a multiple of 64), rows past the last 32 on the GEMV."""
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g) / K**0.5
    wb = w.bfloat16()
    q, s = quantize_rows(w)
    for M in (1, 2, 3, 5, 8, 9, 17, 40):
        xf = torch.randn(M, K, generator=g)
        x = xf.bfloat16()
        ref = x.float() @ wb.float().t()
        n0 = cpu_native.amx_calls()
        y = cpu_native.linear_native(x, wb, isa="amx")
        assert _rel(y, ref) < 4e-3, (M, "bf16")
        assert cpu_native.amx_calls() == n0 + (K >= 32), (M, "bf16 on the tiles")
        for xin in (x, xf):
            a = cpu_native.linear_native(xin, q, isa="amx", weight_scale=s)
            b = cpu_native.linear_native(xin, q, isa="avx512_bf16", weight_scale=s)
            assert torch.equal(a, b), (M, xin.dtype)


def test_amx_int8_linear_is_exact_at_the_extremes():
    """All weights ±127 of one sign and x all positive: the largest int32 tile sums, still exact."""
    g = torch.Generator().manual_seed(7)
    for N, K in [(16, 20000), (17, 64 * 3 + 5), (33, 64 * 313)]:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        q[0], q[1] = 127, -127
        s = torch.rand(N, generator=g) + 0.5
        for M in (1, 3):  # 1 row: super rows where K is a multiple of 64
            x = torch.randn(M, K, generator=g)
            x[0] = x[0].abs() + 1.0
            y = cpu_native.linear_native(x, q, isa="amx", weight_scale=s)
            xs = x.abs().amax(-1) / 32767
            exact = (torch.round(x / xs[:, None]).double() @ q.double().t()).float()
            assert torch.equal(y, exact * xs[:, None] * s[None, :]), (N, K, M)


@pytest.mark.parametrize("E,D,H", [(6, 149, 256), (5, 33, 128), (3, 600, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_expert_units_match_the_reference(E, D, H, threads):
    """From cpu_amx_min_tokens tokens per active expert bf16 experts run AMX units (16-row tiles, row tails,
    several token groups, spans longer than 512 rows): equal to the reference within the AVX512_BF16
    path's tolerance (the tiles ran: the kernel's AMX call counter moved); below it, the AVX512_BF16 units,
    bit for bit. int8 experts run the VNNI units on either path, bit for bit."""
    g = torch.Generator().manual_seed(E * D)
    wu, wd = torch.randn(E, D, H, generator=g) / H**0.5, torch.randn(E, D, H, generator=g) / D**0.5
    qu, su, qd, sd = quantize_experts(wu, wd)
    du, dd = dequantize_experts(qu, su, qd, sd)
    wub, wdb = wu.bfloat16(), wd.bfloat16()
    for T in (6, 15, 16, 23, 40):
        s = torch.rand(T, E, generator=g) * (torch.rand(T, E, generator=g) < 0.5)
        s[0, 0] = float("nan")
        x = torch.randn(T, H, generator=g).bfloat16()
        cu = torch.tensor([0, 7, T], dtype=torch.int32)
        kw = dict(num_threads=threads, allow_dense=False)
        act = s > 0
        amx = int(act.sum()) >= THRESHOLDS.cpu_amx_min_tokens * int(act.any(0).sum())  # tokens per active expert
        n0 = cpu_native.amx_calls()
        y = cpu_native.sparse_ffn_native(x, s, wub, wdb, cu, isa="amx", **kw)
        assert cpu_native.amx_calls() == n0 + amx, T
        z = cpu_native.sparse_ffn_native(x, s, wub, wdb, cu, isa="avx512_bf16", **kw)
        ref = experts_reference(x.float(), s, wub.float(), wdb.float().transpose(1, 2), "block")
        assert _rel(y, ref) < 1e-2 and _rel(z, ref) < 1e-2, T
        if not amx:
            assert torch.equal(y, z), T
        yi = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, isa="amx", up_scale=su, down_scale=sd, **kw)
        zi = cpu_native.sparse_ffn_native(x, s, qu, qd, cu, isa="avx512_bf16", up_scale=su, down_scale=sd, **kw)
        assert cpu_native.amx_calls() == n0 + amx, T
        assert torch.equal(yi, zi), T  # int8 experts: the VNNI units on AMX CPUs too
        ref_i = experts_reference(x.float(), s, du, dd.transpose(1, 2), "block")
        assert _rel(yi, ref_i) < 1e-2, T


def test_linears_of_up_to_32_rows_take_the_native_kernel_on_amx(monkeypatch):
    """The CPU linear method's size rule: on AMX the native kernel up to its cpu_linear_rows entry for bf16 (its
    tiles beat oneDNN there), a narrower path's entry there (no tiles); both equal F.linear (the C++ op and its
    Python implementation alike)."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    w = (torch.randn(96, 256) / 16).bfloat16()
    for isa in ("amx", "avx512_bf16"):
        monkeypatch.setenv(cpu_native.ISA_ENV, isa)
        top32, top, _ = THRESHOLDS.cpu_linear_rows[cpu_native.route_path()]
        assert cpu_ops.native_rows(top, torch.bfloat16) and not cpu_ops.native_rows(top + 1, torch.bfloat16)
        assert cpu_ops.native_rows(top32, torch.float32) and not cpu_ops.native_rows(top32 + 1, torch.float32)
        for m in (top, top + 1):
            x = torch.randn(m, 256).bfloat16()
            for op in (cpu_ops.linear, cpu_ops.linear_python):
                n0 = cpu_native.amx_calls()
                y = op(x, w)
                assert cpu_native.amx_calls() == n0 + (isa == "amx" and m <= top), (isa, m, op)
                assert _rel(y, torch.nn.functional.linear(x, w)) < 1e-2, (isa, m, op)


def test_decode_sizes_take_the_tiles_by_default():
    """The default rules (kernels/dispatch.py: cpu_amx_min_rows = cpu_amx_min_tokens = 1, measured faster
    at every decode size once the tile paths stopped prefetching in software): a 1-row linear and a 1-token
    expert step run on the tiles, bf16 and int8 linears alike, and equal the reference."""
    assert THRESHOLDS.cpu_amx_min_rows == 1 and THRESHOLDS.cpu_amx_min_tokens == 1
    g = torch.Generator().manual_seed(3)
    E, D, H = 8, 40, 256
    w = torch.randn(96, H, generator=g) / H**0.5
    q, s = quantize_rows(w)
    x = torch.randn(1, H, generator=g).bfloat16()
    for weight, kw, ref in ((w.bfloat16(), {}, x.float() @ w.bfloat16().float().t()),
                            (q, {"weight_scale": s}, x.float() @ (q.float() * s[:, None]).t())):
        n0 = cpu_native.amx_calls()
        y = cpu_native.linear_native(x, weight, **kw)
        assert cpu_native.amx_calls() == n0 + 1, weight.dtype
        assert _rel(y, ref) < 1e-2, weight.dtype
    wu = (torch.randn(E, D, H, generator=g) / H**0.5).bfloat16()
    wd = (torch.randn(E, D, H, generator=g) / D**0.5).bfloat16()
    sc = torch.zeros(1, E)
    sc[0, [1, 5]] = torch.tensor([0.7, 1.3])
    cu = torch.tensor([0, 1], dtype=torch.int32)
    n0 = cpu_native.amx_calls()
    y = cpu_native.sparse_ffn_native(x, sc, wu, wd, cu)
    assert cpu_native.amx_calls() == n0 + 1
    ref = experts_reference(x.float(), sc, wu.float(), wd.float().transpose(1, 2), "block")
    assert _rel(y, ref) < 1e-2
