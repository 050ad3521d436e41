"""`vllm serve` exposes BlockFFN sparsity on /metrics, equal to the paper's metrics on the same tokens."""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

from vllm_blockffn.observe.sparsity import token_sparsity
from vllm_blockffn.reference import load_reference
from vllm_blockffn.tools.demo import VLLMServer

PORT = 18741


def scrape(port: int) -> dict[tuple[str, str], float]:
    """{(metric name, layer label or ''): value} for the vllm_blockffn: metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(vllm_blockffn:[a-z_]+)\{([^}]*)\} (\S+)$', line)
        if m:
            layer = re.search(r'layer="(\d+)"', m.group(2))
            out[(m.group(1), layer.group(1) if layer else "")] = float(m.group(3))
    return out


@pytest.mark.slow
def test_metrics_endpoint_matches_reference_sparsity(tiny_factory):
    from openai import OpenAI

    path = tiny_factory(norm="none")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_BLOCKFFN_STATS_INTERVAL": "0"}
    with VLLMServer(path, PORT, extra_args=["--dtype", "float32"], env=env) as server:
        client = OpenAI(base_url=server.base_url, api_key="none")
        out = client.completions.create(model=path, prompt="The logging module defines functions", max_tokens=8,
                                        temperature=0, logprobs=0, extra_body={"ignore_eos": True,
                                                                               "return_token_ids": True})
        choice = out.choices[0]
        ids = list(choice.prompt_token_ids) + list(choice.token_ids)
        metrics = scrape(PORT)
    # every token but the last generated one went through the experts
    _, traces = load_reference(path)(torch.tensor(ids[:-1]), return_router=True)
    n_prompt = len(choice.prompt_token_ids)
    assert {name for name, _ in metrics} >= {
        "vllm_blockffn:token_sparsity", "vllm_blockffn:chunk_sparsity", "vllm_blockffn:tokens_total",
        "vllm_blockffn:expert_bytes_read_total", "vllm_blockffn:expert_bytes_dense_total"}
    E = traces[0].active.shape[1]
    for layer, trace in enumerate(traces):
        active = trace.active
        assert metrics[("vllm_blockffn:tokens_total", str(layer))] == len(ids) - 1
        assert metrics[("vllm_blockffn:token_sparsity", str(layer))] == pytest.approx(token_sparsity(active), abs=1e-9)
        union = int(active[:n_prompt].any(0).sum()) + int(active[n_prompt:].sum())
        segments = 1 + (len(ids) - 1 - n_prompt)
        expected_cls = 1 - union / (segments * E)
        assert metrics[("vllm_blockffn:chunk_sparsity", str(layer))] == pytest.approx(expected_cls, abs=1e-9)
    read, dense = metrics[("vllm_blockffn:expert_bytes_read_total", "")], metrics[
        ("vllm_blockffn:expert_bytes_dense_total", "")]
    assert 0 < read < dense
