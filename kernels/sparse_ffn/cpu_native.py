"""Expert-major sparse experts for CPUs: a small C kernel (``cpu_native.c``), compiled on first use.

Why native: at decode sizes the sparse expert op must run at memory speed (each active
expert's [D, H] slabs read once), and a Python loop of BLAS calls per run of experts is
overhead-bound (~5 µs per torch op against ~1-10 µs of weight reads per expert).

What it does for one call, whatever the segmentation (``cu_seqlens`` only bounds the token
range [cu[0], cu[S]); tokens outside it get y = 0):
1. scan the fp32 scores once (host data) and list, for every expert in the union of the
   whole step, the tokens that use it and their scores: *expert-major* — a batch of
   requests reads each active expert's weights once per step, and only the active
   (token, expert) pairs are computed. That is exact for the per-segment-union semantics
   too: a pair with score 0 contributes exactly 0.
2. the active experts' rows, in units of 4 rows, are cut into one chunk per thread of
   equal estimated cost (a unit costs its row reads plus one dot per token). For each of
   its units a thread reads the 4 W_up rows once, dots them with the expert's tokens' x (2–4 tokens
   per register block; AVX2: up to 8 per pass, in L1-sized chunks), h = SiLU(·) · r, then streams
   the same 4 rows of W_down into its own fp32 y buffer: no barrier inside the call; the buffers
   are summed at the end (T·H).
Active pairs: a (token, expert) pair is active iff its score > 0. A NaN, zero, negative or -Inf
score is inactive (the expert contributes exactly 0 to that token, whatever its weights or x);
the scan evaluates that once into a mask that sizes and fills every buffer, so no value of the
scores or of x can make the kernel touch memory outside its buffers. NaN/Inf in x propagate
into the output rows of the tokens that use an expert (as in the PyTorch paths).
Arithmetic: fp32 accumulation; bf16 weights are widened on load (on AVX512_BF16 CPUs, bf16
weights with bf16 x use VDPBF16PS dot products: exact bf16 products, fp32 sums), y is rounded
once at the end.

ISA paths (chosen at run time, one shared object for every x86-64 CPU): ``amx`` (``avx512_bf16`` with
the linears' dot products on AMX tiles, where the CPU has AMX-BF16/INT8 and Linux grants the tile
state), ``avx512_bf16``, ``avx512`` (F/BW/VL/DQ), ``avx2`` (AVX2 + FMA), ``portable`` (GCC vector
extensions).
:func:`cpu_isa` tells the one in use; ``$VLLM_BLOCKFFN_CPU_ISA`` forces a narrower one (tests
run every path the machine can). Weight streaming: each unit's W_down rows are prefetched while
its W_up rows are read, and the next unit's W_up rows while its W_down rows are read. K-major streams
(packed experts, K-major linears) prefetch 2 KB ahead, except where the hardware prefetchers follow them
better (AMD's AVX-512 cores, lines serving few tokens: :func:`set_kmajor_prefetch`,
``$VLLM_BLOCKFFN_CPU_PREFETCH``); there the int8 K-major linears prefetch into L2, 4 KB ahead, from 2 rows
(:func:`kmajor_i8_linear_prefetch`).

Threads: OpenMP's current count, which ``torch.set_num_threads`` sets (or
``$VLLM_BLOCKFFN_CPU_THREADS``), OpenMP from the libgomp torch has loaded (same soname, so the
same thread pool that vLLM pins). On an oversubscribed machine (more runnable threads than
cores) a 2-thread call waits at the join for a preempted thread; with vLLM's pinned threads on
their own cores this does not arise. Set the variable to 1 on a shared box.

Build: ``cc -O3 -fopenmp -shared`` (no ``-march=native``: every ISA path carries its own target
attribute; no ``-ffast-math``: the kernel must keep IEEE NaN semantics on data it does not
control) into a cache directory (``$VLLM_BLOCKFFN_CACHE_DIR``, else
``$XDG_CACHE_HOME/vllm_blockffn`` or ``~/.cache/...``, else the temp directory), keyed by the
source, the compiler and the flags. Without a compiler, when the build or the load fails, or
with ``VLLM_BLOCKFFN_CPU_NATIVE=0``, :func:`native_available` is False (one warning line) and
callers keep the plain-PyTorch path. Supported dtypes: fp32 and bf16 x; fp32, bf16 and int8 weights (int8:
weight-only, with per-output-row fp32 scales, ``kernels/quant.py``: the kernel scales each W_up row's dot
product and each W_down column, and reads 1 byte per weight; on AVX512_BF16 CPUs, which all have VNNI, the
W_up and linear dot products run VPDPBUSD on the int8 rows as stored and x rounded to int16 per token (a
step of max|x| / 32767) in two byte planes, two instructions per 64 weights and token, exact integer sums
corrected by each row's sum (:func:`int8_row_sums`, computed once when the weights are bound); the W_down
pass runs VPDPWSSD on row pairs into int32 sums per thread's run of rows of an expert); on AVX2 and plain
AVX-512 CPUs the same int16 roundings of x and h go through VPMADDWD (int8 rows widened to int16, exact
int32 sums): the same integers, so the same results bit for bit as the VNNI path (tests/test_int8.py);
only the portable path widens int8 to fp32. int8 experts packed K-major at load (``layout.pack_experts_kmajor``,
5-D tensors, on the paths of ``THRESHOLDS.cpu_experts_kmajor_int8``) run as two K-major int8 linears an expert
(VPDPBUSD on VNNI CPUs, VPMADDWD on AVX2: the same integers)
(``kx_run``: the up blocks split by cost, the down pass by output columns, one stream an expert and thread; their
row sums from :func:`expert_row_sums`). bf16 experts packed K-major at load (the paths of
``THRESHOLDS.cpu_experts_kmajor_bf16``) run the same way with the K-major bf16 linears' forms (VDPBF16PS on x as
stored where it is fast, ``kmajor_dot``; the FMA split forms otherwise, the same sums in the same order), h rounded to
bf16 for bf16 x. fp16 goes to the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from ..dispatch import THRESHOLDS
from ..layout import KMAJOR_GROUP, expert_dims, experts_kmajor
from ..quant import check_expert_scales

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_native.c")
_CFLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi"]
SANITIZE_ENV = "VLLM_BLOCKFFN_CPU_SANITIZE"
"""=1 builds the kernel with AddressSanitizer (tests: run the process with libasan preloaded)."""
MARKS_ENV = "VLLM_BLOCKFFN_CPU_MARKS"
"""=1 builds the kernel with the call timeline's clock reads (:func:`call_marks`; benchmarks/expert_call_cpu.py)."""
MARK_NAMES = ("router", "scores", "set-up", "in: calling thread", "in: last thread", "up: calling thread",
              "up: last thread", "down: calling thread", "down: last thread", "joined", "returned")
