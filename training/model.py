"""A trainable BlockFFN (vanilla GQA attention, block expert layout) that mirrors
`vllm_blockffn.reference.ReferenceModel` exactly (SPEC.md §2), batched and with autograd.

The expert computation is written as two dense matmuls over all experts,
y = W_down,cat · (r ⊙ SiLU(W_up,cat x)), which equals Σ_e r_e W_down,e SiLU(W_up,e x):
training needs every expert's gradient anyway, and an expert with r_e = 0 adds nothing.

`official_tensors()` / `load_official_tensors()` convert to and from the checkpoint's
tensor names and shapes (`vllm_blockffn.serving.checkpoint.expected_shapes`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vllm_blockffn.reference import rms_norm, rope_cos_sin, rotate_half
from vllm_blockffn.serving.checkpoint import expected_shapes
from vllm_blockffn.serving.config import BlockFFNSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        if spec.attention_type != "vanilla":
            raise ValueError("training/ implements vanilla (GQA) attention only")
        H, nh, nkv, hd = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.spec = spec
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = self.spec
        B, T, _ = x.shape
        nh, nkv, hd = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * hd))


class BlockFFN(nn.Module):
    """ReLU router (+ rms/sum/none norm) and E experts of size d_e (block layout)."""

    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
        self.spec = spec
        self.router_proj = nn.Linear(H, E, bias=False)
        self.router_norm = nn.Parameter(torch.ones(E)) if spec.norm_after_router == "rms" else None
        self.up_proj = nn.Parameter(torch.empty(E, D, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, D))
        self.router_only_aux = False  # see TrainableBlockFFN.set_router_only_aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] → (y [..., H], router pre-activation z [..., E])."""
        s = self.spec
        E, D, H = s.num_experts, s.expert_size, s.hidden_size
        z = self.router_proj(x)
        a = F.relu(z)
        if s.norm_after_router == "rms":
            r = rms_norm(a, self.router_norm, s.rms_norm_eps)
        elif s.norm_after_router == "sum":
            r = a / (a.sum(-1, keepdim=True) * s.norm_scale + 1e-5)
        else:
            r = a
        h = F.silu(x @ self.up_proj.reshape(E * D, H).T)  # [..., E·D]
        h = (h.unflatten(-1, (E, D)) * r.unsqueeze(-1)).flatten(-2)
        y = h @ self.down_proj.permute(0, 2, 1).reshape(E * D, H)
        if self.router_only_aux:  # same values; gradients of the auxiliary losses stop at router_proj
            z = F.linear(x.detach(), self.router_proj.weight)
        return y, z


class Layer(nn.Module):
    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.mlp = BlockFFN(spec)
        self.scale = spec.residual_scale

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin) * self.scale
        y, z = self.mlp(self.post_attention_layernorm(h))
        return h + y * self.scale, z


class TrainableBlockFFN(nn.Module):
    """Embedding · scale_emb → layers → final RMSNorm / (H / dim_model_base) → lm_head."""

    def __init__(self, spec: BlockFFNSpec):
        super().__init__()
        if spec.ffn_type != "block":
            raise ValueError("training/ writes the 'block' expert layout")
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size,
                                                                        bias=False)

    def init_weights(self, seed: int, init_std: float = 0.1) -> None:
        """MiniCPM/BlockFFN-style (μP) init: N(0, init_std) for the embedding, N(0, init_std /
        sqrt(H / dim_model_base)) for every matrix, ones for the norms."""
        gen = torch.Generator().manual_seed(seed)
        width = self.spec.hidden_size / self.spec.dim_model_base
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("norm.weight", "layernorm.weight", "router_norm")):
                    p.fill_(1.0)
                elif name == "embed_tokens.weight":
                    p.normal_(0.0, init_std, generator=gen)
                else:
                    p.normal_(0.0, init_std / math.sqrt(width), generator=gen)

    def set_router_only_aux(self, on: bool) -> None:
        """Make forward() return router pre-activations whose gradient reaches only router_proj.

        The auxiliary losses (L_AL, L_CS, hinges) then train the routers alone and do not bend the
        hidden states the LM loss shapes; the LM loss still reaches the routers through the
        routing weights. Not in the paper (training/README.md)."""
        for layer in self.layers:
            layer.mlp.router_only_aux = on

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, T] (or [T]) → (fp32 logits [B, T, V], router pre-activations z per layer [B, T, E])."""
        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids[None]
        T = input_ids.shape[1]
        cos, sin = rope_cos_sin(self.spec, self.spec.head_dim, torch.arange(T))
        cos, sin = cos.to(self.embed_tokens.weight.device), sin.to(self.embed_tokens.weight.device)
        h = self.embed_tokens(input_ids) * self.spec.scale_emb
        zs = []
        for layer in self.layers:
            h, z = layer(h, cos, sin)
            zs.append(z)
        h = self.norm(h) / self.spec.logit_divisor
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = (h @ head.T).float()
        if squeeze:
            return logits[0], [z[0] for z in zs]
        return logits, zs

    # --- the official checkpoint format -------------------------------------------------------
    def _official_params(self) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{name}.weight"] = getattr(layer.self_attn, name).weight
            out[p + "mlp.router_proj.weight"] = layer.mlp.router_proj.weight
            if layer.mlp.router_norm is not None:
                out[p + "mlp.router_norm.weight"] = layer.mlp.router_norm
            out[p + "mlp.up_proj"] = layer.mlp.up_proj  # [E, d_e, H], no .weight suffix
            out[p + "mlp.down_proj"] = layer.mlp.down_proj  # [E, H, d_e]
        return out

    def official_tensors(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Every tensor of the official format (names/shapes of `expected_shapes`), detached copies."""
        params = self._official_params()
        shapes = expected_shapes(self.spec)
        if set(params) != set(shapes):
            raise AssertionError(f"tensor names differ from the official format: {set(params) ^ set(shapes)}")
        out = {}
        for name, shape in shapes.items():
            t = params[name].detach()
            if tuple(t.shape) != shape:
                raise AssertionError(f"{name}: shape {tuple(t.shape)}, official {shape}")
            out[name] = t.to("cpu", dtype).contiguous().clone()
        return out

    @torch.no_grad()
    def load_official_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self._official_params()
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))
