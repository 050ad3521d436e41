"""The BlockFFN model in plain PyTorch, written from SPEC.md §2 — no vLLM inside.

It is the ground truth the tests compare vLLM against, and the engine of the
`analyze` command and the training code. It favours clarity over speed: full
causal attention over the whole sequence, no KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_blockffn.kernels.layout import down_rows
from vllm_blockffn.serving.checkpoint import IGNORED_SUFFIXES, check_weights, iter_tensors
from vllm_blockffn.serving.config import BlockFFNSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x · rsqrt(mean(x²) + eps)) · w with the mean in float32."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_cos_sin(spec: BlockFFNSpec, dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style RoPE tables; rope_scaling linear divides positions, dynamic grows the base (HF NTK)."""
    base = spec.rope_theta
    pos = positions.double()
    scaling = spec.rope_scaling
    if scaling and scaling["type"] == "linear":
        pos = pos / scaling["factor"]
    elif scaling and scaling["type"] == "dynamic":
        seq_len = int(positions.max()) + 1
        if seq_len > spec.max_position_embeddings:
            f = scaling["factor"]
            base = base * ((f * seq_len / spec.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]."""
    xf = x.float()
    return (xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [T, nh, d], k: [T, nkv, d], v: [T, nkv, dv] → [T, nh·dv]."""
    T, nh, _ = q.shape
    rep = nh // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(-1), v.float())
    return out.reshape(T, -1).to(q.dtype)


@dataclass
class RouterTrace:
    """What one layer's router did for every token: z = W_r x (pre-activation)."""

    logits: torch.Tensor  # [T, E]

    @property
    def active(self) -> torch.Tensor:
        return self.logits > 0


class ReferenceBlockFFN(nn.Module):
    """router (Linear → ReLU → norm) and experts, every expert computed densely."""

    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        self.spec = spec
        E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
        self.router_proj = nn.Parameter(torch.empty(E, H))
        self.router_norm = nn.Parameter(torch.ones(E)) if spec.norm_after_router == "rms" else None
        self.up = nn.Parameter(torch.empty(E, D, H))  # block layout
        self.down = nn.Parameter(torch.empty(E, H, D))

    def router(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x @ self.router_proj.T
        a = F.relu(z)
        mode = self.spec.norm_after_router
        if mode == "rms":
            r = rms_norm(a, self.router_norm, self.spec.rms_norm_eps)
        elif mode == "sum":
            r = a / (a.sum(-1, keepdim=True) * self.spec.norm_scale + 1e-5)
        else:
            r = a
        return z, r

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, r = self.router(x)
        h = F.silu(torch.einsum("edh,th->ted", self.up, x))  # [T, E, D]
        y = torch.einsum("ehd,ted->teh", self.down, h)  # [T, E, H]
        return (r.unsqueeze(-1) * y).sum(1), z


class ReferenceAttention(nn.Module):
    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        self.spec = spec
        H, nh, nkv = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads
        if spec.attention_type == "vanilla":
            hd = spec.head_dim
            self.q_proj = nn.Parameter(torch.empty(nh * hd, H))
            self.k_proj = nn.Parameter(torch.empty(nkv * hd, H))
            self.v_proj = nn.Parameter(torch.empty(nkv * hd, H))
            self.o_proj = nn.Parameter(torch.empty(H, nh * hd))
        else:
            nope, rope, v = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
            self.q_a_proj = nn.Parameter(torch.empty(spec.q_lora_rank, H))
            self.q_a_layernorm = nn.Parameter(torch.ones(spec.q_lora_rank))
            self.q_b_proj = nn.Parameter(torch.empty(nh * (nope + rope), spec.q_lora_rank))
            self.kv_a_proj_with_mqa = nn.Parameter(torch.empty(spec.kv_lora_rank + rope, H))
            self.kv_a_layernorm = nn.Parameter(torch.ones(spec.kv_lora_rank))
            self.kv_b_proj = nn.Parameter(torch.empty(nh * (nope + v), spec.kv_lora_rank))
            self.o_proj = nn.Parameter(torch.empty(H, nh * v))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        s = self.spec
        T, nh = x.shape[0], s.num_attention_heads
        if s.attention_type == "vanilla":
            hd = s.head_dim
            q = (x @ self.q_proj.T).view(T, nh, hd)
            k = (x @ self.k_proj.T).view(T, s.num_key_value_heads, hd)
            v = (x @ self.v_proj.T).view(T, s.num_key_value_heads, hd)
            cos, sin = rope_cos_sin(s, hd, positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = causal_attention(q, k, v, hd**-0.5)
        else:
            nope, rope, vd = s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim
            q = rms_norm(x @ self.q_a_proj.T, self.q_a_layernorm, s.rms_norm_eps) @ self.q_b_proj.T
            q = q.view(T, nh, nope + rope)
            kv_a = x @ self.kv_a_proj_with_mqa.T
            c, k_pe = kv_a.split([s.kv_lora_rank, rope], dim=-1)
            kv = (rms_norm(c, self.kv_a_layernorm, s.rms_norm_eps) @ self.kv_b_proj.T).view(T, nh, nope + vd)
            k_nope, v = kv.split([nope, vd], dim=-1)
            cos, sin = rope_cos_sin(s, rope, positions)
            q_pe = apply_rope(q[..., nope:], cos, sin)
            k_pe = apply_rope(k_pe.view(T, 1, rope), cos, sin).expand(T, nh, rope)
            q = torch.cat([q[..., :nope], q_pe], dim=-1)
            k = torch.cat([k_nope, k_pe], dim=-1)
            out = causal_attention(q, k, v, (nope + rope) ** -0.5)
        return out @ self.o_proj.T


class ReferenceLayer(nn.Module):
    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        self.spec = spec
        self.input_layernorm = nn.Parameter(torch.ones(spec.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(spec.hidden_size))
        self.self_attn = ReferenceAttention(spec)
        self.mlp = ReferenceBlockFFN(spec)

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, eps = self.spec.residual_scale, self.spec.rms_norm_eps
        h = h + self.self_attn(rms_norm(h, self.input_layernorm, eps), positions) * s
        y, z = self.mlp(rms_norm(h, self.post_attention_layernorm, eps))
        return h + y * s, z


class ReferenceModel(nn.Module):
    """Embedding · scale_emb → layers → final norm / (H / dim_model_base) → lm_head."""

    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(ReferenceLayer(spec) for _ in range(spec.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(spec.hidden_size))
        self.lm_head = None if spec.tie_word_embeddings else nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, return_router: bool = False):
        """input_ids [T] → fp32 logits [T, V] (and each layer's RouterTrace)."""
        positions = torch.arange(input_ids.shape[0])
        h = self.embed_tokens[input_ids] * self.spec.scale_emb
        traces = []
        for layer in self.layers:
            h, z = layer(h, positions)
            traces.append(RouterTrace(z.float()))
        h = rms_norm(h, self.norm, self.spec.rms_norm_eps) / self.spec.logit_divisor
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = (h @ head.T).float()
        return (logits, traces) if return_router else logits

    @torch.no_grad()
    def greedy(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = list(input_ids)
        for _ in range(max_new_tokens):
            ids.append(int(self(torch.tensor(ids))[-1].argmax()))
        return ids[len(input_ids):]

    @torch.no_grad()
    def prompt_logprobs(self, input_ids: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) for t ≥ 1, as vLLM's prompt_logprobs reports them."""
        logp = self(torch.tensor(input_ids)).log_softmax(-1)
        return [float(logp[t - 1, input_ids[t]]) for t in range(1, len(input_ids))]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ReferenceModel:
        spec = BlockFFNSpec.from_pretrained(path)
        check_weights(path, spec)
        model = cls(spec)
        params = dict(model.named_parameters())
        E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
        tensors = iter_tensors(path)
        if spec.int8:  # a `vllm-blockffn quantize` checkpoint: the dequantized weights (kernels/quant.py)
            tensors = _dequantized(dict(tensors), spec)
        for name, tensor in tensors:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            key = name.removeprefix("model.").removesuffix(".weight")
            if key.endswith("mlp.up_proj"):
                tensor, key = tensor.reshape(E, D, H), key.replace("up_proj", "up")
            elif key.endswith("mlp.down_proj"):
                tensor = down_rows(tensor, spec.ffn_type, E)  # [E, H, D] in both layouts
                key = key.replace("down_proj", "down")
            elif key == "lm_head" and spec.tie_word_embeddings:
                continue
            if key not in params:
                raise KeyError(f"{path}: unexpected weight '{name}' in a BlockFFN checkpoint")
            params[key].data = tensor.to(dtype).contiguous()
        return model.to(dtype)


def _dequantized(tensors: dict[str, torch.Tensor], spec: BlockFFNSpec) -> list[tuple[str, torch.Tensor]]:
    """An int8 checkpoint's tensors with every int8 weight times its row scales (fp32), scales dropped."""
    from vllm_blockffn.kernels.layout import down_from_rows
    from vllm_blockffn.kernels.quant import dequantize_rows

    E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
    out = []
    for name, t in tensors.items():
        if name.endswith("_scale"):
            continue
        if t.dtype == torch.int8:
            s = tensors[name + "_scale"]
            if name.endswith("mlp.up_proj"):
                t = dequantize_rows(t.reshape(E, D, H), s.reshape(E, D)).reshape(t.shape)
            elif name.endswith("mlp.down_proj"):
                t = down_from_rows(dequantize_rows(down_rows(t, spec.ffn_type, E), s), spec.ffn_type)
            else:
                t = dequantize_rows(t, s)
        out.append((name, t))
    return out


def load_reference(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    return ReferenceModel.from_pretrained(path, dtype)


__all__ = ["ReferenceModel", "RouterTrace", "load_reference", "rms_norm"]
