"""BlockFFN causal LM for vLLM: stock MiniCPM attention and decoder, a BlockFFN in place of the MLP.

Vanilla (GQA) attention comes from vLLM's MiniCPM model, MLA from its MiniCPM3
model; only the FFN block and the weight-name mapping are ours.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.minicpm import MiniCPMDecoderLayer, MiniCPMForCausalLM, MiniCPMModel
from vllm.model_executor.models.minicpm3 import MiniCPM3DecoderLayer
from vllm.model_executor.models.utils import (
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops
from vllm_blockffn.observe.stats import RECORDER
from vllm_blockffn.patches import worker_step_end
from vllm_blockffn.serving import cpu_compile, hugepages
from vllm_blockffn.serving.checkpoint import IGNORED_SUFFIXES, BlockFFNWeightError
from vllm_blockffn.serving.config import BlockFFNSpec
from vllm_blockffn.serving.layers import cpu_attention, cpu_experts, cpu_linear
from vllm_blockffn.serving.layers.blockffn import BlockFFN


def load_checked(param: torch.nn.Parameter, tensor: torch.Tensor, shard_id, error: type[Exception],
                 what: str) -> None:
    """Load through the parameter's weight_loader; a plain copy is shape-checked first, so a
    wrong shape is named instead of failing as a bare assert inside vLLM."""
    loader = getattr(param, "weight_loader", default_weight_loader)
    if shard_id is not None:
        loader(param, tensor, shard_id)
        return
    if loader is default_weight_loader and tuple(param.shape) != tuple(tensor.shape):
        raise error(f"{what} has shape {list(tensor.shape)}; expected {list(param.shape)}")
    loader(param, tensor)


class _BlockFFNBlock:
    """Replaces MiniCPMDecoderLayer's MLP/MoE construction with a BlockFFN."""

    def _init_ffn_block(self) -> None:
        self.post_attention_layernorm = RMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        self.mlp = BlockFFN(BlockFFNSpec.from_config(self.config), prefix=f"{self.prefix}.mlp",
                            model_name=getattr(self.config, "name_or_path", ""), quant_config=self.quant_config)


class BlockFFNDecoderLayer(_BlockFFNBlock, MiniCPMDecoderLayer):
    """GQA attention (attention_type = "vanilla")."""


class BlockFFNMLADecoderLayer(_BlockFFNBlock, MiniCPM3DecoderLayer):
    """Multi-head latent attention (attention_type = "mla")."""


class BlockFFNModel(MiniCPMModel):
    """MiniCPMModel whose pipeline stages pass only `hidden_states` to the next stage.

    MiniCPM's decoder layers return `(hidden_states, None)`: the residual lives inside a
    layer. Stock MiniCPMModel still sends `{"hidden_states", "residual": None}` between
    stages, and the receiving stage fails on the None (vLLM 0.32: `'NoneType' object
    is not subscriptable` in sync_and_gather_intermediate_tensors). So pipeline
    parallel sends, allocates and receives `hidden_states` alone.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        if current_platform.is_cpu():  # before vLLM's compile wrapper (in super().__init__) copies the config
            cpu_compile.apply(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], self.config.hidden_size)
        # CPUs with the C++ expert op: the step's request layout, written once per step by forward() and read
        # by every BlockFFN layer (blockffn.py, _publish_segments): [tokens, S, cu_0 .. cu_S], S ≤ max_num_seqs;
        # the same op publishes the step's attention metadata (cpu_attention.py).
        ffns = [m for m in self.modules() if isinstance(m, BlockFFN)]
        layout = None
        if current_platform.is_cpu() and ffns and cpu_native.native_available():
            cpu_ops.implementation()  # the ops registered (built on first use) before any graph refers to them
            layout = torch.zeros(vllm_config.scheduler_config.max_num_seqs + 3, dtype=torch.int32)
            for m in ffns:
                m.step_segments = layout
            # the attention layers: one C++ call each, the step's metadata published with the layout
            cpu_attention.install(self, layout, vllm_config)
        if current_platform.is_cpu():
            cpu_compile.check(self, vllm_config)
            cpu_compile.release(vllm_config)  # a draft model built next compiles with Python's wrapper
        self.register_buffer("step_segments", layout, persistent=False)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.step_segments is not None:
            torch.ops.vllm.blockffn_publish_segments(self.step_segments, positions)
        if intermediate_tensors is not None:  # MiniCPMModel reads a residual, which its layers ignore
            intermediate_tensors = IntermediateTensors(
                {"hidden_states": intermediate_tensors["hidden_states"], "residual": None})
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors({"hidden_states": out["hidden_states"]})
        return out

    def _init_layers(self, prefix, config, cache_config, quant_config) -> None:
        layer_cls = BlockFFNMLADecoderLayer if config.attention_type == "mla" else BlockFFNDecoderLayer
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: layer_cls(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Only q/k/v are stacked; the experts' `up_proj`/`down_proj` have no `.weight`
        # suffix and load through BlockFFN's own weight_loaders.
        stacked = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            shard_name = name.split(".")[-2]
            shard_id = stacked.get(shard_name) if ".self_attn." in name else None
            if shard_id is not None:
                name = name.replace(shard_name, "qkv_proj")
            if is_pp_missing_parameter(name, self):
                continue
            if name not in params:
                raise BlockFFNWeightError(f"checkpoint weight 'model.{name}' is not part of a BlockFFN model "
                                          f"with this config.json")
            load_checked(params[name], tensor, shard_id, BlockFFNWeightError, f"weight 'model.{name}'")
            loaded.add(name)
        return loaded


class BlockFFNForCausalLM(MiniCPMForCausalLM):
    """Served for every MiniCPM checkpoint whose `ffn_type` is `block` or `block_linear`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        BlockFFNSpec.from_config(vllm_config.model_config.hf_config)  # clear errors before building
        RECORDER.start_model(getattr(vllm_config.model_config.hf_config, "name_or_path", ""))
        worker_step_end.apply()  # in a worker process: vLLM's worker module is imported by now
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # decode-size linears at memory speed on CPUs (cpu_linear.py): the unquantized ones (all of them, or
        # under `--quantization blockffn_int8` the router's; the int8 ones stream through quantization.py)
        cpu_linear.install(self)

    def _init_model(self, *, vllm_config: VllmConfig, prefix: str = ""):
        return BlockFFNModel(vllm_config=vllm_config, prefix=prefix)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own: on CPUs the float experts packed K-major where it is
        faster (cpu_experts.py; int8 experts were packed by their method), then the weights go to 2 MiB pages
        (hugepages.py: each decode step streams them all)."""
        for module in self.modules():
            if isinstance(module, BlockFFN) and module.quant_method is None:
                cpu_experts.pack(module)
        if next(self.parameters()).device.type == "cpu":
            cpu_experts.logger.info("blockffn: %s", cpu_experts.describe(self))
        hugepages.place_weights(self)
