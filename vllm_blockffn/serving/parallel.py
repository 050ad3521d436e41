"""Which tensor / pipeline parallel sizes a BlockFFN checkpoint can be split into.

Pure config arithmetic (no torch, no vLLM): the front-end check registered by
`patches/models_config_map.py` and the tests share it.
"""

from __future__ import annotations

from vllm_blockffn.serving.config import BlockFFNConfigError, BlockFFNSpec


def parallel_size_problems(spec: BlockFFNSpec, tensor_parallel_size: int,
                           pipeline_parallel_size: int = 1) -> list[str]:
    """One sentence per config.json field that does not fit; empty when the sizes fit.

    - `expert_size`: every expert's d_e columns are split across the TP ranks.
    - `num_attention_heads`: heads are split across the TP ranks (vanilla and MLA).
    - `num_key_value_heads` (vanilla only; MLA's latent KV is replicated): split
      across the ranks when TP <= KV heads, each replicated TP/KV times otherwise.
    - `num_hidden_layers`: every pipeline stage needs at least one layer.
    """
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    problems = []
    if spec.expert_size % tp:
        problems.append(
            f"expert_size={spec.expert_size} is not divisible by tensor_parallel_size={tp} "
            f"(vllm-blockffn splits every expert's {spec.expert_size} columns evenly across the TP ranks)")
    if spec.num_attention_heads % tp:
        problems.append(f"num_attention_heads={spec.num_attention_heads} is not divisible by "
                        f"tensor_parallel_size={tp}")
    kv = spec.num_key_value_heads
    if spec.attention_type == "vanilla" and (kv % tp if tp <= kv else tp % kv):
        problems.append(
            f"num_key_value_heads={kv} does not fit tensor_parallel_size={tp} (KV heads are split "
            f"across ranks when TP <= {kv}, so {kv} must be divisible by TP; when TP > {kv} each is "
            f"replicated, so TP must be a multiple of {kv})")
    if pp > spec.num_hidden_layers:
        problems.append(f"num_hidden_layers={spec.num_hidden_layers} is smaller than "
                        f"pipeline_parallel_size={pp} (every stage needs at least one layer)")
    return problems


def valid_tensor_parallel_sizes(spec: BlockFFNSpec, limit: int = 64) -> list[int]:
    return [tp for tp in range(1, limit + 1) if not parallel_size_problems(spec, tp)]


def check_parallel_sizes(spec: BlockFFNSpec, tensor_parallel_size: int, pipeline_parallel_size: int = 1,
                         source: str = "config.json") -> None:
    """Raise BlockFFNConfigError naming every field that does not fit, and the TP sizes that would."""
    problems = parallel_size_problems(spec, tensor_parallel_size, pipeline_parallel_size)
    if problems:
        sizes = ", ".join(map(str, valid_tensor_parallel_sizes(spec, limit=16)))
        raise BlockFFNConfigError(
            f"{source}: this BlockFFN checkpoint cannot run with tensor_parallel_size={tensor_parallel_size}, "
            f"pipeline_parallel_size={pipeline_parallel_size}: " + "; ".join(problems)
            + f". Tensor parallel sizes up to 16 that fit: {sizes}.")
