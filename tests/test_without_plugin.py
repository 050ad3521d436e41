"""What stock vLLM does with a BlockFFN checkpoint when the plugin is not loaded.

Documented in the README ("Without the plugin"): it is never silently served as
something else — it is refused, or stock MiniCPM's top-k MoE fails to build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = """
import sys
if __name__ == "__main__":
    from vllm import LLM
    try:
        LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128,
            gpu_memory_utilization=0.1, trust_remote_code=sys.argv[2] == "1")
    except BaseException as e:
        print("REFUSED:", type(e).__name__, str(e).replace("\\n", " ")[:600])
    else:
        print("SERVED")
"""


def run_without_plugin(path: str, trust_remote_code: bool) -> str:
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, path, "1" if trust_remote_code else "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("REFUSED", "SERVED"))]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[-1]


@pytest.mark.slow
def test_refused_without_trust_remote_code(tiny_model):
    outcome = run_without_plugin(tiny_model, trust_remote_code=False)
    assert outcome.startswith("REFUSED") and "contains custom code" in outcome


@pytest.mark.slow
def test_stock_minicpm_moe_fails_to_build_with_remote_config(tiny_model, tmp_path):
    # A stand-in for the official remote configuration_minicpm.py: a plain config class.
    path = str(tmp_path / "with-remote-config")
    shutil.copytree(tiny_model, path)
    with open(os.path.join(path, "configuration_minicpm.py"), "w") as f:
        f.write("from transformers import PretrainedConfig\n\n\n"
                "class MiniCPMConfig(PretrainedConfig):\n    model_type = 'minicpm'\n")
    outcome = run_without_plugin(path, trust_remote_code=True)
    # Stock MiniCPM sees `num_experts` and builds its top-k MoE, which needs fields
    # (and weights) a BlockFFN checkpoint does not have.
    assert outcome.startswith("REFUSED") and "num_experts_per_tok" in outcome
