"""The transformers config class for BlockFFN checkpoints.

Official checkpoints point `auto_map` at remote code; serving never runs it. This
class holds every config.json field as an attribute (as MiniCPMConfig does) with
MiniCPMConfig's defaults for the scaling fields.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from vllm_blockffn.serving.config import BlockFFNSpec


class BlockFFNConfig(PretrainedConfig):
    model_type = "minicpm"

    def __init__(self, **kwargs):
        kwargs.pop("auto_map", None)  # never resolve the checkpoint's remote code
        super().__init__(**kwargs)
        for name, default in (("scale_emb", 1), ("dim_model_base", 1), ("scale_depth", 1.0),
                              ("attention_type", "vanilla"), ("hidden_act", "silu"),
                              ("norm_scale", 1.0), ("block_implementation", "torch")):
            if getattr(self, name, None) is None:
                setattr(self, name, default)
        if getattr(self, "num_key_value_heads", None) is None and hasattr(self, "num_attention_heads"):
            self.num_key_value_heads = self.num_attention_heads

    @property
    def spec(self) -> BlockFFNSpec:
        return BlockFFNSpec.from_config(self)
