"""`vllm serve` with the plugin, in a subprocess, queried with the `openai` client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PROMPTS

from vllm_blockffn.reference import load_reference
from vllm_blockffn.tools.demo import VLLMServer

PORT = 18731


@pytest.fixture(scope="module")
def server(tiny_factory):
    # The checkpoint carries remote-code stubs that raise if imported: with
    # --trust-remote-code the plugin must still never execute them.
    path = tiny_factory(attention="mla", remote_code=True)
    with VLLMServer(path, PORT, extra_args=["--dtype", "float32", "--trust-remote-code"],
                    env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as srv:
        yield srv
    assert srv.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="none", timeout=120)


def complete(client, model, prompt, max_tokens=12):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


@pytest.mark.slow
def test_models_endpoint_lists_the_checkpoint(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]


@pytest.mark.slow
def test_completion_matches_reference(client, server):
    reference = load_reference(server.model)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=f"{server.model}/tokenizer.json")
    out = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    ids = tok(PROMPTS[0])["input_ids"]
    expected = tok.decode(reference.greedy(ids, 12), skip_special_tokens=True)
    assert out.choices[0].text == expected
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_streaming_completion_equals_non_streaming(client, server):
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model=server.model, prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == complete(client, server.model, PROMPTS[2])


@pytest.mark.slow
def test_concurrent_requests_equal_sequential(client, server):
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS + PROMPTS[:3])]
    assert len(prompts) == 8
    sequential = [complete(client, server.model, p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda p: complete(client, server.model, p), prompts))
    assert concurrent == sequential
    assert len(set(sequential)) > 1


@pytest.mark.slow
def test_chat_completion(client, server):
    out = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content and out.usage.completion_tokens == 8
