"""The BlockFFN layer for vLLM: a replicated ReLU+norm router and experts sharded inside.

Tensor parallelism shards *within* experts: every rank holds a D/TP slice of every
expert. Decoding is memory-bound, so a layer's time is the slowest rank's active
bytes. Sharding within experts gives every rank exactly |union|·(D/TP)·H·2 bytes
to read whatever the routing; sharding *by* expert gives a rank the bytes of the
active experts it happens to own, and with ~10 of 56 experts active per chunk the
busiest of two ranks typically owns well over half of them. The router is tiny
(E×H) and replicated so every rank knows the whole active set; the layer ends in
one all-reduce, as a dense MLP does.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_blockffn.kernels.dispatch import THRESHOLDS
from vllm_blockffn.kernels.sparse_ffn import cpu_ops
from vllm_blockffn.kernels.sparse_ffn.cpu import dense_ffn, sparse_ffn_cpu, uses_native
from vllm_blockffn.kernels.sparse_ffn.cpu_native import bound_experts
from vllm_blockffn.observe.stats import RECORDER, stats_enabled
from vllm_blockffn.serving import segments
from vllm_blockffn.serving.checkpoint import BlockFFNWeightError
from vllm_blockffn.serving.config import BlockFFNSpec, env_choice
from vllm_blockffn.serving.layers import cpu_attention
from vllm_blockffn.serving.layers.quantization import Int8ExpertsMethod

# "skip" is benchmark-only: experts output zeros and read nothing, so a step takes T_rest, the time of
# everything but the experts (benchmarks/bench_e2e_cpu.py: the Amdahl bound on the experts' speed-up).
BACKENDS = ("auto", "dense", "sparse", "skip")
BACKEND_ENV = "VLLM_BLOCKFFN_BACKEND"


ROUTER_ENV = "VLLM_BLOCKFFN_CPU_ROUTER"


def router_mode() -> str:
    """`VLLM_BLOCKFFN_CPU_ROUTER`: fused (default: on CPUs the router runs inside the expert kernel at
    decode sizes) | separate (its own linear and ops, as on accelerators)."""
    return env_choice(ROUTER_ENV, ("fused", "separate"), "fused")


def router_scores(z: torch.Tensor, mode: str, eps: float, norm_scale: float,
                  norm_w: torch.Tensor | None) -> torch.Tensor:
    """ReLU + norm of the router's logits z [T, E], in fp32 (SPEC.md); the native kernel's fused router
    (cpu_native.c, blockffn_router_sparse_ffn) computes the "rms" case the same way."""
    a = torch.relu(z.float())
    if mode == "rms":
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()
    if mode == "sum":
        return a / (a.sum(-1, keepdim=True) * norm_scale + 1e-5)
    return a


def backend_from_env() -> str:
    """`VLLM_BLOCKFFN_BACKEND`: auto (default) | dense | sparse."""
    return env_choice(BACKEND_ENV, BACKENDS, "auto")


class BlockFFN(nn.Module):
    """router_proj → ReLU → router_norm, then Σ_e r_e · W_down,e · SiLU(W_up,e x)."""

    def __init__(self, spec: BlockFFNSpec, prefix: str = "", model_name: str = "", quant_config=None):
        super().__init__()
        self.spec = spec
        self.prefix = prefix
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
        if D % self.tp_size:
            raise ValueError(
                f"tensor_parallel_size={self.tp_size} does not divide expert_size={D}: vllm-blockffn "
                f"shards every expert's {D} columns across ranks; choose a TP size that divides {D}")
        self.local_expert_size = D // self.tp_size
        self.backend = backend_from_env()
        self.layer_id = extract_layer_index(prefix)
        # int8 experts (`--quantization blockffn_int8`, quantization.py): the method makes the weights. Other
        # methods (vLLM's own, e.g. online fp8 for the linears) leave the experts in the model's dtype.
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method = method if isinstance(method, Int8ExpertsMethod) else None
        # Bytes of one whole expert (up + down, int8: + its fp32 scales), whatever the TP slicing.
        if self.quant_method is not None:
            self.expert_bytes = 2 * D * H + 4 * (D + H)
        else:
            self.expert_bytes = 2 * D * H * torch.tensor([], dtype=torch.get_default_dtype()).element_size()

        self.router_proj = ReplicatedLinear(H, E, bias=False, prefix=f"{prefix}.router_proj")
        self.router_proj.blockffn_row_major = True  # the fused router + experts kernel reads it [E, H] (cpu_linear.py)
        if spec.norm_after_router == "rms":
            self.router_norm = nn.Module()
            self.router_norm.weight = nn.Parameter(torch.ones(E), requires_grad=False)
            set_weight_attrs(self.router_norm.weight, {"weight_loader": self._load_router_norm})
        else:
            self.router_norm = None
        # Both stored as [E, D/TP, H]: each expert's rows contiguous, so a sparse
        # step reads one block per active expert.
        if self.quant_method is not None:
            self.quant_method.create_weights(self)
        else:
            self.up_proj = nn.Parameter(torch.empty(E, self.local_expert_size, H), requires_grad=False)
            self.down_proj = nn.Parameter(torch.empty(E, self.local_expert_size, H), requires_grad=False)
            set_weight_attrs(self.up_proj, {"weight_loader": self._load_up})
            set_weight_attrs(self.down_proj, {"weight_loader": self._load_down})
        self.record_stats = stats_enabled()
        if self.record_stats:  # the counters are allocated now, on the weights' device, never inside a graph
            RECORDER.add_layer(self.layer_id, model_name, E, self.expert_bytes, self.up_proj.device)
        # CPUs, C++ route (torch.ops.blockffn_native.router_experts): the step's request layout, a buffer the
        # model shares with its layers and fills once per step (BlockFFNModel.forward), and the layer's
        # counter row as a tensor over the recorder's numpy row (the kernel adds to it).
        self.register_buffer("step_segments", None, persistent=False)
        row = RECORDER.host_row(self.layer_id, E, self.expert_bytes) if self.record_stats and \
            self.up_proj.device.type == "cpu" else None
        self.register_buffer("stats_row", None if row is None else torch.from_numpy(row), persistent=False)

    # -- weight loading: checkpoint layout → [E, D_local, H] ---------------------------------
    def _check_shape(self, name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(loaded.shape) != expected:
            raise BlockFFNWeightError(
                f"weight '{self.prefix}.{name}' has shape {list(loaded.shape)}; expected {list(expected)} "
                f"(ffn_type={self.spec.ffn_type!r}, num_experts={self.spec.num_experts}, "
                f"expert_size={self.spec.expert_size}, hidden_size={self.spec.hidden_size})")

    def _tp_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's D/TP slice of an [E, D, ...] tensor (weights [E, D, H], up scales [E, D])."""
        d = self.local_expert_size
        return full[:, self.tp_rank * d:(self.tp_rank + 1) * d]

    def _load_up(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        E, D, H = self.spec.num_experts, self.spec.expert_size, self.spec.hidden_size
        self._check_shape("up_proj", loaded, (E, D, H) if self.spec.ffn_type == "block" else (E * D, H))
        full = loaded.reshape(E, D, H)
        if self.quant_method is not None:  # int8: quantized here, whole, before the TP slice
            full, scale = self.quant_method.quantize_or_check(self, "up_proj", full)
            if scale is not None:
                self.up_proj_scale.data.copy_(self._tp_slice(scale))
        param.data.copy_(self._tp_slice(full))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        E, D, H = self.spec.num_experts, self.spec.expert_size, self.spec.hidden_size
        if self.spec.ffn_type == "block":
            self._check_shape("down_proj", loaded, (E, H, D))
            full = loaded.transpose(1, 2)
        else:
            self._check_shape("down_proj", loaded, (H, E * D))
            full = loaded.reshape(H, E, D).permute(1, 2, 0)
        if self.quant_method is not None:
            full, scale = self.quant_method.quantize_or_check(self, "down_proj", full)
            if scale is not None:
                self.down_proj_scale.data.copy_(scale)  # per output row h: the same on every rank
        param.data.copy_(self._tp_slice(full))

    def _load_up_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """int8 checkpoints: W_up's row scales, [E, D] (block) or [E·D] (block_linear)."""
        E, D = self.spec.num_experts, self.spec.expert_size
        self._check_shape("up_proj_scale", loaded, (E, D) if self.spec.ffn_type == "block" else (E * D,))
        param.data.copy_(self._tp_slice(loaded.reshape(E, D).float()))

    def _load_down_scale(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """int8 checkpoints: W_down's output-row scales, [E, H] in both layouts."""
        self._check_shape("down_proj_scale", loaded, (self.spec.num_experts, self.spec.hidden_size))
        param.data.copy_(loaded.float())

    def _load_router_norm(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        self._check_shape("router_norm.weight", loaded, (self.spec.num_experts,))
        param.data.copy_(loaded)

    # -- forward ------------------------------------------------------------------------------
    def router(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores r [T, E] in fp32; r_e = 0 exactly where expert e is inactive."""
        z, _ = self.router_proj(x)
        norm_w = self.router_norm.weight if self.router_norm is not None else None
        return router_scores(z, self.spec.norm_after_router, self.spec.rms_norm_eps, self.spec.norm_scale, norm_w)

    def _fuses_router(self, x: torch.Tensor) -> bool:
        """Whether this step's router runs inside the CPU expert kernel (decided from static facts, at
        trace time): CPU, the ReLU + RMS-norm router in x's dtype with its weight as loaded (not packed
        away by vLLM's oneDNN path: VLLM_BLOCKFFN_CPU_LINEAR=vllm), a sparse backend, the native kernel,
        and `VLLM_BLOCKFFN_CPU_ROUTER` not `separate`."""
        w = self.router_proj.weight
        return (not segments.on_accelerator(x) and self.spec.norm_after_router == "rms"
                and self.backend in ("auto", "sparse") and router_mode() == "fused"
                and isinstance(w, torch.Tensor) and w.dtype == x.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and tuple(w.shape) == (self.spec.num_experts, self.spec.hidden_size)  # vLLM's oneDNN path empties it
                and getattr(self.router_proj, "bias", None) is None and uses_native(x, self.up_proj, self.down_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant_method is not None
        scales = (self.up_proj_scale if q else None, self.down_proj_scale if q else None)
        args = (self.backend, self.layer_id, self.expert_bytes, self.record_stats, *scales)
        if self._fuses_router(x):
            if self.step_segments is not None:  # one C++ op: no Python per decode step (cpu_ops.py)
                sums = self.up_proj_row_sums if q else None
                y = torch.ops.blockffn_native.router_experts(
                    x, self.router_proj.weight, self.router_norm.weight, self.spec.rms_norm_eps, self.up_proj,
                    self.down_proj, self.step_segments, self.stats_row, *scales, sums, *args[:4])
            else:
                y = torch.ops.vllm.blockffn_router_experts(x, self.router_proj.weight, self.router_norm.weight,
                                                           self.spec.rms_norm_eps, self.up_proj, self.down_proj,
                                                           *args)
            return tensor_model_parallel_all_reduce(y) if self.tp_size > 1 else y
        scores = self.router(x)
        if segments.on_accelerator(x):
            # The output buffer is allocated here, inside the compiled piece before the op: vLLM
            # splits piecewise CUDA graphs at this op (patches/splitting_ops.py), and the next
            # piece replays reading its input at the captured address, so the op must write
            # into memory the previous piece owns (as vLLM's attention ops do).
            y = torch.empty_like(x)
            torch.ops.vllm.blockffn_experts_with_output(x, scores, self.up_proj, self.down_proj, y, *args)
        else:
            y = torch.ops.vllm.blockffn_experts(x, scores, self.up_proj, self.down_proj, *args)
        if self.tp_size > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y


Scale = torch.Tensor | None


def run_experts(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                backend: str, layer_id: int, expert_bytes: int, record: bool, up_scale: Scale = None,
                down_scale: Scale = None) -> torch.Tensor:
    """The experts of one layer for this step, per request segment (segments.py).

    On an accelerator (`segments.on_accelerator`) nothing here reads device data on the host,
    copies host data to the device or branches on device data, so the same code is valid
    eagerly, between piecewise CUDA graphs and captured inside a full graph (README
    "CUDA graphs"; tests/test_replay.py replays it with the Triton kernels interpreted).
    int8 experts: ``up_scale`` / ``down_scale`` (kernels/quant.py), else None."""
    if backend == "skip":
        return torch.zeros_like(x)
    if not segments.on_accelerator(x):
        return _experts_cpu(x, scores, w_up, w_down_t, backend, layer_id, expert_bytes, record, up_scale,
                            down_scale)
    from vllm_blockffn.kernels import ops
    num_tokens = x.shape[0]
    starts = segments.request_starts(num_tokens)
    if starts is None:
        cu = segments.whole_batch(num_tokens, x.device, graph_safe=True)
    else:
        if starts.dtype != torch.int32:  # vLLM's is int32 already; a device-side cast otherwise
            starts = starts.to(torch.int32)
        cu = segments.kernel_segments(starts, num_tokens)
        if record:
            RECORDER.record(layer_id, scores, starts, expert_bytes, on_device=True)
        scores = segments.mask_padding(scores, starts)
    # The kernels' bodies, not their custom ops: this op is opaque already, and the nested
    # custom-op dispatch cost 30–60 µs per call on a CPU (measured at 16abe25).
    if backend == "dense":
        return ops.dense_ffn_eager(x, scores, w_up, w_down_t, up_scale, down_scale)
    return ops.sparse_ffn_eager(x, scores, w_up, w_down_t, cu, impl="auto" if backend == "auto" else "triton",
                                up_scale=up_scale, down_scale=down_scale)


def _cpu_segments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cu_seqlens, vLLM's query_start_loc or None) on a CPU: the requests' offsets as they are (int32;
    the CPU paths give tokens past the last one y = 0, and the CPU backend pads nothing), or the
    whole batch as one segment when no request layout is known (warm-up, profiling)."""
    starts = segments.request_starts(x.shape[0])
    if starts is None:
        return segments.whole_batch(x.shape[0], x.device, graph_safe=False), None
    return (starts if starts.dtype == torch.int32 else starts.to(torch.int32)), starts


def _publish_segments(layout: torch.Tensor, positions: torch.Tensor) -> None:
    """Once per step on CPUs (BlockFFNModel.forward): this step's request layout into the buffer the layers'
    C++ expert op reads (int32 [tokens, S, cu_0 .. cu_S], S = 0 when no layout is known or it does not fit:
    the op then takes the whole batch as one segment and adds no counters, as :func:`_cpu_segments`), and the
    step's attention metadata for the model's C++ attention calls (cpu_attention.py: they take `layout` as an
    input, so a compiled graph keeps them after this op)."""
    num_tokens = positions.shape[0]
    starts = segments.request_starts(num_tokens)
    buf = layout.numpy()
    n = 0 if starts is None else starts.shape[0]
    buf[0], buf[1] = num_tokens, 0
    if 2 <= n <= buf.shape[0] - 2:
        buf[2:2 + n] = starts.numpy()
        buf[1] = n - 1
    cpu_attention.publish(layout)


def _publish_segments_fake(layout: torch.Tensor, positions: torch.Tensor) -> None:
    return None


def _experts_cpu(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 backend: str, layer_id: int, expert_bytes: int, record: bool, up_scale: Scale,
                 down_scale: Scale) -> torch.Tensor:
    """run_experts on a CPU: host data, no graphs; the segments of :func:`_cpu_segments`, and the
    native kernel adds the live counters from the scan it makes anyway. Kept short on purpose: it
    runs once per layer and step, after a kernel that has just flushed the caches, so every Python
    call here costs several µs of each decode step (RESULTS.md, "Where a decode step goes")."""
    cu, starts = _cpu_segments(x)
    stats = None
    if starts is not None and record:
        if backend != "dense" and uses_native(x, w_up, w_down_t):
            stats = RECORDER.host_row(layer_id, scores.shape[1], expert_bytes)
        else:
            RECORDER.record(layer_id, scores, starts, expert_bytes, on_device=False)
    if backend == "dense":
        return dense_ffn(x, scores, w_up, w_down_t, up_scale, down_scale)
    return sparse_ffn_cpu(x, scores, w_up, w_down_t, cu, allow_dense=backend == "auto", stats=stats,
                          up_scale=up_scale, down_scale=down_scale)


def _blockffn_experts(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                      backend: str, layer_id: int, expert_bytes: int, record: bool, up_scale: Scale = None,
                      down_scale: Scale = None) -> torch.Tensor:
    """The experts as one opaque op (CPU backend: no graphs, no output copy). It reads this
    step's segments from vLLM's forward context, which a torch.compile'd graph must not capture."""
    return run_experts(x, scores, w_up, w_down_t, backend, layer_id, expert_bytes, record, up_scale, down_scale)


def _blockffn_router_experts(x: torch.Tensor, w_router: torch.Tensor, norm_w: torch.Tensor, eps: float,
                             w_up: torch.Tensor, w_down_t: torch.Tensor, backend: str, layer_id: int,
                             expert_bytes: int, record: bool, up_scale: Scale = None,
                             down_scale: Scale = None) -> torch.Tensor:
    """CPUs: the ReLU + RMS-norm router and the experts as one op (BlockFFN._fuses_router). Decode-size
    steps run both in one native call (cpu_native.NativeExperts.with_router): no router linear, no
    scores tensor, one Python entry per layer instead of three. Longer steps (prefill) compute the
    scores with the CPU linear op (its size rules: bf16 on AVX2 CPUs, where torch's fallback was 3.2-3.7x
    slower than the kernel for this [E, H] weight at 128-1024 tokens, runs the kernel or widened fp32 GEMMs)
    and take the CPU expert route."""
    if x.shape[0] > THRESHOLDS.cpu_linear_max_tokens:
        z = cpu_ops.linear(x, w_router)
        scores = router_scores(z, "rms", eps, 1.0, norm_w)
        return _experts_cpu(x, scores, w_up, w_down_t, backend, layer_id, expert_bytes, record, up_scale,
                            down_scale)
    cu, starts = _cpu_segments(x)
    stats = RECORDER.host_row(layer_id, w_router.shape[0], expert_bytes) if record and starts is not None else None
    return bound_experts(w_up, w_down_t, up_scale, down_scale).with_router(x, w_router, norm_w, eps, cu, stats)


def _blockffn_router_experts_fake(x: torch.Tensor, w_router: torch.Tensor, norm_w: torch.Tensor, eps: float,
                                  w_up: torch.Tensor, w_down_t: torch.Tensor, backend: str, layer_id: int,
                                  expert_bytes: int, record: bool, up_scale: Scale = None,
                                  down_scale: Scale = None) -> torch.Tensor:
    return torch.empty_like(x)


def _blockffn_experts_fake(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                           backend: str, layer_id: int, expert_bytes: int, record: bool, up_scale: Scale = None,
                           down_scale: Scale = None) -> torch.Tensor:
    return torch.empty_like(x)


def _blockffn_experts_with_output(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor,
                                  w_down_t: torch.Tensor, output: torch.Tensor, backend: str, layer_id: int,
                                  expert_bytes: int, record: bool, up_scale: Scale = None,
                                  down_scale: Scale = None) -> None:
    """Accelerators: the same op writing into `output` (allocated by the caller), so that it can
    be a piecewise-graph splitting op (patches/splitting_ops.py) and be captured in full graphs."""
    output.copy_(run_experts(x, scores, w_up, w_down_t, backend, layer_id, expert_bytes, record, up_scale,
                             down_scale))


def _blockffn_experts_with_output_fake(x: torch.Tensor, scores: torch.Tensor, w_up: torch.Tensor,
                                       w_down_t: torch.Tensor, output: torch.Tensor, backend: str, layer_id: int,
                                       expert_bytes: int, record: bool, up_scale: Scale = None,
                                       down_scale: Scale = None) -> None:
    return None


direct_register_custom_op("blockffn_experts", _blockffn_experts, fake_impl=_blockffn_experts_fake)
direct_register_custom_op("blockffn_publish_segments", _publish_segments, mutates_args=["layout"],
                          fake_impl=_publish_segments_fake)
direct_register_custom_op("blockffn_router_experts", _blockffn_router_experts,
                          fake_impl=_blockffn_router_experts_fake)
direct_register_custom_op("blockffn_experts_with_output", _blockffn_experts_with_output, mutates_args=["output"],
                          fake_impl=_blockffn_experts_with_output_fake)
