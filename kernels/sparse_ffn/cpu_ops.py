"""``torch.ops.blockffn_native``: the per-layer CPU calls of a BlockFFN decode step as torch ops in C++.

Why: an XLarge-sized decode step calls ~70 linears (attention projections, lm_head) and 35 router +
expert kernels. Through Python custom ops each call costs ~20 µs (linears) to ~80 µs (experts: the
forward context, the counters, the bound weights, a ctypes call of 27 arguments) beyond the kernel, run
with the caches the weight stream has just flushed; in C++ (``cpu_ops.cpp``) a call is the dispatcher,
one allocation and the C call (benchmarks/RESULTS.md).

What: ``linear(x [M, K], weight [N, K]) -> y [M, N]`` in x's dtype, fp32/bf16 weights (x of the same
dtype): the native streaming kernel for :func:`native_rows`, :func:`widened_linear` for :func:`widened_rows`
(bf16 on CPUs without AMX), else ``F.linear`` (oneDNN).
``linear_kmajor(x [M, K], packed) -> y [M, N]``: bf16 weights packed K-major at load (``layout.pack_kmajor``
[N / 16, K / 2, 16, 2]; serving/layers/cpu_linear.py packs them on the paths of ``THRESHOLDS.cpu_linear_kmajor``),
fp32/bf16 x: the kernel's outer-product linear at every M (:func:`linear_kmajor_python` says why), but bf16 x from
:func:`kmajor_widened_rows` (avx2) :func:`widened_linear_kmajor`; fp32 weights ([N / 16, K, 16, 1], the paths of
``THRESHOLDS.cpu_linear_kmajor_fp32``) the kernel at every M.
``int8_linear(x, weight, weight_scale, row_sums)``: int8 weights with fp32 per-row scales [N] and their
int32 row sums (:func:`cpu_native.int8_row_sums`, made once at load): the native kernel at every M for fp32
and bf16 x, on every path; torch's weight-only int8 GEMM with the scales applied to its output for other x.
``int8_linear_kmajor(x, packed, weight_scale, row_sums)``: the same for int8 weights packed K-major at load
([N / 16, K / 4, 16, 4]; serving/layers/quantization.py packs them on the paths of
``THRESHOLDS.cpu_linear_kmajor_int8``), fp32/bf16 x: the kernel's outer-product int8 linear at every M.
``router_experts(x, w_router, norm_w, eps, w_up, w_down_t, segments, stats, up_scale, down_scale,
up_row_sums, backend, layer_id, expert_bytes, record)``: the layer's ReLU + RMS-norm router and sparse
experts in one kernel call for decode-size steps, the step's request layout read from ``segments``
(written once per step by the model, ``vllm::blockffn_publish_segments``), the counters added to
``stats``; longer steps go to the Python op ``vllm::blockffn_router_experts``.
``attention(query, key, value, output, step, layer)`` (C++ only): a layer's KV cache update and
attention with vLLM's own CPU kernels, the step's metadata published once per step
(vllm_blockffn/serving/layers/cpu_attention.py, where it is installed and why); without the C++ build
the layers keep vLLM's attention ops.

How: ``cpu_ops.cpp`` is compiled on first use with the C++ compiler against the installed torch (cached
like the kernel, ~7 s once) and loaded with ``torch.ops.load_library``; it gets the kernel's entry
points and the size rules (kernels/dispatch.py) once. Where it cannot be built (no C++ compiler, no
torch headers, no native kernel) or with ``VLLM_BLOCKFFN_CPU_OPS=python``, the same op is registered with
the Python implementation below (same rules, same kernel calls, so the same results bit for bit).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sysconfig
import threading

import torch
import torch.nn.functional as F

from ..dispatch import NEVER, THRESHOLDS
from ..layout import KMAJOR_ROWS, unpack_kmajor
from . import cpu_native

logger = logging.getLogger(__name__)

OPS_ENV = "VLLM_BLOCKFFN_CPU_OPS"
"""auto (default: the C++ op where it builds) | python (the Python implementation of the same op)."""
_SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_ops.cpp")
_lock = threading.Lock()
_impl: str | None = None  # "cpp" | "python" once registered
_keep: list = []  # the Python registration and the loaded library, kept alive


def native_rows(m: int, dtype: torch.dtype) -> bool:
    """Whether an m-row linear of float ``dtype`` runs the native kernel: decode sizes (≤ ``cpu_linear_max_tokens``)
    on every path, past them up to the path's ``cpu_linear_rows`` entry for the dtype (measured per path:
    dispatch.py). The ISA is looked up only past decode sizes."""
    if m <= THRESHOLDS.cpu_linear_max_tokens:
        return True
    fp32, bf16, _ = THRESHOLDS.cpu_linear_rows[cpu_native.route_path()]
    return m <= (bf16 if dtype == torch.bfloat16 else fp32)


def widened_rows(m: int, dtype: torch.dtype) -> bool:
    """Whether an m-row bf16 linear runs :func:`widened_linear`: from the path's ``cpu_linear_rows`` entry, where
    oneDNN's fp32 GEMM on widened weights outruns both the kernel and oneDNN's bf16 GEMM (no bf16 GEMM on
    AVX2; half the fp32 rate with AVX512_BF16 and no AMX on the Xeon; never where route_path is avx512_bf16_dp)."""
    return (dtype == torch.bfloat16 and m > THRESHOLDS.cpu_linear_max_tokens
            and m >= THRESHOLDS.cpu_linear_rows[cpu_native.route_path()][2])


def kmajor_widen_from(isa: str) -> int:
    """The rows from which a bf16 linear packed K-major with bf16 x runs :func:`widened_linear_kmajor` on kernel path
    ``isa`` (``THRESHOLDS.cpu_linear_kmajor_widen_min_tokens`` by its route entry; NEVER where it has none)."""
    return THRESHOLDS.cpu_linear_kmajor_widen_min_tokens.get(cpu_native.route_key(isa), NEVER)


def kmajor_widened_rows(m: int, dtype: torch.dtype, weight_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether an m-row linear packed K-major with x of ``dtype`` runs :func:`widened_linear_kmajor`: bf16 x past
    decode sizes, from the rows of :func:`kmajor_widen_from` for the path calls run with (avx2: no oneDNN bf16 GEMM,
    whose fp32 GEMM on widened blocks outruns the kernel from 128 rows there). Never for an fp32 weight: on AVX2 the
    K-major fp32 kernel outran oneDNN's fp32 GEMM at every size measured ([5376, 1792], warm: 64 / 128 / 256 / 512 /
    1024 rows 7.6 / 13.5 / 28.1 / 54.2 / 110 ms against 11.5 / 18.9 / 36.5 / 60.1 / 116; RESULTS.md 2026-12-07
    09:15 UTC)."""
    return (weight_dtype != torch.float32 and dtype == torch.bfloat16 and m > THRESHOLDS.cpu_linear_max_tokens
            and m >= kmajor_widen_from(cpu_native.cpu_isa() or "portable"))


