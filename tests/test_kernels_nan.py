"""Garbage in, no crash out: the CPU expert kernels on NaN / Inf / negative / denormal / huge
router scores and NaN / Inf activations, every ISA path this machine runs, fp32 and bf16,
T from 1 to 8192 (issue: vLLM's memory-profiling pass fed NaN scores to the native kernel,
which was built with -ffast-math and wrote past its token lists: SIGSEGV in `vllm serve`).

The contract (kernels/sparse_ffn/naive.py): a pair is active iff score > 0; NaN, zero,
negative and -Inf scores contribute exactly 0. Tokens whose inputs are all finite must match
the reference exactly as clean inputs do; the others only must not crash or touch memory
outside the buffers (the AddressSanitizer test checks that on a sanitizer build)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vllm_blockffn.kernels.sparse_ffn import cpu_native
from vllm_blockffn.kernels.sparse_ffn.cpu import dense_ffn, sparse_ffn_cpu, sparse_ffn_cpu_torch
from vllm_blockffn.kernels.sparse_ffn.naive import active_scores, experts_reference, sparse_ffn_naive

pytestmark = pytest.mark.skipif(not cpu_native.native_available(), reason="native CPU kernel did not build")

BEST = cpu_native.best_isa() or "portable"
PATHS = [isa for isa in cpu_native.ISAS if cpu_native.ISAS.index(isa) <= cpu_native.ISAS.index(BEST)]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": dict(rtol=1e-4, atol=1e-4), "bf16": dict(rtol=3e-2, atol=3e-2)}


def garbage_case(T: int, E: int, D: int, H: int, dtype: torch.dtype, seed: int = 0):
    """Scores with every kind of bad value, x with NaN/Inf rows; returns the 'clean' token mask
    (tokens whose scores and x are finite and of ordinary size)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.relu(torch.randn(T, E, generator=g)) * (torch.rand(T, E, generator=g) < 0.3)
    kinds = torch.randint(0, 9, (T, E), generator=g)
    pick = torch.rand(T, E, generator=g) < 0.04
    bad = {0: float("nan"), 1: -float("nan"), 2: float("-inf"), 3: -1.5, 4: 1e-42, 5: -0.0, 6: float("inf"),
           7: 3e38, 8: 1e-39}
    for k, v in bad.items():
        s[pick & (kinds == k)] = v
    if T >= 4:  # whole rows of NaN (what a NaN router input gives) and of negatives
        s[1] = float("nan")
        s[2] = -1.0
    x = torch.randn(T, H, generator=g)
    x_bad = torch.rand(T, generator=g) < 0.05
    x[x_bad, 0] = float("nan")
    x[x_bad & (torch.rand(T, generator=g) < 0.5), 1] = float("inf")
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(dtype)
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(dtype)
    clean = ~x_bad & ~(s == float("inf")).any(1) & ~(s > 1e30).any(1)
    return x.to(dtype), s, w_up, w_down_t, clean


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3, 64, 1000, 8192])
def test_native_kernel_survives_garbage_and_keeps_clean_tokens_exact(isa, dtype, T):
    E, D, H = (48, 21, 256) if T <= 1000 else (16, 8, 64)
    x, s, w_up, w_down_t, clean = garbage_case(T, E, D, H, DT[dtype], seed=T)
    cu = torch.tensor([0, T // 3, T], dtype=torch.int32) if T > 1 else torch.tensor([0, 1], dtype=torch.int32)
    y = cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu, isa=isa, num_threads=2)
    assert y.shape == (T, H) and y.dtype == x.dtype
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    assert clean.sum() > 0.3 * T or T < 4
    torch.testing.assert_close(y.float()[clean], ref[clean], **TOL[dtype])
    # a row of NaN or negative scores activates nothing: exactly zero output
    if T >= 4:
        assert torch.equal(y[1:3].float(), torch.zeros(2, H))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_cpu_path_agrees_on_nan_scores(dtype):
    """NaN scores mean 'inactive' in the native kernel, the PyTorch sparse path, dense and naive."""
    T, E, D, H = 12, 16, 8, 40
    x, s, w_up, w_down_t, _ = garbage_case(T, E, D, H, DT[dtype], seed=3)
    x = torch.randn(T, H).to(DT[dtype])  # finite x; scores keep NaN / negatives / -Inf
    s[s > 1e30] = 2.0
    s[s == float("inf")] = 1.0
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    ref = experts_reference(x.float(), s, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    outs = {
        "native": cpu_native.sparse_ffn_native(x, s, w_up, w_down_t, cu),
        "torch": sparse_ffn_cpu_torch(x, s, w_up, w_down_t, cu, allow_dense=False),
        "dense": dense_ffn(x, s, w_up, w_down_t),
        "naive": sparse_ffn_naive(x, s, w_up, w_down_t, cu),
    }
    for name, y in outs.items():
        assert torch.isfinite(y.float()).all(), name
        torch.testing.assert_close(y.float(), ref, **TOL[dtype], msg=name)
    assert torch.equal(active_scores(s) > 0, s > 0) and not active_scores(s).isnan().any()


def test_isa_switch_forces_a_narrower_path(monkeypatch):
    monkeypatch.setenv(cpu_native.ISA_ENV, "portable")
    assert cpu_native.cpu_isa() == "portable"
    monkeypatch.setenv(cpu_native.ISA_ENV, "avx512_bf16")  # narrower than amx, where the CPU has it
    assert cpu_native.cpu_isa() == ("avx512_bf16" if cpu_native.ISAS.index(BEST) >= 3 else BEST)
    monkeypatch.setenv(cpu_native.ISA_ENV, "amx")
    assert cpu_native.cpu_isa() == BEST or cpu_native.ISAS.index(BEST) < 4  # never wider than the CPU
    monkeypatch.setenv(cpu_native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="VLLM_BLOCKFFN_CPU_ISA='sse9'"):
        cpu_native.cpu_isa()
    # the switch reaches the kernel through the public entry point (same result, other path)
    x, s, w_up, w_down_t, clean = garbage_case(8, 8, 8, 24, torch.float32, seed=1)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    monkeypatch.setenv(cpu_native.ISA_ENV, "portable")
    a = sparse_ffn_cpu(x, s, w_up, w_down_t, cu, allow_dense=False)
    monkeypatch.setenv(cpu_native.ISA_ENV, "auto")
    b = sparse_ffn_cpu(x, s, w_up, w_down_t, cu, allow_dense=False)
    torch.testing.assert_close(a[clean], b[clean], rtol=1e-5, atol=1e-5)


def test_address_sanitizer_build_on_every_path(tmp_path):
    """A sanitizer build of the kernel (VLLM_BLOCKFFN_CPU_SANITIZE=1) runs the garbage cases of
    every path in a child process with libasan preloaded: any out-of-bounds access aborts it."""
    libasan = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("no libasan for this compiler")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kernels_nan import garbage_case, PATHS
        from vllm_blockffn.kernels.sparse_ffn import cpu_native
        assert cpu_native.native_available()
        for isa in PATHS:
            for dt in (torch.float32, torch.bfloat16):
                for T in (1, 7, 300, 2048):
                    x, s, wu, wd, _ = garbage_case(T, 24, 13, 40, dt, seed=T)
                    cu = torch.tensor([0, T // 2, T, T], dtype=torch.int32)
                    for nth in (1, 2):
                        cpu_native.sparse_ffn_native(x, s, wu, wd, cu, isa=isa, num_threads=nth)
        print("ASAN-CLEAN")
    """)
    env = dict(os.environ, VLLM_BLOCKFFN_CPU_SANITIZE="1", VLLM_BLOCKFFN_CACHE_DIR=str(tmp_path),
               LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "ASAN-CLEAN" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])
