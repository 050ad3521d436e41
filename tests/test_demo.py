"""The README's first command, as a newcomer runs it, and the bundled model at the dtypes vLLM serves.

vLLM 0.32 serves a bf16 checkpoint (the bundled one, like the official ones) in bf16 on every
x86 CPU (``CpuPlatform.supported_dtypes`` lists bf16 first), compiled with torch.compile: the
configuration that crashed the native kernel on NaN router scores of the memory-profiling run
(issue 16) while every other engine test forced fp32 and ``enforce_eager``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PROMPTS, compare_to_reference, greedy_in_fresh_process

from vllm_blockffn.reference import load_reference
from vllm_blockffn.tools.demo import root_cause

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "blockffn-tiny-trained")
CLI = [sys.executable, "-m", "vllm_blockffn.tools.cli"]


@pytest.mark.slow
def test_demo_serves_the_bundled_model_in_its_own_dtype_and_answers():
    """`scripts/dev demo` without its setup step: `vllm serve` with vLLM's defaults (bf16, compiled)."""
    r = subprocess.run([*CLI, "demo", "--model", MODEL, "--port", "18745"], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    out = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line and not line.startswith("start"))
    assert out["dtype"].strip() == "bfloat16", r.stdout
    assert out["completion"].strip() not in ("", "''"), r.stdout
    assert "completion_tokens=24" in out["usage"], r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bundled_model_compiled_matches_reference(dtype, record_figure):
    """torch.compile on (not enforce_eager), auto backend, both dtypes (whichever the CPU serves by
    default, the other is forced here): no crash, and the outputs of the reference model."""
    reference = load_reference(MODEL)
    outputs = greedy_in_fresh_process(MODEL, PROMPTS, dtype=dtype, enforce_eager=False)
    worst, same = compare_to_reference(outputs, reference)
    record_figure(f"max|dlogprob| bundled model compiled {dtype}", f"{worst:.2e}")
    if dtype == "float32":
        assert worst <= 1e-3 and all(same)
    else:  # bf16 rounding: logprobs close, most greedy continuations identical
        assert worst <= 0.5 and sum(same) >= len(same) - 2, (worst, same)


def test_demo_failure_prints_the_root_cause(tmp_path):
    """A server that cannot start: the demo exits 1 and shows the error lines, not only the log's tail."""
    missing = tmp_path / "no-such-model"
    r = subprocess.run([*CLI, "demo", "--model", str(missing), "--port", "18746"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1
    assert "root cause (first error lines of the log)" in r.stderr
    cause = r.stderr.split("root cause (first error lines of the log) ---", 1)[1].split("--- last lines", 1)[0]
    assert str(missing) in cause or "Error" in cause, cause


def test_root_cause_finds_the_segfault_before_the_tail():
    """The log shape of the crash in issue 16: the cause is far from the tail."""
    log = "\n".join(
        [f"INFO 12-01 line {i}" for i in range(200)]
        + ["!!!!!!! Segfault encountered !!!!!!!", '  File "<unknown>", line 0, in up_unit_bf16',
           '  File "<unknown>", line 0, in blockffn_sparse_ffn._omp_fn.0']
        + [f"INFO 12-01 shutdown {i}" for i in range(300)]
        + ["ERROR 12-01 Worker proc VllmWorker-0 died unexpectedly (exit code: -11), shutting down executor.",
           "RuntimeError: Engine core initialization failed. See root cause above."])
    cause = root_cause(log)
    assert cause.splitlines()[0] == "!!!!!!! Segfault encountered !!!!!!!"
    assert "in up_unit_bf16" in cause and "died unexpectedly" in cause
    assert root_cause("INFO all fine\nINFO still fine") == ""