"""The points of a router + experts call the timeline build reads the clock at (cpu_native.c, BLOCKFFN_MARKS)."""
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_WEIGHT_CODES = {**_DTYPE_CODES, torch.int8: 2}
"""Weight dtypes: int8 comes with per-output-row fp32 scales (kernels/quant.py)."""
_KMAJOR_EXPERTS = {torch.int8: 3, torch.bfloat16: 4, torch.float32: 5}
"""The kernel's weight codes for experts packed K-major (layout.pack_experts_kmajor)."""
ISAS = ("portable", "avx2", "avx512", "avx512_bf16", "amx")
"""The kernel's ISA paths, narrowest first (codes 0..4 in cpu_native.c)."""
ISA_ENV = "VLLM_BLOCKFFN_CPU_ISA"
UP_ROW_COST = 3.0
"""Cost of reading one weight row, in units of one token's dot product over it (work split)."""

_THREADS = int(os.environ.get("VLLM_BLOCKFFN_CPU_THREADS", "0") or 0)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
lib_path: str | None = None
"""The shared object in use (None until loaded or without one)."""


def _cache_dir() -> str:
    d = os.environ.get("VLLM_BLOCKFFN_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "vllm_blockffn")
    return d


def _fallback(why: str) -> None:
    logger.warning("blockffn: native CPU kernel unavailable (%s); CPU sparse experts use the PyTorch path", why)


def _open(path: str) -> ctypes.CDLL | None:
    """Load a built kernel and declare its entry points; None if it is not a usable build."""
    global lib_path
    try:
        lib = ctypes.CDLL(path)
        fn = lib.blockffn_sparse_ffn
        isa = lib.blockffn_cpu_isa
        lib.blockffn_set_prefetch.argtypes = [ctypes.c_int]
        lib.blockffn_set_pairdown.argtypes = [ctypes.c_int]
        lib.blockffn_set_split_tokens.argtypes = [ctypes.c_int]
        lib.blockffn_set_split_tokens.restype = ctypes.c_int
        lib.blockffn_set_group_major.argtypes = [ctypes.c_int]
        lib.blockffn_set_unit_floor.argtypes = [ctypes.c_int]
        lib.blockffn_set_expert_flags.argtypes = [ctypes.c_int]
        lib.blockffn_set_kmajor_dot.argtypes = [ctypes.c_int]
        lib.blockffn_kmajor_dot.argtypes = [ctypes.c_int]
        lib.blockffn_set_kmajor_prefetch.argtypes = [ctypes.c_int]
        lib.blockffn_set_kmajor_ahead.argtypes = [ctypes.c_int]
        lib.blockffn_set_work_stealing.argtypes = [ctypes.c_int]
        lib.blockffn_kmajor_prefetch_tokens.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.blockffn_kmajor_i8_linear_prefetch.argtypes = [ctypes.c_int, ctypes.c_long]
        lib.blockffn_set_int8_experts_l2.argtypes = [ctypes.c_int]
        lib.blockffn_int8_experts_prefetch.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.blockffn_set_amx_rules.argtypes = [ctypes.c_long, ctypes.c_long]
        lib.blockffn_set_amx_rules(THRESHOLDS.cpu_amx_min_rows, THRESHOLDS.cpu_amx_min_tokens)
        lib.blockffn_amx_calls.restype = ctypes.c_long
    except (OSError, AttributeError) as exc:
        logger.debug("blockffn: cannot load %s: %s", path, exc)
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, i64, i32, p, p, p, i32, p, i64, i64, i64, i64, i64, p, i32, f32, i32, i64, f32, p, i32, i32, p, p,
                   p]
    fn.restype = i32
    isa.restype = i32
    lib_path = path
    lib.blockffn_linear.argtypes = [p, i64, i32, p, i32, i64, i64, i64, p, i64, i32, i32, p, p]
    lib.blockffn_linear.restype = i32
    lib.blockffn_linear_kmajor.argtypes = [p, i64, i32, p, i64, i64, i64, p, i64, i32, i32]
    lib.blockffn_linear_kmajor.restype = i32
    lib.blockffn_linear_kmajor_f32.argtypes = [p, i64, i32, p, i64, i64, i64, p, i64, i32, i32]
    lib.blockffn_linear_kmajor_f32.restype = i32
    lib.blockffn_linear_kmajor_i8.argtypes = [p, i64, i32, p, i64, i64, i64, p, i64, i32, i32, p, p]
    lib.blockffn_linear_kmajor_i8.restype = i32
    lib.blockffn_router_sparse_ffn.argtypes = [p, i64, i32, p, i32, p, f32, p, p, i32, p, i64, i64, i64, i64, i64, p,
                                               i32, f32, i32, i64, f32, p, i32, p, p, p]
    lib.blockffn_router_sparse_ffn.restype = i32
    lib.blockffn_resolve_isa.argtypes = [i32]
    lib.blockffn_resolve_isa.restype = i32
    lib.blockffn_stream_read.argtypes = [p, i64, i32, i32]
    lib.blockffn_stream_read.restype = ctypes.c_double
    lib.blockffn_read_ranges.argtypes = [p, p, p, i64, i32, i32]
    lib.blockffn_read_ranges.restype = ctypes.c_double
    lib.blockffn_fma_peak.argtypes = [i64, i32, i32]
    lib.blockffn_fma_peak.restype = ctypes.c_double
    return lib


