"""CPUs: inductor's C++ wrapper for BlockFFN models' compiled graphs.

Why: a compiled CPU decode step of an XLarge-sized BlockFFN model makes ~140 calls into C++ (the linears, the
router + experts and attention ops of kernels/sparse_ffn/cpu_ops.cpp) and ~100 inductor kernels (norms,
residuals), and inductor's default wrapper makes every one of them from Python: each op call parses its
arguments against its schema (~3-5 µs), each kernel call is a Python call too. With
``inductor_compile_config["cpp_wrapper"]`` inductor emits the graph's wrapper in C++: the same kernels and ops
in the same order, called from compiled code (+4-9% tokens/s end to end, the same tokens; benchmarks/RESULTS.md,
2026-12-05 UTC).

When: :func:`apply`, called once the model's layers are built (BlockFFNModel.__init__, in each worker, before
anything is compiled; vLLM hashes the compilation config for its compile cache at compile time), turns it on
for a BlockFFN model on CPU when every graph the engine compiles can take it: every attention layer runs our
C++ call (vLLM's own attention ops take an opaque ``layer_name`` argument, which inductor's C++ wrapper cannot
pass: "arg type PyObject is not yet supported by custom_op_wrapper"), so not with
``VLLM_BLOCKFFN_CPU_ATTENTION=vllm``, ``VLLM_BLOCKFFN_CPU_OPS=python``, MLA layers or a speculative draft model
(its layers keep vLLM's attention). A ``cpp_wrapper`` the user set (``--compilation-config
'{"inductor_compile_config": {"cpp_wrapper": false}}'``) is left as set, and ``VLLM_BLOCKFFN_CPP_WRAPPER=off``
keeps Python's wrapper. Eager engines compile nothing: the key then changes nothing. The first compile of a
model takes ~25 s longer (the wrapper is compiled with the kernels); vLLM's compile cache keeps it.
"""

from __future__ import annotations

import logging

import torch

from vllm_blockffn.serving.config import env_choice

logger = logging.getLogger(__name__)

CPP_WRAPPER_ENV = "VLLM_BLOCKFFN_CPP_WRAPPER"
"""auto (default: inductor's C++ wrapper where every compiled graph can take it) | off (Python's wrapper)."""


def mode() -> str:
    """``VLLM_BLOCKFFN_CPP_WRAPPER``: auto or off (a ValueError naming the variable otherwise)."""
    return env_choice(CPP_WRAPPER_ENV, ("auto", "off"), "auto")


def why_not(model: torch.nn.Module, vllm_config) -> str | None:
    """Why this engine's graphs keep inductor's Python wrapper, or None when the C++ wrapper can serve them."""
    from vllm.platforms import current_platform

    from vllm_blockffn.serving.layers.cpu_attention import StepAttention

    spec = vllm_config.speculative_config
    vllm_attention = [m for m in model.modules() if hasattr(m, "impl") and type(m) is not StepAttention]
    checks = (
        (current_platform.is_cpu(), "not a CPU"),
        (mode() == "auto", f"{CPP_WRAPPER_ENV}={mode()}"),
        (not vllm_attention, f"{len(vllm_attention)} attention layers on vLLM's ops"),
        (spec is None or getattr(spec, "draft_model_config", None) is None, "a speculative draft model"),
    )
    return next((why for ok, why in checks if not ok), None)


def apply(model: torch.nn.Module, vllm_config) -> bool:
    """Set ``cpp_wrapper`` for this engine's compiled graphs (module docstring); True when it is on."""
    cfg = vllm_config.compilation_config.inductor_compile_config
    if "cpp_wrapper" not in cfg:
        why = why_not(model, vllm_config)
        if why is None:
            cfg["cpp_wrapper"] = True
        else:
            logger.debug("blockffn: inductor's Python wrapper (%s)", why)
    return bool(cfg.get("cpp_wrapper", False))
