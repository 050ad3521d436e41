"""Inflate a trained BlockFFN to the byte shape of an official release, computing the same function.

Why: the bundled model is tiny (H = 256, 4 layers), so on it the experts are a small share of a
step's time and an end-to-end speed-up says little about BlockFFN-Small … XLarge. No official
checkpoint is reachable here, and a randomly initialised one routes like a random ReLU (CLS-8 ≈ 1%).
`inflate` keeps the trained routers and every number the model computes, and pads the weights
until the expert bytes per layer and the layer count equal the official configuration, with
hidden size and attention width as close to it as exactness allows. Timing it measures the
official sizes' memory traffic with trained routing.

Construction (source: H, L layers, E experts of d_e; target --like: H_o, L_o, E_o, d_o). The
inflated residual stream is h' = α·[h, 0] with α = sqrt(H'/H); every step below is exact in real
arithmetic (fp32 rounding only; see tests/test_inflate.py):

- hidden H → H': every [·, H] weight gets zero columns, every [H, ·] weight zero rows, so the
  padded dims of the residual stay exactly 0. mean over H' of (α·h)² = α²·(H/H')·mean(h²) =
  mean(h²), so RMSNorm(h'; w/α, eps) = [RMSNorm(h; w, eps), 0] with rms_norm_eps unchanged
  (the other exact variant, eps' = eps·H/H' with weights w·sqrt(H/H'), would also change the
  router's RMSNorm over E and need router_proj scaled by sqrt(H/H'); this one keeps every router
  tensor bit-identical and MLA's internal q_a/kv_a norms untouched). The stream's factor α enters
  at the embedding (scale_emb' = α·scale_emb), is kept by the residual branches
  (scale_depth' = α·scale_depth·sqrt(L'/L), so s' = scale_depth'/sqrt(L') = α·s) and leaves at the
  logits: the final norm keeps its weight, so it outputs α·[RMSNorm(h), 0], and
  dim_model_base' = α·dim_model_base makes H'/dim_model_base' = α·H/dim_model_base.
- attention: head_dim is kept (RoPE rotates halves of a head, so a head cannot be padded);
  heads are added to fill the width H' (vanilla: H' = heads'·head_dim, KV heads in the source's
  GQA ratio, so old query heads keep their KV heads; MLA: heads' = H'/v_head_dim, LoRA ranks
  kept). New heads have zero q/k/v rows and zero o_proj columns: computed, contributing nothing.
- experts: d_e → d_e' with zero up rows (SiLU(0) = 0) and zero down columns, E and the routers
  kept. H' (a multiple of head_dim·GQA group) and d_e' are chosen so that E·d_e'·H' equals
  E_o·d_o·H_o, exactly when an integer d_e' exists, else to within rounding of d_e' (< 0.5%),
  H' as close to H_o as that allows (for E = 32 or 48: H' = H_o, d_e' = E_o·d_o/E, e.g. Small 96
  / 64).
- layers L → L': after each source layer i come copies whose attention o_proj and expert
  down_proj are zero, so they add nothing, but whose attention, router, post-attention norm and
  up_proj are layer i's: they run layer i's router on the real residual stream after layer i,
  so their routing and expert reads are trained-realistic, not idle (bundled model, 256 tokens of
  docstrings: a copy's active set agrees with its layer's own on 96–100% of (token, expert) pairs,
  active fractions 30/23/12.5/15% vs 28/23/12.5/14%). The residual scale is compensated as above.
- EAGLE head (--eagle-head): its hidden dims padded the same way. The target hands it α·[ĥ, 0]
  (ĥ its final-normed state) and the embedding α·[x, 0], so input_norm1/2 weights are /α; `fc`
  (weight and bias) is ×α so the head's residual is α·[z, 0] as well: norm weights /α, o_proj and
  down_proj ×α, and a layer without input norm (thunlp/EAGLE-1 layer 0) gets q/k/v /α. Its
  output z'/scale_width' = z/scale_width: the same logits, the same drafts, and the draft
  vocabulary (token_id_remap, d2t, freq_V files) copied unchanged. A residual scale that
  depends on the target's depth is written out as `eagle_residual_scale`.

Byte shares (parameters, so the same in any dtype), inflating models/blockffn-tiny-trained (E 32,
vanilla GQA 8/4 heads of 32, vocab 4096, untied lm_head). Per layer: experts / attention / router
and norms; whole model: experts / attention / embeddings + lm_head / router and norms:

| --like | H' | L' | heads | d_e' | experts/layer | per layer | whole model | params |
|---|---|---|---|---|---|---|---|---|
| small  | 768  | 16 | 24/12 | 96  | 4.72 M  | 72.4 / 27.2 / 0.4% | 68.3 / 25.6 / 5.7 / 0.4% | 111 M  |
| medium | 1280 | 27 | 40/20 | 160 | 13.11 M | 72.6 / 27.2 / 0.2% | 71.0 / 26.6 / 2.1 / 0.2% | 498 M  |
| large  | 1536 | 32 | 48/24 | 192 | 18.87 M | 72.6 / 27.2 / 0.2% | 71.5 / 26.8 / 1.5 / 0.2% | 845 M  |
| xlarge | 1792 | 35 | 56/28 | 224 | 25.69 M | 72.6 / 27.2 / 0.2% | 71.8 / 26.9 / 1.2 / 0.2% | 1253 M |

(Official releases use MLA with vocab 122753, so their attention and embedding shares differ;
the expert bytes per layer and the layer count are what match.) `vllm-blockffn inflate` prints
these counts for the model it writes and stores them and the plan in OUT/inflate.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from vllm_blockffn.serving.checkpoint import check_weights, expected_shapes, iter_tensors
from vllm_blockffn.serving.config import BlockFFNSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "tokenizer.model", "vocab.json", "merges.txt")
BYTE_TOLERANCE = 0.005  # relative deviation of the expert bytes allowed when no integer d_e' is exact


@dataclass(frozen=True)
class Official:
    """The expert geometry and depth of an official BlockFFN release (SPEC.md §1)."""

    name: str
    hidden_size: int
    num_layers: int
    num_experts: int
    expert_size: int

    @property
    def expert_params(self) -> int:
        """up + down parameters of one layer's experts."""
        return 2 * self.num_experts * self.expert_size * self.hidden_size