WIDEN_ROWS = 512
"""Weight rows widened per fp32 GEMM in :func:`widened_linear` (3.5 MB of fp32 at K = 1792: cache-sized, never a
whole fp32 copy of the weight); the C++ op uses the same."""


def widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for bf16 x and W through oneDNN's fp32 GEMM, ``WIDEN_ROWS`` weight rows at a time widened to fp32:
    bf16 products are exact in fp32 and accumulate in fp32, as in the kernel; y rounded to bf16 once."""
    xf = x.float()
    y = x.new_empty((x.shape[0], weight.shape[0]))
    for n0 in range(0, weight.shape[0], WIDEN_ROWS):
        y[:, n0 : n0 + WIDEN_ROWS] = F.linear(xf, weight[n0 : n0 + WIDEN_ROWS].float())
    return y


def widened_linear_kmajor(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """:func:`widened_linear` on a bf16 weight packed K-major (``layout.pack_kmajor``), ``WIDEN_ROWS`` rows unpacked
    and widened at a time: the same fp32 weights, so the same bits (the C++ op unpacks natively; this mirror is
    slower, not different)."""
    xf = x.float()
    y = x.new_empty((x.shape[0], packed.shape[0] * KMAJOR_ROWS))
    blocks = WIDEN_ROWS // KMAJOR_ROWS
    for b0 in range(0, packed.shape[0], blocks):
        n0 = b0 * KMAJOR_ROWS
        w = unpack_kmajor(packed[b0 : b0 + blocks]).float()
        y[:, n0 : n0 + w.shape[0]] = F.linear(xf, w)
    return y


def linear_python(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear`` in Python: the native kernel for :func:`native_rows`, :func:`widened_linear` for
    :func:`widened_rows`, else ``F.linear``."""
    if x.dim() == 2 and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16) \
            and cpu_native.native_available():
        if native_rows(x.shape[0], x.dtype):
            return cpu_native.linear_native(x, weight)
        if widened_rows(x.shape[0], x.dtype):
            return widened_linear(x, weight)
    return F.linear(x, weight)


