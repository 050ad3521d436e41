"""Checkpoint files: listing, reading and shape-checking BlockFFN weights (SPEC.md §1).

Shared by the reference model, the CLI and the front-end preflight that rejects a
bad checkpoint before vLLM starts its workers. No vLLM imports here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from vllm_blockffn.serving.config import BlockFFNSpec

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class BlockFFNWeightError(ValueError):
    """A checkpoint tensor that is missing or has a shape the config does not allow."""


def weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files of a checkpoint folder, safetensors preferred (as vLLM does)."""
    path = os.fspath(path)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, name) for name in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise BlockFFNWeightError(f"{path}: no weights found (expected model.safetensors, "
                              f"{SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX})")


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, lazily (bin files are memory-mapped)."""
    from safetensors import safe_open

    for file in weight_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes without reading tensor data (safetensors headers; bin via mmap)."""
    return file_tensor_shapes(weight_files(path))


def file_tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in these .safetensors / .bin files."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:
            for name, tensor in torch.load(file, map_location="cpu", mmap=True, weights_only=True).items():
                shapes[name] = tuple(tensor.shape)
    return shapes


def expected_shapes(spec: BlockFFNSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor an official checkpoint of this config holds, with its shape."""
    H, E, D = spec.hidden_size, spec.num_experts, spec.expert_size
    nh, nkv = spec.num_attention_heads, spec.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, H),
        "model.norm.weight": (H,),
    }
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, H)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        if spec.attention_type == "vanilla":
            hd = spec.head_dim
            out[p + "self_attn.q_proj.weight"] = (nh * hd, H)
            out[p + "self_attn.k_proj.weight"] = (nkv * hd, H)
            out[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
            out[p + "self_attn.o_proj.weight"] = (H, nh * hd)
        else:
            qr, kvr = spec.q_lora_rank, spec.kv_lora_rank
            nope, rope, v = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
            out[p + "self_attn.q_a_proj.weight"] = (qr, H)
            out[p + "self_attn.q_a_layernorm.weight"] = (qr,)
            out[p + "self_attn.q_b_proj.weight"] = (nh * (nope + rope), qr)
            out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (kvr + rope, H)
            out[p + "self_attn.kv_a_layernorm.weight"] = (kvr,)
            out[p + "self_attn.kv_b_proj.weight"] = (nh * (nope + v), kvr)
            out[p + "self_attn.o_proj.weight"] = (H, nh * v)
        out[p + "mlp.router_proj.weight"] = (E, H)
        if spec.norm_after_router == "rms":
            out[p + "mlp.router_norm.weight"] = (E,)
        if spec.ffn_type == "block":
            out[p + "mlp.up_proj"] = (E, D, H)
            out[p + "mlp.down_proj"] = (E, H, D)
        else:
            out[p + "mlp.up_proj"] = (E * D, H)
            out[p + "mlp.down_proj"] = (H, E * D)
    return out


# Tensors some checkpoints carry that no model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def check_weights(path: str | os.PathLike, spec: BlockFFNSpec) -> None:
    """Raise BlockFFNWeightError naming the first missing tensor or wrong shape."""
    found = tensor_shapes(path)
    for name, shape in expected_shapes(spec).items():
        if name not in found:
            raise BlockFFNWeightError(f"{path}: weight '{name}' is missing; expected shape {list(shape)} "
                                      f"(ffn_type={spec.ffn_type!r}, attention_type={spec.attention_type!r})")
        if tuple(found[name]) != shape:
            raise BlockFFNWeightError(f"{path}: weight '{name}' has shape {list(found[name])}; expected "
                                      f"{list(shape)} from config.json (hidden_size={spec.hidden_size}, "
                                      f"num_experts={spec.num_experts}, expert_size={spec.expert_size})")