def _cflags() -> list[str]:
    flags = list(_CFLAGS)
    if os.environ.get(MARKS_ENV, "0") in ("1", "true", "True"):
        flags.append("-DBLOCKFFN_MARKS")
    if os.environ.get(SANITIZE_ENV, "0") in ("1", "true", "True"):
        return [*flags, "-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
    return flags


def _build() -> ctypes.CDLL | None:
    """Build (or reuse) the shared object; None with one warning line when that is impossible."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return build_shared(_SOURCE_FILE, cc, _cflags(), ["-lm"], "sparse_ffn_cpu", _open, _fallback)


def build_shared(source_file: str, cc: str | None, flags: list[str], libs: list[str], stem: str,
                 opener: Callable[[str], T | None], fallback: Callable[[str], None]) -> T | None:
    """Compile ``source_file`` with ``cc`` into the cache directory (keyed by the source, the compiler and
    the flags, so a changed source builds anew; concurrent workers replace the file atomically) and
    open it with ``opener``; None after one ``fallback`` call naming what failed. Shared by the kernel
    and its torch op bindings (``cpu_ops.py``)."""
    if cc is None:
        fallback("no C compiler found")
        return None
    try:
        with open(source_file, encoding="utf-8") as f:
            source = f.read()
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        fallback(f"{type(exc).__name__}: {exc}")
        return None
    key = hashlib.sha256("\0".join([source, cc, version, " ".join(flags + libs), os.uname().machine]).encode()
                         ).hexdigest()
    dirs = [_cache_dir(), os.path.join(tempfile.gettempdir(), f"vllm_blockffn-{os.getuid()}")]
    errors = []
    for d in dirs:
        path = os.path.join(d, f"{stem}_{key[:16]}.so")
        if os.path.exists(path):
            lib = opener(path)
            if lib is not None:
                return lib
            # a stale or corrupt build under our key: rebuild it below (replaced atomically)
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp_so = tempfile.mkstemp(suffix=".so", dir=d)
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc.strerror or exc}")
            continue
        try:
            r = subprocess.run([cc, *flags, source_file, "-o", tmp_so, *libs], capture_output=True, text=True,
                               timeout=300)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                fallback(f"{cc} failed with exit code {r.returncode}: {last}")
                return None
            os.replace(tmp_so, path)  # atomic: concurrent workers may build the same file
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{d}: {exc}")
            continue
        finally:
            if os.path.exists(tmp_so):
                os.unlink(tmp_so)
        lib = opener(path)
        if lib is not None:
            return lib
        errors.append(f"{path}: built but cannot be loaded")
    fallback("; ".join(errors) or "no writable cache directory")
    return None


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("VLLM_BLOCKFFN_CPU_NATIVE", "1") not in ("0", "false", "False"):
                _lib = _build()
                if _lib is not None:
                    _lib.blockffn_set_kmajor_prefetch(prefetch_env())
            _tried = True
    return _lib


PREFETCH_ENV = "VLLM_BLOCKFFN_CPU_PREFETCH"


def prefetch_env() -> int:
    """``$VLLM_BLOCKFFN_CPU_PREFETCH`` as :func:`set_kmajor_prefetch` takes it: ``auto`` (default, -1: the CPU's
    rule), ``all`` (0: every K-major stream prefetches) or ``n`` ≥ 1 (the streams serving ``n`` tokens or more)."""
    raw = os.environ.get(PREFETCH_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return -1
    if raw == "all":
        return 0
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ValueError(f"{PREFETCH_ENV}={os.environ.get(PREFETCH_ENV)!r}; expected 'auto', 'all' or a token count >= 1")


def threads() -> int:
    """The thread count calls pass (``$VLLM_BLOCKFFN_CPU_THREADS``; 0: OpenMP's current count)."""
    return _THREADS


def best_isa() -> str | None:
    """The widest ISA path this CPU runs (None without the native kernel)."""
    lib = _load()
    return None if lib is None else ISAS[lib.blockffn_cpu_isa()]


def isa_at_least(floor: str, isa: str | None = None) -> bool:
    """True when the path calls run with (``isa``, else :func:`cpu_isa`) is ``floor`` or wider: what a
    feature of ``floor`` (e.g. the VNNI int8 dots of ``avx512_bf16``) needs, AMX CPUs included."""
    isa = isa or cpu_isa()
    return isa is not None and ISAS.index(isa) >= ISAS.index(floor)


def _isa_code(isa: str | None) -> int:
    """The code to pass for ``isa``: None → -1, which makes the kernel read ``$VLLM_BLOCKFFN_CPU_ISA``
    itself (``blockffn_resolve_isa``: no environment lookup per call here); ``auto`` → the best."""
    if isa is None:
        return -1
    name = isa.strip().lower() or "auto"
    if name == "auto":
        return len(ISAS)  # clamped to the CPU's best by the kernel
    if name not in ISAS:
        raise ValueError(f"isa={isa!r}; expected 'auto' or one of {list(ISAS)}")
    return ISAS.index(name)


def _bad_isa_env() -> ValueError:
    return ValueError(f"{ISA_ENV}={os.environ.get(ISA_ENV)!r}; expected 'auto' or one of {list(ISAS)}")


def cpu_isa(isa: str | None = None) -> str | None:
    """The ISA path calls run with (``isa`` or ``$VLLM_BLOCKFFN_CPU_ISA``, never wider than the CPU's)."""
    lib = _load()
    if lib is None:
        return None
    code = lib.blockffn_resolve_isa(_isa_code(isa))
    if code < 0:
        raise _bad_isa_env()
    return ISAS[code]


def set_amx_rules(min_rows: int | None = None, min_tokens: int | None = None) -> None:
    """Where the ``amx`` path uses the tiles: linears from ``min_rows`` rows, expert calls from ``min_tokens``
    tokens per active expert (None: ``kernels/dispatch.py``'s ``cpu_amx_min_rows`` / ``cpu_amx_min_tokens``). Benchmarks
    set them to compare the AMX code with the AVX512_BF16 code at every size."""
    lib = _load()
    if lib is not None:
        lib.blockffn_set_amx_rules(THRESHOLDS.cpu_amx_min_rows if min_rows is None else min_rows,
                                   THRESHOLDS.cpu_amx_min_tokens if min_tokens is None else min_tokens)


def amx_calls() -> int:
    """How many kernel calls ran AMX tiles so far in this process (tests: which path a call took)."""
    lib = _load()
    return 0 if lib is None else int(lib.blockffn_amx_calls())


def set_prefetch(blocks: int) -> int | None:
    """Software prefetch of the weight stream: 0 off, ``n`` the block ``n`` calls ahead, -1 (default) the next call's
    block, or the one after it for expert units under 4 KB (int8 at H = 768; cpu_native.c says why); benchmarks
    compare. Returns the setting it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_prefetch(max(-1, int(blocks))))


def set_pairdown(on: bool) -> None:
    """The down passes on AVX512_BF16 + VNNI CPUs (benchmarks compare): on (default) = row pairs
    (VDPBF16PS for bf16 weights, VPDPWSSD for int8; bf16 from 3 tokens an active expert: the split FMA form
    ``bs_down``), off = the widening ones (to fp32, then FMAs) (``cpu_native.c``, ``bf_down`` / ``vn_down``)."""
    lib = _load()
    if lib is not None:
        lib.blockffn_set_pairdown(int(bool(on)))


def set_split_tokens(n: int) -> int | None:
    """bf16 expert units on AVX512_BF16 CPUs: the split FMA forms from ``n`` tokens sharing an expert (0 = never:
    VDPBF16PS at every size; -1, the default: 3 where this CPU issues VDPBF16PS slower than 1.5 FMAs, else never,
    the probe of :func:`kmajor_dot`) (``cpu_native.c``, ``bs_up`` / ``bs_down``; benchmarks compare). Returns the
    setting it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_split_tokens(max(-1, int(n))))


def set_group_major(on: bool) -> None:
    """Experts with more than 4 tokens on the AVX-512 float and VNNI units: the down pass a group of 4 tokens at
    a time over a thread's units (default on; off: each unit takes all its tokens' groups at once). The same
    results bit for bit; benchmarks compare (``cpu_native.c``, ``blockffn_sparse_ffn``)."""
    lib = _load()
    if lib is not None:
        lib.blockffn_set_group_major(1 if on else 0)


def set_unit_floor(per_byte: int) -> int | None:
    """How the expert kernel splits its units between threads: a unit costs its tokens plus ``UP_ROW_COST``, but no
    less than ``per_byte`` token dot products a weight byte of its rows (default 3: a bf16 unit of up to ~3 tokens
    costs its read); 0 = no floor, the split of before (benchmarks compare; results do not depend on it except
    through the threads' summation order). Returns the floor it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_unit_floor(max(0, int(per_byte))))


def set_expert_flags(on: bool) -> int | None:
    """Packed experts: the down pass of an expert waits for that expert's up blocks only (1, the default) or for the
    whole up pass at a barrier (0); the same bits either way (benchmarks and tests compare). Returns the setting it
    replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_expert_flags(int(bool(on))))


