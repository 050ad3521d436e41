"""vLLM's Ray executor (V2) and Ray worker actor, made to run on the CPU platform.

Not a registry entry: `patches/ray_cpu.py` (which patches `Executor.get_class`) hands
out `CpuRayExecutorV2`, and only then is this module imported (it imports Ray).
See ray_cpu.py for what, why and remove-when. Importing this module in a process
(the engine core, each Ray worker) gives that process's CPU platform its Ray
resource name; vLLM pickles both classes below by reference, so every process that
runs them imports this module first.
"""

from __future__ import annotations

import contextlib
import os
import threading

import ray
from vllm import envs
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

RESOURCE_ENV = "VLLM_BLOCKFFN_RAY_CPU_RESOURCE"
DEFAULT_RESOURCE = "vllm_cpu"


def resource_name() -> str:
    """The custom Ray resource that counts vLLM CPU worker slots (`vllm_cpu` by default)."""
    name = os.environ.get(RESOURCE_ENV, "").strip() or DEFAULT_RESOURCE
    if name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith("node:"):
        raise ValueError(f"{RESOURCE_ENV}={name!r}: Ray reserves this resource name; choose a custom name "
                         f"such as {DEFAULT_RESOURCE!r}")
    return name


def _set_platform_resource() -> str:
    name = resource_name()
    if current_platform.is_cpu() and current_platform.ray_device_key != name:
        # Class attribute, as CUDA/ROCm/XPU declare theirs; only Ray code paths read it.
        type(current_platform).ray_device_key = name
    return name


_set_platform_resource()


# -- engine-core side ----------------------------------------------------------------------------------
def _starts_local_instance(address: str | None) -> bool:
    """Whether ray.init(address) would start a private Ray instance rather than join a cluster."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # private API: when in doubt, join without declaring anything
        return False


def connect_ray(parallel_config) -> bool:
    """ray.init as vLLM would, declaring our resource on a private local instance; then
    fail fast, with the command that fixes it, if the cluster has too few worker slots.
    Returns whether this call started a private local Ray instance."""
    key = _set_platform_resource()
    need = parallel_config.world_size
    started_local = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # as vLLM's initialize_ray_cluster does
        kwargs = {"address": None, "runtime_env": parallel_config.ray_runtime_env}
        if _starts_local_instance(None):
            kwargs["resources"] = {key: float(need)}
            logger.info("Starting a local Ray instance with %d %r worker slots", need, key)
            started_local = True
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            if "InvalidAuthToken" not in f"{e!r} {e.__cause__!r}":
                raise
            raise ConnectionError(
                f"{e}: the Ray cluster uses token authentication and this process has no token. Set "
                f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token "
                f"for `vllm serve` as for `ray start` (README: Multi-node with Ray).") from e
    if parallel_config.placement_group is not None or ray.util.get_current_placement_group() is not None:
        return started_local  # the caller's placement group: vLLM checks its bundles for `key`
    have = ray.cluster_resources().get(key, 0)
    if have < need:
        raise RuntimeError(
            f"vLLM on CPU with Ray needs {need} units of the Ray resource {key!r} (one per worker: "
            f"world_size = tensor_parallel_size x pipeline_parallel_size = {need}); the Ray cluster has "
            f"{have:g}. Declare them when starting each Ray node, e.g. "
            f"`ray start --head --resources '{{\"{key}\": {need}}}'` (and `ray start --address ... "
            f"--resources '{{\"{key}\": N}}'` on the others; {RESOURCE_ENV} renames the resource).")
    return started_local


@contextlib.contextmanager
def _worker_class(cls):
    """RayExecutorV2._init_executor spawns `ray.remote(RayWorkerProc)` by module global name."""
    saved = ray_executor_v2.RayWorkerProc
    ray_executor_v2.RayWorkerProc = cls
    try:
        yield
    finally:
        ray_executor_v2.RayWorkerProc = saved


class CpuRayExecutorV2(RayExecutorV2):
    """RayExecutorV2 with a CPU worker-slot resource and CPU worker actors.

    On shutdown it also undoes what it set up: it removes the placement group it
    created (RayExecutorV2 kills its actors but leaves the group, and its worker slots,
    reserved until the driver process exits, so a second engine in the same process
    would wait forever for them), and it stops the private local Ray instance it
    started, if any.
    """

    _owned_placement_group = None
    _owns_ray_instance = False

    def _init_executor(self) -> None:
        self._owns_ray_instance = connect_ray(self.parallel_config)
        owned = self.parallel_config.placement_group is None and ray.util.get_current_placement_group() is None
        try:
            with _worker_class(CpuRayWorkerProc):
                super()._init_executor()
        finally:  # also when start-up fails after the group was made
            if owned:
                self._owned_placement_group = self.parallel_config.placement_group

    def shutdown(self) -> None:
        super().shutdown()
        pg, self._owned_placement_group = self._owned_placement_group, None
        if pg is not None and ray.is_initialized():
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # the cluster may be gone already
                logger.debug("could not remove placement group %s", pg.id, exc_info=True)
        # Not from the worker monitor thread (a dead worker): other threads may be inside Ray calls.
        if self._owns_ray_instance and ray.is_initialized() and threading.current_thread() is threading.main_thread():
            self._owns_ray_instance = False
            ray.shutdown()


# -- Ray worker side -----------------------------------------------------------------------------------
def _local_worker_count(key: str) -> int:
    """How many of this engine's workers share this node (bundles of our placement group here)."""
    try:
        pg = ray.util.get_current_placement_group()
        node = ray.get_runtime_context().get_node_id()
        table = ray.util.placement_group_table(pg)
        return max(1, sum(1 for i, spec in enumerate(pg.bundle_specs)
                          if spec.get(key) and table["bundles_to_node_id"].get(i) == node))
    except Exception:
        return 1