def linear_kmajor_python(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``linear_kmajor`` in Python: the kernel's outer-product linear at every M. Why every M: on the Xeon without
    AMX it ran [5376, 1792] bf16 at 197 GFLOP/s (8 rows, cold) to 271-288 (64-128 rows, warm), beating the row-dot
    kernel (1.4x at 8 rows) and oneDNN's fp32 GEMM on widened weights up to 512 rows (0.96x at 1024;
    RESULTS.md 2026-12-04 19:28 UTC). Except bf16 x from :func:`kmajor_widened_rows` (avx2)."""
    if x.dim() == 2 and kmajor_widened_rows(x.shape[0], x.dtype, packed.dtype):
        return widened_linear_kmajor(x, packed)
    return cpu_native.linear_kmajor_native(x, packed)


def int8_linear_kmajor_python(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                              row_sums: torch.Tensor) -> torch.Tensor:
    """``int8_linear_kmajor`` in Python: the kernel's outer-product int8 linear at every M (int8 weights packed
    K-major at load on the integer paths of ``THRESHOLDS.cpu_linear_kmajor_int8``: the row-major int8 linear's
    integers; on the VNNI path 1.06-1.13x faster at 1 row, 1.2-1.4x at 4-8, cold, RESULTS.md 2026-12-04 22:32 UTC;
    on AVX2 level at 1 row, 1.4-1.5x at 4-8, RESULTS.md 2026-12-07 02:49 UTC)."""
    return cpu_native.linear_kmajor_native(x, packed, weight_scale=weight_scale, row_sums=row_sums)


def int8_linear_python(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       row_sums: torch.Tensor) -> torch.Tensor:
    """``int8_linear`` in Python (``row_sums`` unused: the bound linear makes its own): the kernel at every M
    (torch's ``_weight_int8pack_mm``, the fallback for other x dtypes, was 25-32x slower with fp32 x and ~1.4x
    with bf16 x from 9 to 256 rows on the AMD EPYC; RESULTS.md 2026-12-04 07:01 UTC)."""
    if x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and cpu_native.native_available():
        return cpu_native.linear_native(x, weight, weight_scale=weight_scale)
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, torch.ones(weight.shape[0], dtype=x.dtype))
    return (y.float() * weight_scale).to(x.dtype)


def router_experts_python(x: torch.Tensor, w_router: torch.Tensor, norm_w: torch.Tensor, eps: float,
                          w_up: torch.Tensor, w_down_t: torch.Tensor, segments: torch.Tensor,
                          stats: torch.Tensor | None, up_scale: torch.Tensor | None, down_scale: torch.Tensor | None,
                          up_row_sums: torch.Tensor | None, backend: str, layer_id: int, expert_bytes: int,
                          record: bool) -> torch.Tensor:
    """``router_experts`` in Python: the serving layer's Python op (``vllm::blockffn_router_experts``,
    vllm_blockffn/serving/layers/blockffn.py), which reads the step's layout from vLLM's forward context
    itself (the same layout ``segments`` holds) and binds its own row sums."""
    return torch.ops.vllm.blockffn_router_experts(x, w_router, norm_w, eps, w_up, w_down_t, backend, layer_id,
                                                  expert_bytes, record, up_scale, down_scale)


def _linear_fake(x: torch.Tensor, weight: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _kmajor_fake(x: torch.Tensor, packed: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0] * packed.shape[2]))


def _router_experts_fake(x: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(x)


def _attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                    step: torch.Tensor, layer: int) -> None:
    return None


def _cxx_flags() -> list[str]:
    root = os.path.dirname(torch.__file__)
    inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # torch's version in the flags, so in the build's cache key: a torch upgraded in place builds anew
    return ["-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DBLOCKFFN_TORCH_VERSION=\"{torch.__version__}\"", f"-I{inc}",
            f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}", f"-I{sysconfig.get_paths()['include']}",
            f"-L{lib}", f"-Wl,-rpath,{lib}"]


def _open_cpp(path: str) -> str | None:
    """Load the built op library and bind it to the kernel; None if it is not a usable build."""
    kernel = cpu_native._load()
    try:
        torch.ops.load_library(path)
        so = ctypes.CDLL(path)
        rows = (ctypes.c_long * (3 * len(cpu_native.ISAS)))(  # by the kernel's ISA codes, each slot its route entry
            *[n for isa in cpu_native.ISAS for n in THRESHOLDS.cpu_linear_rows[cpu_native.route_key(isa)]])
        so.blockffn_ops_bind.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                         ctypes.POINTER(ctypes.c_long), ctypes.c_long]
        so.blockffn_ops_bind(ctypes.cast(kernel.blockffn_linear, ctypes.c_void_p),
                             ctypes.cast(kernel.blockffn_resolve_isa, ctypes.c_void_p), cpu_native.threads(),
                             THRESHOLDS.cpu_linear_max_tokens, rows, WIDEN_ROWS)
        widen = (ctypes.c_long * len(cpu_native.ISAS))(*[kmajor_widen_from(isa) for isa in cpu_native.ISAS])
        so.blockffn_ops_bind_kmajor.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.POINTER(ctypes.c_long)]
        so.blockffn_ops_bind_kmajor(ctypes.cast(kernel.blockffn_linear_kmajor, ctypes.c_void_p),
                                    ctypes.cast(kernel.blockffn_linear_kmajor_f32, ctypes.c_void_p),
                                    ctypes.cast(kernel.blockffn_linear_kmajor_i8, ctypes.c_void_p), widen)
        so.blockffn_ops_bind_experts.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_long, ctypes.c_float]
        so.blockffn_ops_bind_experts(ctypes.cast(kernel.blockffn_router_sparse_ffn, ctypes.c_void_p),
                                     cpu_native.UP_ROW_COST, THRESHOLDS.cpu_min_dense_tokens,
                                     THRESHOLDS.cpu_max_pair_fraction)
    except (OSError, AttributeError, RuntimeError, ctypes.ArgumentError) as exc:
        logger.debug("blockffn: cannot load %s: %s", path, exc)
        return None
    _keep.append(so)
    return path


def _fallback(why: str) -> None:
    logger.warning("blockffn: C++ CPU ops unavailable (%s); the decode-size linears use the Python op", why)


def _register_python() -> None:
    lib = torch.library.Library("blockffn_native", "DEF")
    lib.define("linear(Tensor x, Tensor weight) -> Tensor")
    lib.define("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor row_sums) -> Tensor")
    lib.impl("linear", linear_python, "CPU")
    lib.define("linear_kmajor(Tensor x, Tensor packed) -> Tensor")
    lib.impl("linear_kmajor", linear_kmajor_python, "CPU")
    lib.define("int8_linear_kmajor(Tensor x, Tensor packed, Tensor weight_scale, Tensor row_sums) -> Tensor")
    lib.impl("int8_linear_kmajor", int8_linear_kmajor_python, "CPU")
    lib.define("router_experts(Tensor x, Tensor w_router, Tensor norm_w, float eps, Tensor w_up, Tensor w_down_t, "
               "Tensor segments, Tensor? stats, Tensor? up_scale, Tensor? down_scale, Tensor? up_row_sums, "
               "str backend, int layer_id, int expert_bytes, bool record) -> Tensor")
    lib.impl("int8_linear", int8_linear_python, "CPU")
    lib.impl("router_experts", router_experts_python, "CPU")
    _keep.append(lib)


def implementation() -> str:
    """Register ``torch.ops.blockffn_native`` once per process (building the C++ op on first use) and say
    which implementation serves it: ``cpp`` or ``python``."""
    global _impl
    if _impl is None:
        with _lock:
            if _impl is None:
                impl = "python"
                choice = os.environ.get(OPS_ENV, "auto").strip().lower() or "auto"
                if choice not in ("auto", "python"):
                    raise ValueError(f"{OPS_ENV}={os.environ[OPS_ENV]!r}; expected 'auto' or 'python'")
                if choice == "auto" and cpu_native.native_available():
                    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
                    if cpu_native.build_shared(_SOURCE_FILE, cxx, _cxx_flags(), ["-lc10", "-ltorch_cpu", "-ltorch"],
                                               "blockffn_ops", _open_cpp, _fallback):
                        impl = "cpp"
                if impl == "python":
                    _register_python()
                torch.library.register_fake("blockffn_native::linear")(_linear_fake)
                torch.library.register_fake("blockffn_native::int8_linear")(_linear_fake)
                torch.library.register_fake("blockffn_native::linear_kmajor")(_kmajor_fake)
                torch.library.register_fake("blockffn_native::int8_linear_kmajor")(_kmajor_fake)
                torch.library.register_fake("blockffn_native::router_experts")(_router_experts_fake)
                if impl == "cpp":
                    torch.library.register_fake("blockffn_native::attention")(_attention_fake)
                _impl = impl
    return _impl


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.ops.blockffn_native.linear``: y = x Wᵀ, fp32/bf16 (module docstring); registered on first use."""
    implementation()
    return torch.ops.blockffn_native.linear(x, weight)


