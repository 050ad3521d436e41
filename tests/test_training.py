"""training/: the CLS-aware losses on hand-checkable tensors, and a short smoke training whose
checkpoint loads with the reference model and matches the training model's logits."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from training.losses import (
    AdaptiveFactor,
    LayerCSController,
    activation_locality_loss,
    chunk_sparsification_loss,
    expert_rate_hinge_loss,
)
from training.model import TrainableBlockFFN


def _bce(logit: float, target: float) -> float:
    sig = 1 / (1 + math.exp(-logit))
    return -(target * math.log(sig) + (1 - target) * math.log(1 - sig))


def test_activation_locality_loss_by_hand():
    # One pair, one expert: z_{t-1} = 0.01, z_t = -0.01 → BCE(logit 1, target sigmoid(-1)).
    z = torch.tensor([[[0.01], [-0.01]]])
    expected = _bce(1.0, 1 / (1 + math.exp(1.0)))
    assert activation_locality_loss(z).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(1.0443, abs=1e-4)

    # Two pairs, two experts; the pair mask drops the second pair (a document boundary).
    z = torch.tensor([[[0.01, -0.02], [-0.01, 0.03], [5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    pairs = [(1.0, -1.0), (-2.0, 3.0)]  # (α·z_{t-1}, α·z_t) for each expert of the kept pair
    expected = sum(_bce(a, 1 / (1 + math.exp(-b))) for a, b in pairs) / 2
    assert activation_locality_loss(z, mask).item() == pytest.approx(expected, rel=1e-5)

    # Same sign with large magnitude on both sides: (almost) no loss.
    z = torch.tensor([[[1.0, -1.0], [2.0, -3.0]]])
    assert activation_locality_loss(z).item() < 1e-3


def test_chunk_sparsification_loss_by_hand():
    # Both experts share the activation mass equally: p = 0.5 for every token and expert.
    z = torch.ones(1, 2, 2)
    p = 1 / (2 + 1e-5)
    assert chunk_sparsification_loss(z, 2).item() == pytest.approx(1 - (1 - p + 1e-5) ** 2, rel=1e-5)  # 0.75
    assert chunk_sparsification_loss(z, 2).item() == pytest.approx(0.75, abs=1e-4)
    assert chunk_sparsification_loss(z, 1).item() == pytest.approx(0.5, abs=1e-4)  # 1-token chunks

    # Each token puts all its mass on a different expert: both experts are surely active in the chunk.
    z = torch.tensor([[[1.0, -1.0], [-1.0, 3.0]]])
    assert chunk_sparsification_loss(z, 2).item() == pytest.approx(1.0, abs=1e-4)
    # ... while the same expert for both tokens leaves the other one surely off: 0.5.
    z = torch.tensor([[[1.0, -1.0], [2.0, -1.0]]])
    assert chunk_sparsification_loss(z, 2).item() == pytest.approx(0.5, abs=1e-4)

    # Nothing active: no loss (up to the 1e-5 of the formula); masked tokens count as inactive.
    assert abs(chunk_sparsification_loss(-torch.ones(1, 4, 3), 2).item()) < 1e-4
    z = torch.ones(1, 2, 2)
    mask = torch.tensor([[1.0, 0.0]])
    assert chunk_sparsification_loss(z, 2, mask).item() == pytest.approx(0.5, abs=1e-4)

    with pytest.raises(ValueError):
        chunk_sparsification_loss(torch.ones(1, 3, 2), 2)


def test_losses_have_router_gradients():
    z = torch.randn(2, 8, 4, requires_grad=True)
    (activation_locality_loss(z) + chunk_sparsification_loss(z, 4)).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_adaptive_factor():
    f = AdaptiveFactor(0.05, stable_steps=2, window=2, max_ratio=4.0)
    values = [f.step(cs, step) for step, cs in enumerate([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])]
    assert values == [0.05] * 6  # falling L_CS: unchanged
    f = AdaptiveFactor(0.05, stable_steps=0, window=2, max_ratio=4.0)
    values = [f.step(cs, step) for step, cs in enumerate([0.1, 0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    # window 2 rose 10× → grow linearly to the cap (4 × 0.05) over the next 2 steps; then flat.
    assert values[3] == pytest.approx(0.05)
    assert values[4] == pytest.approx(0.125)
    assert values[5] == pytest.approx(0.2)
    assert max(values) == pytest.approx(0.2)


def test_expert_rate_hinges_touch_only_dead_and_always_on_experts():
    """Expert 0 never fires (revive pulls up its top 2% of tokens), expert 1 always fires (suppress
    pushes down its weakest positive tokens, enough to reach 80%), expert 2 fires on 97% (flagged
    too), and the routing experts 3-5 (about half the tokens) get no gradient at all."""
    torch.manual_seed(0)
    z = torch.randn(2, 64, 6)
    z[..., 0] -= 5
    z[..., 1] += 5
    z[..., 2] += 1.5
    z.requires_grad_(True)
    revive, suppress = expert_rate_hinge_loss(z, min_rate=0.01, max_rate=0.9, revive_rate=0.02,
                                              target_max_rate=0.8)
    assert revive.item() > 0 and suppress.item() > 0
    (revive + suppress).backward()
    g = z.grad.reshape(-1, 6)
    touched = (g != 0).sum(0).tolist()
    assert touched[0] == 3  # ceil(0.02 · 128)
    assert touched[1] == 26  # ceil((1.0 − 0.8) · 128)
    assert 0 < touched[2] <= 22 and touched[3:] == [0, 0, 0]
    flat = z.detach().reshape(-1, 6)
    assert (g[:, 0] <= 0).all()  # descent raises expert 0's pre-activations
    assert (g[:, 1] >= 0).all()  # and lowers expert 1's
    # The suppressed tokens are expert 1's smallest pre-activations.
    chosen = flat[g[:, 1] != 0, 1]
    assert chosen.max() <= flat[g[:, 1] == 0, 1].min()
    # Nothing to do on a routing layer.
    r, s = expert_rate_hinge_loss(torch.randn(2, 64, 6))
    assert r.item() == 0 and s.item() == 0


def test_allowed_always_on_experts_are_exempt_from_suppress():
    """allowed_always=1: the most used expert (1, always on) is a shared expert and untouched; the
    next one (2, on 97%) is still pushed down."""
    torch.manual_seed(0)
    z = torch.randn(2, 64, 6)
    z[..., 1] += 5
    z[..., 2] += 1.5
    z.requires_grad_(True)
    _, suppress = expert_rate_hinge_loss(z, max_rate=0.9, target_max_rate=0.8, allowed_always=1)
    suppress.backward()
    touched = (z.grad.reshape(-1, 6) != 0).sum(0).tolist()
    assert touched[1] == 0 and touched[2] > 0 and touched[3:] == [0, 0, 0]


def test_router_only_aux_stops_auxiliary_gradients_at_the_router():
    """--router-only-aux: same z values; an auxiliary loss on them reaches router_proj and nothing else."""
    from vllm_blockffn.serving.config import BlockFFNSpec
    from vllm_blockffn.tools.tiny import TinyOptions, tiny_config

    cfg = tiny_config(TinyOptions(attention="vanilla", layout="block", norm="rms", hidden_size=64, num_layers=2,
                                  num_experts=8, expert_size=16, vocab_size=128), 128)
    model = TrainableBlockFFN(BlockFFNSpec.from_config(cfg))
    model.init_weights(0)
    ids = torch.randint(3, 128, (1, 16))
    _, plain = model(ids)
    model.set_router_only_aux(True)
    _, zs = model(ids)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, zs, strict=True))
    sum(chunk_sparsification_loss(z, 8) for z in zs).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {f"layers.{i}.mlp.router_proj.weight" for i in range(2)}


def test_layer_cs_controller():
    c = LayerCSController(2, target_tls=0.8, gain=1.0, lo=0.5, hi=2.0)
    m = c.update([0.7, 0.9])  # layer 0 too dense → more λ_CS, layer 1 too sparse → less
    assert m[0] == pytest.approx(math.exp(0.1)) and m[1] == pytest.approx(math.exp(-0.1))
    for _ in range(50):
        m = c.update([0.0, 1.0])
    assert m == pytest.approx([2.0, 0.5])  # clamped


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from training.train import parse_args, train

    out = str(tmp_path_factory.mktemp("smoke-train"))
    args = parse_args(["--out", out, "--steps", "6", "--hidden-size", "64", "--layers", "2", "--experts", "8",
                       "--expert-size", "16", "--vocab-size", "512", "--seq-len", "64", "--batch-size", "2",
                       "--cs-chunk", "16", "--lambda-cs", "0.2", "--cs-adaptive", "--cs-stable-steps", "2",
                       "--cs-window", "2",
                       "--sparsity-start-step", "2", "--sparsity-ramp-steps", "2", "--log-every", "1",
                       "--eval-every", "3", "--eval-windows", "2", "--eval-max-windows", "3",
                       "--threads", "1", "--lambda-revive", "1", "--lambda-suppress", "1",
                       "--target-tls", "0.8", "0.85"])
    threads = torch.get_num_threads()
    try:
        summary = train(args)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_smoke_training_losses_finite(smoke_run):
    out, summary = smoke_run
    assert summary["steps"] == 6
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 6
    for r in steps:
        for key in ("loss", "lm", "al", "cs"):
            assert math.isfinite(r[key]), (key, r)
    # LM-only warm-up for 2 steps, then both weights ramp up linearly over 2 steps.
    assert [r["lambda_cs"] for r in steps[:2]] == [0.0, 0.0] and steps[0]["loss"] == steps[0]["lm"]
    assert steps[2]["lambda_cs"] == pytest.approx(0.1) and steps[3]["lambda_cs"] == pytest.approx(0.2)
    assert steps[3]["lambda_al"] == pytest.approx(2e-3) and steps[3]["loss"] > steps[3]["lm"]
    # The per-layer λ_CS controller starts after the ramp; the anti-collapse hinges are logged.
    assert steps[2]["cs_mult"] == [1.0, 1.0] and steps[5]["cs_mult"] != [1.0, 1.0]
    assert all("revive" in r and "suppress" in r for r in steps[2:])
    assert all(len(r["rare"]) == len(r["always"]) == 2 for r in steps)
    result = summary["eval"]
    assert math.isfinite(result["heldout_loss"]) and 0 <= result["tls"] <= 1
    assert set(result["cls"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert result["cls"]["1"] == pytest.approx(result["tls"])


def test_smoke_checkpoint_loads_and_matches_training_model(smoke_run):
    from safetensors.torch import load_file

    from vllm_blockffn.reference import load_reference
    from vllm_blockffn.serving.checkpoint import check_weights
    from vllm_blockffn.serving.config import BlockFFNSpec

    out, _ = smoke_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    spec = BlockFFNSpec.from_pretrained(out)
    check_weights(out, spec)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "minicpm" and cfg["architectures"] == ["MiniCPMForCausalLM"]
    assert cfg["ffn_type"] == "block" and cfg["norm_after_router"] == "rms" and spec.head_dim == 32
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())

    reference = load_reference(out)
    model = TrainableBlockFFN(spec)
    model.load_official_tensors(tensors)
    model.eval()
    ids = torch.randint(0, spec.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    ref_logits, traces = reference(ids, return_router=True)
    with torch.no_grad():
        logits, zs = model(ids)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4), (logits - ref_logits).abs().max()
    for z, trace in zip(zs, traces, strict=True):
        assert torch.allclose(z, trace.logits, atol=1e-5, rtol=1e-5)
    # Batched forward equals the per-sequence one.
    with torch.no_grad():
        batched, _ = model(torch.stack([ids, ids.flip(0)]))
    assert torch.allclose(batched[0], logits, atol=1e-5)
