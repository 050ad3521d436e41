"""Write small BlockFFN checkpoints in exactly the official format (SPEC.md §1).

No hub access: the tokenizer is a byte-level BPE trained here in about a second
on text that ships with Python itself (the standard library's docstrings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from vllm_blockffn.serving.checkpoint import expected_shapes
from vllm_blockffn.serving.config import BlockFFNSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Files an official release ships for `--trust-remote-code`. Ours refuse to run, so a
# test can prove that serving never executes checkpoint code.
REMOTE_CODE_STUB = (
    "raise RuntimeError('vllm-blockffn test checkpoint: this remote-code file must never be executed')\n"
)


@dataclass
class TinyOptions:
    attention: str = "vanilla"  # vanilla | mla
    layout: str = "block"  # block | block_linear
    norm: str = "rms"  # rms | sum | none
    dtype: str = "float32"
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    num_experts: int = 12
    expert_size: int = 32
    vocab_size: int = 1024
    weight_format: str = "safetensors"  # safetensors | bin
    shards: int = 1
    tie_word_embeddings: bool = False
    remote_code: bool = False


def tiny_config(opts: TinyOptions, vocab_size: int) -> dict:
    """A config.json with the official field names and MiniCPM-style scaling."""
    heads = opts.hidden_size // 32
    cfg = {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        },
        "model_type": "minicpm",
        "vocab_size": vocab_size,
        "hidden_size": opts.hidden_size,
        "num_hidden_layers": opts.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": opts.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": opts.dtype,
        "scale_emb": 12,
        "dim_model_base": 32,
        "scale_depth": 1.4,
        "attention_type": opts.attention,
        "ffn_type": opts.layout,
        "num_experts": opts.num_experts,
        "expert_size": opts.expert_size,
        "hidden_act": "silu",
        "router_act": "relu",
        "norm_after_router": opts.norm,
        "norm_scale": 1.0,
        "block_implementation": "torch",
        # Present in official configs, unused by BlockFFN.
        "intermediate_size": opts.num_experts * opts.expert_size,
        "ffn_gated": True,
        "moe_top_k": 0,
        "initializer_range": 0.1,
        "use_cache": True,
    }
    if opts.attention == "mla":
        cfg.update(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    return cfg


def train_tokenizer(out_dir: str, vocab_size: int, texts: list[str] | None = None) -> int:
    """Train a byte-level BPE on `texts` (default: stdlib docstrings); write tokenizer files; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if texts is None:
        import pydoc  # noqa: F401  (imports a wide set of documented modules)

        texts = []
        for name in ("json", "os", "re", "collections", "argparse", "logging", "pathlib", "random",
                     "string", "textwrap", "functools", "itertools", "dataclasses", "typing", "unittest"):
            module = __import__(name)
            texts.append(module.__doc__ or "")
            for attr in sorted(dir(module)):
                doc = getattr(getattr(module, attr, None), "__doc__", None)
                if isinstance(doc, str):
                    texts.append(doc)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": False, "model_max_length": 2048,
            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant:{% endif %}",
        }, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
    return tok.get_vocab_size()


def random_weights(spec: BlockFFNSpec, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights scaled by 1/sqrt(fan_in) so activations stay O(1) through the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            tensor = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1]
            tensor = torch.randn(shape, generator=gen) / fan_in**0.5
        out[name] = tensor.to(dtype).contiguous()
    return out


def save_weights(out_dir: str, tensors: dict[str, torch.Tensor], weight_format: str, shards: int) -> None:
    """Write as the official converter does (bin) or as (sharded) safetensors with an index."""
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if weight_format == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in group}
        if ext == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(out_dir, file), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(out_dir, file))
        weight_map.update({n: file for n in group})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def make_tiny(out_dir: str | os.PathLike, opts: TinyOptions | None = None) -> str:
    """Write a complete tiny BlockFFN checkpoint folder and return its path."""
    opts = opts or TinyOptions()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    vocab = train_tokenizer(out_dir, opts.vocab_size)
    cfg = tiny_config(opts, vocab)
    spec = BlockFFNSpec.from_config(cfg)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    save_weights(out_dir, random_weights(spec, opts.seed, DTYPES[opts.dtype]), opts.weight_format, opts.shards)
    if opts.remote_code:
        for name in ("configuration_minicpm.py", "modeling_minicpm.py"):
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(REMOTE_CODE_STUB)
    return out_dir