def cpu_threads_for(local_rank: int, local_workers: int, bind: str, allowed: list[int]) -> list[int] | None:
    """The CPUs a worker's OpenMP threads run on, following VLLM_CPU_OMP_THREADS_BIND:
    `nobind` -> None (leave the process alone); `"0-3|4-7"` -> entry `local_rank`;
    `auto` -> an even, contiguous share of the CPUs the process may use."""
    bind = bind.strip() or "auto"
    if bind == "nobind":
        return None
    if bind != "auto":
        from vllm.utils.cpu_resource_utils import parse_id_list

        lists = bind.split("|")
        if local_rank >= len(lists):
            raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={bind!r} lists {len(lists)} CPU sets; local rank "
                             f"{local_rank} on this node needs one of its own")
        return parse_id_list(lists[local_rank])
    share = max(1, len(allowed) // max(1, local_workers))
    start = min(local_rank * share, max(0, len(allowed) - share))
    return allowed[start:start + share]


class CpuRayWorkerProc(RayWorkerProc):
    """RayWorkerProc for the CPU platform (see ray_cpu.py)."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # Ray keeps per-instance ids only for accelerators; a CPU worker has no device to map.
        return ray.get_runtime_context().get_node_id(), []

    def initialize_worker(self, local_rank, env_vars, distributed_init_method, driver_env_vars=None,
                          assigned_physical_gpu_ids=None) -> None:
        self._bind_threads(local_rank, driver_env_vars or {})
        super().initialize_worker(local_rank, env_vars, distributed_init_method, driver_env_vars,
                                  assigned_physical_gpu_ids=assigned_physical_gpu_ids)

    @staticmethod
    def _bind_threads(local_rank: int, driver_env_vars: dict[str, str]) -> None:
        import torch

        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or driver_env_vars.get("VLLM_CPU_OMP_THREADS_BIND")
        cpus = cpu_threads_for(local_rank, _local_worker_count(resource_name()), bind or envs.VLLM_CPU_OMP_THREADS_BIND,
                               sorted(os.sched_getaffinity(0)))
        if cpus is None:
            return
        os.sched_setaffinity(0, cpus)
        os.environ["OMP_NUM_THREADS"] = str(len(cpus))
        torch.set_num_threads(len(cpus))
        logger.info("Ray CPU worker local_rank=%d: %d OpenMP threads on CPUs %s", local_rank, len(cpus), cpus)
