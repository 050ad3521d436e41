"""`vllm-blockffn quantize SRC OUT`: write a BlockFFN checkpoint with int8 weights and fp32 row scales.

Why: `--quantization blockffn_int8` quantizes at every load; a quantized checkpoint is half the
download and disk of bf16 and loads the same int8 tensors (tests/test_int8.py checks the two give
the same model). The math is ``kernels/quant.py`` (symmetric, one fp32 scale per output row); the
tensor names and shapes are :func:`~vllm_blockffn.serving.checkpoint.int8_tensors` (README "int8
weights"). Everything else (router, norms, embedding, MLA's kv_b_proj) is copied unchanged, and
config.json gains ``"quantization_config": {"quant_method": "blockffn_int8", "bits": 8, "linears": …}``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import torch

from vllm_blockffn.kernels.layout import down_from_rows, down_rows
from vllm_blockffn.kernels.quant import quantize_rows
from vllm_blockffn.serving.checkpoint import check_weights, int8_tensors, iter_tensors
from vllm_blockffn.serving.config import BlockFFNSpec
from vllm_blockffn.tools.inflate import COPIED_FILES, write_weights


def quantized_tensors(src: str, spec: BlockFFNSpec, linears: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the quantized checkpoint, one source tensor at a time."""
    E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
    targets = int8_tensors(spec, linears)
    for name, t in iter_tensors(src):
        if name not in targets:
            yield name, t
            continue
        where = f"{src}: weight '{name}'"
        if name.endswith("mlp.up_proj"):  # rows of W_up,e: over H, whatever the layout
            q, s = quantize_rows(t.reshape(E, D, H), where)
            q, s = q.reshape(t.shape), s.reshape(targets[name + "_scale"][1])
        elif name.endswith("mlp.down_proj"):  # rows of W_down,e = [E, H, D] rows, over D
            q, s = quantize_rows(down_rows(t, spec.ffn_type, E), where)
            q = down_from_rows(q, spec.ffn_type)
        else:  # a linear [N, K]
            q, s = quantize_rows(t, where)
        yield name, q.contiguous()
        yield (name + "_scale"), s.contiguous()


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, linears: bool = True) -> BlockFFNSpec:
    """Write the int8 checkpoint of the float BlockFFN checkpoint ``src`` to ``out``."""
    src, out = os.fspath(src), os.fspath(out)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    spec = BlockFFNSpec.from_config(cfg, source=os.path.join(src, "config.json"))
    if spec.int8:
        raise ValueError(f"{src}: already a blockffn_int8 checkpoint (config.json quantization_config)")
    check_weights(src, spec)  # every tensor present, of its shape, floating point: named errors
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError(f"quantize: OUT ({out}) must differ from SRC")
    os.makedirs(out, exist_ok=True)
    write_weights(out, quantized_tensors(src, spec, linears))
    cfg["quantization_config"] = {"quant_method": "blockffn_int8", "bits": 8, "linears": linears}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    return BlockFFNSpec.from_pretrained(out)
