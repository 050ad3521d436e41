"""Inductor's C++ wrapper for BlockFFN models on CPU (serving/cpu_compile.py): on where every compiled graph can
take it, off where vLLM's own attention ops would be in a graph, off by the switch, the user's setting kept; the
same tokens and prompt logprobs either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops

from vllm_blockffn.serving import cpu_compile
from vllm_blockffn.serving.layers import cpu_attention

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "blockffn-tiny-trained")

_ENGINE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
llm = LLM(a["model"], dtype="bfloat16", max_model_len=256, seed=0, max_num_seqs=4, kv_cache_memory_bytes=1 << 26,
          **a["kw"])
prompts = ["Return the list of items in the dictionary.", "Hello", "1 2 3 4 5 6 7 8"]
plp = None if "speculative_config" in a["kw"] else 0
outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=plp))
rows = [{"tokens": list(o.outputs[0].token_ids),
         "lp": [None if d is None else max(v.logprob for v in d.values()) for d in (o.prompt_logprobs or [])]}
        for o in outs]
cfg = llm.llm_engine.vllm_config.compilation_config.inductor_compile_config
import gc
gc.unfreeze()  # (vLLM freezes its start-up objects out of gc's lists)
# each torch.compile(backend="inductor") holds its options, copied when it was called (the models' compile wrappers
# and a few small functions of vLLM's): how many compile with the C++ wrapper
wrappers = [w.config.get("cpp_wrapper") for w in gc.get_objects() if type(w).__name__ == "_TorchCompileInductorWrapper"]
mark = llm.llm_engine.vllm_config.additional_config.get("blockffn_cpp_wrapper")
print("BLOCKFFN-RESULT " + json.dumps({"out": rows, "cpp_wrapper": cfg.get("cpp_wrapper"), "mark": mark,
                                       "cpp_compiles": sum(w is True for w in wrappers)}))
"""
EAGLE_HEAD = os.path.join(os.path.dirname(MODEL), "blockffn-tiny-trained-eagle")


def _engine(env: dict, **kw) -> dict:
    proc = subprocess.run([sys.executable, "-c", _ENGINE, json.dumps({"model": MODEL, "kw": kw})],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BLOCKFFN-RESULT ")), None)
    assert proc.returncode == 0 and line, f"engine exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.skipif(not cpu_native.native_available() or cpu_ops.implementation() != "cpp",
                    reason="needs the C++ CPU ops")
def test_compiled_engines_take_the_cpp_wrapper_where_they_can_with_the_same_tokens():
    cpp = _engine({})
    assert cpp["cpp_wrapper"] is True and cpp["cpp_compiles"] == 1 and cpp["mark"] is None  # the model's graph
    off = _engine({cpu_compile.CPP_WRAPPER_ENV: "off"})
    assert off["cpp_wrapper"] is None and off["cpp_compiles"] == 0
    assert cpp["out"] == off["out"]  # tokens and prompt logprobs, exactly
    # vLLM's own attention ops in the graph (their opaque layer-name argument): Python's wrapper, and it serves
    vllm_ops = _engine({cpu_attention.ATTENTION_ENV: "vllm"})
    assert vllm_ops["cpp_wrapper"] is None and vllm_ops["out"] == cpp["out"]
    # the user's setting is kept
    user = _engine({}, compilation_config={"inductor_compile_config": {"cpp_wrapper": False}})
    assert user["cpp_wrapper"] is False and user["out"] == cpp["out"]


@pytest.mark.skipif(not cpu_native.native_available() or cpu_ops.implementation() != "cpp",
                    reason="needs the C++ CPU ops")
def test_with_an_eagle_head_the_target_takes_the_cpp_wrapper_and_the_head_pythons():
    """The EAGLE head (its layers on vLLM's attention ops) is built after the target in the same config: one compiled
    graph takes the C++ wrapper (the target's, built while the key was set; the head compiles too, without it), the
    engine is marked in vLLM's config hash, and the greedy tokens are those of the same engine with Python's wrapper
    everywhere."""
    spec = {"method": "eagle", "model": EAGLE_HEAD, "num_speculative_tokens": 3}
    cpp = _engine({}, speculative_config=spec)
    off = _engine({cpu_compile.CPP_WRAPPER_ENV: "off"}, speculative_config=spec)
    assert cpp["mark"] == "target" and off["mark"] is None
    assert cpp["cpp_wrapper"] is None  # taken out again before the head was built
    assert cpp["cpp_compiles"] == 1 and off["cpp_compiles"] == 0
    assert cpp["out"] == off["out"]


def test_the_switch_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_compile.CPP_WRAPPER_ENV, "python")
    with pytest.raises(ValueError, match="VLLM_BLOCKFFN_CPP_WRAPPER='python'; expected one of"):
        cpu_compile.mode()
