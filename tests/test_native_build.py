"""The native CPU kernel's build never crashes serving: an unwritable cache, a failing compiler, a
stale or foreign shared object → the PyTorch path with one warning line (or a clean rebuild), and
`vllm-blockffn check --env` says which path the machine uses. Each case in a fresh process (the
kernel is loaded once per process)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

PROBE = ("import torch, logging; from vllm_blockffn.kernels.sparse_ffn import cpu_native as c; "
         "from vllm_blockffn.kernels.sparse_ffn.cpu import sparse_ffn_cpu; "
         "x = torch.randn(2, 16); s = torch.rand(2, 4); w = torch.randn(4, 8, 16); "
         "y = sparse_ffn_cpu(x, s, w, w, torch.tensor([0, 2], dtype=torch.int32)); "
         "print('NATIVE', c.native_available(), c.cpu_isa(), tuple(y.shape))")


def run(env: dict, code: str = PROBE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_unwritable_cache_directories_fall_back_with_one_warning(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores modes: a path under a regular file is unwritable for anyone
        (tmp_path / "file").write_text("x")
        ro = tmp_path / "file" / "cache"
    r = run({"VLLM_BLOCKFFN_CACHE_DIR": str(ro), "TMPDIR": str(ro)})
    assert r.returncode == 0, r.stderr[-2000:]
    if "NATIVE True" in r.stdout:  # Python's tempfile found another writable temp dir: built there
        return
    assert "NATIVE False None (2, 16)" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if "native CPU kernel unavailable" in line]
    assert len(warnings) == 1, r.stderr


def test_failing_compiler_falls_back_with_one_warning(tmp_path):
    r = run({"CC": "/bin/false", "VLLM_BLOCKFFN_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and "NATIVE False None (2, 16)" in r.stdout, (r.stdout, r.stderr[-2000:])
    warnings = [line for line in r.stderr.splitlines() if "native CPU kernel unavailable" in line]
    assert len(warnings) == 1 and "/bin/false failed with exit code 1" in warnings[0], r.stderr


def test_stale_or_foreign_shared_object_is_rebuilt(tmp_path):
    env = {"VLLM_BLOCKFFN_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}
    r = run(env)
    assert "NATIVE True" in r.stdout, r.stderr[-2000:]
    (so,) = glob.glob(str(tmp_path / "sparse_ffn_cpu_*.so"))
    with open(so, "wb") as f:  # what a build for another CPU / a torn copy looks like to the loader
        f.write(b"\x7fELF not really a shared object")
    r = run(env)
    assert r.returncode == 0 and "NATIVE True" in r.stdout, r.stderr[-2000:]
    assert open(so, "rb").read(4) == b"\x7fELF" and os.path.getsize(so) > 10000


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_check_env_names_the_path(isa):
    r = subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "check", "--env"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "VLLM_BLOCKFFN_CPU_ISA": isa})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("native CPU kernel"))
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    best = cpu_native.best_isa()
    if best is None:
        assert "unavailable" in line
    else:
        want = isa if cpu_native.ISAS.index(isa) <= cpu_native.ISAS.index(best) else best
        assert f"ISA path {want} " in line and f"widest this CPU runs: {best}" in line, line


@pytest.mark.parametrize("isa,mode", [("avx2", "auto"), ("avx512_bf16", "auto"), ("avx512_bf16", "rowmajor")])
def test_check_env_names_the_linear_layout(isa, mode):
    """Whether the fp32 / bf16 / int8 projections are packed K-major: on the paths of THRESHOLDS.cpu_linear_kmajor_fp32
    / cpu_linear_kmajor / cpu_linear_kmajor_int8, unless VLLM_BLOCKFFN_CPU_LINEAR=rowmajor."""
    from vllm_blockffn.kernels.dispatch import THRESHOLDS
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    if not cpu_native.native_available():
        pytest.skip("no native kernel")
    r = subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "check", "--env"], capture_output=True,
                       text=True, timeout=300,
                       env={**os.environ, "VLLM_BLOCKFFN_CPU_ISA": isa, "VLLM_BLOCKFFN_CPU_LINEAR": mode})
    assert r.returncode == 0, r.stderr
    for dtype, paths in (("fp32", THRESHOLDS.cpu_linear_kmajor_fp32), ("bf16", THRESHOLDS.cpu_linear_kmajor),
                         ("int8", THRESHOLDS.cpu_linear_kmajor_int8)):
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"{dtype} attention projections"))
        packed = mode == "auto" and cpu_native.cpu_isa(isa) in paths
        assert ("packed K-major at load" in line) == packed and ("as loaded (" in line) == (not packed), line
        if dtype == "bf16" and packed:  # which form: the dot form only on AVX512_BF16 paths of CPUs that probe fast
            dot = cpu_native.isa_at_least("avx512_bf16", cpu_native.cpu_isa(isa)) and cpu_native.vdpbf16ps_fast()
            assert ("one VDPBF16PS a line and token" in line) == dot, line
    route = cpu_native.route_path(isa)  # the long-step routes' table entry, and whether bf16 GEMMs run widened
    line = next(x for x in r.stdout.splitlines() if x.startswith("CPU experts:"))
    assert f"entry {route})" in line and ("bf16 experts: bf16 GEMMs" in line) == (route in ("avx512_bf16_dp", "amx"))
    experts = [x for x in r.stdout.splitlines() if x.startswith("bf16 experts as loaded")]
    assert len(experts) == cpu_native.isa_at_least("avx512_bf16", cpu_native.cpu_isa(isa))
    for line in experts:
        assert ("at every size" in line) == cpu_native.vdpbf16ps_fast() != ("split FMA forms" in line), line
    from vllm_blockffn.serving.layers.cpu_experts import kmajor_paths

    for dtype, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):  # cpu_experts.py
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"{dtype} experts:"))
        assert ("packed K-major at load" in line) == (cpu_native.cpu_isa(isa) in kmajor_paths(dt)), line


@pytest.mark.parametrize("ops", ["auto", "python"])
def test_check_env_names_the_ops_implementation(ops):
    """`check --env` says whether the per-layer calls run as C++ torch ops (cpu_ops.py) or in Python."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    if not cpu_native.native_available():
        pytest.skip("no native kernel: no per-layer ops")
    r = subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "check", "--env"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "VLLM_BLOCKFFN_CPU_OPS": ops})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("per-layer calls"))
    has_cxx = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
    assert ("C++ torch ops" in line) == (ops == "auto" and has_cxx), line
    attn = next(x for x in r.stdout.splitlines() if x.startswith("attention:"))
    assert ("one C++ call per layer" in attn) == (ops == "auto" and has_cxx), attn


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_check_env_says_where_weights_live(setting):
    """`check --env` says whether weights go to 2 MiB pages after loading (hugepages.py), as the engine decides."""
    from vllm_blockffn.serving import hugepages

    r = subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "check", "--env"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, hugepages.ENV: setting})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("weights in 2 MiB pages"))
    placed = setting == "auto" and hugepages.thp_mode() not in (None, "never")
    assert line.startswith(f"weights in 2 MiB pages after loading: {'yes' if placed else 'no'} "), line
    assert f"{hugepages.ENV}={setting}" in line
