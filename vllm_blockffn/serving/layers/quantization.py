"""`--quantization blockffn_int8`: weight-only int8 experts and decode-size linears for BlockFFN models.

Why: decoding is memory-bound; int8 weights are half of bf16's bytes, on top of the routing's
sparsity. With ~10% of the experts active, the experts are a minority of a step's bytes (the
attention projections and the lm_head are read whole every step), so both are quantized.

What: symmetric int8 with one fp32 scale per output row (``kernels/quant.py``, the one definition),
weight-only: activations stay in the model's dtype. Quantized: every expert's W_up / W_down, the
attention projections (q/k/v, o; MLA's except ``kv_b_proj``, which vLLM's MLA reads as a float
weight) and the lm_head (when not tied to the embedding). Not quantized: the router (it decides
sparsity; it stays in the model's dtype), norms, embedding, EAGLE draft heads.

How (vLLM's own mechanism, `register_quantization_config`, as its online fp8 does):
- ``--quantization blockffn_int8`` (or ``quantization="blockffn_int8"`` in ``vllm.LLM``) on a float
  checkpoint quantizes **at load**: the experts inside their weight loaders (each loader sees the
  whole checkpoint tensor, so scales do not depend on the TP size, and no float copy of the experts
  is ever held), the linears after loading.
- A checkpoint written by ``vllm-blockffn quantize SRC OUT`` carries ``"quantization_config":
  {"quant_method": "blockffn_int8"}`` in config.json and loads the same int8 tensors directly
  (tensor names: README "int8 weights").
- CPU: the native kernels read int8 (experts: ``cpu_native.c``; linears: the streaming GEMV at every M —
  torch's ``_weight_int8pack_mm`` was 25-32x slower with fp32 x past decode sizes on AVX2 —
  ``torch.ops.blockffn_native.int8_linear``, kernels/sparse_ffn/cpu_ops.py, with each row's sum made once
  at load). On AVX512_BF16 (+VNNI)
  CPUs their dot products with W_up rows and linear rows run VPDPBUSD on x rounded to int16 per
  token (a step of max|x| / 32767: finer than bf16's rounding for all but the smallest elements) and
  the W_down pass VPDPWSSD on h rounded to int16 likewise; on AVX2 (and plain AVX-512) CPUs VPMADDWD on the
  same int16 roundings gives the same integers, hence the same results bit for bit; only the portable
  path widens int8 to fp32. On the paths of ``THRESHOLDS.cpu_experts_kmajor_int8`` the experts are packed
  K-major at load like the linears (cpu_experts.py: each expert two K-major int8 linears, read as one stream
  a panel; ``VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor`` keeps them as loaded). GPU: the experts run the
  Triton kernels on int8; the dense linears are dequantized once at load (int8 GEMMs on GPUs are
  vLLM's own schemes' job).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from vllm_blockffn.kernels.layout import pack_kmajor
from vllm_blockffn.kernels.quant import QMAX, dequantize_rows, quantize_rows
from vllm_blockffn.kernels.sparse_ffn import cpu_native, cpu_ops
from vllm_blockffn.serving.layers import cpu_experts, cpu_linear

NAME = "blockffn_int8"
SKIPPED_LINEARS = ("router_proj", "kv_b_proj")
"""Linears that stay in the model's dtype (the router decides sparsity; MLA reads kv_b_proj's weight)."""


class BlockFFNWeightQuantError(ValueError):
    """A quantized checkpoint's tensor is missing, of the wrong dtype or shape."""


@register_quantization_config(NAME)
class BlockFFNInt8Config(QuantizationConfig):
    """Weight-only int8 (per-output-row scales) for BlockFFN experts and decode-size linears."""

    def __init__(self, from_checkpoint: bool = False, linears: bool = True) -> None:
        super().__init__()
        self.from_checkpoint = from_checkpoint
        self.linears = linears
        self.tied_lm_head = False  # set from config.json (maybe_update_config): a tied head is the embedding

    def __repr__(self) -> str:
        return f"BlockFFNInt8Config(from_checkpoint={self.from_checkpoint}, linears={self.linears})"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # GPUs: the Triton int8 paths are compiled for sm_80 / sm_90

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # `--quantization blockffn_int8` on a float checkpoint: quantize at load

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BlockFFNInt8Config:
        """config.json's ``quantization_config`` of a checkpoint saved by ``vllm-blockffn quantize``."""
        unknown = set(config) - {"quant_method", "linears", "bits", "scheme"}
        if unknown:
            raise ValueError(f"config.json quantization_config: unknown field(s) {sorted(unknown)} for {NAME}; "
                             f"expected quant_method, linears, bits, scheme")
        if config.get("bits", 8) != 8:
            raise ValueError(f"config.json quantization_config.bits = {config['bits']!r}; {NAME} stores 8-bit weights")
        linears = config.get("linears", True)
        if not isinstance(linears, bool):
            raise ValueError(f"config.json quantization_config.linears = {linears!r}; expected true or false")
        return cls(from_checkpoint=True, linears=linears)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        self.tied_lm_head = bool(getattr(hf_config, "tie_word_embeddings", False))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        if isinstance(layer, BlockFFN):
            return Int8ExpertsMethod(self)
        if isinstance(layer, ParallelLMHead):
            return Int8LinearMethod(self) if self.linears and not self.tied_lm_head else None
        if isinstance(layer, LinearBase):
            if not self.linears or prefix.rsplit(".", 1)[-1] in SKIPPED_LINEARS:
                return UnquantizedLinearMethod()
            return Int8LinearMethod(self)
        return None


