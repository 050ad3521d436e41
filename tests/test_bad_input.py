"""Bad checkpoints fail early with an error that names the field or tensor and what was expected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_blockffn.serving.checkpoint import BlockFFNWeightError, check_weights
from vllm_blockffn.serving.config import BlockFFNConfigError, BlockFFNSpec


def config_of(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", None, "'num_experts' is missing; expected a positive integer"),
    ("expert_size", None, "'expert_size' is missing; expected a positive integer"),
    ("num_experts", 0, "'num_experts' = 0; expected a positive integer"),
    ("norm_after_router", "softmax", "'norm_after_router' = 'softmax'; expected one of ['rms', 'sum', 'none']"),
    ("router_act", "gelu", "'router_act' = 'gelu'; expected one of ['relu']"),
    ("block_implementation", "megablocks", "'block_implementation' = 'megablocks'; expected one of"),
    ("block_implementation", "fastmoe", "no official release uses"),
    ("attention_type", "sliding", "'attention_type' = 'sliding'; expected one of ['vanilla', 'mla']"),
    ("rope_scaling", {"type": "yarn", "factor": 2}, "'rope_scaling'"),
])
def test_config_errors_name_the_field(tiny_model, field, value, message):
    cfg = config_of(tiny_model)
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    with pytest.raises(BlockFFNConfigError) as err:
        BlockFFNSpec.from_config(cfg)
    assert message in str(err.value)


def test_mla_fields_are_required(tiny_factory):
    cfg = config_of(tiny_factory(attention="mla"))
    del cfg["kv_lora_rank"]
    with pytest.raises(BlockFFNConfigError, match="'kv_lora_rank' is missing"):
        BlockFFNSpec.from_config(cfg)


def test_sum_norm_needs_norm_scale(tiny_model):
    cfg = {**config_of(tiny_model), "norm_after_router": "sum"}
    del cfg["norm_scale"]
    with pytest.raises(BlockFFNConfigError, match="'norm_scale' is missing"):
        BlockFFNSpec.from_config(cfg)


@pytest.fixture
def broken_copy(tiny_model, tmp_path):
    """broken_copy(edit_weights, edit_config) → a copy of the tiny checkpoint with one thing wrong."""

    def make(edit_weights=None, edit_config=None) -> str:
        out = str(tmp_path / "broken")
        shutil.copytree(tiny_model, out)
        if edit_weights:
            file = os.path.join(out, "model.safetensors")
            tensors = load_file(file)
            edit_weights(tensors)
            save_file({k: v.contiguous() for k, v in tensors.items()}, file)
        if edit_config:
            cfg = config_of(out)
            edit_config(cfg)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(cfg, f)
        return out

    return make


def test_wrong_shape_and_missing_weight_are_named(broken_copy, tmp_path):
    path = broken_copy(edit_weights=lambda t: t.update({"model.layers.1.mlp.up_proj":
                                                         t["model.layers.1.mlp.up_proj"][:, :16].contiguous()}))
    with pytest.raises(BlockFFNWeightError, match=r"'model.layers.1.mlp.up_proj' has shape \[12, 16, 128\]; "
                                                  r"expected \[12, 32, 128\]"):
        check_weights(path, BlockFFNSpec.from_pretrained(path))


def _without_router(tensors):
    del tensors["model.layers.0.mlp.router_proj.weight"]


@pytest.mark.slow
def test_vllm_llm_refuses_before_starting(broken_copy):
    from vllm import LLM

    path = broken_copy(edit_weights=_without_router)
    with pytest.raises(Exception) as err:
        LLM(path, dtype="float32", enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.1)
    assert "weight 'model.layers.0.mlp.router_proj.weight' is missing; expected shape [12, 128]" in str(err.value)


@pytest.mark.slow
def test_vllm_serve_exits_with_the_config_error(broken_copy):
    path = broken_copy(edit_config=lambda c: c.pop("expert_size"))
    proc = subprocess.run(["vllm", "serve", path, "--port", "18799", "--max-model-len", "128"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "BlockFFN field 'expert_size' is missing; expected a positive integer" in proc.stdout + proc.stderr


def test_cli_check_reports_ok_and_errors(tiny_model, broken_copy, capsys):
    from vllm_blockffn.tools.cli import main

    assert main(["check", tiny_model]) == 0
    assert "BlockFFN checkpoint OK" in capsys.readouterr().out
    bad = broken_copy(edit_weights=lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    assert main(["check", bad]) == 2
    assert "'model.norm.weight' has shape [3]; expected [128]" in capsys.readouterr().err
