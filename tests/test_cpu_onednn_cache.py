"""patches/cpu_onednn_cache.py: vLLM's CPU processes bound oneDNN's primitive cache, which vLLM's
`onednn_mm` (the EAGLE head's linears) fills with one primitive per token count — ~290 MB, and
heap fragmentation that kept the worker's RSS growing through benchmarks/soak.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained")
EAGLE_HEAD = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained-eagle")

# 600 onednn_mm calls with distinct M on one handler (the EAGLE head's gate_up shape): the malloc
# bytes they leave in use are the primitives the caches keep (~220 KiB each): vLLM's handler keeps
# 32, oneDNN's global cache up to its capacity (1,024 by default: ~166 MiB; 128: ~35 MiB).
PROBE = '''
import ctypes, json, os, torch
from vllm import _custom_ops as ops

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

def onednn_cache_growth_mib():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    in_use = lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd
    handler = ops.create_onednn_mm(torch.randn(1024, 256).t(), 32)
    x = torch.randn(1000, 256)
    ops.onednn_mm(handler, x[:5], None)
    before = in_use()
    for m in range(6, 606):
        ops.onednn_mm(handler, x[:m], None)
    return (in_use() - before) / 2**20
'''

ENGINE = PROBE + '''
import sys
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
llm = LLM(a["model"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
          gpu_memory_utilization=0.15, seed=0,
          speculative_config={"method": "eagle", "model": a["eagle"], "num_speculative_tokens": 3})
prompts = ["def main():", "import json\\n" * 20, "class A:\\n    pass\\n" * 9]
outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
# in-process engine: this process is the worker
print("BLOCKFFN-RESULT " + json.dumps(dict(capacity=os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                                           growth=onednn_cache_growth_mib())))
'''


def _run(script: str, env: dict, *args: str) -> dict:
    """`script` in a new Python process whose environment has no oneDNN cache setting but `env`'s."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                          env={**base, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BLOCKFFN-RESULT ")), None)
    assert proc.returncode == 0 and line, f"exit {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
    return json.loads(line.split(" ", 1)[1])


def test_apply_sets_a_bound_unless_the_user_chose(monkeypatch):
    from vllm_blockffn.patches import cpu_onednn_cache

    monkeypatch.delenv(cpu_onednn_cache.CAPACITY_ENV, raising=False)
    monkeypatch.delenv(cpu_onednn_cache.LEGACY_ENV, raising=False)
    cpu_onednn_cache.apply()
    assert os.environ[cpu_onednn_cache.CAPACITY_ENV] == str(cpu_onednn_cache.CAPACITY)
    for name in (cpu_onednn_cache.CAPACITY_ENV, cpu_onednn_cache.LEGACY_ENV):
        with monkeypatch.context() as m:
            m.delenv(cpu_onednn_cache.CAPACITY_ENV, raising=False)
            m.setenv(name, "512")
            cpu_onednn_cache.apply()
            assert os.environ[name] == "512"
            if name == cpu_onednn_cache.LEGACY_ENV:
                assert cpu_onednn_cache.CAPACITY_ENV not in os.environ


@pytest.mark.slow
def test_eagle_engine_keeps_onednn_primitives_bounded():
    """A real engine with the bundled model's EAGLE head (its linears on vLLM's onednn_mm), in a
    fresh process so that no earlier oneDNN use has fixed the capacity: the plugin's bound is in
    force in the worker, and distinct token counts leave a bounded set of primitives; the same
    calls under oneDNN's default capacity (1,024) keep several times more."""
    stock = _run(PROBE + "\nprint('BLOCKFFN-RESULT ' + json.dumps(dict(growth=onednn_cache_growth_mib())))",
                 {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    patched = _run(ENGINE, {}, json.dumps(dict(model=MODEL, eagle=EAGLE_HEAD)))
    assert patched["capacity"] == "128"
    assert stock["growth"] > 120, stock  # the cause: one primitive per M, 1,024 kept
    assert patched["growth"] < 60, patched
