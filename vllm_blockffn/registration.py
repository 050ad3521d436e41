"""What the `vllm.general_plugins` entry point registers; safe to run many times per process."""

from __future__ import annotations

ARCHITECTURE = "BlockFFNForCausalLM"


def register_all() -> None:
    from vllm import ModelRegistry

    from vllm_blockffn.observe.metrics import setup_process as setup_metrics
    from vllm_blockffn.patches import apply_all

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_blockffn.serving.model:BlockFFNForCausalLM")
    if "EagleBlockFFNForCausalLM" not in ModelRegistry.get_supported_archs():  # EAGLE heads (eagle.py)
        ModelRegistry.register_model("EagleBlockFFNForCausalLM", "vllm_blockffn.serving.eagle:EagleBlockFFNForCausalLM")
    apply_all()
    setup_metrics()
    # `--quantization blockffn_int8` (registers itself with vLLM on import; once per process)
    import vllm_blockffn.serving.layers.quantization  # noqa: F401
