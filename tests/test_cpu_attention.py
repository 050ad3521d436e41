"""The C++ attention call (serving/layers/cpu_attention.py, kernels/sparse_ffn/cpu_ops.cpp) against vLLM's
CPU backend (bit for bit: the same kernels with the same arguments) and against plain PyTorch attention over
the tokens written so far; engines with it and with vLLM's attention ops give the same tokens, prompt
logprobs and KV caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import vllm._custom_ops as vops
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.plugins import load_general_plugins
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata, _get_attn_isa
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops

from vllm_blockffn.serving.layers import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_native.native_available() or cpu_ops.implementation() != "cpp",
                                reason="needs the C++ CPU ops")

H, KVH, D, BS = 4, 2, 64, 32
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "blockffn-tiny-trained")
BLOCKS = {0: [3, 1], 1: [0, 4]}  # request -> its KV cache blocks (not in order, as vLLM hands them out)


def _steps():
    """(new tokens per request) for: a prefill of both, a decode step, verify chunks (3 + 1 tokens), and a
    padded step (2 padding rows past the last request)."""
    return [((37, 5), 0), ((1, 1), 0), ((3, 1), 0), ((1, 1), 2)]


def _metadata(lens, done, dtype, isa, pad):
    qsl = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32)
    seq_lens = torch.tensor([done[0] + lens[0], done[1] + lens[1]], dtype=torch.int32)
    table = torch.tensor([BLOCKS[0], BLOCKS[1]], dtype=torch.int32)
    slots = []
    for r in range(2):
        for p in range(done[r], done[r] + lens[r]):
            slots.append(BLOCKS[r][p // BS] * BS + p % BS)
    slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64)
    sched = vops.cpu_attn_get_scheduler_metadata(num_reqs=2, num_heads=H, num_kv_heads=KVH, head_dim=D,
                                                 seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
                                                 sliding_window_size=-1, isa=isa, enable_kv_split=False)
    return CPUAttentionMetadata(num_actual_tokens=sum(lens), max_query_len=max(lens), query_start_loc=qsl,
                                max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=table,
                                slot_mapping=slot_mapping, scheduler_metadata=sched, causal=True)


def _plain(q, keys, values, start, scale):
    """Causal attention of q [n, H, D] (positions start..start+n-1) over keys/values [L, KVH, D] in fp32."""
    k = keys.float().repeat_interleave(H // KVH, dim=1)
    v = values.float().repeat_interleave(H // KVH, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    pos = torch.arange(start, start + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_op_equals_vllms_cpu_backend_and_plain_attention(dtype):
    torch.manual_seed(0)
    scale = D ** -0.5
    isa = _get_attn_isa(dtype, BS, D)
    if isa == "amx":  # the tile state is granted per process: vLLM's engine has oneDNN ask, a bare test asks itself
        assert torch._C._cpu._init_amx()
    load_general_plugins()  # the BlockFFN architecture, for the model config the backend reads its dtype from
    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(MODEL, dtype=dtype))):
        impl = CPUAttentionBackendImpl(H, D, scale, KVH, None, None, "auto")
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    ours, theirs = (torch.zeros(6, KVH, BS, 2 * D, dtype=dtype) for _ in range(2))
    step = torch.zeros(8, dtype=torch.int32)
    ops = torch.ops.blockffn_native
    ops.attention_layers(step, [ours], [isa], [scale, -1.0, 0.0, 1.0, 1.0])
    done, keys, values = [0, 0], [[], []], [[], []]
    try:
        for lens, pad in _steps():
            md = _metadata(lens, done, dtype, isa, pad)
            T = sum(lens) + pad
            q, k, v = (torch.randn(T, n, D).to(dtype) for n in (H, KVH, KVH))
            ops.attention_step(step, [md.query_start_loc, md.seq_lens, md.block_table, md.scheduler_metadata,
                                      md.slot_mapping, torch.empty(0)], [md.num_actual_tokens, 1, 1, 0, 0])
            out = torch.full((T, H, D), 7.0, dtype=dtype)
            ops.attention(q, k, v, out, step, 0)
            ref = torch.full((T, H, D), 7.0, dtype=dtype)
            impl.do_kv_cache_update(layer, k, v, theirs, md.slot_mapping)
            impl.forward(layer, q, k, v, theirs, md, output=ref)
            # the cache as vLLM's backend writes it (its layout depends on the ISA), the output bit for bit
            assert torch.equal(out, ref) and torch.equal(ours, theirs), (lens, pad)
            assert torch.all(out[sum(lens):] == 7.0), "padding rows are left as they were"
            at = 0
            for r in range(2):
                keys[r].append(k[at:at + lens[r]])
                values[r].append(v[at:at + lens[r]])
                # the cache holds every token written so far: attention over them in plain PyTorch
                want = _plain(q[at:at + lens[r]], torch.cat(keys[r]), torch.cat(values[r]), done[r], scale)
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                torch.testing.assert_close(out[at:at + lens[r]].float(), want, atol=tol, rtol=tol)
                at += lens[r]
                done[r] += lens[r]
        # a step without metadata (warm-up, profiling): nothing written, output untouched
        ops.attention_step(step, [], [-1])
        before = ours.clone()
        out = torch.full((1, H, D), 7.0, dtype=dtype)
        ops.attention(torch.randn(1, H, D).to(dtype), torch.randn(1, KVH, D).to(dtype),
                      torch.randn(1, KVH, D).to(dtype), out, step, 0)
        assert torch.all(out == 7.0) and torch.equal(ours, before)
    finally:
        ops.attention_release(step)


def test_attention_op_names_what_is_wrong():
    ops = torch.ops.blockffn_native
    step = torch.zeros(8, dtype=torch.int32)
    x = torch.zeros(1, H, D)
    with pytest.raises(RuntimeError, match="no attention published"):
        ops.attention(x, x[:, :KVH], x[:, :KVH], x.clone(), step, 0)
    with pytest.raises(ValueError, match="expected 1, 1 and 5"):
        ops.attention_layers(step, [torch.zeros(2, KVH, BS, 2 * D)], ["vec"], [1.0])
    with pytest.raises(ValueError, match=r"kv_caches\[0\]"):
        ops.attention_layers(step, [torch.zeros(2, KVH, BS, 3)], ["vec"], [1.0, -1.0, 0.0, 1.0, 1.0])
    try:
        ops.attention_layers(step, [torch.empty(0)], [""], [1.0, -1.0, 0.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="layer 3 of a model with 1"):
            ops.attention(x, x[:, :KVH], x[:, :KVH], x.clone(), step, 3)
        with pytest.raises(ValueError, match="names set 2"):
            ops.attention_step(step, [], [2])
        t = torch.zeros(3, dtype=torch.int32)
        ops.attention_step(step, [t, t, t, t, t, t], [1, 1, 1, 0, 0])
        with pytest.raises(RuntimeError, match="no KV cache bound"):
            ops.attention(x, x[:, :KVH], x[:, :KVH], x.clone(), step, 0)
    finally:
        ops.attention_release(step)


_ENGINE = r"""
import hashlib, json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(args["model"], dtype="bfloat16", max_model_len=512, seed=0, max_num_seqs=4, max_num_batched_tokens=48,
          kv_cache_memory_bytes=1 << 26, enable_prefix_caching=True, **args["kw"])
