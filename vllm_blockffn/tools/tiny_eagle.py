"""Write tiny EAGLE heads for tiny BlockFFN targets, in the official head format (see eagle.py).

`make_tiny_eagle` writes a random head: `fc` [H, 2H] (+ bias), `input_norm1/2`, dense Llama
layers named `layers.{i}.…`, no `embed_tokens`/`lm_head` (the target's are used), a small
config.json, and optionally an FR-Spec vocabulary (`freq_{V}.pt` as CPM.cu writes it,
`freq_{V}.pkl` as thunlp/BlockFFN reads it, or a `token_id_remap`/`d2t` tensor).

`make_oracle_target` and `make_oracle_head` write a target and a head whose drafts are (up to float rounding) always
the target's own next tokens, so a test can demand ~100% acceptance. The target keeps the
official format but is rigged: one layer, its BlockFFN output zeroed (the router and experts
still run), attention made to attend to the current token only (q = k, scaled up, so the
softmax saturates), every embedding row at the same RMS and a final norm of ones. Then the
target's next token is a function of the current token alone, and a head that copies the
attention (folding in the target's input norm when the head has none), maps the embedding
half of `fc` to `scale_emb · x` and drops the hidden half reproduces it exactly, whatever
context EAGLE's one-token shift leaves it.
No vLLM imports here.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from collections import Counter
from dataclasses import dataclass

import torch

from vllm_blockffn.serving.checkpoint import iter_tensors
from vllm_blockffn.tools.tiny import save_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class TinyEagleOptions:
    seed: int = 0
    num_layers: int = 1
    intermediate_size: int | None = None  # default 2·H
    fc_bias: bool = True  # EAGLE-1 trains fc with a bias; the official loaders load one
    layer0_input_norm: bool = False  # False: thunlp/BlockFFN (EAGLE-1) style; True: CPM.cu MiniCPM4 style
    prefix: str = ""  # "" (official) | "model." | "eagle."
    weight_format: str = "safetensors"  # safetensors | bin
    draft_vocab_size: int | None = None  # FR-Spec reduced vocabulary size V
    remap_format: str = "pt"  # pt (CPM.cu freq_V.pt) | pkl (thunlp/BlockFFN freq_V.pkl) | tensor | d2t
    # eagle: a Llama-style EAGLE config | target: a copy of the target's | minimal: only the fields the
    # thunlp/BlockFFN loader reads (num_hidden_layers, intermediate_size, heads, kv heads, head_dim)
    config_style: str = "eagle"
    residual_scale: float | None = None  # written as eagle_residual_scale when set


def _target(target_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(target_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg, dict(iter_tensors(target_dir))


def frequency_ranked_ids(target_dir: str, size: int, texts: list[str] | None = None) -> list[int]:
    """FR-Spec vocabulary as CPM.cu's gen_fr_index.py builds it: the `size` most frequent token ids
    of a corpus (here: a few stdlib docstrings) in frequency order, EOS forced in, then the
    remaining ids by number so that any size up to the full vocabulary can be asked for."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(target_dir, "tokenizer.json"))
    if texts is None:
        texts = []
        for name in ("json", "os", "re", "collections", "functools", "itertools"):
            module = __import__(name)
            texts += [module.__doc__ or ""] + [getattr(getattr(module, a), "__doc__", None) or ""
                                               for a in sorted(dir(module))]
    counts = Counter(i for t in texts if isinstance(t, str) and t for i in tok.encode(t).ids)
    ranked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    with open(os.path.join(target_dir, "config.json")) as f:
        cfg = json.load(f)
    ranked += [i for i in range(cfg["vocab_size"]) if i not in counts]
    ids = ranked[:size]
    eos = cfg.get("eos_token_id")
    if isinstance(eos, int) and eos not in ids:
        ids[-1] = eos
    return ids


