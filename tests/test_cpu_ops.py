"""``torch.ops.blockffn_native`` (kernels/sparse_ffn/cpu_ops.py): the decode-size linears as torch ops in
C++, against their Python implementation (bit for bit: same rules, same kernel) and plain PyTorch, on
every ISA path this CPU runs; its errors; the Python implementation in a served engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, greedy_in_fresh_process
from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.quant import dequantize_rows, quantize_experts, quantize_rows
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops

pytestmark = pytest.mark.skipif(not cpu_native.native_available(), reason="native CPU kernel did not build")

BEST = cpu_native.best_isa() or "portable"
PATHS = [isa for isa in cpu_native.ISAS if cpu_native.ISAS.index(isa) <= cpu_native.ISAS.index(BEST)]
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "blockffn-tiny-trained")
ROWS = sorted({1, 4, THRESHOLDS.cpu_linear_max_tokens, THRESHOLDS.cpu_linear_max_tokens + 1,
               *[m for rule in THRESHOLDS.cpu_linear_rows.values() for n in rule for m in (n, n + 1) if n < 200]})


@pytest.fixture(autouse=True, scope="module")
def _registered_ops() -> None:
    """torch.ops.blockffn_native exists once registered: tests calling it directly work run alone too."""
    cpu_ops.implementation()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.skipif(not HAS_CXX or os.environ.get(cpu_ops.OPS_ENV, "auto") != "auto", reason="no C++ compiler")
def test_the_cpp_ops_build_here():
    assert cpu_ops.implementation() == "cpp"


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_equals_its_python_implementation_and_torch(isa, dtype, monkeypatch):
    """Every size rule (native kernel up to cpu_linear_max_tokens, then each path's cpu_linear_rows: the kernel,
    oneDNN or widened fp32 GEMMs): the C++ op takes the same route as the Python one, so the same bits."""
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(300, 192, generator=g) / 14).to(dtype)
    for m in ROWS:
        x = torch.randn(m, 192, generator=g).to(dtype)
        y = cpu_ops.linear(x, w)
        assert y.dtype == dtype and y.shape == (m, 300)
        assert torch.equal(y, cpu_ops.linear_python(x, w)), (isa, dtype, m)
        assert _rel(y, x.float() @ w.float().t()) < (1e-5 if dtype == torch.float32 else 8e-3), (isa, dtype, m)
    xt = torch.randn(192, 3, generator=g).to(dtype).t()  # non-unit column stride: made contiguous
    assert torch.equal(cpu_ops.linear(xt, w), cpu_ops.linear_python(xt.contiguous(), w))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_int8_linear_op_equals_its_python_implementation_and_the_dequantized_reference(isa, xdt, monkeypatch):
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    g = torch.Generator().manual_seed(8)
    q, s = quantize_rows(torch.randn(96, 256, generator=g))
    sums = cpu_native.int8_row_sums(q)
    ref_w = dequantize_rows(q, s)
    for m in (1, 8, 9, 40):
        x = torch.randn(m, 256, generator=g).to(xdt)
        y = cpu_ops.int8_linear(x, q, s, sums)
        assert torch.equal(y, cpu_ops.int8_linear_python(x, q, s, sums)), (isa, xdt, m)
        assert _rel(y, x.float() @ ref_w.t()) < 2e-2, (isa, xdt, m)


def test_ops_name_what_is_wrong(monkeypatch):
    if cpu_ops.implementation() != "cpp":
        pytest.skip("the C++ ops' messages (the Python implementation's are cpu_native's)")
    w = torch.randn(3, 20)
    with pytest.raises(ValueError, match=r"x \[2, 19\] and weight \[3, 20\]; expected x \[M, 20\]"):
        cpu_ops.linear(torch.randn(2, 19), w)
    q, s = quantize_rows(torch.randn(6, 64))
    sums = cpu_native.int8_row_sums(q)
    with pytest.raises(ValueError, match=r"weight_scale: expected contiguous torch.float32 \[6\]"):
        cpu_ops.int8_linear(torch.randn(1, 64), q, s.double(), sums)
    with pytest.raises(ValueError, match=r"row_sums: expected contiguous torch.int32 \[6\]"):
        cpu_ops.int8_linear(torch.randn(1, 64), q, s, sums[:5])
    monkeypatch.setenv(cpu_native.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="VLLM_BLOCKFFN_CPU_ISA"):
        cpu_ops.linear(torch.randn(1, 20), w)


def _layer(dtype: str, E: int = 16, D: int = 24, H: int = 64, seed: int = 0):
    """x-independent weights of one layer: router, norm, experts (int8: + scales and W_up's row sums)."""
    g = torch.Generator().manual_seed(seed)
    xdt = torch.float32 if dtype == "fp32" else torch.bfloat16
    w_r = (torch.randn(E, H, generator=g) / H**0.5).to(xdt)
    norm_w = (1 + 0.1 * torch.randn(E, generator=g)).to(xdt)
    w_up, w_down_t = torch.randn(E, D, H, generator=g) / H**0.5, torch.randn(E, D, H, generator=g) / D**0.5
    if dtype == "int8":
        qu, su, qd, sd = quantize_experts(w_up, w_down_t)
        return xdt, w_r, norm_w, qu, qd, (su, sd, cpu_native.int8_row_sums(qu))
    return xdt, w_r, norm_w, w_up.to(xdt), w_down_t.to(xdt), (None, None, None)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_router_experts_op_equals_the_bound_python_route(dtype):
    """Decode sizes: the C++ op's one kernel call is NativeExperts.with_router's, bit for bit, counters
    included; the layout is used only when written for this many tokens (else one segment, no counters)."""
    xdt, w_r, norm_w, w_up, w_down_t, (su, sd, rs) = _layer(dtype)
    bound = cpu_native.bound_experts(w_up, w_down_t, su, sd)
    for lengths in ([1], [1, 1, 1, 1], [4], [4, 3, 1]):
        T = sum(lengths)
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T)).to(xdt)
        layout = torch.zeros(8, dtype=torch.int32)
        layout[:2] = torch.tensor([T, len(lengths)])
        layout[2:3 + len(lengths)] = cu
        got, want = torch.zeros(5, dtype=torch.int64), np.zeros(5, dtype=np.int64)
        y = torch.ops.blockffn_native.router_experts(x, w_r, norm_w, 1e-5, w_up, w_down_t, layout, got, su, sd, rs,
                                                     "auto", 0, 1, True)
        ref = bound.with_router(x, w_r, norm_w, 1e-5, cu, want)
        assert torch.equal(y, ref), (dtype, lengths)
        assert got.tolist() == want.tolist() and want[2] == len(lengths), (dtype, lengths)
        layout[0] = T + 1  # written for another step: one segment, no counters
        y1 = torch.ops.blockffn_native.router_experts(x, w_r, norm_w, 1e-5, w_up, w_down_t, layout, got, su, sd, rs,
                                                      "auto", 0, 1, True)
        assert torch.equal(y1, bound.with_router(x, w_r, norm_w, 1e-5, cu[[0, -1]])) and got.tolist() == want.tolist()


