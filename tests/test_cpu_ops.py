"""``torch.ops.blockffn_native`` (kernels/sparse_ffn/cpu_ops.py): the decode-size linears as torch ops in
C++, against their Python implementation (bit for bit: same rules, same kernel) and plain PyTorch, on
every ISA path this CPU runs; its errors; the Python implementation in a served engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, greedy_in_fresh_process
from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.quant import dequantize_rows, quantize_rows
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops

pytestmark = pytest.mark.skipif(not cpu_native.native_available(), reason="native CPU kernel did not build")

BEST = cpu_native.best_isa() or "portable"
PATHS = [isa for isa in cpu_native.ISAS if cpu_native.ISAS.index(isa) <= cpu_native.ISAS.index(BEST)]
HAS_CXX = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "blockffn-tiny-trained")
ROWS = sorted({1, 4, THRESHOLDS.cpu_linear_max_tokens, THRESHOLDS.cpu_linear_max_tokens + 1,
               THRESHOLDS.cpu_linear_max_tokens_amx, THRESHOLDS.cpu_linear_max_tokens_amx + 1, 70})


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.skipif(not HAS_CXX or os.environ.get(cpu_ops.OPS_ENV, "auto") != "auto", reason="no C++ compiler")
def test_the_cpp_ops_build_here():
    assert cpu_ops.implementation() == "cpp"


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_equals_its_python_implementation_and_torch(isa, dtype, monkeypatch):
    """Every size rule (native kernel up to cpu_linear_max_tokens, bf16 on AMX up to ..._amx, oneDNN
    above): the C++ op takes the same route as the Python one, so the same bits."""
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


def test_a_bad_ops_switch_is_named():
    code = "from vllm_blockffn.kernels.sparse_ffn import cpu_ops; cpu_ops.implementation()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, cpu_ops.OPS_ENV: "fortran"})
    assert r.returncode != 0 and "VLLM_BLOCKFFN_CPU_OPS='fortran'; expected 'auto' or 'python'" in r.stderr


@pytest.mark.slow
def test_engine_with_the_python_ops_gives_the_same_tokens():
    """The served bf16 model with the Python implementation of the ops (VLLM_BLOCKFFN_CPU_OPS=python, as on
    machines without a C++ compiler) and with the C++ one: the same greedy tokens."""
    kw = dict(max_tokens=12, dtype="bfloat16")
    cpp = greedy_in_fresh_process(MODEL, PROMPTS[:3], **kw)
    py = greedy_in_fresh_process(MODEL, PROMPTS[:3], env={cpu_ops.OPS_ENV: "python"}, **kw)
    assert [list(o.outputs[0].token_ids) for o in cpp] == [list(o.outputs[0].token_ids) for o in py]