def _write_remap(out_dir: str, ids: list[int], fmt: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    if fmt == "pt":
        torch.save(list(ids), os.path.join(out_dir, f"freq_{len(ids)}.pt"))
    elif fmt == "pkl":
        with open(os.path.join(out_dir, f"freq_{len(ids)}.pkl"), "wb") as f:
            pickle.dump(list(ids), f)
    elif fmt == "tensor":
        tensors[prefix + "token_id_remap"] = torch.tensor(ids, dtype=torch.int32)
    elif fmt == "d2t":
        tensors[prefix + "d2t"] = torch.tensor(ids, dtype=torch.int64) - torch.arange(len(ids))
    else:
        raise ValueError(f"remap_format {fmt!r}; expected pt, pkl, tensor or d2t")


def _head_config(target_cfg: dict, opts: TinyEagleOptions, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int) -> dict:
    if opts.config_style == "target":
        cfg = dict(target_cfg)  # a copy of the BlockFFN target's config.json, as some EAGLE trainers write
    elif opts.config_style == "eagle":
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": target_cfg["vocab_size"],
               "hidden_size": target_cfg["hidden_size"], "rms_norm_eps": target_cfg.get("rms_norm_eps", 1e-5),
               "max_position_embeddings": target_cfg.get("max_position_embeddings", 2048),
               "bos_token_id": target_cfg.get("bos_token_id"), "eos_token_id": target_cfg.get("eos_token_id"),
               "torch_dtype": target_cfg.get("torch_dtype", "float32")}
    elif opts.config_style == "minimal":
        cfg = {}  # only what the official loaders read from a head config (thunlp/BlockFFN EagleConfig)
    else:
        raise ValueError(f"config_style {opts.config_style!r}; expected eagle, target or minimal")
    cfg.update(num_hidden_layers=opts.num_layers, intermediate_size=intermediate, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu")
    if opts.residual_scale is not None:
        cfg["eagle_residual_scale"] = opts.residual_scale
    return cfg


def _write_head(out_dir: str, tensors: dict[str, torch.Tensor], cfg: dict, opts: TinyEagleOptions,
                target_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    if opts.draft_vocab_size:
        ids = frequency_ranked_ids(target_dir, opts.draft_vocab_size)
        _write_remap(out_dir, ids, opts.remap_format, tensors, opts.prefix)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_weights(out_dir, {k: v.contiguous() for k, v in tensors.items()}, opts.weight_format, 1)
    return out_dir


def make_tiny_eagle(out_dir: str | os.PathLike, target_dir: str | os.PathLike,
                    opts: TinyEagleOptions | None = None) -> str:
    """A random head for the (vanilla-attention or MLA) tiny target in `target_dir`; returns `out_dir`."""
    opts = opts or TinyEagleOptions()
    out_dir, target_dir = os.fspath(out_dir), os.fspath(target_dir)
    with open(os.path.join(target_dir, "config.json")) as f:
        tcfg = json.load(f)
    H = tcfg["hidden_size"]
    heads = tcfg["num_attention_heads"]
    kv_heads = tcfg.get("num_key_value_heads") or heads
    hd = H // heads
    inter = opts.intermediate_size or 2 * H
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        tcfg.get("torch_dtype", "float32")]
    gen = torch.Generator().manual_seed(1000 + opts.seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(dtype)

    p = opts.prefix
    t: dict[str, torch.Tensor] = {p + "fc.weight": rand(H, 2 * H), p + "input_norm1.weight": norm(H),
                                  p + "input_norm2.weight": norm(H)}
    if opts.fc_bias:
        t[p + "fc.bias"] = (0.01 * torch.randn(H, generator=gen)).to(dtype)
    for i in range(opts.num_layers):
        q = f"{p}layers.{i}."
        if i > 0 or opts.layer0_input_norm:
            t[q + "input_layernorm.weight"] = norm(H)
        t[q + "self_attn.q_proj.weight"] = rand(heads * hd, H)
        t[q + "self_attn.k_proj.weight"] = rand(kv_heads * hd, H)
        t[q + "self_attn.v_proj.weight"] = rand(kv_heads * hd, H)
        t[q + "self_attn.o_proj.weight"] = rand(H, heads * hd)
        t[q + "post_attention_layernorm.weight"] = norm(H)
        t[q + "mlp.gate_proj.weight"] = rand(inter, H)
        t[q + "mlp.up_proj.weight"] = rand(inter, H)
        t[q + "mlp.down_proj.weight"] = rand(H, inter)
    cfg = _head_config(tcfg, opts, heads, kv_heads, hd, inter)
    return _write_head(out_dir, t, cfg, opts, target_dir)


def make_oracle_target(source: str | os.PathLike, out_dir: str | os.PathLike, sharpness: float = 8.0,
                       seed: int = 0) -> str:
    """The rigged target, from a one-layer vanilla-attention tiny checkpoint (official format kept)."""
    source, out_dir = os.fspath(source), os.fspath(out_dir)
    tcfg, w = _target(source)
    if tcfg["num_hidden_layers"] != 1 or tcfg.get("attention_type", "vanilla") != "vanilla":
        raise ValueError("an oracle target needs a one-layer tiny target with vanilla attention")
    H, heads = tcfg["hidden_size"], tcfg["num_attention_heads"]
    kv_heads = tcfg.get("num_key_value_heads") or heads
    hd, group = H // heads, heads // kv_heads
    dtype = w["model.embed_tokens.weight"].dtype
    gen = torch.Generator().manual_seed(2000 + seed)
    emb = w["model.embed_tokens.weight"].float()  # every row at the same RMS c
    c = float(emb.pow(2).mean().sqrt())
    w["model.embed_tokens.weight"] = (emb / emb.pow(2).mean(-1, keepdim=True).sqrt() * c).to(dtype)
    if tcfg.get("tie_word_embeddings"):
        w.pop("lm_head.weight", None)
    w["model.norm.weight"] = torch.ones(H, dtype=dtype)
    w["model.layers.0.mlp.down_proj"] = torch.zeros_like(w["model.layers.0.mlp.down_proj"])
    k = torch.randn(kv_heads * hd, H, generator=gen) * (sharpness / H**0.5)  # q = k: self-attention only
    w["model.layers.0.self_attn.k_proj.weight"] = k.to(dtype)
    w["model.layers.0.self_attn.q_proj.weight"] = k.view(kv_heads, hd, H).repeat_interleave(group, 0) \
        .reshape(heads * hd, H).to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    for name in (*TOKENIZER_FILES, "config.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
    save_weights(out_dir, w, "safetensors", 1)
    return out_dir


def head_residual_scale(opts: TinyEagleOptions, target_cfg: dict) -> float:
    """The residual scale vllm_blockffn.serving.eagle.residual_scale() resolves for a head written with `opts`."""
    if opts.residual_scale is not None:
        return opts.residual_scale
    if opts.layer0_input_norm and opts.config_style == "target" and "scale_depth" in target_cfg:
        return target_cfg["scale_depth"] / math.sqrt(target_cfg["num_hidden_layers"] + 1)
    return 1.0


def make_oracle_head(target_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     opts: TinyEagleOptions | None = None) -> str:
    """A head that drafts exactly what the oracle target in `target_dir` will say, in the layout `opts`
    asks for. Without a layer-0 input norm (thunlp/BlockFFN style) the target's norm, which only
    rescales the equal-RMS embeddings, is folded into q/k/v; the target's residual scale is folded
    into o_proj, so whichever scale the head's config resolves to, the sum comes out the same."""
    opts = opts or TinyEagleOptions()
    if opts.num_layers != 1:
        raise ValueError("an oracle head has one layer")
    target_dir, out_dir = os.fspath(target_dir), os.fspath(out_dir)
    tcfg, w = _target(target_dir)
    H, heads = tcfg["hidden_size"], tcfg["num_attention_heads"]
    kv_heads = tcfg.get("num_key_value_heads") or heads
    hd = H // heads
    dtype = w["model.embed_tokens.weight"].dtype
    gen = torch.Generator().manual_seed(3000 + opts.seed)
    se = float(tcfg.get("scale_emb", 1.0))
    c = float(w["model.embed_tokens.weight"].float().pow(2).mean().sqrt())
    p, q = opts.prefix, f"{opts.prefix}layers.0."
    fc = torch.zeros(H, 2 * H)  # input_norm1(x·scale_emb) = x / c  →  fc  →  x·scale_emb
    fc[:, :H] = torch.eye(H) * (se * c)
    t = {p + "fc.weight": fc.to(dtype), p + "input_norm1.weight": torch.ones(H, dtype=dtype),
         p + "input_norm2.weight": torch.ones(H, dtype=dtype)}
    if opts.fc_bias:
        t[p + "fc.bias"] = torch.zeros(H, dtype=dtype)
    norm = w["model.layers.0.input_layernorm.weight"].float()
    for proj in ("q", "k", "v"):
        weight = w[f"model.layers.0.self_attn.{proj}_proj.weight"].float()
        if not opts.layer0_input_norm:  # the head sees x·scale_emb, the target norm(x·scale_emb) = (x / c)·norm
            weight = weight * norm / (se * c)
        t[q + f"self_attn.{proj}_proj.weight"] = weight.to(dtype)
    if opts.layer0_input_norm:
        t[q + "input_layernorm.weight"] = norm.to(dtype)
    scale = float(tcfg.get("scale_depth", 1.0)) / math.sqrt(tcfg["num_hidden_layers"])
    t[q + "self_attn.o_proj.weight"] = (w["model.layers.0.self_attn.o_proj.weight"].float()
                                        * (scale / head_residual_scale(opts, tcfg))).to(dtype)
    inter = opts.intermediate_size or 2 * H
    t[q + "post_attention_layernorm.weight"] = torch.ones(H, dtype=dtype)
    t[q + "mlp.gate_proj.weight"] = (torch.randn(inter, H, generator=gen) / H**0.5).to(dtype)
    t[q + "mlp.up_proj.weight"] = (torch.randn(inter, H, generator=gen) / H**0.5).to(dtype)
    t[q + "mlp.down_proj.weight"] = torch.zeros(H, inter, dtype=dtype)  # the target's FFN adds nothing either
    cfg = _head_config(tcfg, opts, heads, kv_heads, hd, inter)
    return _write_head(out_dir, t, cfg, opts, target_dir)