def test_router_experts_op_hands_long_steps_to_the_python_op():
    import vllm_blockffn.serving.layers.blockffn  # noqa: F401  (registers vllm::blockffn_router_experts)

    xdt, w_r, norm_w, w_up, w_down_t, _ = _layer("bf16")
    T = THRESHOLDS.cpu_linear_max_tokens + 5
    x = torch.randn(T, 64).to(xdt)
    layout = torch.tensor([T, 1, 0, T], dtype=torch.int32)
    y = torch.ops.blockffn_native.router_experts(x, w_r, norm_w, 1e-5, w_up, w_down_t, layout, None, None, None, None,
                                                 "auto", 0, 1, False)
    ref = torch.ops.vllm.blockffn_router_experts(x, w_r, norm_w, 1e-5, w_up, w_down_t, "auto", 0, 1, False)
    assert torch.equal(y, ref)


def test_router_experts_op_names_what_is_wrong():
    if cpu_ops.implementation() != "cpp":
        pytest.skip("the C++ op's messages")
    xdt, w_r, norm_w, w_up, w_down_t, _ = _layer("bf16")
    x, layout = torch.randn(1, 64).to(xdt), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w_router BFloat16 \[16, 63\], norm_w \[16\]; expected BFloat16 \[16, 64\]"):
        torch.ops.blockffn_native.router_experts(x, w_r[:, :63], norm_w, 1e-5, w_up, w_down_t, layout, None, None, None,
                                                 None, "auto", 0, 1, False)
    _, w_r, norm_w, qu, qd, (su, sd, rs) = _layer("int8")
    with pytest.raises(ValueError, match=r"int8 experts: expected contiguous up_scale float32 \[16, 24\]"):
        torch.ops.blockffn_native.router_experts(x, w_r, norm_w, 1e-5, qu, qd, layout, None, su, sd, None, "auto", 0, 1,
                                                 False)
    with pytest.raises(ValueError, match=r"segments: Long"):
        torch.ops.blockffn_native.router_experts(x, w_r, norm_w, 1e-5, qu, qd, layout.long(), None, su, sd, rs, "auto",
                                                 0, 1, False)


