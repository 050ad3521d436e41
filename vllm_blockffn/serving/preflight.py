"""Front-end checks of a checkpoint, before vLLM starts any worker.

Run from `patches/hf_config_parser.py` in the process that parses the model config
(`vllm serve`'s API server, or the `LLM(...)` caller), so a bad checkpoint fails there with
one line that names the file or field, instead of a traceback from a worker.

What is checked, and what it costs:
- A BlockFFN checkpoint (`check_checkpoint`): config.json field by field; every weight file
  (index shards present, safetensors headers and file sizes, `.bin` archives: no tensor data
  read, milliseconds per file); every expected weight's name, shape and floating-point dtype.
- Non-finite values: only the routers (`router_proj`, `router_norm`; E·H + E values per layer,
  3.5 M for the 1.2B XLarge: a few ms), and only as a warning. The experts are most of a
  checkpoint's bytes (0.9 G values for XLarge): scanning them would read every byte once more
  before the workers read them, seconds per GB on every start, for a fault that only a damaged
  training run or a bad conversion produces. `vllm-blockffn check MODEL_DIR` scans every weight
  and fails on any NaN/Inf; run it once per new checkpoint. EAGLE heads are not scanned here.
- Any other local model folder vLLM is asked to parse (`check_other_folder`): an EAGLE head or
  any model. Its weight files' integrity only (the faults that would make every loader fail
  anyway, so only the place and the message change), and for a BlockFFN/FR-Spec EAGLE head also
  that its weights are floating point. A healthy head never gets here: `patches/eagle_head.py`
  takes it first; a head whose files cannot be read falls through to this check.

In the `vllm` command an uncaught BlockFFN checkpoint error ends the process with that one line
(`install_cli_hook`) rather than a traceback; `LLM(...)` raises it as usual (inside pydantic's
ValidationError, as vLLM wraps every config error).
"""

from __future__ import annotations

import logging
import os
import sys

from vllm_blockffn.serving.checkpoint import (
    INDEX_TENSORS,
    BlockFFNWeightError,
    check_dtypes,
    check_folder_files,
    check_weights,
    file_tensor_info,
    is_eagle_head,
    nonfinite_weights,
    router_weight_names,
    weight_files,
)
from vllm_blockffn.serving.config import BlockFFNConfigError, BlockFFNSpec

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

TRACEBACK_ENV = "VLLM_BLOCKFFN_TRACEBACK"  # =1: keep the full traceback in the `vllm` command
_HOOK_MARK = "__vllm_blockffn_cli_hook__"
CHECKPOINT_ERRORS = (BlockFFNConfigError, BlockFFNWeightError)


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
    """Raise BlockFFNConfigError / BlockFFNWeightError naming the field, file or tensor at fault;
    warn (once per tensor) about NaN/Inf in the routers."""
    path = checkpoint_dir(model, revision)
    source = os.path.join(path, "config.json") if path else f"{model}/config.json"
    spec = BlockFFNSpec.from_config(config_dict, source=source)
    if path is not None:
        infos = file_tensor_info(weight_files(path))
        if is_eagle_head(infos):  # an EAGLE head with a copy of its target's config.json, whose files
            check_dtypes(infos.values(), allowed_other=INDEX_TENSORS)  # patches/eagle_head could not read
        check_weights(path, spec, infos)
        for message in nonfinite_weights(infos, router_weight_names(spec)):
            logger.warning("%s: this model will compute NaN outputs (serving anyway; "
                           "`vllm-blockffn check %s` checks every weight)", message, path)
    return spec


def check_other_folder(path: str) -> None:
    """A local model folder that is not a BlockFFN checkpoint: raise BlockFFNFileError for a weight
    file that no loader could read (a missing shard, a truncated or non-safetensors .safetensors, a
    .bin that is not a torch archive) and, for an EAGLE head, a weight that is not floating point.
    Legacy-format (pickle) .bin files of other models are not loaded here (no mmap for them)."""
    check_folder_files(path, load_legacy_bin=False)


def checkpoint_error(exc: BaseException | None, depth: int = 0) -> BaseException | None:
    """The BlockFFN checkpoint error in `exc`: itself, inside pydantic's ValidationError (vLLM's
    config classes wrap every ValueError in one, nested for a draft model), or its cause."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, CHECKPOINT_ERRORS) or (isinstance(exc, ValueError)
                                              and type(exc).__module__.startswith("vllm_blockffn.")):
        return exc
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        try:
            for item in errors():
                found = checkpoint_error((item.get("ctx") or {}).get("error"), depth + 1)
                if found is not None:
                    return found
        except Exception:
            pass
    return checkpoint_error(exc.__cause__ or exc.__context__, depth + 1)


def install_cli_hook() -> None:
    """In the `vllm` command only: an uncaught BlockFFN checkpoint error is printed as one line,
    `vllm-blockffn: error: <message>`, instead of a traceback (exit status 1, as for any uncaught
    exception). Every other exception, and `VLLM_BLOCKFFN_TRACEBACK=1`, keep the traceback."""
    if os.path.basename(sys.argv[0] if sys.argv else "") != "vllm" or os.environ.get(TRACEBACK_ENV) == "1":
        return
    previous = sys.excepthook
    if getattr(previous, _HOOK_MARK, False):
        return

    def hook(exc_type, exc, tb):
        found = checkpoint_error(exc)
        if found is None:
            return previous(exc_type, exc, tb)
        print(f"vllm-blockffn: error: {found}", file=sys.stderr, flush=True)

    setattr(hook, _HOOK_MARK, True)
    sys.excepthook = hook
