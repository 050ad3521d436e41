"""vLLM's own machinery with a BlockFFN model: paged KV cache, continuous batching of prompts
of different lengths, prefix caching, chunked prefill with a small token budget."""

from __future__ import annotations

import pytest
from conftest import PROMPTS

from vllm_blockffn.reference import load_reference

LONG = " ".join(["The json module exposes an API familiar to users of the standard library marshal "
                 "and pickle modules."] * 4)
SHARED = "Return a new dictionary initialized from an optional positional argument and a possibly empty set"
BATCH = [*PROMPTS, LONG, SHARED + " of keyword arguments.", SHARED + " of items."]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["vanilla", "mla"])
def test_prefix_caching_and_chunked_prefill_keep_greedy_outputs(tiny_factory, engine_factory, attention):
    path = tiny_factory(attention=attention)
    reference = load_reference(path)

    plain = engine_factory(path, enable_prefix_caching=False, max_num_batched_tokens=2048)
    baseline = [list(o.outputs[0].token_ids) for o in plain.greedy(BATCH)]
    assert len(plain.llm.get_tokenizer()(LONG)["input_ids"]) > 64  # longer than the chunk budget below
    plain.close()

    chunked = engine_factory(path, enable_prefix_caching=True, enable_chunked_prefill=True,
                             max_num_batched_tokens=32, max_num_seqs=4)
    first = chunked.greedy(BATCH)
    second = chunked.greedy(BATCH)  # the same prompts again: their prefixes are now cached
    assert [list(o.outputs[0].token_ids) for o in first] == baseline
    assert [list(o.outputs[0].token_ids) for o in second] == baseline
    assert sum(o.num_cached_tokens or 0 for o in second) > 0, "prefix cache was never hit"
    for out, tokens in zip(first, baseline):
        assert tokens == reference.greedy(out.prompt_token_ids, 16)