# ------------------------------------------------------------------------------- dense linears
class Int8LinearMethod(LinearMethodBase):
    """int8 weight [N, K] + fp32 ``weight_scale`` [N] for a linear layer or the lm_head."""

    def __init__(self, config: BlockFFNInt8Config) -> None:
        self.config = config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        n = sum(output_partition_sizes)
        dtype = torch.int8 if self.config.from_checkpoint else params_dtype
        weight = Parameter(torch.empty(n, input_size_per_partition, dtype=dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        if self.config.from_checkpoint:
            scale = Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(scale, {"output_dim": 0})
            layer.register_parameter("weight_scale", scale)
            set_weight_attrs(scale, extra_weight_attrs)
        layer._blockffn_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = layer.weight.data
        if not self.config.from_checkpoint:
            q, s = quantize_rows(w, f"{getattr(layer, 'prefix', 'linear')}.weight")
            layer.weight = Parameter(q, requires_grad=False)
            layer.weight_scale = Parameter(s, requires_grad=False)
        elif w.dtype != torch.int8:
            raise BlockFFNWeightQuantError(f"{getattr(layer, 'prefix', 'linear')}.weight is {w.dtype} in a "
                                           f"{NAME} checkpoint; expected int8")
        if not current_platform.is_cpu():  # GPUs: dense linears in the model's dtype (module docstring)
            w = dequantize_rows(layer.weight.data, layer.weight_scale.data, layer._blockffn_params_dtype)
            layer.weight = Parameter(w, requires_grad=False)
            del layer.weight_scale
            return
        layer.weight.data = layer.weight.data.contiguous()
        # each row's sum, which the VNNI dot products subtract (cpu_native.int8_row_sums), made once here
        layer.weight_row_sums = Parameter(cpu_native.int8_row_sums(layer.weight.data), requires_grad=False)
        cpu_ops.implementation()  # the op registered (built on first use) before any graph refers to it
        layer.blockffn_out_features = layer.weight.shape[0]
        if cpu_linear.packs_kmajor(layer.weight.data):  # the outer-product kernel (cpu_ops.py) where the rule packs
            layer.weight = Parameter(pack_kmajor(layer.weight.data), requires_grad=False)
            layer.blockffn_kmajor = True

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not hasattr(layer, "weight_scale"):  # GPU: dequantized at load
            return F.linear(x, layer.weight, bias)
        shape = x.shape
        op = cpu_ops.int8_linear_kmajor if getattr(layer, "blockffn_kmajor", False) else cpu_ops.int8_linear
        y = op(x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, layer.weight_row_sums)
        y = y.reshape(*shape[:-1], layer.blockffn_out_features)
        return y if bias is None else y + bias


# -------------------------------------------------------------------------------------- experts
class Int8ExpertsMethod(QuantizeMethodBase):
    """The BlockFFN layer's experts as int8 [E, D/TP, H] + ``up_proj_scale`` [E, D/TP] and
    ``down_proj_scale`` [E, H] (kernels/quant.py). The layer's weight loaders call :meth:`load`."""

    def __init__(self, config: BlockFFNInt8Config) -> None:
        self.config = config

    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        E, Dl, H = layer.spec.num_experts, layer.local_expert_size, layer.spec.hidden_size
        layer.up_proj = Parameter(torch.empty(E, Dl, H, dtype=torch.int8), requires_grad=False)
        layer.down_proj = Parameter(torch.empty(E, Dl, H, dtype=torch.int8), requires_grad=False)
        layer.up_proj_scale = Parameter(torch.empty(E, Dl, dtype=torch.float32), requires_grad=False)
        layer.down_proj_scale = Parameter(torch.empty(E, H, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(layer.up_proj, {"weight_loader": layer._load_up})
        set_weight_attrs(layer.down_proj, {"weight_loader": layer._load_down})
        set_weight_attrs(layer.up_proj_scale, {"weight_loader": layer._load_up_scale})
        set_weight_attrs(layer.down_proj_scale, {"weight_loader": layer._load_down_scale})

    def quantize_or_check(self, layer: torch.nn.Module, name: str, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A whole checkpoint tensor in the internal layout → (int8 tensor, its row scales or None).

        At load (float checkpoint): quantized here, per output row (up: rows of W_up,e; down: the
        rows of W_down,e, i.e. ``full``'s columns), before any TP slicing. From a quantized
        checkpoint: must already be int8 (its scales load separately)."""
        where = f"weight '{layer.prefix}.{name}'"
        if self.config.from_checkpoint:
            if full.dtype != torch.int8:
                raise BlockFFNWeightQuantError(f"{where} is {full.dtype} in a {NAME} checkpoint; expected int8 "
                                               f"(with '{layer.prefix}.{name}_scale')")
            return full, None
        if name == "up_proj":
            return quantize_rows(full, where)
        q, s = quantize_rows(full.transpose(1, 2), where)
        return q.transpose(1, 2), s

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in ("up_proj_scale", "down_proj_scale"):
            s = getattr(layer, name)
            if not self.config.from_checkpoint:
                continue
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise BlockFFNWeightQuantError(f"weight '{layer.prefix}.{name}' holds negative or non-finite "
                                               f"scales; expected max|row| / {QMAX} ≥ 0")
        if layer.up_proj.device.type != "cpu":
            return
        cpu_experts.pack(layer)
        # the row sums the VNNI dot products subtract, made once here
        sums = cpu_native.expert_row_sums(layer.up_proj.data, layer.down_proj.data)
        layer.up_proj_row_sums = Parameter(sums, requires_grad=False)

    def apply(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("BlockFFN.forward passes the scales to the expert kernels")