def linear_kmajor(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``torch.ops.blockffn_native.linear_kmajor``: y = x Wᵀ for a bf16 or fp32 W packed K-major
    (``layout.pack_kmajor`` [N / 16, K / g, 16, g]), fp32/bf16 x, y in x's dtype; registered on first use."""
    implementation()
    return torch.ops.blockffn_native.linear_kmajor(x, packed)


def int8_linear_kmajor(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                       row_sums: torch.Tensor) -> torch.Tensor:
    """``torch.ops.blockffn_native.int8_linear_kmajor``: y = x Wᵀ for an int8 W packed K-major (``layout.pack_kmajor``
    [N / 16, K / 4, 16, 4]) with fp32 row scales [N] and the row-major weight's row sums [N]; registered on first
    use."""
    implementation()
    return torch.ops.blockffn_native.int8_linear_kmajor(x, packed, weight_scale, row_sums)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                row_sums: torch.Tensor) -> torch.Tensor:
    """``torch.ops.blockffn_native.int8_linear``: y = x (weight · weight_scale)ᵀ for int8 weight [N, K], fp32
    weight_scale [N] and int32 row_sums [N] (:func:`cpu_native.int8_row_sums`); registered on first use."""
    implementation()
    return torch.ops.blockffn_native.int8_linear(x, weight, weight_scale, row_sums)