def set_kmajor_prefetch(tokens: int) -> int | None:
    """Software prefetch in the K-major streams (packed experts and linears): -1 (default) by the CPU's rule, 0 in
    every stream (the rule elsewhere than AMD's AVX-512 cores), ``n`` in the streams whose lines serve at least ``n``
    tokens; the same bits either way (benchmarks and tests compare). Returns the setting it replaced (None without
    the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_kmajor_prefetch(max(-1, int(tokens))))


def set_kmajor_ahead(on: int) -> int | None:
    """The AVX2 K-major forms' prefetch ahead (1, default): where more tokens than one pass holds share a stream, the
    last pass over a piece of weight prefetches the next piece while it computes from cache (cpu_native.c,
    ``g_km_ahead``); 0 leaves memory idle during those passes, as before. The same bits either way (benchmarks and
    tests compare). Returns the setting it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_kmajor_ahead(1 if on else 0))


WORK_STEALING_ALL = 3
""":func:`set_work_stealing`'s default: the K-major linears (1) and the packed experts' down pass (2)."""


def set_work_stealing(mode: int) -> int | None:
    """Where threads take the rest of the others' work once their own is done (cpu_native.c
    ``ws_claim``): 1 the K-major linears' panels, 2 the packed experts' down-pass column blocks, as a mask;
    :data:`WORK_STEALING_ALL` (default) both, 0 the static splits alone. The same bits in every mode (benchmarks and
    tests compare). Returns the setting it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_work_stealing(int(mode) & WORK_STEALING_ALL))


INT8_PREFETCH_MODES = ("none", "L1, 2 KB ahead", "L2, 4 KB ahead")
"""The modes :func:`kmajor_i8_linear_prefetch` and :func:`int8_experts_prefetch` return, by code."""


def _prefetch_query(name: str, isa: str | None, n: int) -> int:
    """``blockffn_<name>(isa code, n)`` of the loaded kernel, -3 raised as the ISA variable's error."""
    lib = _load()
    assert lib is not None, "native kernel unavailable"
    code = int(getattr(lib, f"blockffn_{name}")(_isa_code(isa), int(n)))
    if code == -3:
        raise _bad_isa_env()
    return code


def kmajor_i8_linear_prefetch(rows: int, isa: str | None = None) -> int:
    """How an int8 K-major linear of ``rows`` rows prefetches its weight streams on ``isa`` (default: the path calls
    take): 0 none (also the portable fp32 fallback), 1 into L1 2 KB ahead (from :func:`kmajor_prefetch_tokens`
    rows), 2 into L2 4 KB ahead (AMD's AVX-512 cores under the CPU's rule, from 2 rows: there a call's VPDPBUSD no
    longer wait on its reads; cpu_native.c, ``km_i8_linear_pf``); the same bits either way."""
    return _prefetch_query("kmajor_i8_linear_prefetch", isa, rows)


