"""Front-end checks of a BlockFFN checkpoint, before vLLM starts any worker."""

from __future__ import annotations

import os

from vllm_blockffn.serving.checkpoint import check_weights
from vllm_blockffn.serving.config import BlockFFNSpec


def checkpoint_dir(model, revision: str | None = None) -> str | None:
    """The local folder holding the weights (a local path, or the hub cache if already there)."""
    if os.path.isdir(os.fspath(model)):
        return os.fspath(model)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(model), revision=revision, local_files_only=True)
    except Exception:
        return None


def check_checkpoint(model, config_dict: dict, revision: str | None = None) -> BlockFFNSpec:
    """Raise BlockFFNConfigError / BlockFFNWeightError naming the field or tensor at fault."""
    path = checkpoint_dir(model, revision)
    source = os.path.join(path, "config.json") if path else f"{model}/config.json"
    spec = BlockFFNSpec.from_config(config_dict, source=source)
    if path is not None:
        check_weights(path, spec)
    return spec