def test_a_bad_ops_switch_is_named():
    code = "from vllm_blockffn.kernels.sparse_ffn import cpu_ops; cpu_ops.implementation()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, cpu_ops.OPS_ENV: "fortran"})
    assert r.returncode != 0 and "VLLM_BLOCKFFN_CPU_OPS='fortran'; expected 'auto' or 'python'" in r.stderr


def test_a_failing_cxx_build_falls_back_to_the_python_ops_with_one_warning(tmp_path):
    code = ("import logging; logging.basicConfig(); from vllm_blockffn.kernels.sparse_ffn import cpu_ops; "
            "import torch; print('IMPL', cpu_ops.implementation()); "
            "print('Y', cpu_ops.linear(torch.ones(1, 4), torch.ones(3, 4)).tolist())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CXX": "false", "VLLM_BLOCKFFN_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "IMPL python" in r.stdout and "Y [[4.0, 4.0, 4.0]]" in r.stdout
    assert r.stderr.count("C++ CPU ops unavailable") == 1, r.stderr


@pytest.mark.slow
def test_engine_with_the_python_ops_gives_the_same_tokens():
    """The served bf16 and int8 model with the Python implementation of the ops (VLLM_BLOCKFFN_CPU_OPS=python,
    as on machines without a C++ compiler) and with the C++ one, requests batched: the same greedy tokens."""
    for quant in ({}, {"quantization": "blockffn_int8"}):
        kw = dict(max_tokens=12, dtype="bfloat16", **quant)
        cpp = greedy_in_fresh_process(MODEL, PROMPTS[:4], **kw)
        py = greedy_in_fresh_process(MODEL, PROMPTS[:4], env={cpu_ops.OPS_ENV: "python"}, **kw)
        assert [list(o.outputs[0].token_ids) for o in cpp] == [list(o.outputs[0].token_ids) for o in py], kw


@pytest.mark.parametrize("isa", PATHS)
def test_linears_take_each_paths_measured_route(isa, monkeypatch):
    """Past decode sizes each path has its measured rule (THRESHOLDS.cpu_linear_rows): the kernel up to the dtype's
    entry (it beats oneDNN there: fp32 on avx2 up to 64 rows, bf16 on AMX up to 32), bf16 on oneDNN's fp32 GEMM
    over widened weight blocks from the third entry (CPUs without AMX: no oneDNN bf16 GEMM on AVX2, half its fp32
    rate with AVX512_BF16), F.linear elsewhere. The op's result is its route's, bit for bit, and the C++ op and
    its Python implementation agree."""
    monkeypatch.setenv(cpu_native.ISA_ENV, isa)
    g = torch.Generator().manual_seed(11)
    top = THRESHOLDS.cpu_linear_max_tokens
    fp32, bf16, wide = THRESHOLDS.cpu_linear_rows[cpu_native.route_path()]  # (avx512_bf16: its _dp entry on Zen 4)
    n = 2 * cpu_ops.WIDEN_ROWS + 77  # two whole blocks of widened rows and a part
    seen = set()
    for dtype, lim in ((torch.float32, fp32), (torch.bfloat16, bf16)):
        edges = {top, top + 1, lim, lim + 1, *((wide - 1, wide) if dtype == torch.bfloat16 else ())}
        for m in sorted(e for e in edges if 0 < e <= 160):
            route = "kernel" if m <= max(top, lim) else \
                "widened" if dtype == torch.bfloat16 and m >= wide else "torch"
            seen.add(route)
            assert cpu_ops.native_rows(m, dtype) == (route == "kernel"), (dtype, m)
            assert cpu_ops.widened_rows(m, dtype) == (route == "widened"), (dtype, m)
            w = (torch.randn(n, 200, generator=g) / 14).to(dtype)
            x = torch.randn(m, 200, generator=g).to(dtype)
            y = cpu_ops.linear(x, w)
            want = {"kernel": cpu_native.linear_native, "widened": cpu_ops.widened_linear, "torch": F.linear}[route]
            assert torch.equal(y, want(x, w)), (dtype, m)
            assert torch.equal(y, cpu_ops.linear_python(x, w)), (dtype, m)
            assert _rel(y, x.float() @ w.float().t()) < (1e-5 if dtype == torch.float32 else 8e-3), (dtype, m)
    assert seen >= {"kernel", "torch"} and ("widened" in seen) == (wide <= 160), seen
    xb, wb = torch.randn(64, 200, generator=g).bfloat16(), w.bfloat16()  # fp32 sums, one bf16 rounding
    torch.testing.assert_close(cpu_ops.widened_linear(xb, wb).float(), xb.float() @ wb.float().t(), rtol=2**-8,
                               atol=1e-6)