def set_int8_experts_l2(tokens: int) -> int | None:
    """The int8 packed experts' L2 prefetch (4 KB ahead): -1 (default) by the CPU's rule (AMD's AVX-512 cores: from 3
    tokens an expert), 0 never (the L1 rule of :func:`set_kmajor_prefetch` alone), ``n`` from ``n`` tokens; the same
    bits either way (benchmarks compare). Returns the setting it replaced (None without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_int8_experts_l2(max(-1, int(tokens))))


def int8_experts_prefetch(tokens: int, isa: str | None = None) -> int:
    """How an int8 packed expert serving ``tokens`` tokens prefetches its streams on ``isa`` (default: the path calls
    take): the codes of :data:`INT8_PREFETCH_MODES` (``check --env`` reports it)."""
    return _prefetch_query("int8_experts_prefetch", isa, tokens)


def kmajor_prefetch_tokens(int8: bool, isa: str | None = None) -> int:
    """The fewest tokens a K-major stream's lines must serve for it to prefetch, on ``isa`` (default: the path calls
    take) for int8 weights or bf16 ones in the form that path takes now (:func:`kmajor_dot`): 0 = every stream
    (``check --env`` reports it)."""
    return _prefetch_query("kmajor_prefetch_tokens", isa, int(bool(int8)))


def set_kmajor_dot(mode: int) -> int | None:
    """The K-major bf16 linears with bf16 x on AVX512_BF16 CPUs: 1 the dot form (one VDPBF16PS a line and token),
    0 the split FMA form, -1 (default) whichever this CPU issues faster (a probe, once; :func:`kmajor_dot`). The
    same bits either way (subnormals aside); benchmarks and tests compare. Returns the mode it replaced (None
    without the native kernel)."""
    lib = _load()
    return None if lib is None else int(lib.blockffn_set_kmajor_dot(max(-1, min(1, int(mode)))))


def vdpbf16ps_fast() -> bool:
    """Whether this CPU issues VDPBF16PS faster than 1.5 FMAs (the kernel's probe, once a process; False without
    AVX512_BF16): the bf16 code's defaults follow it — the K-major linears' dot form, no split FMA forms in the
    experts (AMD Zen 4) — or the split forms (the Xeons measured in RESULTS.md)."""
    lib = _load()
    return lib is not None and bool(lib.blockffn_dp_fast())


def route_path(isa: str | None = None) -> str:
    """The key of ``kernels/dispatch.py``'s per-path route tables for the path calls run with (``isa``, else
    :func:`cpu_isa`; "portable" without the kernel): the path's name, except ``avx512_bf16_dp`` on AVX512_BF16
    CPUs that issue VDPBF16PS at least as fast as an FMA (:func:`vdpbf16ps_fast`: AMD Zen 4), where the kernel's
    bf16 units and oneDNN's bf16 GEMM both run twice the FMA's multiply-adds, so the long-step routes cross over
    elsewhere than on the Xeons whose figures the ``avx512_bf16`` entries hold."""
    return route_key(cpu_isa(isa) or "portable")


def route_key(path: str) -> str:
    """:func:`route_path` for a path named as is (not clamped to this CPU's): the C++ ops' per-ISA table."""
    return "avx512_bf16_dp" if path == "avx512_bf16" and vdpbf16ps_fast() else path


def kmajor_dot(isa: str | None = None) -> bool:
    """Whether bf16 x through the K-major linears takes the dot form on path ``isa`` (default: the one calls use)."""
    lib = _load()
    return lib is not None and bool(lib.blockffn_kmajor_dot(_isa_code(isa)))


def int8_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """int32 sums of an int8 weight's rows (last dim), which the kernel's VPDPBUSD dot products subtract
    (``vb_up`` in cpu_native.c: x enters them offset by 32768); the bindings below make them once."""
    return weight.sum(-1, dtype=torch.int32).contiguous()


def expert_row_sums(w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """The int32 row sums the kernel subtracts for int8 experts: W_up's [E, D]; for experts packed K-major
    (``layout.pack_experts_kmajor``) W_up's then W_down's [E, H] (its rows: the outputs), flattened into one tensor."""
    if not experts_kmajor(w_up):
        return int8_row_sums(w_up)
    return torch.cat([w.sum((2, 4), dtype=torch.int32).flatten() for w in (w_up, w_down_t)])


class NativeLinear:
    """A linear's weight bound to the streaming GEMV (``blockffn_linear``): the weight checks and the
    arguments that do not change between calls resolved once, as :class:`NativeExperts` does for the
    experts. Why: a served model calls ~70 linears per decode step right after kernels that flushed the
    caches, where every Python-level check costs µs (benchmarks/step_breakdown_cpu.py). int8 weights:
    ``weight_scale`` fp32 [N] (W = q · scale per row) and the row sums (:func:`int8_row_sums`) made here.
    The weight is not expected to change in place after binding."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor | None = None) -> None:
        lib = _load()
        assert lib is not None, "native kernel unavailable"
        if weight.dim() != 2 or weight.dtype not in _WEIGHT_CODES:
            raise ValueError(f"linear: weight {weight.dtype} {list(weight.shape)}; expected a 2-D "
                             f"{list(_WEIGHT_CODES)} weight [N, K]")
        N, K = weight.shape
        weight = weight.contiguous()
        scale = rowsum = sums = None
        if weight_scale is not None or weight.dtype == torch.int8:
            if weight.dtype != torch.int8 or weight_scale is None:
                raise ValueError(f"linear: weight {weight.dtype} with weight_scale "
                                 f"{'given' if weight_scale is not None else 'missing'}; int8 weights need fp32 "
                                 f"[N] scales")
            if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N,):
                raise ValueError(f"weight_scale: {weight_scale.dtype} {list(weight_scale.shape)}; expected "
                                 f"torch.float32 [{N}]")
            weight_scale = weight_scale.contiguous()
            sums = int8_row_sums(weight)
            scale, rowsum = weight_scale.data_ptr(), sums.data_ptr()
        self.tensors = (weight, weight_scale, sums)  # kept alive with the pointers below
        self.N, self.K = N, K
        self.w_ptr = weight.data_ptr()
        self._fn = lib.blockffn_linear
        self._w = (self.w_ptr, _WEIGHT_CODES[weight.dtype])
        self._q = (scale, rowsum)

    def __call__(self, x: torch.Tensor, num_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
        """y = x Wᵀ for x [M, K] (fp32/bf16), in x's dtype."""
        if x.dim() != 2 or x.shape[1] != self.K:
            raise ValueError(f"linear: x {list(x.shape)} and weight {[self.N, self.K]}; expected x [M, {self.K}]")
        if x.stride(1) != 1:
            x = x.contiguous()
        M = x.shape[0]
        y = torch.empty((M, self.N), dtype=x.dtype)
        rc = self._fn(x.data_ptr(), x.stride(0), _DTYPE_CODES[x.dtype], *self._w, M, self.N, self.K, y.data_ptr(),
                      self.N, num_threads or _THREADS, _isa_code(isa), *self._q)
        if rc:
            _check_rc(rc, "linear", x, self.tensors[0])
        return y


def bound_linear(weight: torch.Tensor, weight_scale: torch.Tensor | None = None) -> NativeLinear:
    """The :class:`NativeLinear` of this weight, made on the first call and kept on ``weight`` (a served
    model passes the same parameter every step); made again when its storage or scales changed."""
    b = getattr(weight, "_blockffn_linear", None)
    if b is not None and b.w_ptr == weight.data_ptr() and b.tensors[1] is weight_scale:
        return b
    b = NativeLinear(weight, weight_scale)
    if b.tensors[0] is weight and b.tensors[1] is weight_scale:
        weight._blockffn_linear = b  # contiguous already: the binding describes exactly these tensors
    return b


def linear_native(x: torch.Tensor, weight: torch.Tensor, num_threads: int | None = None,
                  isa: str | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ for decode-size x [M, K] (fp32/bf16) and W [N, K] (fp32/bf16, or int8 with
    ``weight_scale`` fp32 [N]: W = q · scale per row): a streaming GEMV reading every weight byte
    once, split across threads by rows (equal bytes). fp32 accumulation. The weight is bound on the
    first call (:func:`bound_linear`): a served model calls this ~70 times per decode step right after
    kernels have flushed the caches, so a call is a handful of checks and one ctypes call (the kernel
    resolves the ISA and thread count)."""
    return bound_linear(weight, weight_scale)(x, num_threads, isa)


def linear_kmajor_native(x: torch.Tensor, packed: torch.Tensor, num_threads: int | None = None,
                         isa: str | None = None, weight_scale: torch.Tensor | None = None,
                         row_sums: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ for x [M, K] (fp32/bf16) and W packed K-major (kernels/layout.py ``pack_kmajor``), in x's dtype: the
    outer-product form. bf16 W (``packed`` [N / 16, K / 2, 16, 2], ``blockffn_linear_kmajor``): for the 1-64-row
    bf16 linears of AVX-512 CPUs without AMX, where the row-dot GEMV is compute-bound from ~4 rows; each output is
    the sequential fp32 FMA chain over k on every path. fp32 W ([N / 16, K, 16, 1], ``blockffn_linear_kmajor_f32``):
    the same for the fp32 linears of AVX2 CPUs, where vLLM serves fp32 (its bf16 GEMM is torch's fallback there).
    int8 W ([N / 16, K / 4, 16, 4] with its fp32 ``weight_scale`` [N] and ``row_sums`` [N] of the row-major weight,
    :func:`int8_row_sums`; ``blockffn_linear_kmajor_i8``): the integer paths' integers (VPDPBUSD with VNNI, VPMADDWD
    on AVX2 and plain AVX-512), so the same bits as the row-major int8 linear there; fp32 FMAs on the portable
    path."""
    lib = _load()
    assert lib is not None, "native kernel unavailable"
    g = {torch.float32: 1, torch.bfloat16: 2, torch.int8: 4}.get(packed.dtype)
    if g is None or packed.dim() != 4 or packed.shape[2:] != (16, g) or not packed.is_contiguous():
        raise ValueError(f"linear_kmajor: packed weight {packed.dtype} {list(packed.shape)}; expected a contiguous "
                         f"torch.float32 [N / 16, K, 16, 1], torch.bfloat16 [N / 16, K / 2, 16, 2] or torch.int8 "
                         f"[N / 16, K / 4, 16, 4] (layout.pack_kmajor)")
    N, K = packed.shape[0] * 16, packed.shape[1] * g
    if x.dim() != 2 or x.shape[1] != K or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"linear_kmajor: x {x.dtype} {list(x.shape)}; expected fp32/bf16 [M, {K}] for the packed "
                         f"weight [{N}, {K}]")
    int8 = packed.dtype == torch.int8
    if int8 != (weight_scale is not None and row_sums is not None) or int8 and (
            weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N,) or not weight_scale.is_contiguous()
            or row_sums.dtype != torch.int32 or tuple(row_sums.shape) != (N,) or not row_sums.is_contiguous()):
        raise ValueError(f"linear_kmajor: weight_scale {None if weight_scale is None else list(weight_scale.shape)}, "
                         f"row_sums {None if row_sums is None else list(row_sums.shape)} for a {packed.dtype} weight; "
                         f"expected contiguous float32 [{N}] and int32 [{N}] (int8_row_sums) with int8 weights only")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((x.shape[0], N), dtype=x.dtype)
    if int8:
        rc = lib.blockffn_linear_kmajor_i8(x.data_ptr(), x.stride(0), _DTYPE_CODES[x.dtype], packed.data_ptr(),
                                           x.shape[0], N, K, y.data_ptr(), N, num_threads or _THREADS, _isa_code(isa),
                                           weight_scale.data_ptr(), row_sums.data_ptr())
    else:
        fn = lib.blockffn_linear_kmajor_f32 if packed.dtype == torch.float32 else lib.blockffn_linear_kmajor
        rc = fn(x.data_ptr(), x.stride(0), _DTYPE_CODES[x.dtype], packed.data_ptr(), x.shape[0], N, K, y.data_ptr(), N,
                num_threads or _THREADS, _isa_code(isa))
    if rc:
        _check_rc(rc, "linear_kmajor", x, packed)
    return y


