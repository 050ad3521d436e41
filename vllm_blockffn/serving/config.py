"""Reading and checking a BlockFFN checkpoint's config.json (SPEC.md §1).

This module imports neither torch nor vLLM: the reference model, the CLI, the
config hook that runs in vLLM's front-end process and the vLLM model all share
one parser, so a bad checkpoint fails the same way everywhere, early and with
the name of the field at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BLOCK_FFN_TYPES = ("block", "block_linear")
OTHER_FFN_TYPES = ("vanilla", "moe")
ATTENTION_TYPES = ("vanilla", "mla")
ROUTER_NORMS = ("rms", "sum", "none")
ROUTER_ACTS = ("relu",)
HIDDEN_ACTS = ("silu",)
# "torch" and "kernel" share the official weight layout; the other two name
# training-time layouts that no release uses.
BLOCK_IMPLEMENTATIONS = ("torch", "kernel")
UNSUPPORTED_BLOCK_IMPLEMENTATIONS = ("fastmoe", "megablocks")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class BlockFFNConfigError(ValueError):
    """A checkpoint config that cannot describe a BlockFFN model we can serve."""


def is_blockffn_config(config: Any) -> bool:
    """True when a MiniCPM-family config (dict or object) declares a BlockFFN FFN."""
    value = config.get("ffn_type") if isinstance(config, Mapping) else getattr(config, "ffn_type", None)
    return value in BLOCK_FFN_TYPES


def _as_mapping(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return vars(config)


@dataclass(frozen=True)
class BlockFFNSpec:
    """The fields of a BlockFFN checkpoint that decide its math and weight shapes."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    scale_emb: float
    dim_model_base: float
    scale_depth: float
    attention_type: str
    ffn_type: str
    num_experts: int
    expert_size: int
    hidden_act: str
    router_act: str
    norm_after_router: str
    norm_scale: float
    block_implementation: str
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    int8: bool = False
    """A checkpoint written by `vllm-blockffn quantize` (config.json quantization_config blockffn_int8)."""
    int8_linears: bool = True
    """…with its attention projections and lm_head in int8 too (quantization_config.linears)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / self.num_hidden_layers**0.5

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    @classmethod
    def from_config(cls, config: Any, source: str = "config.json") -> BlockFFNSpec:
        """Parse and check (defaults are MiniCPMConfig's).

        Raises BlockFFNConfigError naming the field and what was expected.
        """
        cfg = _as_mapping(config)

        def err(field: str, expected: str, got: Any = None, present: bool = True) -> BlockFFNConfigError:
            if not present:
                return BlockFFNConfigError(f"{source}: BlockFFN field '{field}' is missing; expected {expected}")
            return BlockFFNConfigError(f"{source}: BlockFFN field '{field}' = {got!r}; expected {expected}")

        def need(field: str, expected: str, default: Any = ...) -> Any:
            if field not in cfg or cfg[field] is None:
                if default is ...:
                    raise err(field, expected, present=False)
                return default
            return cfg[field]

        def positive_int(field: str, default: Any = ...) -> int:
            value = need(field, "a positive integer", default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise err(field, "a positive integer", value)
            return value

        def number(field: str, default: Any = ...) -> float:
            value = need(field, "a number", default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise err(field, "a number", value)
            return float(value)

        def choice(field: str, allowed: tuple[str, ...], default: Any = ..., refused: tuple[str, ...] = ()) -> str:
            value = need(field, f"one of {list(allowed)}", default)
            if value in refused:
                raise err(field, f"one of {list(allowed)} ('{value}' uses a weight layout that no "
                                 "official release uses and vllm-blockffn does not load)", value)
            if value not in allowed:
                raise err(field, f"one of {list(allowed)}", value)
            return value

        ffn_type = need("ffn_type", f"one of {list(BLOCK_FFN_TYPES)}")
        if ffn_type not in BLOCK_FFN_TYPES:
            raise err("ffn_type", f"one of {list(BLOCK_FFN_TYPES)} for a BlockFFN model", ffn_type)

        hidden = positive_int("hidden_size")
        heads = positive_int("num_attention_heads")
        attention_type = choice("attention_type", ATTENTION_TYPES, default="vanilla")
        mla = {}
        if attention_type == "mla":
            mla = {name: positive_int(name) for name in MLA_FIELDS}
        elif hidden % heads:
            raise err("num_attention_heads", f"a divisor of hidden_size={hidden}", heads)
        kv_heads = positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise err("num_key_value_heads", f"a divisor of num_attention_heads={heads}", kv_heads)

        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is not None:
            kind = None
            if isinstance(rope_scaling, Mapping):
                kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic") or not isinstance(rope_scaling.get("factor"), (int, float)):
                raise err("rope_scaling", 'null or {"type": "linear"|"dynamic", "factor": number}', rope_scaling)
            rope_scaling = {"type": kind, "factor": float(rope_scaling["factor"])}

        norm = choice("norm_after_router", ROUTER_NORMS)
        qc = cfg.get("quantization_config")
        if qc is not None and (not isinstance(qc, Mapping) or qc.get("quant_method") != "blockffn_int8"):
            method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
            raise err("quantization_config", "absent (float weights) or {\"quant_method\": \"blockffn_int8\"} "
                      "(a checkpoint written by `vllm-blockffn quantize`)", method)
        int8_linears = qc.get("linears", True) if qc is not None else True
        if not isinstance(int8_linears, bool):
            raise err("quantization_config.linears", "true or false", int8_linears)
        spec = cls(
            vocab_size=positive_int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=positive_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=number("rms_norm_eps", default=1e-5),
            rope_theta=number("rope_theta", default=10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=positive_int("max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            scale_emb=number("scale_emb", default=1.0),
            dim_model_base=number("dim_model_base", default=1.0),
            scale_depth=number("scale_depth", default=1.0),
            attention_type=attention_type,
            ffn_type=ffn_type,
            num_experts=positive_int("num_experts"),
            expert_size=positive_int("expert_size"),
            hidden_act=choice("hidden_act", HIDDEN_ACTS, default="silu"),
            router_act=choice("router_act", ROUTER_ACTS),
            norm_after_router=norm,
            norm_scale=number("norm_scale") if norm == "sum" else number("norm_scale", default=1.0),
            block_implementation=choice("block_implementation", BLOCK_IMPLEMENTATIONS, default="torch",
                                        refused=UNSUPPORTED_BLOCK_IMPLEMENTATIONS),
            **mla,
            int8=qc is not None,
            int8_linears=int8_linears,
        )
        return spec

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BlockFFNSpec:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            return cls.from_config(json.load(f), source=config_path)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment variable ``name``, lower-cased: one of ``choices`` (unset or empty:
    ``default``); a ValueError naming the variable and the choices otherwise."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {list(choices)}")
    return value