shared = "A long shared prefix that the second round finds in the prefix cache: " * 2
prompts = [shared + "one", "Short", shared + "two and a few more words", "1 2 3 4 5 6 7 8 9 10 11 12"]
out = []
for round_ in range(2):  # the second round hits the prefix cache; max_num_batched_tokens=48 chunks the prefills
    for o in llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)):
        out.append({"tokens": list(o.outputs[0].token_ids),
                    "lp": [None if d is None else max(v.logprob for v in d.values()) for d in o.prompt_logprobs]})
def caches(m):
    return [hashlib.sha256(x.self_attn.attn.kv_cache.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for x in m.model.layers]
import torch
print("BLOCKFFN-RESULT " + json.dumps({"out": out, "caches": llm.apply_model(caches)[0],
      "classes": llm.apply_model(lambda m: sorted({type(x.self_attn.attn).__name__ for x in m.model.layers}))[0]}))
"""


def _engine(kw: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _ENGINE, json.dumps({"model": MODEL, "kw": kw})],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BLOCKFFN-RESULT ")), None)
    assert proc.returncode == 0 and line, f"engine exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("kw", [{}, {"enforce_eager": True}], ids=["compiled", "eager"])
def test_engine_with_the_cpp_attention_equals_vllms_attention_ops(kw):
    """Batched requests, chunked prefills beside decodes, prefix-cache hits: the same tokens, prompt logprobs
    and KV caches (every layer, bit for bit) with the C++ attention call as with vLLM's ops."""
    cpp = _engine(kw, {})
    py = _engine(kw, {cpu_ops.OPS_ENV: "python"})
    assert cpp["classes"] == ["StepAttention"] and py["classes"] == ["Attention"]
    assert cpp["out"] == py["out"]
    assert cpp["caches"] == py["caches"]


def test_the_switch_keeps_vllms_attention_ops():
    """VLLM_BLOCKFFN_CPU_ATTENTION=vllm: vLLM's ops for every layer, the C++ ops otherwise as before, the
    same tokens; a value it does not know is named."""
    vllm = _engine({}, {cpu_attention.ATTENTION_ENV: "vllm"})
    assert vllm["classes"] == ["Attention"]
    assert vllm["out"] == _engine({}, {})["out"]
    with pytest.raises(AssertionError, match="VLLM_BLOCKFFN_CPU_ATTENTION='sdpa'; expected one of"):
        _engine({}, {cpu_attention.ATTENTION_ENV: "sdpa"})