LIKE = {
    "small": Official("0.1B Small", 768, 16, 48, 64),
    "medium": Official("0.5B Medium", 1280, 27, 40, 128),
    "large": Official("0.8B Large", 1536, 32, 48, 128),
    "xlarge": Official("1.2B XLarge", 1792, 35, 56, 128),
}


@dataclass
class Plan:
    """How a source is inflated: new sizes, the residual factor α, and where each layer comes from."""

    hidden_size: int
    expert_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    alpha: float
    layer_source: list[int]  # output layer → source layer whose tensors it copies
    real: list[bool]  # output layer → True for a source layer, False for an added (zero-output) one
    expert_params_error: float  # (E·d_e'·H' − E_o·d_o·H_o) / E_o·d_o·H_o
    target: dict = field(default_factory=dict)


def _check_source(src: str | os.PathLike) -> BlockFFNSpec:
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ValueError(f"{src}: no config.json; expected a BlockFFN checkpoint folder (official format)")
    spec = BlockFFNSpec.from_pretrained(src)
    check_weights(src, spec)
    return spec


def resolve_like(like: str | Official) -> Official:
    if isinstance(like, Official):
        return like
    if like not in LIKE:
        raise ValueError(f"--like {like!r}; expected one of {list(LIKE)}")
    return LIKE[like]


