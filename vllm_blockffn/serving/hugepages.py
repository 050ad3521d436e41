"""Weights in 2 MiB pages on CPUs: every weight byte of a decode step is streamed once, and with 4 KiB
pages that stream crosses a page every 4 KiB — a TLB miss, and a stop for the hardware prefetcher,
which does not cross pages. On Linux with transparent huge pages in ``madvise`` mode (the common
default), memory is only backed by 2 MiB pages where it was asked for; torch does not ask unless
``THP_MEM_ALLOC_ENABLE=1`` was set before torch was imported (too late in most vLLM processes).

So after loading (``BlockFFNForCausalLM.process_weights_after_loading``, vLLM's model-level hook,
after every layer's quantization), each large CPU parameter's 2 MiB-aligned interior is advised
``MADV_HUGEPAGE`` and collapsed now with ``MADV_COLLAPSE`` (Linux ≥ 6.1; on older kernels khugepaged
collapses it later). Nothing is copied by torch, pointers do not change, and failure only leaves 4 KiB
pages (logged). ``VLLM_BLOCKFFN_HUGEPAGES=off`` turns it off; THP ``never`` does too. Measured in
benchmarks/RESULTS.md ("Huge pages").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

from vllm_blockffn.serving.config import env_choice

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

ENV = "VLLM_BLOCKFFN_HUGEPAGES"
"""``auto`` (default: advise and collapse large CPU weights where THP is not ``never``) | ``off``."""
MODES = ("auto", "off")
HUGE = 2 << 20
MIN_BYTES = 4 << 20
"""Parameters smaller than this are left alone (at most one 2 MiB page would be gained)."""
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def mode() -> str:
    return env_choice(ENV, MODES, "auto")


def thp_mode() -> str | None:
    """The kernel's THP setting (``always`` / ``madvise`` / ``never``), None where it cannot be read."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


_libc: ctypes.CDLL | None = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def advise(t: torch.Tensor) -> tuple[int, int]:
    """Advise and collapse the 2 MiB-aligned interior of a CPU tensor's storage.
    Returns (bytes advised, bytes collapsed now)."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    a, b = (start + HUGE - 1) & ~(HUGE - 1), end & ~(HUGE - 1)
    if b <= a:
        return 0, 0
    madvise = _madvise()
    if madvise(a, b - a, _MADV_HUGEPAGE) != 0:
        return 0, 0
    return b - a, (b - a if madvise(a, b - a, _MADV_COLLAPSE) == 0 else 0)


def place_weights(model: torch.nn.Module) -> tuple[int, int]:
    """Huge pages for every CPU parameter and buffer of ``model`` of at least MIN_BYTES (module
    docstring). Returns (bytes advised, bytes collapsed); (0, 0) where off or unsupported."""
    if mode() == "off" or not sys.platform.startswith("linux") or thp_mode() in (None, "never"):
        return 0, 0
    seen: set[int] = set()
    advised = collapsed = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu" or t.is_meta or t.untyped_storage().nbytes() < MIN_BYTES:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        a, c = advise(t)
        advised, collapsed = advised + a, collapsed + c
    if advised:
        logger.info("blockffn: %.2f GB of weights in 2 MiB pages (%.2f GB collapsed now; THP %s)",
                    advised / 1e9, collapsed / 1e9, thp_mode())
    return advised, collapsed
