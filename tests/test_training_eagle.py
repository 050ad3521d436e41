"""training/eagle.py: a few steps of EAGLE head training on a tiny target, and the written head checked
against the format vLLM serves (vllm_blockffn.serving.eagle.inspect_head) and an independent plain-torch forward
of the saved tensors (the math of vllm_blockffn/serving/eagle.py's docstring)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from training import data as data_mod
from training.eagle import EagleHead, Target, head_geometry, parse_args, save_head, train
from vllm_blockffn.reference import apply_rope, causal_attention, load_reference, rms_norm, rope_cos_sin
from vllm_blockffn.serving.eagle import inspect_head, looks_like_head, residual_scale
from vllm_blockffn.tools.tiny_eagle import TinyEagleOptions

STEPS = 30
UNROLL_FROM = 20  # the last 10 steps also train draft steps 2 and 3


def _texts() -> list[str]:
    import argparse
    import collections
    import json as json_mod
    import logging
    import re
    import string
    import textwrap

    docs = []
    for module in (argparse, collections, json_mod, logging, re, string, textwrap):
        docs.append(module.__doc__ or "")
        docs += [getattr(getattr(module, a), "__doc__", None) or "" for a in sorted(dir(module))]
    return [d.strip() for d in docs if isinstance(d, str) and len(d.strip()) >= 40]


@pytest.fixture(scope="module")
def run(tiny_factory, tmp_path_factory):
    target = tiny_factory()
    texts = _texts()
    held = [t for t in texts if len(t) > 600][:4]  # long documents: the simulated-decoding prompts
    corpus = data_mod.Corpus(train=[t for t in texts if t not in held], heldout=held, source="test")
    out = str(tmp_path_factory.mktemp("eagle-head"))
    args = parse_args(["--target", target, "--out", out, "--steps", str(STEPS), "--seq-len", "64",
                       "--batch-size", "4", "--warmup-steps", "3", "--log-every", "1", "--eval-every", "0",
                       "--dtype", "float32", "--no-vllm-eval", "--vllm-prompts", "2", "--vllm-tokens", "6",
                       "--max-train-windows", "64", "--unroll", "3", "--unroll-from", str(UNROLL_FROM)])
    threads = torch.get_num_threads()
    try:
        result = train(args, corpus=corpus)
    finally:
        torch.set_num_threads(threads)
    return target, out, result


def reference_head(path: str, target_cfg: dict, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Plain-torch forward of a saved thunlp/BlockFFN-style head for one sequence: x = embedding·scale_emb [T, H],
    h = normed target hidden states [T, H] → z [T, H] (draft step 1 at every position)."""
    from vllm_blockffn.serving.config import BlockFFNSpec

    w = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    eps, nh, nkv, hd = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    spec = BlockFFNSpec.from_config(target_cfg)
    T = x.shape[0]
    cos, sin = rope_cos_sin(spec, hd, torch.arange(T))
    z = torch.cat((rms_norm(x, w["input_norm1.weight"], eps), rms_norm(h, w["input_norm2.weight"], eps)), -1)
    z = z @ w["fc.weight"].T + w["fc.bias"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        a = rms_norm(z, w[p + "input_layernorm.weight"], eps) if p + "input_layernorm.weight" in w else z
        q = apply_rope((a @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, hd), cos, sin)
        k = apply_rope((a @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd), cos, sin)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
        z = z + causal_attention(q, k, v, hd**-0.5) @ w[p + "self_attn.o_proj.weight"].T  # residual scale 1
        m = rms_norm(z, w[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)
        z = z + mlp @ w[p + "mlp.down_proj.weight"].T
    return z


def test_head_folder_is_a_servable_head(run):
    target, out, _ = run
    with open(os.path.join(target, "config.json")) as f:
        tcfg = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert looks_like_head(out)
    info = inspect_head(out, cfg)
    H = tcfg["hidden_size"]
    assert info["hidden_size"] == H and info["intermediate_size"] == 2 * H and info["num_hidden_layers"] == 1
    assert info["num_attention_heads"] == tcfg["num_attention_heads"]
    assert info["num_key_value_heads"] == tcfg["num_key_value_heads"]
    assert info["head_dim"] == H // tcfg["num_attention_heads"]
    assert info["eagle_fc_bias"] and not info["eagle_layer0_input_norm"] and info["eagle_draft_vocab_size"] is None
    assert residual_scale(type("C", (), {**cfg, **info})(), type("T", (), tcfg)()) == 1.0
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in tensors)  # the target's are used
    for name in ("train_args.json", "train_log.jsonl", "eval.json"):
        assert os.path.exists(os.path.join(out, name)), name


def test_saved_head_forward_equals_training_module(run):
    target_dir, out, result = run
    head = result["head"].eval()
    target = Target(target_dir)
    ids = torch.randint(3, target.spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    hidden = target.hidden(ids)
    x, h = target.embed_scaled(ids[:, 1:]), hidden[:, :-1]
    with torch.no_grad():
        zs = head(x, h, 3)
    ref = reference_head(out, target.config, x[0], h[0])
    assert torch.allclose(zs[0][0], ref, atol=1e-5, rtol=1e-4), (zs[0][0] - ref).abs().max()
    # Unrolled steps = what vLLM computes: step 2 at p sees the real entries < p and its own input (the step-1
    # output at p−1); step 3 at p sees the real entries < p−1, step 2 at p−1 and its own.
    for p in (2, 9, 22):
        h2 = h[0, :p + 1].clone()
        h2[p] = zs[0][0, p - 1]
        assert torch.allclose(reference_head(out, target.config, x[0, :p + 1], h2)[p], zs[1][0, p], atol=1e-5)
        h3 = h[0, :p + 1].clone()
        h3[p - 1] = zs[0][0, p - 2]
        h3[p] = reference_head(out, target.config, x[0, :p], h3[:p])[p - 1]
        assert torch.allclose(reference_head(out, target.config, x[0, :p + 1], h3)[p], zs[2][0, p], atol=1e-5)


def test_target_features_match_reference_model(tiny_model):
    target = Target(tiny_model)
    ids = torch.randint(3, target.spec.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    logits = target.logits(target.hidden(ids[None]))[0]
    ref = load_reference(tiny_model)(ids)
    assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (logits - ref).abs().max()


def test_loss_decreases_and_eval_written(run):
    _, out, result = run
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "step" in r]
    assert len(rows) == STEPS and all(math.isfinite(r["loss"]) for r in rows)
    # The draft-step-1 objective falls; from step UNROLL_FROM the loss also holds steps 2 and 3, and falls too.
    step1 = [r["step1_reg"] + 0.1 * r["step1_ce"] for r in rows]
    assert sum(step1[-5:]) / 5 < 0.9 * sum(step1[:5]) / 5, step1
    assert all("step3_reg" in r for r in rows[UNROLL_FROM:]) and not any("step2_reg" in r for r in rows[:UNROLL_FROM])
    unrolled = [r["loss"] for r in rows[UNROLL_FROM:]]
    assert sum(unrolled[-3:]) / 3 < 0.97 * sum(unrolled[:3]) / 3, unrolled
    ev = result["heldout"]
    for k in (1, 2, 3):
        assert 0.0 <= ev[f"step{k}_acc"] <= 1.0
    sim = result["torch_sim"]
    assert sim["num_drafts"] > 0 and 0.0 <= sim["acceptance_rate"] <= 1.0
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["heldout"] == ev


def test_bf16_save_rounds_the_training_weights(tiny_model, tmp_path):
    target = Target(tiny_model)
    opts = TinyEagleOptions()
    head = EagleHead(head_geometry(target, opts), target.spec)
    head.init_weights(0)
    save_head(str(tmp_path), head, target, opts, torch.bfloat16)
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    expected = head.official_tensors(torch.bfloat16)
    assert set(saved) == set(expected)
    assert all(saved[n].dtype == torch.bfloat16 and torch.equal(saved[n], expected[n]) for n in saved)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