def stream_read(buf: torch.Tensor, num_threads: int | None = None, isa: str | None = None) -> float:
    """Sum a contiguous fp32 tensor with the kernel's threads and widest loads (read-bandwidth probe)."""
    lib = _load()
    assert lib is not None and buf.dtype == torch.float32 and buf.is_contiguous()
    return lib.blockffn_stream_read(buf.data_ptr(), buf.numel(), num_threads or _THREADS, _isa_code(isa))


def read_floor(calls: list[list[torch.Tensor]], num_threads: int | None = None,
               isa: str | None = None) -> Callable[[], float]:
    """A function that reads the bytes of each call's tensors (contiguous; a multiple of 4 bytes each), one parallel
    region a call, the bytes split evenly over the threads (``blockffn_read_ranges``): the least a kernel call
    reading exactly those bytes costs here, for benchmarks to show beside the kernel's time. The tensors are kept
    alive by the function."""
    lib = _load()
    assert lib is not None
    flat = [t for ts in calls for t in ts]
    for t in flat:
        if not t.is_contiguous() or (t.numel() * t.element_size()) % 4:
            raise ValueError(f"read_floor: a tensor {t.dtype} {list(t.shape)}; expected contiguous, a multiple of "
                             "4 bytes")
    ptrs = np.array([t.data_ptr() for t in flat], dtype=np.uint64)
    lens = np.array([t.numel() * t.element_size() for t in flat], dtype=np.int64)
    off = np.cumsum([0, *(len(ts) for ts in calls)]).astype(np.int64)
    code, nt = _isa_code(isa), num_threads or _THREADS

    def run() -> float:
        return lib.blockffn_read_ranges(ptrs.ctypes.data, lens.ctypes.data, off.ctypes.data, len(calls), nt, code)

    run.keep = flat  # type: ignore[attr-defined]
    return run


def call_marks(reset: bool = True) -> tuple[int, dict[str, float]] | None:
    """The timeline of the router + experts calls since the last reset: (calls, {point: mean µs since a call's
    entry}) for :data:`MARK_NAMES`; None unless the kernel was built with ``VLLM_BLOCKFFN_CPU_MARKS=1`` (set before
    the first kernel call of the process). Packed experts at decode sizes only (cpu_native.c, BLOCKFFN_MARKS)."""
    lib = _load()
    if lib is None or not hasattr(lib, "blockffn_marks"):
        return None
    out = (ctypes.c_double * len(MARK_NAMES))()
    lib.blockffn_marks.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blockffn_marks.restype = ctypes.c_long
    n = lib.blockffn_marks(out, len(MARK_NAMES))
    if reset:
        lib.blockffn_marks_reset()
    return n, dict(zip(MARK_NAMES, out))


