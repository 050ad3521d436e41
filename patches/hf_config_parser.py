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
  Any other local folder (an EAGLE head whose files `patches/eagle_head` could not read,
  or any model) gets its weight files' integrity checked first: a missing shard, a
  truncated safetensors file or a .bin that is not a torch archive fails here with one
  line naming the file, rather than in a worker (`vllm_blockffn.serving.preflight`); a
  config.json that is not JSON is named with its line and column.
  `EngineArgs.create_engine_config` reads config.json with transformers before it parses
  it (`maybe_override_with_speculators`), where a config.json that is not JSON fails as
  transformers' OSError without line or column: the reference that `vllm.engine.arg_utils`
  holds is wrapped to read a local config.json first, with the same one-line error.
How: wrap `parse`; every other config goes to the original parser after that check. Also
  wraps `vllm.engine.arg_utils.maybe_override_with_speculators` (a check, then the original).
Remove when: vLLM can route a model_type to a plugin's parser by a config field,
  or ships BlockFFN support itself.
"""

from __future__ import annotations

import json
import os

from vllm_blockffn.serving.config import is_blockffn_config

_MARK = "__vllm_blockffn_patched__"


def _local_config(model) -> dict | None:
    if not os.path.isfile(os.path.join(os.fspath(model), "config.json")):
        return None
    from vllm_blockffn.serving.checkpoint import read_config

    return read_config(model)  # BlockFFNFileError with the path, line and column when it is not JSON


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
        from vllm_blockffn.serving import preflight

        try:
            config_dict = _local_config(model) or _hub_config(model, revision)
            blockffn = config_dict is not None and is_blockffn_config(config_dict)
            if blockffn:
                preflight.check_checkpoint(model, config_dict, revision)
            elif config_dict is not None and os.path.isdir(os.fspath(model)):
                preflight.check_other_folder(os.fspath(model))
        except preflight.CHECKPOINT_ERRORS:
            preflight.install_cli_hook()  # `vllm serve`: the error as one line, not a traceback
            raise
        if not blockffn:
            return original(self, model, trust_remote_code, revision, code_revision, **kwargs)
        from vllm_blockffn.serving.hf_config import BlockFFNConfig

        config = BlockFFNConfig(**{**config_dict, "architectures": ["BlockFFNForCausalLM"]})
        config.name_or_path = str(model)
        return config_dict, config  # get_config applies hf_overrides afterwards

    setattr(parse, _MARK, True)
    HFConfigParser.parse = parse
    _wrap_speculators_probe()


def _wrap_speculators_probe() -> None:
    import vllm.engine.arg_utils as arg_utils

    original = getattr(arg_utils, "maybe_override_with_speculators", None)
    if original is None or getattr(original, _MARK, False):
        return

    def maybe_override_with_speculators(*args, **kwargs):
        from vllm_blockffn.serving import preflight

        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, (str, os.PathLike)):
            try:
                _local_config(model)  # a config.json that is not JSON: path, line and column
            except preflight.CHECKPOINT_ERRORS:
                preflight.install_cli_hook()
                raise
        return original(*args, **kwargs)

    setattr(maybe_override_with_speculators, _MARK, True)
    arg_utils.maybe_override_with_speculators = maybe_override_with_speculators
