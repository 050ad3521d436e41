"""Patch `vllm.transformers_utils.config.HFConfigParser.parse`.

What: a MiniCPM-family checkpoint whose `ffn_type` is `block` or `block_linear` is
  parsed by vllm-blockffn: config.json is checked field by field, the weight files'
  names and shapes are checked against it, and the config comes back as
  `BlockFFNConfig` with `architectures = ["BlockFFNForCausalLM"]`.
Why: official BlockFFN checkpoints declare `MiniCPMForCausalLM` with an `auto_map`
  to remote code. Stock vLLM either refuses them (no `--trust-remote-code`) or runs
  the remote config and then builds its top-k MiniCPM MoE from `num_experts`, which
  fails deep in weight loading. Checking here, in the front-end process, turns a bad
  checkpoint into one clear error before any worker starts, and no checkpoint code
  is ever executed, with or without `--trust-remote-code`.
How: wrap `parse`; every other config goes to the original parser untouched.
Remove when: vLLM can route a model_type to a plugin's parser by a config field,
  or ships BlockFFN support itself.
"""

from __future__ import annotations

import json
import os

from vllm_blockffn.serving.config import is_blockffn_config

_MARK = "__vllm_blockffn_patched__"


def _local_config(model) -> dict | None:
    path = os.path.join(os.fspath(model), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _hub_config(model, revision) -> dict | None:
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(str(model), "config.json", revision=revision)) as f:
            return json.load(f)
    except Exception:
        return None


def apply() -> None:
    from vllm.transformers_utils.config import HFConfigParser

    original = HFConfigParser.parse
    if getattr(original, _MARK, False):
        return

    def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
        config_dict = _local_config(model) or _hub_config(model, revision)
        if config_dict is None or not is_blockffn_config(config_dict):
            return original(self, model, trust_remote_code, revision, code_revision, **kwargs)
        from vllm_blockffn.serving.hf_config import BlockFFNConfig
        from vllm_blockffn.serving.preflight import check_checkpoint

        check_checkpoint(model, config_dict, revision)
        config = BlockFFNConfig(**{**config_dict, "architectures": ["BlockFFNForCausalLM"]})
        config.name_or_path = str(model)
        return config_dict, config  # get_config applies hf_overrides afterwards

    setattr(parse, _MARK, True)
    HFConfigParser.parse = parse
