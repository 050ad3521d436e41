"""vllm-blockffn: BlockFFN models in vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (runs in every vLLM process, maybe twice)."""
    from vllm_blockffn.registration import register_all

    register_all()