def fma_peak(num_threads: int | None = None, isa: str | None = None, rounds: int = 4_000_000) -> float:
    """Multiply-adds per second the kernel's threads can issue in fp32 FMAs on the path's widest vectors
    (arithmetic-ceiling probe, beside :func:`stream_read`'s bandwidth)."""
    lib = _load()
    assert lib is not None
    return lib.blockffn_fma_peak(rounds, num_threads or _THREADS, _isa_code(isa))


def native_available() -> bool:
    """True when the compiled kernel is loaded (builds it on the first call)."""
    return _load() is not None


def native_supports(x: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Dtypes and devices the kernel takes (fp32 / bf16 x; fp32 / bf16 / int8 weights; CPU tensors)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPE_CODES
        and w_up.dtype in _WEIGHT_CODES
        and w_down_t.dtype == w_up.dtype
        and native_available()
    )


class NativeExperts:
    """One layer's expert weights bound to the kernel: the weight checks and every argument that
    does not change between calls resolved once, as vLLM's CPU MoE prepacks its experts.

    Why: a served model calls the experts once per layer and step right after a kernel that has
    flushed the caches, where each Python-level check costs several µs (benchmarks/
    step_breakdown_cpu.py); bound once per weight tensor (:func:`bound_experts`), a call checks x,
    the scores and the segments and makes one ctypes call. int8 weights: ``up_scale`` [E, D] and
    ``down_scale`` [E, H] (kernels/quant.py), checked here, and W_up's row sums (:func:`int8_row_sums`) made here.
    The weights are not expected to change in place after binding (as vLLM's prepacked CPU experts)."""

    def __init__(self, w_up: torch.Tensor, w_down_t: torch.Tensor, up_scale: torch.Tensor | None = None,
                 down_scale: torch.Tensor | None = None) -> None:
        lib = _load()
        assert lib is not None, "native kernel unavailable"
        packed = experts_kmajor(w_up)
        E, D, H = expert_dims(w_up) if packed or w_up.dim() == 3 else (0, 0, 0)
        g = KMAJOR_GROUP.get(w_up.dtype, 0)
        down_shape = (E, H // 16, D // g, 16, g) if packed and g else tuple(w_up.shape)
        if w_up.dim() not in (3, 5) or tuple(w_down_t.shape) != down_shape or \
                (packed and (not g or w_down_t.dtype != w_up.dtype)):
            raise ValueError(f"sparse_ffn: w_up {list(w_up.shape)}, w_down_t {list(w_down_t.shape)}; expected both "
                             f"[E, D, H], or fp32 / bf16 / int8 packed by layout.pack_experts_kmajor")
        su = sd = rs = up_sums = None
        w_up, w_down_t = w_up.contiguous(), w_down_t.contiguous()
        if check_expert_scales(w_up, up_scale, w_down_t, down_scale):
            up_scale, down_scale = up_scale.contiguous(), down_scale.contiguous()
            up_sums = expert_row_sums(w_up, w_down_t)
            su, sd, rs = up_scale.data_ptr(), down_scale.data_ptr(), up_sums.data_ptr()
        self.tensors = (w_up, w_down_t, up_scale, down_scale, up_sums)  # kept alive with the pointers below
        self.E, self.D, self.H = E, D, H
        self.w_up_ptr = w_up.data_ptr()
        self._lib = lib
        self._fn = lib.blockffn_sparse_ffn
        self._norm: tuple = (None, 0, None)  # the router's norm weight, its address, its fp32 copy
        code = _KMAJOR_EXPERTS[w_up.dtype] if packed else _WEIGHT_CODES[w_up.dtype]
        self._weights = (w_up.data_ptr(), w_down_t.data_ptr(), code)
        self._scales = (su, sd, rs)
        self._stats: tuple[np.ndarray | None, int | None] = (None, None)  # the layer's counter row, its address

    def __call__(self, x: torch.Tensor, scores: torch.Tensor, cu_seqlens: torch.Tensor, allow_dense: bool = False,
                 stats: np.ndarray | None = None, num_threads: int | None = None, isa: str | None = None,
                 all_experts: bool = False) -> torch.Tensor | None:
        """:func:`sparse_ffn_native` on the bound weights."""
        x, cu_seqlens = self._inputs(x, cu_seqlens)
        T, H = x.shape
        if scores.dtype != torch.float32 or not scores.is_contiguous():
            scores = scores.float().contiguous()
        th = THRESHOLDS
        y = torch.empty((T, H), dtype=x.dtype)
        rc = self._fn(
            x.data_ptr(), x.stride(0), _DTYPE_CODES[x.dtype], scores.data_ptr(), *self._weights, cu_seqlens.data_ptr(),
            cu_seqlens.shape[0] - 1, T, self.E, self.D, H, y.data_ptr(), num_threads or _THREADS, UP_ROW_COST,
            allow_dense, th.cpu_min_dense_tokens, th.cpu_max_pair_fraction,
            self._stats_address(stats), _isa_code(isa), all_experts, *self._scales,
        )  # fmt: skip
        if rc == 0:
            return y
        if rc == 1:
            return None
        _check_rc(rc, "sparse_ffn", x, self.tensors[0])
        return y

    def with_router(self, x: torch.Tensor, w_router: torch.Tensor, norm_w: torch.Tensor, eps: float,
                    cu_seqlens: torch.Tensor, stats: np.ndarray | None = None, num_threads: int | None = None,
                    isa: str | None = None) -> torch.Tensor:
        """The layer's ReLU + RMS-norm router (``w_router`` [E, H] in x's dtype, ``norm_w`` [E]) and these
        experts in one kernel call (``blockffn_router_sparse_ffn``): scores = relu(x W_rᵀ) · rsqrt(mean
        relu(·)² + eps) · norm_w, as ``BlockFFN.router`` computes them, then :meth:`__call__` on them
        (sparse always). For decode-size steps on CPUs, where the router as separate ops costs more
        than reading it."""
        x, cu_seqlens = self._inputs(x, cu_seqlens)
        T, H = x.shape
        E = self.E
        if w_router.dtype != x.dtype or tuple(w_router.shape) != (E, H) or tuple(norm_w.shape) != (E,):
            raise ValueError(f"router: w_router {w_router.dtype} {list(w_router.shape)}, norm_w {list(norm_w.shape)}; "
                             f"expected {x.dtype} [{E}, {H}] and [{E}]")
        w_router = w_router.contiguous()
        if self._norm[0] is not norm_w or self._norm[1] != norm_w.data_ptr():  # its fp32 copy, made once
            self._norm = (norm_w, norm_w.data_ptr(), norm_w.float().contiguous())
        th = THRESHOLDS
        y = torch.empty((T, H), dtype=x.dtype)
        xdt = _DTYPE_CODES[x.dtype]
        rc = self._lib.blockffn_router_sparse_ffn(
            x.data_ptr(), x.stride(0), xdt, w_router.data_ptr(), xdt, self._norm[2].data_ptr(), eps, *self._weights,
            cu_seqlens.data_ptr(), cu_seqlens.shape[0] - 1, T, E, self.D, H, y.data_ptr(), num_threads or _THREADS,
            UP_ROW_COST, False, th.cpu_min_dense_tokens, th.cpu_max_pair_fraction, self._stats_address(stats),
            _isa_code(isa), *self._scales,
        )  # fmt: skip
        if rc:
            _check_rc(rc, "router + sparse_ffn", x, self.tensors[0])
        return y

    def _inputs(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] with unit column stride and int32 contiguous segments, or a ValueError naming x."""
        if x.dim() != 2 or x.shape[1] != self.H:
            raise ValueError(f"sparse_ffn: x {list(x.shape)} for experts [E, D, H] = {[self.E, self.D, self.H]}; "
                             f"expected x [T, {self.H}]")
        if x.stride(1) != 1:
            x = x.contiguous()
        if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
            cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        return x, cu_seqlens

    def _stats_address(self, stats: np.ndarray | None) -> int | None:
        """The counters' address, checked once per array: a layer adds to the same row every step, and
        numpy's attribute reads cost ~10 µs per call in a decode step (cold caches)."""
        if stats is None:
            return None
        if stats is not self._stats[0]:
            self._stats = (stats, _stats_ptr(stats))
        return self._stats[1]


def bound_experts(w_up: torch.Tensor, w_down_t: torch.Tensor, up_scale: torch.Tensor | None = None,
                  down_scale: torch.Tensor | None = None) -> NativeExperts:
    """The :class:`NativeExperts` of these weights, made on the first call and kept on ``w_up`` (a
    served model passes the same parameter objects every step); made again when the tensors behind
    it changed (new storage, other scales)."""
    b = getattr(w_up, "_blockffn_native", None)
    if b is not None and b.w_up_ptr == w_up.data_ptr() and b.tensors[1] is w_down_t and b.tensors[2] is up_scale \
            and b.tensors[3] is down_scale:
        return b
    b = NativeExperts(w_up, w_down_t, up_scale, down_scale)
    if b.tensors[0] is w_up and b.tensors[2] is up_scale and b.tensors[3] is down_scale:
        w_up._blockffn_native = b  # contiguous already: the binding describes exactly these tensors
    return b


def sparse_ffn_native(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    allow_dense: bool = False,
    num_threads: int | None = None,
    stats: np.ndarray | None = None,
    isa: str | None = None,
    all_experts: bool = False,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """y [T, H] computing only the active (token, expert) pairs, each active expert read once.

    Tokens outside [cu[0], cu[S]) (vLLM's padding) get y = 0. With ``allow_dense``, returns
    None instead when :func:`~..dispatch.cpu_native_prefers_dense` says dense GEMMs win (the
    kernel evaluates that rule on the counts it scans anyway). Call :func:`native_supports`
    first: this assumes a loaded kernel and fp32/bf16 CPU tensors. ``stats``: an int64 [5]
    array of live counters (vllm_blockffn.observe.stats columns) to add this call's to, from
    the scan the kernel does anyway (also when it declines). ``isa``: force a path (see
    :func:`cpu_isa`). Active pairs: score > 0 (NaN inactive; the module docstring).
    ``all_experts``: the dense layer (every expert for every token in range, inactive pairs weighted
    by 0), streamed like the sparse one: the dense baseline at decode sizes (``dense_ffn``).
    int8 weights: ``up_scale`` [E, D] and ``down_scale`` [E, H] (kernels/quant.py), checked here.
    """
    return bound_experts(w_up, w_down_t, up_scale, down_scale)(x, scores, cu_seqlens, allow_dense, stats,
                                                               num_threads, isa, all_experts)


def _check_rc(rc: int, op: str, x: torch.Tensor, w: torch.Tensor) -> None:
    """The kernel's return code as an exception: -2 bad arguments, -3 a bad ``$VLLM_BLOCKFFN_CPU_ISA``,
    any other non-zero no memory."""
    if rc == -2:
        raise ValueError(f"blockffn {op} CPU kernel: bad arguments (x {tuple(x.shape)}, weight {tuple(w.shape)})")
    if rc == -3:
        raise _bad_isa_env()
    if rc != 0:
        raise MemoryError(f"blockffn {op} CPU kernel: out of memory")


def _stats_ptr(stats: np.ndarray) -> int:
    if stats.dtype != np.int64 or stats.shape != (5,) or not stats.flags.c_contiguous:
        raise ValueError(f"stats must be a contiguous int64 array of 5 counters, got {stats.dtype} {stats.shape}")
    return stats.__array_interface__["data"][0]


def count_native(scores: torch.Tensor, cu_seqlens: torch.Tensor, stats: np.ndarray) -> bool:
    """Add one step's sparsity counters to ``stats`` (int64 [5]) without running the experts.

    For steps that do not run the sparse kernel (the dense backend, the PyTorch fallback):
    the same C scan, well under the ~30 µs numpy needs. False when the kernel is unavailable
    (the caller counts another way)."""
    lib = _load()
    if lib is None or scores.device.type != "cpu":
        return False
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        scores = scores.float().contiguous()
    if cu_seqlens.dtype != torch.int32 or not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    T, E = scores.shape
    rc = lib.blockffn_sparse_ffn(
        None, 0, 0, scores.data_ptr(), None, None, 0, cu_seqlens.data_ptr(), cu_seqlens.shape[0] - 1,
        T, E, 0, 0, None, 1, 0.0, 0, 0, 0.0, _stats_ptr(stats), -1, 0, None, None, None,
    )  # fmt: skip
    if rc == -1:
        raise MemoryError("blockffn counters: out of memory")
    return rc == 2
