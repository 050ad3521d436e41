"""Train an EAGLE-1 style draft head for a BlockFFN target, in the official BlockFFN/FR-Spec head format.

    python -m training.eagle --target models/blockffn-tiny-trained --out models/blockffn-tiny-trained-eagle

The head is what `vllm_blockffn.serving.eagle.EagleBlockFFNForCausalLM` serves (the format is described at
the top of vllm_blockffn/serving/eagle.py), thunlp/BlockFFN (EAGLE-1) style: `fc` with a bias, no layer-0
`input_layernorm`, residual scale s from `vllm_blockffn.tools.tiny_eagle.head_residual_scale` (1 here).
For a drafted position p, with x = target_embedding(token) · scale_emb and h the target's
final-normed hidden state (RMSNorm with its weight, *before* the MiniCPM division by
H / dim_model_base — vLLM's MiniCPM returns hidden / scale_width, and the head multiplies back):

    z0 = fc(cat(input_norm1(x), input_norm2(h)))
    z  = z0 + s·Attn(z0);  z = z + s·MLP(post_attention_layernorm(z))      (layer 0; later layers
                                                                         also norm the attention input)
    logits = target_lm_head(z / (H / dim_model_base))                     (no final norm; next h = z)

Alignment (vLLM's EAGLE proposer, v1/spec_decode/llm_base_proposer.py: input ids shifted left by
one, positions unchanged): at position p the head gets h_p and the token t_{p+1}, RoPE position p,
and drafts t_{p+2}. Its output is trained towards the target's next hidden state h_{p+1}.

Objective (EAGLE-1): smooth-L1(z_p, h_{p+1}) (mean over the hidden dimension) + 0.1 · cross-entropy
between the head's logits and the target's next-token distribution softmax(logits_{p+1}), both
averaged over positions, with uniform noise on the input hidden states (`--noise`, half-width
relative to the RMS of h). vLLM drafts k tokens autoregressively from the head's own outputs; the
head can also be trained unrolled (`--unroll K`, default 1 = plain EAGLE-1; `--unroll-from` starts
it late): step k at position p gets h = the output of step k−1 at p−1 and the (teacher-forced)
token t_{p+1}; its attention sees the KV entries vLLM would hold then — real-h entries at
positions ≤ p−k+1, then the entries of steps 2..k−1 at the positions in between, and its own.
Every step has the same targets; step k is weighted by `--unroll-weights`, and gradients flow
through the chain. On this target it did not pay for its ~3x cost per step (training/README.md).

Data: the target's corpus and split (`training/data.py`: CPython docstrings + pydoc topics,
the held-out fraction and seed of the target's train_args.json) and its tokenizer. The train
stream is cut into windows of --seq-len tokens; the frozen target's normed hidden states for
every window are computed once (fp16 in memory; `--cache DIR` keeps them on disk keyed by the
target's weights and the corpus) and the head trains on random batches of windows.

Writes to --out: config.json + model.safetensors (the head, via vllm_blockffn.tools.tiny_eagle's
writer), train_args.json, train_log.jsonl, eval.json (held-out per-step top-1 agreement with
the target's greedy next token, measured on the saved tensors, and `torch_sim`: greedy EAGLE
decoding simulated in plain PyTorch on held-out prompts) and, unless --no-vllm-eval, the acceptance
rate measured in vLLM on the same prompts (vllm_eval.json). README.md is not written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from training import data as data_mod
from training.model import RMSNorm, TrainableBlockFFN
from training.train import lr_at
from vllm_blockffn.reference import rope_cos_sin, rotate_half
from vllm_blockffn.serving.checkpoint import iter_tensors
from vllm_blockffn.serving.config import BlockFFNSpec
from vllm_blockffn.tools.tiny_eagle import TinyEagleOptions, _head_config, _write_head, head_residual_scale

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_TARGET = "models/blockffn-tiny-trained"


# ---------------------------------------------------------------------------------------------
# The frozen target
# ---------------------------------------------------------------------------------------------


class Target:
    """The frozen BlockFFN target (training/model.py, fp32 compute): normed hidden states, embeddings, logits."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        self.spec = BlockFFNSpec.from_pretrained(path)
        self.model = TrainableBlockFFN(self.spec)
        self.model.load_official_tensors(dict(iter_tensors(path)))
        self.model.eval().requires_grad_(False)
        m = self.model
        self.embed = m.embed_tokens.weight  # [V, H]
        self.lm_head = m.embed_tokens.weight if m.lm_head is None else m.lm_head.weight  # [V, H]
        self.scale_emb = float(self.spec.scale_emb)
        self.scale_width = float(self.spec.logit_divisor)  # H / dim_model_base

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] → final-normed hidden states [B, T, H] (norm weight applied, not divided by
        H / dim_model_base): what the head's input_norm2 sees in vLLM."""
        m, spec = self.model, self.spec
        cos, sin = rope_cos_sin(spec, spec.head_dim, torch.arange(ids.shape[1]))
        h = m.embed_tokens(ids) * spec.scale_emb
        for layer in m.layers:
            h, _ = layer(h, cos, sin)
        return m.norm(h)

    def embed_scaled(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed) * self.scale_emb

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target logits of normed hidden states (or head logits of head outputs z): lm_head(h / (H / base))."""
        return (hidden / self.scale_width) @ self.lm_head.T


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------


@dataclass
class HeadGeometry:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    fc_bias: bool = True
    layer0_input_norm: bool = False
    residual_scale: float = 1.0


class HeadLayer(nn.Module):
    """A dense Llama layer (GQA + RoPE attention, SiLU-gated MLP), as vLLM's LlamaAttention/LlamaMLP."""

    def __init__(self, g: HeadGeometry, input_norm: bool):
        super().__init__()
        H, nh, nkv, hd = g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim
        self.g = g
        self.input_layernorm = RMSNorm(H, g.rms_norm_eps) if input_norm else None
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, g.rms_norm_eps)
        self.gate_proj = nn.Linear(H, g.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, g.intermediate_size, bias=False)
        self.down_proj = nn.Linear(g.intermediate_size, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        g = self.g
        B, T, _ = x.shape
        a = x if self.input_layernorm is None else self.input_layernorm(x)
        q = self.q_proj(a).view(B, T, g.num_heads, g.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.append((k, v))
        out = unrolled_attention(q, cache, g.head_dim**-0.5)
        x = x + self.o_proj(out.transpose(1, 2).reshape(B, T, -1)) * g.residual_scale
        m = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m)) * g.residual_scale


