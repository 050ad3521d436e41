"""Corrupt checkpoint files: one line that names the file, a non-zero exit, no worker started.

Against the real entry points: `vllm-blockffn check DIR` (a subprocess), and the preflight that
vLLM's front end runs while it parses the model config, before any worker starts: `LLM(...)` in
this process, and `vllm serve` (a subprocess) for three cases. Serving checks the routers' values
only, and only warns (vllm_blockffn/serving/preflight.py says why); `check` scans every weight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_blockffn.tools.tiny_eagle import TinyEagleOptions, make_tiny_eagle

NOT_JSON = '{\n  "hidden_size": 128,\n  oops\n}\n'  # line 3, column 3: a name without quotes


@dataclass
class Case:
    path: str  # what `check` is given (a checkpoint or an EAGLE head folder)
    message: list[str]  # every fragment must be in the one error line (the first names the file)
    head: bool = False  # serve `path` as the EAGLE head of `target`
    target: str | None = None
    serving: str = "error"  # error | warn | ok (NaN/Inf: serving scans the routers only, and warns)


def _edit(file: str, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def _truncate(file: str) -> None:
    os.truncate(file, os.path.getsize(file) // 2)


def _overwrite(file: str, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)


def _set(name: str, fn):
    return lambda t: t.update({name: fn(t[name])})


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:5] = float("nan")
    return t


def _with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = float("-inf")
    return t


@pytest.fixture(scope="module")
def cases(tiny_factory, tmp_path_factory) -> dict[str, Case]:
    single, sharded, binary = tiny_factory(), tiny_factory(shards=2), tiny_factory(weight_format="bin")
    root = tmp_path_factory.mktemp("corrupt")

    def copy(src: str, name: str) -> str:
        return shutil.copytree(src, os.fspath(root / name))

    def head(name: str, **opts) -> str:
        return make_tiny_eagle(root / name, single, TinyEagleOptions(**opts))

    out: dict[str, Case] = {}

    p = copy(single, "truncated")
    _truncate(f := os.path.join(p, "model.safetensors"))
    out["truncated"] = Case(p, [f"{f}: truncated: ", "bytes missing", "expected a complete safetensors file"])

    p = copy(single, "not_safetensors")
    _overwrite(f := os.path.join(p, "model.safetensors"), b"<html>502 Bad Gateway</html>\n" * 40)
    out["not_safetensors"] = Case(p, [f"{f}: not a safetensors file", "expected a complete safetensors file"])

    p = copy(sharded, "shard2_truncated")
    _truncate(f := os.path.join(p, "model-00002-of-00002.safetensors"))
    out["shard2_truncated"] = Case(p, [f"{f}: truncated: "])

    p = copy(sharded, "shard2_missing")
    os.remove(f := os.path.join(p, "model-00002-of-00002.safetensors"))
    out["shard2_missing"] = Case(p, [f"{f}: missing; model.safetensors.index.json names it as the shard holding"])

    p = copy(single, "config_not_json")
    _overwrite(f := os.path.join(p, "config.json"), NOT_JSON.encode())
    out["config_not_json"] = Case(p, [f"{f}: not valid JSON: ", "at line 3 column 3",
                                      "expected a JSON object of config fields"])

    p = copy(binary, "bin_not_torch")
    _overwrite(f := os.path.join(p, "pytorch_model.bin"), b"version https://git-lfs.github.com/spec/v1\n")
    out["bin_not_torch"] = Case(p, [f"{f}: not a PyTorch checkpoint", "expected a PyTorch checkpoint"])

    p = copy(binary, "bin_truncated")
    _truncate(f := os.path.join(p, "pytorch_model.bin"))
    out["bin_truncated"] = Case(p, [f"{f}: truncated or damaged zip archive"])

    p = copy(single, "int_dtype")
    _edit(f := os.path.join(p, "model.safetensors"),
          _set("model.layers.1.mlp.up_proj", lambda t: (t * 100).to(torch.int32)))
    out["int_dtype"] = Case(p, [f"{f}: weight 'model.layers.1.mlp.up_proj' has dtype int32; "
                                "expected a floating-point dtype"])

    p = copy(single, "nan_router")
    _edit(f := os.path.join(p, "model.safetensors"), _set("model.layers.0.mlp.router_proj.weight", _with_nan))
    out["nan_router"] = Case(p, [f"{f}: weight 'model.layers.0.mlp.router_proj.weight' has 5 NaN and 0 infinite "
                                 "values (of 1536); expected finite numbers"], serving="warn")

    p = copy(sharded, "inf_expert")  # in whichever shard holds it
    with open(os.path.join(p, "model.safetensors.index.json")) as index:
        shard = json.load(index)["weight_map"]["model.layers.1.mlp.down_proj"]
    _edit(f := os.path.join(p, shard), _set("model.layers.1.mlp.down_proj", _with_inf))
    out["inf_expert"] = Case(p, [f"{f}: weight 'model.layers.1.mlp.down_proj' has 0 NaN and 1 infinite values"],
                             serving="ok")

    # EAGLE heads (official BlockFFN/FR-Spec format, vllm_blockffn/serving/eagle.py) for `single`.
    p = head("head_truncated")
    _truncate(f := os.path.join(p, "model.safetensors"))
    out["head_truncated"] = Case(p, [f"{f}: truncated: "], head=True, target=single)

    p = head("head_bin_not_torch", weight_format="bin")
    _overwrite(f := os.path.join(p, "pytorch_model.bin"), b"\x00" * 64)
    out["head_bin_not_torch"] = Case(p, [f"{f}: not a PyTorch checkpoint"], head=True, target=single)

    p = head("head_int_dtype")
    _edit(f := os.path.join(p, "model.safetensors"), _set("fc.weight", lambda t: t.to(torch.int32)))
    out["head_int_dtype"] = Case(p, [f"{f}: weight 'fc.weight' has dtype int32; expected a floating-point dtype"],
                                 head=True, target=single)

    p = head("head_target_config_int_dtype", config_style="target")  # config.json: a copy of the target's
    _edit(f := os.path.join(p, "model.safetensors"), _set("layers.0.mlp.down_proj.weight", lambda t: t.to(torch.int16)))
    out["head_target_config_int_dtype"] = Case(p, [f"{f}: weight 'layers.0.mlp.down_proj.weight' has dtype int16"],
                                               head=True, target=single)

    p = head("head_nan")
    _edit(f := os.path.join(p, "model.safetensors"), _set("layers.0.mlp.up_proj.weight", _with_nan))
    out["head_nan"] = Case(p, [f"{f}: weight 'layers.0.mlp.up_proj.weight' has 5 NaN"], head=True, target=single,
                           serving="ok")

    p = head("head_config_not_json")
    _overwrite(f := os.path.join(p, "config.json"), NOT_JSON.encode())
    out["head_config_not_json"] = Case(p, [f"{f}: not valid JSON: ", "at line 3 column 3"], head=True,
                                       target=single, serving="untested")
    return out


CHECK_CASES = ["truncated", "not_safetensors", "shard2_truncated", "shard2_missing", "config_not_json",
               "bin_not_torch", "bin_truncated", "int_dtype", "nan_router", "inf_expert", "head_truncated",
               "head_bin_not_torch", "head_int_dtype", "head_target_config_int_dtype", "head_nan",
               "head_config_not_json"]
SERVE_CASES = ["truncated", "not_safetensors", "shard2_truncated", "shard2_missing", "config_not_json",
               "bin_not_torch", "bin_truncated", "int_dtype", "head_truncated", "head_bin_not_torch",
               "head_int_dtype", "head_target_config_int_dtype"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "vllm-blockffn")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def _one_error_line(text: str, prefix: str = "vllm-blockffn: error: ") -> str:
    lines = [x for x in text.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", CHECK_CASES)
def test_check_names_the_file(cases, name):
    case = cases[name]
    proc = _cli("check", case.path)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    for fragment in case.message:
        assert fragment in line
    assert "Traceback" not in proc.stderr and "OK" not in proc.stdout


def test_check_passes_sound_checkpoint_and_head(tiny_model, tmp_path):
    proc = _cli("check", tiny_model)
    assert proc.returncode == 0 and "BlockFFN checkpoint OK" in proc.stdout and "all finite" in proc.stdout
    head = make_tiny_eagle(tmp_path / "head", tiny_model)
    proc = _cli("check", head)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{head}: BlockFFN EAGLE head OK (1 layer(s), H=128" in proc.stdout


def _llm(case: Case):
    from vllm import LLM

    kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.1)
    if case.head:
        return LLM(case.target, speculative_config={"method": "eagle", "model": case.path,
                                                    "num_speculative_tokens": 2}, **kwargs)
    return LLM(case.path, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVE_CASES)
def test_llm_refuses_while_parsing_the_config(cases, name):
    """The error comes out of vLLM's config parsing, before any engine or worker."""
    from vllm_blockffn.serving.preflight import checkpoint_error

    case = cases[name]
    with pytest.raises(Exception) as err:
        _llm(case)
    found = checkpoint_error(err.value)
    assert found is not None, str(err.value)[-3000:]
    message = str(found)
    assert "\n" not in message
    for fragment in case.message:
        assert fragment in message
    # Raised by vLLM's config parsing (HFConfigParser.parse under get_config), or for config.json by the
    # speculators probe that reads it just before: both run in create_engine_config, before any engine.
    frames = {f.name for f in traceback.extract_tb(found.__traceback__)}
    assert {"get_config", "parse"} <= frames or "maybe_override_with_speculators" in frames, frames


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_serving_warns_on_nonfinite_routers_and_skips_experts(cases):
    """NaN in a router: a one-line warning naming the file and tensor, and the config is served;
    experts are not scanned at serve time (too many bytes), so an Inf expert passes silently."""
    from vllm.engine.arg_utils import EngineArgs

    records = _Records()
    logger = logging.getLogger("vllm.vllm_blockffn.serving.preflight")
    logger.addHandler(records)
    try:
        for name in ("nan_router", "inf_expert"):
            case = cases[name]
            records.messages.clear()
            config = EngineArgs(model=case.path, dtype="float32", max_model_len=128).create_model_config()
            assert config.architectures == ["BlockFFNForCausalLM"]
            if case.serving == "warn":
                assert len(records.messages) == 1 and "\n" not in records.messages[0]
                assert case.message[0] in records.messages[0] and "NaN outputs" in records.messages[0]
            else:
                assert records.messages == []
    finally:
        logger.removeHandler(records)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shard2_truncated", "config_not_json", "head_bin_not_torch"])
def test_vllm_serve_exits_with_one_line(cases, name, record_figure):
    """`vllm serve`: exit status ≠ 0, the last line is ours and names the file; vLLM's own log lines
    above it (for a weight file, its retried "Error parsing config" lines), but no traceback and no
    engine process."""
    case = cases[name]
    exe = os.path.join(os.path.dirname(sys.executable), "vllm")
    args = [exe, "serve", case.target if case.head else case.path, "--port", "18798", "--max-model-len", "128"]
    if case.head:
        args += ["--speculative-config", json.dumps({"method": "eagle", "model": case.path,
                                                      "num_speculative_tokens": 2})]
    start = time.monotonic()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    elapsed = time.monotonic() - start
    record_figure(f"vllm serve, corrupt {name}: seconds to exit", f"{elapsed:.1f}")
    out = proc.stdout
    assert proc.returncode != 0
    last = [x for x in out.splitlines() if x.strip()][-1]
    assert last == _one_error_line(out), out[-3000:]
    for fragment in case.message:
        assert fragment in last
    assert "Traceback" not in out and "EngineCore" not in out
