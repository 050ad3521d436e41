"""Triton plumbing shared by the kernel folders.

Kernels are decorated with ``triton.jit`` lazily, at their first launch, and once per
interpreter mode. Triton decides between the compiled and the interpreted kernel when
``triton.jit`` runs, so decorating at import time would freeze that choice for the whole
process: a test that sets ``TRITON_INTERPRET=1`` for itself only would then get compiled
kernels (useless on a CPU) if another module imported us first, and setting it globally
would leak into everything else that runs in the process. Deciding per launch keeps the
switch local to the code that sets it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

try:  # Triton is optional: the CPU path of vLLM never needs it.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

_TRUE = {"1", "true", "on", "yes"}


def interpret_mode() -> bool:
    """Whether Triton kernels launched now run in the CPU interpreter (TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_usable(device: Any) -> bool:
    """Whether a Triton kernel can run on tensors living on ``device``."""
    if not HAS_TRITON:
        return False
    dev_type = getattr(device, "type", device)
    return dev_type == "cuda" or (dev_type == "cpu" and interpret_mode())


class lazy_jit:  # noqa: N801  (used like the triton.jit decorator)
    """``triton.jit`` applied at launch time, one JIT object per interpreter mode."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._variants: dict[bool, Any] = {}

    def jitted(self) -> Any:
        if not HAS_TRITON:
            raise RuntimeError("Triton is not installed; the Triton kernels are unavailable")
        mode = interpret_mode()
        kernel = self._variants.get(mode)
        if kernel is None:
            kernel = triton.jit(self.fn)
            self._variants[mode] = kernel
        return kernel

    def __getitem__(self, grid: Any) -> Any:
        launcher = self.jitted()[grid]
        if not interpret_mode():
            return launcher

        def run(*args: Any, **kwargs: Any) -> Any:
            with _interpretable_language():
                return launcher(*args, **kwargs)

        return run


_interpreted_stdlib: dict[str, Any] = {}


def _language_objects() -> list[Any]:
    """The modules and classes that Triton's interpreter patches while it runs a kernel."""
    core = tl.core
    objs = [tl, core, tl.math, tl.standard]
    for name in ("tensor", "condition", "dtype", "tensor_descriptor_base"):
        if hasattr(core, name):
            objs.append(getattr(core, name))
    return objs


@contextlib.contextmanager
def _interpretable_language() -> Iterator[None]:
    """Make ``tl.sum``, ``tl.max``, ``tl.cumsum``... callable from an interpreted kernel.

    Triton's own library functions (triton/language/standard.py) are decorated when
    triton is imported; if TRITON_INTERPRET was unset then, they are compiled-mode
    ``JITFunction`` objects that refuse to run inside the interpreter. For the duration of
    an interpreted launch, swap them for interpreted twins. The interpreter patches the
    language modules while a twin runs and does not undo it (it never has to when it owns
    the process), so every attribute of those modules and classes is put back afterwards:
    compiled kernels launched later in the same process see an untouched ``triton.language``.
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction

    saved = [(obj, dict(vars(obj))) for obj in _language_objects()]
    saved.append((InterpreterBuilder, dict(vars(InterpreterBuilder))))
    InterpreterBuilder.create_dot = _bf16_exact_dot(InterpreterBuilder.create_dot)
    for name, value in list(vars(tl).items()):
        if isinstance(value, JITFunction):
            twin = _interpreted_stdlib.get(name)
            if twin is None or twin.fn is not value.fn:
                twin = _interpreted_stdlib[name] = InterpretedFunction(value.fn)
            setattr(tl, name, twin)
    try:
        yield
    finally:
        for obj, attrs in saved:
            # Names the interpreter added to a module's globals (its helpers, which its
            # cached rewritten functions use) stay; names added to classes go.
            if isinstance(obj, type):
                for name in [n for n in vars(obj) if n not in attrs]:
                    delattr(obj, name)
            for name, value in attrs.items():
                if vars(obj).get(name, _MISSING) is not value:
                    setattr(obj, name, value)


_MISSING = object()


def _bf16_exact_dot(create_dot: Callable[..., Any]) -> Callable[..., Any]:
    """The interpreter's ``tl.dot`` with bf16 operands read as numbers: Triton 3.9 stores bf16
    tiles as their uint16 bit patterns and multiplies those (see ``dot_mode``). Our own kernels
    upcast before their dots (``DOT_MODE=2``); vLLM's fused-MoE kernel, which we run unchanged,
    dots bf16 tiles directly. Widening the bits to fp32 gives the exact products a GPU's
    fp32-accumulating bf16 dot computes."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    def widen(h: Any) -> Any:
        if h.dtype == tl.bfloat16:
            return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    return dot


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_mode(dtype: Any) -> int:
    """The ``DOT_MODE`` constexpr of our kernels for operands of ``dtype``.

    0: native ``tl.dot`` (bf16/fp16 on a GPU, fp32 accumulation);
    1: fp32 operands with ``input_precision="ieee"`` (no TF32 rounding, so fp32 results
       match a float32 reference);
    2: upcast to fp32 first: the Triton 3.9 interpreter multiplies bf16 tiles as their raw
       uint16 bit patterns, so under TRITON_INTERPRET bf16 dots go through fp32 (exact
       products, the same fp32 accumulation as the GPU).
    """
    import torch

    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and interpret_mode():
        return 2
    return 0