def unrolled_attention(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Attention of draft step k = len(cache) at every position p at once, over the KV entries vLLM
    holds then: step 1 (real h) at positions ≤ p−k+1, step m = 2..k at position p−k+m.

    q [B, nh, T, d]; cache[m−1] = (K, V) [B, nkv, T, d] of step m. Step 1 is plain causal attention.
    """
    k = len(cache)
    rep = q.shape[1] // cache[0][0].shape[1]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(rep, dim=1) if rep > 1 else t

    k1, v1 = (expand(t) for t in cache[0])
    if k == 1:
        return F.scaled_dot_product_attention(q, k1, v1, is_causal=True, scale=scale)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    scores = [(q @ k1.transpose(-1, -2) * scale).masked_fill(pos[None, :] > pos[:, None] - (k - 1), float("-inf"))]
    values = []
    for m in range(2, k + 1):
        d = k - m  # step m's entry sits d positions before the query
        km, vm = (expand(t) for t in cache[m - 1])
        if d:
            km, vm = F.pad(km[:, :, : T - d], (0, 0, d, 0)), F.pad(vm[:, :, : T - d], (0, 0, d, 0))
        s = (q * km).sum(-1, keepdim=True) * scale
        if d:
            s = s.masked_fill((pos < d)[:, None], float("-inf"))
        scores.append(s)
        values.append(vm)
    p = torch.cat(scores, dim=-1).softmax(-1)
    out = p[..., :T] @ v1
    for i, vm in enumerate(values):
        out = out + p[..., T + i: T + i + 1] * vm
    return out


class EagleHead(nn.Module):
    def __init__(self, g: HeadGeometry, spec: BlockFFNSpec):
        super().__init__()
        H = g.hidden_size
        self.g, self.spec = g, spec
        self.fc = nn.Linear(2 * H, H, bias=g.fc_bias)
        self.input_norm1 = RMSNorm(H, g.rms_norm_eps)
        self.input_norm2 = RMSNorm(H, g.rms_norm_eps)
        self.layers = nn.ModuleList(HeadLayer(g, input_norm=i > 0 or g.layer0_input_norm)
                                    for i in range(g.num_layers))

    def init_weights(self, seed: int) -> None:
        """N(0, 1/fan_in) matrices (o_proj/down_proj scaled down by 1/sqrt(2·layers)), ones for norms, zero bias."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(0.0 if name == "fc.bias" else 1.0)
                else:
                    std = p.shape[1] ** -0.5
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        std /= math.sqrt(2 * self.g.num_layers)
                    p.normal_(0.0, std, generator=gen)

    def rope(self, T: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(self.spec, self.g.head_dim, torch.arange(T))
        return cos.to(device), sin.to(device)

    def step(self, x: torch.Tensor, h: torch.Tensor, cos, sin, caches: list[list]) -> torch.Tensor:
        """One draft step: x = embedding · scale_emb [B, T, H], h [B, T, H] → z [B, T, H]."""
        z = self.fc(torch.cat((self.input_norm1(x), self.input_norm2(h)), dim=-1))
        for layer, cache in zip(self.layers, caches):
            z = layer(z, cos, sin, cache)
        return z

    def forward(self, x: torch.Tensor, h: torch.Tensor, steps: int = 1) -> list[torch.Tensor]:
        """x [B, T, H] (embedding of t_{p+1} · scale_emb), h [B, T, H] (target's normed h_p) → the
        outputs z of draft steps 1..steps at every position (step k valid for p ≥ k−1)."""
        cos, sin = self.rope(x.shape[1], x.device)
        caches: list[list] = [[] for _ in self.layers]
        zs = [self.step(x, h, cos, sin, caches)]
        for _ in range(steps - 1):
            h_prev = F.pad(zs[-1][:, :-1], (0, 0, 1, 0))  # step k at p takes step k−1's output at p−1
            zs.append(self.step(x, h_prev, cos, sin, caches))
        return zs

    # --- the official head format -------------------------------------------------------------
    def official_tensors(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        out = {"fc.weight": self.fc.weight, "input_norm1.weight": self.input_norm1.weight,
               "input_norm2.weight": self.input_norm2.weight}
        if self.fc.bias is not None:
            out["fc.bias"] = self.fc.bias
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            if layer.input_layernorm is not None:
                out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(layer, n).weight
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(layer, n).weight
        return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in out.items()}

    @torch.no_grad()
    def load_official_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.official_tensors(torch.float32)
        if set(own) != set(tensors):
            raise KeyError(f"head tensors differ: {sorted(set(own) ^ set(tensors))}")
        params = dict(self.named_parameters())
        for name, t in tensors.items():
            key = name.replace("self_attn.", "").replace("mlp.", "")
            params[key].copy_(t.to(params[key].dtype))


def head_options(args) -> TinyEagleOptions:
    return TinyEagleOptions(seed=args.seed, num_layers=args.layers, intermediate_size=args.intermediate_size,
                            fc_bias=True, layer0_input_norm=args.layer0_input_norm, config_style="eagle")


def head_geometry(target: Target, opts: TinyEagleOptions) -> HeadGeometry:
    spec = target.spec
    return HeadGeometry(hidden_size=spec.hidden_size, num_layers=opts.num_layers,
                        num_heads=spec.num_attention_heads, num_kv_heads=spec.num_key_value_heads,
                        head_dim=spec.head_dim, intermediate_size=opts.intermediate_size or 2 * spec.hidden_size,
                        rms_norm_eps=spec.rms_norm_eps, fc_bias=opts.fc_bias, layer0_input_norm=opts.layer0_input_norm,
                        residual_scale=head_residual_scale(opts, target.config))


def save_head(out: str, head: EagleHead, target: Target, opts: TinyEagleOptions, dtype: torch.dtype) -> str:
    g = head.g
    cfg = _head_config(target.config, opts, g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate_size)
    cfg["torch_dtype"] = {v: k for k, v in DTYPES.items()}[dtype]
    return _write_head(out, head.official_tensors(dtype), cfg, opts, target.path)


def load_head(path: str, target: Target) -> EagleHead:
    """A saved head folder back into an EagleHead (fp32), through vllm_blockffn.serving.eagle.inspect_head."""
    from vllm_blockffn.serving.eagle import inspect_head, residual_scale

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    info = inspect_head(path, cfg)
    spec = target.spec
    # the residual scale vLLM resolves for this head (vllm_blockffn.serving.eagle.residual_scale)
    scale = residual_scale(SimpleNamespace(**{**cfg, **info}), spec)
    g = HeadGeometry(hidden_size=info["hidden_size"], num_layers=info["num_hidden_layers"],
                     num_heads=info["num_attention_heads"], num_kv_heads=info["num_key_value_heads"],
                     head_dim=info["head_dim"], intermediate_size=info["intermediate_size"],
                     rms_norm_eps=float(cfg.get("rms_norm_eps", spec.rms_norm_eps)), fc_bias=info["eagle_fc_bias"],
                     layer0_input_norm=info["eagle_layer0_input_norm"],
                     residual_scale=scale)
    head = EagleHead(g, spec)
    head.load_official_tensors(dict(iter_tensors(path)))
    return head


# ---------------------------------------------------------------------------------------------
# Data: the target's corpus, cut into windows, with the target's hidden states
# ---------------------------------------------------------------------------------------------


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def window_features(target: Target, wins: torch.Tensor, batch: int = 16, log=None) -> torch.Tensor:
    """Normed target hidden states of every window, fp16 [N, T, H]."""
    out = torch.empty(*wins.shape, target.spec.hidden_size, dtype=torch.float16)
    t0 = time.time()
    for i in range(0, wins.shape[0], batch):
        out[i: i + batch] = target.hidden(wins[i: i + batch]).to(torch.float16)
        if log and (i // batch) % 20 == 0:
            log(f"  target features {i + batch}/{wins.shape[0]} windows ({time.time() - t0:.0f}s)")
    return out


def load_features(target: Target, wins: torch.Tensor, cache: str | None, tag: str, log) -> torch.Tensor:
    if cache:
        key = hashlib.sha256(f"{target.fingerprint()}|{tag}|".encode() + wins.numpy().tobytes()).hexdigest()[:16]
        file = os.path.join(cache, f"eagle-features-{key}.pt")
        if os.path.exists(file):
            log(f"target features from {file}")
            return torch.load(file, weights_only=True)
    feats = window_features(target, wins, log=log)
    if cache:
        os.makedirs(cache, exist_ok=True)
        torch.save(feats, file)
    return feats


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def batch_inputs(target: Target, ids: torch.Tensor, hidden: torch.Tensor):
    """Window ids [B, T] and normed hidden [B, T, H] → head inputs at p = 0..T−2 (x of t_{p+1}, h_p) and
    targets (h_{p+1}, target logits at p+1)."""
    x = target.embed_scaled(ids[:, 1:])
    h_in, h_next = hidden[:, :-1], hidden[:, 1:]
    with torch.no_grad():
        target_logits = target.logits(h_next)
    return x, h_in, h_next, target_logits


def step_losses(target: Target, z: torch.Tensor, h_next: torch.Tensor, target_logits: torch.Tensor,
                k: int) -> dict[str, torch.Tensor]:
    """EAGLE-1 losses of draft step k (positions p ≥ k−1): smooth-L1 (mean over H) and soft CE, mean over p."""
    z, h_next, target_logits = z[:, k - 1:], h_next[:, k - 1:], target_logits[:, k - 1:]
    reg = F.smooth_l1_loss(z, h_next, reduction="none").mean(-1).mean()
    logp = target.logits(z).float().log_softmax(-1)
    p = target_logits.float().softmax(-1)
    ce = -(p * logp).sum(-1).mean()
    with torch.no_grad():
        acc = (logp.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return {"reg": reg, "ce": ce, "acc": acc}


@torch.no_grad()
def evaluate(head: EagleHead, target: Target, wins: torch.Tensor, hidden: torch.Tensor, steps: int,
             batch: int = 16) -> dict:
    """Per draft step k: top-1 agreement of the head's token with the target's greedy next token (`stepK_acc`;
    input tokens teacher-forced from the text, step k ≥ 2 fed the head's own outputs), and the losses.
    `copy_h_acc`: the same agreement for z = h_p (no head: the target's own guess one position early)."""
    head.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(0, wins.shape[0], batch):
        ids, hid = wins[i: i + batch], hidden[i: i + batch].float()
        x, h_in, h_next, tl = batch_inputs(target, ids, hid)
        zs = head(x, h_in, steps)
        for k, z in enumerate(zs, 1):
            losses = step_losses(target, z, h_next, tl, k)
            n = z[:, k - 1:].shape[0] * z[:, k - 1:].shape[1]
            for name, v in losses.items():
                sums[f"step{k}_{name}"] = sums.get(f"step{k}_{name}", 0.0) + float(v) * n
                counts[f"step{k}_{name}"] = counts.get(f"step{k}_{name}", 0) + n
        # reference point: the target's own greedy token one position too early (h_p instead of h_{p+1})
        same = (target.logits(h_in).argmax(-1) == tl.argmax(-1)).float()
        sums["copy_h_acc"] = sums.get("copy_h_acc", 0.0) + float(same.sum())
        counts["copy_h_acc"] = counts.get("copy_h_acc", 0) + same.numel()
    head.train()
    return {k: sums[k] / counts[k] for k in sums}


# ---------------------------------------------------------------------------------------------
# Acceptance in vLLM
# ---------------------------------------------------------------------------------------------


def heldout_prompts(target_dir: str, n: int = 8, prompt_tokens: int = 32, heldout_fraction: float = 0.05,
                    seed: int = 0, corpus: data_mod.Corpus | None = None) -> list[list[int]]:
    """`<s>` + the first prompt_tokens − 1 tokens of the first n held-out documents that have at least
    2·prompt_tokens tokens (the target's corpus split unless `corpus` is given)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(target_dir, "tokenizer.json"))
    corpus = corpus or data_mod.load_corpus(heldout_fraction, seed=seed)
    prompts = []
    for doc in corpus.heldout:
        ids = tok.encode(doc, add_special_tokens=False).ids
        if len(ids) >= 2 * prompt_tokens:
            prompts.append([data_mod.BOS_ID] + ids[: prompt_tokens - 1])
        if len(prompts) == n:
            break
    return prompts


@torch.no_grad()
def simulate_acceptance(head: EagleHead, target: Target, prompts: list[list[int]], max_tokens: int = 64,
                        k: int = 3) -> dict:
    """Greedy EAGLE speculative decoding in plain PyTorch, as vLLM's proposer runs it (no KV caches: every
    pass recomputes the whole sequence). A cross-check of the vLLM measurement that needs no engine."""
    head.eval()
    drafts = draft_tokens = accepted = 0
    per_pos = [0] * k
    outputs = []
    for prompt in prompts:
        seq = list(prompt)
        hidden = target.hidden(torch.tensor([seq]))[0]
        nxt = int(target.logits(hidden[-1]).argmax())
        generated = [nxt]
        while len(generated) < max_tokens:
            # first pass: positions 0..n−1 get (h_p, t_{p+1}), the last one the freshly sampled token
            ids = torch.tensor(seq[1:] + [nxt])
            xs, hs = target.embed_scaled(ids)[None], hidden[None]
            proposal = []
            for _ in range(k):
                z = head(xs, hs, 1)[0][:, -1]
                d = int(target.logits(z).argmax())
                proposal.append(d)
                # the next draft step: one more position, fed the head's own output and its draft token
                xs = torch.cat((xs, target.embed_scaled(torch.tensor([[d]]))), 1)
                hs = torch.cat((hs, z[:, None]), 1)
            seq_verify = seq + [nxt] + proposal
            hidden_v = target.hidden(torch.tensor([seq_verify]))[0]
            greedy = target.logits(hidden_v[len(seq):]).argmax(-1).tolist()  # target's tokens after nxt, d1, ..
            n_acc = 0
            while n_acc < len(proposal) and proposal[n_acc] == greedy[n_acc]:
                n_acc += 1
            drafts += 1
            draft_tokens += len(proposal)
            accepted += n_acc
            for i in range(n_acc):
                per_pos[i] += 1
            new = proposal[:n_acc] + [greedy[n_acc]]
            seq = seq + [nxt] + proposal[:n_acc]
            hidden = hidden_v[: len(seq)]
            nxt = greedy[n_acc]
            generated += new  # vLLM also drafts k tokens near the end (and counts them)
        outputs.append(generated[:max_tokens])
    head.train()
    return {"k": k, "prompts": len(prompts), "max_tokens": max_tokens, "num_drafts": drafts,
            "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "accepted_rate_per_position": [v / drafts for v in per_pos] if drafts else None,
            "outputs": outputs}


def _spec_counters(llm) -> dict:
    out = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "per_pos": []}
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] += float(getattr(m, "value", 0) or 0)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = [float(v) for v in getattr(m, "values", []) or []]
    return out


def measure_vllm(target_dir: str, head_dir: str, prompts: list[list[int]], max_tokens: int = 64,
                 k: int = 3, dtype: str = "float32") -> dict:
    """Greedy generation with and without EAGLE speculation (k draft tokens) on vLLM's CPU backend, in process.
    Returns the acceptance counters and whether the outputs are identical."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    outs, result = {}, {}
    for name, spec in (("plain", None), ("eagle", {"method": "eagle", "model": head_dir,
                                                   "num_speculative_tokens": k})):
        llm = LLM(target_dir, dtype=dtype, max_model_len=512, enforce_eager=True, disable_log_stats=False,
                  gpu_memory_utilization=0.15, max_num_seqs=len(prompts), seed=0, speculative_config=spec)
        before = _spec_counters(llm)
        t = time.perf_counter()
        generated = llm.generate(inputs, params, use_tqdm=False)
        result[f"{name}_time_s"] = round(time.perf_counter() - t, 2)
        outs[name] = [list(o.outputs[0].token_ids) for o in generated]
        if spec is not None:
            after = _spec_counters(llm)  # the counters are process-wide: take the difference
            drafts, draft_tokens, accepted = (after[n] - before[n] for n in ("drafts", "draft_tokens", "accepted"))
            per_pos = [a - b for a, b in zip(after["per_pos"], before["per_pos"] + [0.0] * len(after["per_pos"]))]
            result.update(num_drafts=int(drafts), num_draft_tokens=int(draft_tokens), num_accepted_tokens=int(accepted),
                          acceptance_rate=accepted / draft_tokens if draft_tokens else None,
                          mean_accepted_per_draft=accepted / drafts if drafts else None,
                          mean_acceptance_length=1 + accepted / drafts if drafts else None,
                          accepted_rate_per_position=[v / drafts for v in per_pos] if drafts else None)
        del llm
        cleanup_dist_env_and_memory()
    result.update(k=k, prompts=len(prompts), max_tokens=max_tokens, dtype=dtype,
                  greedy_match=outs["plain"] == outs["eagle"],
                  greedy_match_per_prompt=[a == b for a, b in zip(outs["plain"], outs["eagle"])],
                  plain_outputs=outs["plain"])
    return result


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.eagle", description=__doc__.split("\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET, help="the BlockFFN target checkpoint (frozen)")
    p.add_argument("--out", required=True, help="output head folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1600 when --minutes is not "
                   "given; the learning-rate schedule then follows steps)")
    p.add_argument("--minutes", type=float, default=None, help="training-time budget (feature extraction not "
                   "counted); the schedule follows time when --steps is not given, else it is only a cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    # head
    p.add_argument("--layers", type=int, default=1, help="head decoder layers")
    p.add_argument("--intermediate-size", type=int, default=None, help="head MLP width (default 2·H)")
    p.add_argument("--layer0-input-norm", action="store_true", help="CPM.cu MiniCPM4 style layer-0 input norm "
                   "(default: thunlp/BlockFFN / EAGLE-1 style, none)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the saved head")
    # data / optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="held-out split of the corpus (default: the target's train_args.json, else 0.05)")
    p.add_argument("--corpus-seed", type=int, default=None,
                   help="corpus shuffle seed (default: the target's train_args.json seed, else 0)")
    p.add_argument("--max-train-windows", type=int, default=None, help="use only the first N training windows")
    p.add_argument("--cache", default=None, help="folder to keep the target's hidden states between runs")
    # objective
    p.add_argument("--w-reg", type=float, default=1.0, help="weight of the smooth-L1 hidden-state regression")
    p.add_argument("--w-ce", type=float, default=0.1, help="weight of the CE against the target's distribution")
    p.add_argument("--noise", type=float, default=0.05, help="uniform noise on the input hidden states, "
                   "half-width relative to their RMS (EAGLE-1 adds uniform noise)")
    p.add_argument("--unroll", type=int, default=1, help="draft steps trained: 1 = EAGLE-1; up to 3 also trains "
                   "steps 2..3 on the head's own outputs (vLLM drafts k = 3), at ~3x the cost per step, which did "
                   "not pay off here (README)")
    p.add_argument("--unroll-weights", default="1,0.7,0.5", help="loss weight of each draft step")
    p.add_argument("--unroll-from", type=int, default=0, help="train draft step 1 only before this step "
                   "(an unrolled step costs about 3x as much; see README)")
    # logging / evaluation
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows evaluated (default all)")
    p.add_argument("--vllm-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the acceptance rate in vLLM after training (vllm_eval.json)")
    p.add_argument("--vllm-prompts", type=int, default=8)
    p.add_argument("--vllm-tokens", type=int, default=64)
    p.add_argument("--vllm-k", type=int, default=3)
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        args.steps = 1600
    weights = [float(w) for w in args.unroll_weights.split(",")]
    if len(weights) < args.unroll:
        p.error(f"--unroll-weights has {len(weights)} values for --unroll {args.unroll}")
    args.unroll_weight_list = weights[: args.unroll]
    return args


def _target_split(target_dir: str, args) -> tuple[float, int]:
    saved = {}
    path = os.path.join(target_dir, "train_args.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    fraction = args.heldout_fraction if args.heldout_fraction is not None else saved.get("heldout_fraction", 0.05)
    seed = args.corpus_seed if args.corpus_seed is not None else saved.get("seed", 0)
    return float(fraction), int(seed)


def train(args: argparse.Namespace, corpus: data_mod.Corpus | None = None) -> dict:
    """Train and save a head; `corpus` overrides the target's corpus (tests). Returns eval.json's content,
    plus `vllm` (with --vllm-eval) and `head` (the trained EagleHead)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t_setup = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    target = Target(args.target)
    fraction, corpus_seed = _target_split(args.target, args)
    if corpus is None:
        corpus = data_mod.load_corpus(fraction, seed=corpus_seed)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(args.target, "tokenizer.json"))
    train_ids, _ = data_mod.encode_stream(tokenizer, corpus.train)
    held_ids, _ = data_mod.encode_stream(tokenizer, corpus.heldout)
    T = args.seq_len
    train_w = windows(train_ids, T)
    if args.max_train_windows:
        train_w = train_w[: args.max_train_windows]
    held_w = windows(held_ids, T)
    if args.eval_windows:
        held_w = held_w[: args.eval_windows]
    log(f"corpus: {len(corpus.train)} train docs / {train_ids.numel()} tokens ({train_w.shape[0]} windows of {T}), "
        f"{len(corpus.heldout)} held-out docs / {held_ids.numel()} tokens ({held_w.shape[0]} windows); "
        f"fingerprint {corpus.fingerprint}")
    t_feat = time.time()
    train_h = load_features(target, train_w, args.cache, f"train|{T}", log)
    held_h = load_features(target, held_w, args.cache, f"heldout|{T}", log)
    feature_time = time.time() - t_feat
    log(f"target features: {feature_time:.0f}s; setup {time.time() - t_setup:.0f}s")

    opts = head_options(args)
    g = head_geometry(target, opts)
    head = EagleHead(g, target.spec)
    head.init_weights(args.seed)
    n_params = sum(p.numel() for p in head.parameters())
    log(f"head: {n_params / 1e6:.3f}M parameters, {g.num_layers} layer(s), {g.num_heads}/{g.num_kv_heads} heads × "
        f"{g.head_dim}, MLP {g.intermediate_size}, residual scale {g.residual_scale}; unroll {args.unroll} "
        f"{args.unroll_weight_list}")

    decay = [p for p in head.parameters() if p.dim() >= 2]
    no_decay = [p for p in head.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    with open(os.path.join(args.out, "train_args.json"), "w") as f:
        json.dump({**vars(args), "target_fingerprint": target.fingerprint(), "corpus_fingerprint": corpus.fingerprint,
                   "heldout_fraction_used": fraction, "corpus_seed_used": corpus_seed,
                   "train_windows": train_w.shape[0], "heldout_windows": held_w.shape[0],
                   "head_parameters": n_params, "python": sys.version.split()[0], "torch": torch.__version__},
                  f, indent=2)
    log_file = open(os.path.join(args.out, "train_log.jsonl"), "w")
    budget = None if args.minutes is None else args.minutes * 60
    start = time.time()
    step, last = 0, {}
    history: list[float] = []
    while True:
        elapsed = time.time() - start
        if (args.steps is not None and step >= args.steps) or (budget is not None and elapsed >= budget):
            break
        progress = step / args.steps if args.steps is not None else elapsed / budget
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, train_w.shape[0], (args.batch_size,), generator=gen)
        x, h_in, h_next, tl = batch_inputs(target, train_w[idx], train_h[idx].float())
        if args.noise > 0:
            rms = h_in.pow(2).mean(-1, keepdim=True).sqrt()
            h_in = h_in + (torch.rand(h_in.shape, generator=gen) * 2 - 1) * args.noise * rms
        zs = head(x, h_in, args.unroll if step >= args.unroll_from else 1)
        loss = 0.0
        parts = {}
        for k, (z, w) in enumerate(zip(zs, args.unroll_weight_list), 1):
            losses = step_losses(target, z, h_next, tl, k)
            loss = loss + w * (args.w_reg * losses["reg"] + args.w_ce * losses["ce"])
            parts.update({f"step{k}_{n}": v.item() for n, v in losses.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(head.parameters(), args.grad_clip)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}")
        opt.step()
        history.append(loss.item())
        if step % args.log_every == 0 or (args.steps is not None and step == args.steps - 1):
            last = {"step": step, "time_s": round(time.time() - start, 1), "lr": lr, "loss": loss.item(),
                    "grad_norm": float(gnorm), **parts}
            if args.eval_every and step % args.eval_every == 0 and step:
                ev = evaluate(head, target, held_w[:32], held_h[:32], args.unroll)
                last.update({f"heldout_{k}": v for k, v in ev.items() if k.endswith("acc")})
            log_file.write(json.dumps(last) + "\n")
            log_file.flush()
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
        step += 1
    train_time = time.time() - start
    log(f"trained {step} steps in {train_time / 60:.1f} min (+ {feature_time / 60:.1f} min of target features)")
    log_file.write(json.dumps({"done": True, "steps": step, "train_time_s": round(train_time, 1),
                               "feature_time_s": round(feature_time, 1),
                               "tokens": step * args.batch_size * (T - 1)}) + "\n")
    log_file.close()

    save_head(args.out, head, target, opts, DTYPES[args.dtype])
    saved = load_head(args.out, target)  # evaluate what was written (bf16-rounded by default)
    ev = evaluate(saved, target, held_w, held_h, max(args.unroll, args.vllm_k))
    result = {"heldout": ev, "heldout_windows": held_w.shape[0], "dtype": args.dtype,
              # the same for the unrounded training weights: what storing in --dtype costs
              "heldout_fp32_weights": ev if args.dtype == "float32" else
              evaluate(head, target, held_w, held_h, max(args.unroll, args.vllm_k)),
              "training": {"steps": step, "train_time_s": round(train_time, 1),
                           "feature_time_s": round(feature_time, 1), "last": last,
                           "first_losses": history[:5], "last_losses": history[-5:]}}
    log("held-out top-1 agreement with the target's greedy token (teacher-forced inputs): "
        + ", ".join(f"step {k}: {ev[f'step{k}_acc']:.4f}" for k in range(1, max(args.unroll, args.vllm_k) + 1))
        + f"; z = h baseline {ev['copy_h_acc']:.4f}")
    prompts = heldout_prompts(args.target, args.vllm_prompts, corpus=corpus)
    if not prompts:
        raise ValueError("no held-out document is long enough for a prompt")
    sim = simulate_acceptance(saved, target, prompts, args.vllm_tokens, args.vllm_k)
    outputs = sim.pop("outputs")
    result["torch_sim"] = sim
    log(f"simulated greedy EAGLE decoding (plain PyTorch, k={args.vllm_k}, {len(prompts)} held-out prompts × "
        f"{args.vllm_tokens} tokens): acceptance rate {sim['acceptance_rate']:.4f}, mean acceptance length "
        f"{sim['mean_acceptance_length']:.3f}")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    if args.vllm_eval:
        vr = measure_vllm(args.target, args.out, prompts, args.vllm_tokens, args.vllm_k)
        vr["greedy_match_torch_sim"] = vr.pop("plain_outputs") == outputs
        with open(os.path.join(args.out, "vllm_eval.json"), "w") as f:
            json.dump(vr, f, indent=2)
        log(f"vLLM (k={vr['k']}): acceptance rate {vr['acceptance_rate']:.4f}, mean acceptance length "
            f"{vr['mean_acceptance_length']:.3f}, greedy outputs with and without speculation match: "
            f"{vr['greedy_match']}")
        result["vllm"] = vr
    result["head"] = head  # the trained module itself (not written to eval.json)
    return result


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
