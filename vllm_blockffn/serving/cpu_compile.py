"""CPUs: inductor's C++ wrapper for BlockFFN models' compiled graphs.

Why: a compiled CPU decode step of an XLarge-sized BlockFFN model makes ~140 calls into C++ (the linears, the
router + experts and attention ops of kernels/sparse_ffn/cpu_ops.cpp) and ~100 inductor kernels (norms,
residuals, RoPE), and inductor's default wrapper makes every one of them from Python: each op call parses its
arguments against its schema (~3-5 µs), each kernel call is a Python call too. The gaps between our kernels
were ~4-6 ms of a 37-61 ms step (benchmarks/step_breakdown_cpu.py, RESULTS.md). With
``inductor_compile_config["cpp_wrapper"]`` inductor emits the graph's wrapper in C++: the same kernels and
ops in the same order, called from compiled code.

What: :func:`apply` (from the model's config hook, patches/models_config_map.py) sets ``cpp_wrapper`` in the
compilation config of a BlockFFN model served on CPU, unless the user set it (``--compilation-config
'{"inductor_compile_config": {"cpp_wrapper": false}}'`` keeps Python's wrapper) or
``VLLM_BLOCKFFN_CPP_WRAPPER=off``. Graphs only: eager mode (``enforce_eager``) compiles nothing, and the key
then changes nothing. The first compile of a model takes longer (the wrapper is compiled with the kernels);
vLLM's compile cache keeps it for the next start.
"""

from __future__ import annotations

from vllm_blockffn.serving.config import env_choice

CPP_WRAPPER_ENV = "VLLM_BLOCKFFN_CPP_WRAPPER"
"""auto (default: inductor's C++ wrapper for BlockFFN models on CPU) | off (inductor's Python wrapper)."""


def apply(vllm_config) -> bool:
    """Turn inductor's C++ wrapper on for this CPU engine (module docstring); True when it is on."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    cfg = vllm_config.compilation_config.inductor_compile_config
    if "cpp_wrapper" not in cfg and env_choice(CPP_WRAPPER_ENV, ("auto", "off"), "auto") == "auto":
        cfg["cpp_wrapper"] = True
    return bool(cfg.get("cpp_wrapper", False))