def make_plan(spec: BlockFFNSpec, like: str | Official, expert_align: int = 1) -> Plan:
    """Choose H', d_e', heads and the layer map for `spec` inflated to `like` (see module docstring).
    ``expert_align``: d_e' a multiple of it (H' then as close to H_o as that allows): the official releases' d_e are
    multiples of 16, the grain the CPU kernel packs int8 experts in (layout.pack_experts_kmajor), which a source
    with another E would otherwise miss (E = 48 like XLarge: d_e' 149 at H' 1792, 144 at 1856 with 16)."""
    if expert_align < 1:
        raise ValueError(f"--expert-align {expert_align}; expected a positive integer")
    off = resolve_like(like)
    E, H, L = spec.num_experts, spec.hidden_size, spec.num_hidden_layers
    if off.num_layers < L:
        raise ValueError(f"source has {L} layers, more than {off.name}'s {off.num_layers}; expected a smaller source")
    target = off.num_experts * off.expert_size * off.hidden_size
    if spec.attention_type == "vanilla":
        group = spec.num_attention_heads // spec.num_key_value_heads
        step = spec.head_dim * group
    else:
        step = spec.v_head_dim
    candidates = []
    for h in range(math.ceil(H / step) * step, 2 * max(off.hidden_size, H) + step, step):
        d = max(-(-spec.expert_size // expert_align), round(target / (E * h) / expert_align)) * expert_align
        err = (E * d * h - target) / target
        candidates.append((abs(err) > BYTE_TOLERANCE, abs(h - off.hidden_size) if abs(err) <= BYTE_TOLERANCE
                           else abs(err), abs(err), h, d, err))
    bad, _, _, h_new, d_new, err = min(candidates)
    if bad:
        raise ValueError(f"cannot match {off.name}'s expert bytes ({E}·d_e'·H' vs {target}) within "
                         f"{BYTE_TOLERANCE:.1%} from E={E}, d_e={spec.expert_size}, H={H}; expected a source whose "
                         f"experts are not larger than the target's")
    if spec.attention_type == "vanilla":
        heads = h_new // spec.head_dim
        kv_heads = heads // (spec.num_attention_heads // spec.num_key_value_heads)
    else:
        heads = max(spec.num_attention_heads, h_new // spec.v_head_dim)
        kv_heads = heads
    # Added layers spread evenly: source layer i is followed by n_i copies, Σ n_i = L' − L.
    extra = [(off.num_layers - L) // L + (i < (off.num_layers - L) % L) for i in range(L)]
    layer_source, real = [], []
    for i, n in enumerate(extra):
        layer_source += [i] * (n + 1)
        real += [True] + [False] * n
    return Plan(hidden_size=h_new, expert_size=d_new, num_layers=off.num_layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, alpha=math.sqrt(h_new / H), layer_source=layer_source, real=real,
                expert_params_error=err, target=asdict(off))


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` in the leading corner of a zero tensor of `shape`."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def inflated_config(cfg: dict, spec: BlockFFNSpec, plan: Plan, dtype: str) -> dict:
    """config.json of the inflated model: new sizes, and the MiniCPM scalars that carry α."""
    a, L = plan.alpha, spec.num_hidden_layers
    out = dict(cfg)
    out.update(hidden_size=plan.hidden_size, num_hidden_layers=plan.num_layers,
               num_attention_heads=plan.num_attention_heads, num_key_value_heads=plan.num_key_value_heads,
               expert_size=plan.expert_size, intermediate_size=spec.num_experts * plan.expert_size,
               scale_emb=spec.scale_emb * a, scale_depth=spec.scale_depth * a * math.sqrt(plan.num_layers / L),
               dim_model_base=spec.dim_model_base * a, torch_dtype=dtype)
    return out


def inflated_tensors(src: str, spec: BlockFFNSpec, plan: Plan, dtype: torch.dtype
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The inflated checkpoint's tensors, in checkpoint order, one at a time."""
    source = {n: t for n, t in iter_tensors(src)}
    a, H2, D2 = plan.alpha, plan.hidden_size, plan.expert_size
    E, H, D = spec.num_experts, spec.hidden_size, spec.expert_size
    new_spec = BlockFFNSpec.from_config(inflated_config({**_raw_config(src)}, spec, plan, "float32"))
    shapes = expected_shapes(new_spec)

    def get(name: str) -> torch.Tensor:
        return source[name].to(torch.float32)

    for name, shape in shapes.items():
        if not name.startswith("model.layers."):
            # embed_tokens, lm_head: zero columns; the final norm keeps its weight (outputs α·[RMSNorm(h), 0])
            yield name, _pad(get(name), shape).to(dtype).contiguous()
            continue
        j = int(name.split(".")[2])
        rest = name.split(".", 3)[3]
        i, real = plan.layer_source[j], plan.real[j]
        t = get(f"model.layers.{i}.{rest}")
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            t = _pad(t / a, shape)
        elif rest == "self_attn.o_proj.weight":
            t = _pad(t, shape) if real else t.new_zeros(shape)
        elif rest == "mlp.up_proj":
            t = _pad(t.reshape(E, D, H), (E, D2, H2))
            t = t.reshape(shape)
        elif rest == "mlp.down_proj":
            if not real:
                t = t.new_zeros(shape)
            elif spec.ffn_type == "block":
                t = _pad(t, shape)
            else:
                t = _pad(t.reshape(H, E, D), (H2, E, D2)).reshape(shape)
        else:  # q/k/v (new heads: zero rows), MLA projections and norms, router_proj, router_norm
            t = _pad(t, shape)
        yield name, t.to(dtype).contiguous()


def _raw_config(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def write_weights(out_dir: str, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int = 2 << 30) -> int:
    """safetensors shards of at most ~shard_bytes, written as the tensors come (with an index when > 1)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, files = 0, 0, []

    def flush() -> None:
        file = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], os.path.join(out_dir, file), metadata={"format": "pt"})
        files.append((file, list(shards[-1])))
        shards[-1] = {}

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        os.replace(os.path.join(out_dir, files[0][0]), os.path.join(out_dir, "model.safetensors"))
        return total
    n = len(files)
    weight_map = {}
    for k, (file, names) in enumerate(files):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, file), os.path.join(out_dir, final))
        weight_map.update({name: final for name in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def component_params(spec: BlockFFNSpec) -> dict[str, dict[str, int]]:
    """Parameter counts by component, per layer (layer 0) and for the whole model."""
    per_layer = {"experts": 0, "attention": 0, "router": 0, "norms": 0}
    total = dict(per_layer, embeddings_lm_head=0)
    for name, shape in expected_shapes(spec).items():
        n = math.prod(shape)
        if ".mlp.up_proj" in name or ".mlp.down_proj" in name:
            kind = "experts"
        elif ".self_attn." in name:
            kind = "attention"
        elif ".mlp.router" in name:
            kind = "router"
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            kind = "norms"
        else:
            kind = "embeddings_lm_head"
        total[kind] += n
        if name.startswith("model.layers.0."):
            per_layer[kind] += n
    return {"per_layer": per_layer, "total": total}


def share_table(spec: BlockFFNSpec) -> str:
    """Component shares (experts / attention / router / embeddings + lm_head), per layer and total."""
    counts = component_params(spec)
    lines = []
    for scope in ("per_layer", "total"):
        c = counts[scope]
        whole = sum(c.values())
        parts = ", ".join(f"{k} {v / 1e6:.2f} M ({v / whole:.1%})" for k, v in c.items() if v)
        lines.append(f"{scope.replace('_', ' ')}: {parts}; all {whole / 1e6:.2f} M")
    return "\n".join(lines)


def inflate(src: str | os.PathLike, out: str | os.PathLike, like: str | Official, dtype: str = "float32",
            expert_align: int = 1) -> Plan:
    """Write the inflated checkpoint of `src` to `out` (a BlockFFN checkpoint folder); return its plan
    (``expert_align``: :func:`make_plan`)."""
    src, out = os.fspath(src), os.fspath(out)
    spec = _check_source(src)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; expected one of {list(DTYPES)}")
    plan = make_plan(spec, like, expert_align)
    os.makedirs(out, exist_ok=True)
    cfg = inflated_config(_raw_config(src), spec, plan, dtype)
    write_weights(out, inflated_tensors(src, spec, plan, DTYPES[dtype]))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    new_spec = BlockFFNSpec.from_config(cfg)
    meta = {"source": os.path.abspath(src), "plan": asdict(plan), "params": component_params(new_spec),
            "source_params": component_params(spec)}
    with open(os.path.join(out, "inflate.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return plan


# ---------------------------------------------------------------------------------------------
# EAGLE head
# ---------------------------------------------------------------------------------------------


def inflate_eagle_head(src_head: str | os.PathLike, out_head: str | os.PathLike, src_target: str | os.PathLike,
                       plan: Plan, dtype: str = "float32") -> None:
    """Write `src_head` (official BlockFFN/FR-Spec format, for `src_target`) padded to `plan`'s hidden size."""
    from types import SimpleNamespace

    from vllm_blockffn.serving.eagle import head_tensor_shapes, inspect_head, read_head_tensor, residual_scale

    src_head, out_head = os.fspath(src_head), os.fspath(out_head)
    with open(os.path.join(src_head, "config.json")) as f:
        raw = json.load(f)
    info = inspect_head(src_head, raw)  # raises EagleHeadError naming what is wrong
    spec = BlockFFNSpec.from_pretrained(src_target)
    if info["hidden_size"] != spec.hidden_size:
        raise ValueError(f"{src_head}: head hidden size {info['hidden_size']} differs from the source target's "
                         f"{spec.hidden_size}; expected the head of {src_target}")
    a, H, H2 = plan.alpha, spec.hidden_size, plan.hidden_size
    prefix = info["eagle_prefix"]
    no_norm_layer = None if info["eagle_layer0_input_norm"] else info["eagle_layer_offset"]
    shapes = head_tensor_shapes(src_head)
    tensors: dict[str, torch.Tensor] = {}

    for stored in shapes:
        name = stored[len(prefix):] if prefix and stored.startswith(prefix) else stored
        t = read_head_tensor(src_head, stored)
        if name in ("token_id_remap", "d2t") or name.endswith("rotary_emb.inv_freq"):
            tensors[stored] = t
            continue
        t = t.to(torch.float32)
        if name == "fc.weight":
            new = t.new_zeros(H2, 2 * H2)
            new[:H, :H], new[:H, H2:H2 + H] = a * t[:, :H], a * t[:, H:]
            t = new
        elif name == "fc.bias":
            t = _pad(a * t, (H2,))
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("layernorm.weight"):
            t = _pad(t / a, (H2,))
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            t = _pad(t, (t.shape[0], H2))
        elif name == "norm.weight":
            t = _pad(t, (H2,))
        else:
            layer = int(name.split(".")[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # [H, ·]: zero rows, ×α
                t = _pad(a * t, (H2, t.shape[1]))
            else:  # q/k/v/qkv/gate/up/gate_up [·, H]: zero columns; /α where no input norm precedes
                t = _pad(t / a if layer == no_norm_layer and ".self_attn." in name else t, (t.shape[0], H2))
        tensors[stored] = t.to(DTYPES[dtype]).contiguous()
    os.makedirs(out_head, exist_ok=True)
    write_weights(out_head, iter(tensors.items()))
    cfg = dict(raw)
    if "hidden_size" in cfg:
        cfg["hidden_size"] = H2
    target_cfg = inflated_config(_raw_config(src_target), spec, plan, dtype)
    for k in ("scale_emb", "scale_depth", "dim_model_base"):
        if k in cfg:
            cfg[k] = target_cfg[k]
    cfg["torch_dtype"] = dtype

    def scale(head_cfg: dict, n_layers: int) -> float:
        fields = {**head_cfg, "eagle_layer0_input_norm": info["eagle_layer0_input_norm"]}
        return residual_scale(SimpleNamespace(**{k: fields.get(k) for k in (
            "eagle_residual_scale", "scale_depth", "mup_denominator", "eagle_layer0_input_norm")}),
            SimpleNamespace(num_hidden_layers=n_layers))

    wanted = scale(raw, spec.num_hidden_layers)
    if not math.isclose(scale(cfg, plan.num_layers), wanted, rel_tol=1e-12):
        cfg["eagle_residual_scale"] = wanted
    with open(os.path.join(out_head, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src_head):
        if name.startswith("freq_"):
            shutil.copy(os.path.join(src_head, name), os.path.join(out_head, name))


__all__ = ["LIKE", "Official", "Plan", "component_params", "inflate", "inflate_eagle_head", "make_plan",
           "share_table"]
