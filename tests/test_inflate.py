"""`vllm-blockffn inflate`: the padded model computes the source's function at an official size's bytes."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import PROMPTS

from vllm_blockffn.reference import load_reference
from vllm_blockffn.serving.checkpoint import tensor_shapes
from vllm_blockffn.serving.config import BlockFFNSpec
from vllm_blockffn.tools.cli import main as cli
from vllm_blockffn.tools.inflate import LIKE, Official, inflate, make_plan

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "models", "blockffn-tiny-trained")
EAGLE_HEAD = os.path.join(ROOT, "models", "blockffn-tiny-trained-eagle")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, str]:
    """The bundled model and its EAGLE head, inflated --like small (fp32), through the CLI."""
    root = tmp_path_factory.mktemp("inflated")
    out, head = str(root / "small"), str(root / "small-eagle")
    assert cli(["inflate", MODEL, out, "--like", "small", "--eagle-head", EAGLE_HEAD, head]) == 0
    return out, head


def _token_ids(n: int = 80) -> torch.Tensor:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(MODEL, "tokenizer.json"))
    return torch.tensor(tok(" ".join(PROMPTS) * 2)["input_ids"][:n])


def test_expert_bytes_and_depth_equal_the_named_config(small):
    out, _ = small
    spec, off = BlockFFNSpec.from_pretrained(out), LIKE["small"]
    shapes = tensor_shapes(out)
    assert spec.num_hidden_layers == off.num_layers and spec.hidden_size == off.hidden_size
    for i in range(spec.num_hidden_layers):
        n = sum(math.prod(shapes[f"model.layers.{i}.mlp.{p}"]) for p in ("up_proj", "down_proj"))
        assert n == off.expert_params
    source = BlockFFNSpec.from_pretrained(MODEL)
    assert (spec.num_experts, spec.head_dim) == (source.num_experts, source.head_dim)  # E, routers, head_dim kept


@pytest.mark.parametrize("like", list(LIKE))
@pytest.mark.parametrize("experts", [32, 48])
def test_every_official_size_is_matched_on_paper(like, experts):
    """E = 32 (bundled) and 48 (a retrained model): exact, or within d_e' rounding (< 0.5%), at H' = H_o."""
    spec = dataclasses.replace(BlockFFNSpec.from_pretrained(MODEL), num_experts=experts)
    plan, off = make_plan(spec, like), LIKE[like]
    assert plan.hidden_size == off.hidden_size and plan.num_layers == off.num_layers
    assert abs(2 * experts * plan.expert_size * plan.hidden_size / off.expert_params - 1) < 0.005
    if (off.num_experts * off.expert_size) % experts == 0:
        assert plan.expert_params_error == 0
    assert plan.num_attention_heads * spec.head_dim == plan.hidden_size
    assert plan.real.count(True) == spec.num_hidden_layers and len(plan.layer_source) == off.num_layers


def test_reference_logits_and_routing_agree(small):
    """fp32 reference model: same logits (to float rounding), same active experts in every source layer;
    the added layers route the real stream with a copy of the layer before them."""
    out, _ = small
    source, inflated = load_reference(MODEL), load_reference(out)
    ids = _token_ids()
    want, want_traces = source(ids, return_router=True)
    got, traces = inflated(ids, return_router=True)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with open(os.path.join(out, "inflate.json")) as f:
        plan = json.load(f)["plan"]
    for j, trace in enumerate(traces):
        i = plan["layer_source"][j]
        agree = (trace.active == want_traces[i].active).float().mean()
        assert agree == 1 if plan["real"][j] else agree > 0.6  # copies see the stream one layer later
        assert trace.active.any(-1).all()  # every added layer reads experts


def test_mla_block_linear_sum_router_tied_source(tiny_factory, tmp_path):
    """Other layouts, at a small custom target: MLA heads added, block_linear padded, tied embeddings."""
    src = tiny_factory(attention="mla", layout="block_linear", norm="sum", tie_word_embeddings=True)
    target = Official("test", hidden_size=256, num_layers=5, num_experts=16, expert_size=36)
    plan = inflate(src, tmp_path / "out", target)
    assert (plan.hidden_size, plan.expert_size, plan.expert_params_error) == (256, 48, 0)
    ids = torch.arange(3, 60)
    want, got = load_reference(src)(ids), load_reference(tmp_path / "out")(ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert cli(["inflate", str(tmp_path), str(tmp_path / "out"), "--like", "small"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no config.json; expected a BlockFFN checkpoint folder" in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli(["inflate", MODEL, str(tmp_path / "out"), "--like", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected one of"):
        make_plan(BlockFFNSpec.from_pretrained(MODEL), "huge")


def _greedy_with_eagle(engine_factory, target: str, head: str) -> tuple[list[list[int]], tuple[int, int]]:
    from test_spec_decode import _spec_counts

    engine = engine_factory(target, dtype="float32", disable_log_stats=False, gpu_memory_utilization=0.2,
                            speculative_config={"method": "eagle", "model": head, "num_speculative_tokens": 3})
    tokens = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, max_tokens=24)]
    counts = _spec_counts(engine)
    engine.close()
    return tokens, counts


@pytest.mark.slow
def test_vllm_greedy_tokens_and_eagle_acceptance_unchanged(small, engine_factory, record_figure):
    """In vLLM (fp32): the inflated target with the inflated head gives the source's greedy tokens and
    accepts the same drafts (speculation keeps greedy outputs, tests/test_spec_decode.py)."""
    out, head = small
    want, want_counts = _greedy_with_eagle(engine_factory, MODEL, EAGLE_HEAD)
    got, got_counts = _greedy_with_eagle(engine_factory, out, head)
    record_figure("inflated small + eagle: accepted/drafted (source)", f"{got_counts[1]}/{got_counts[0]} "
                  f"({want_counts[1]}/{want_counts[0]})")
    assert got == want
    assert got_counts == want_counts and want_counts[1] > 0


@pytest.mark.parametrize("like", list(LIKE))
def test_expert_align_gives_kernel_friendly_expert_sizes(like):
    """--expert-align 16: d_e' a multiple of 16 (as the official releases', the grain int8 experts are packed in on
    CPUs), the expert bytes still within 0.5% of the official ones, heads filling H'; without it H' = H_o."""
    spec = BlockFFNSpec.from_pretrained(MODEL)
    plan, off = make_plan(spec, like, expert_align=16), LIKE[like]
    assert plan.expert_size % 16 == 0 and plan.num_layers == off.num_layers
    assert abs(2 * spec.num_experts * plan.expert_size * plan.hidden_size / off.expert_params - 1) < 0.005
    assert plan.num_attention_heads * spec.head_dim == plan.hidden_size
    with pytest.raises(ValueError, match="--expert-align 0; expected a positive integer"):
        make_plan(spec, like, expert_align=0)
