"""The shipped trained model (models/blockffn-tiny-trained): served by vLLM exactly, and really sparse."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import PROMPTS, compare_to_reference

from vllm_blockffn.observe.sparsity import chunk_sparsity, token_sparsity
from vllm_blockffn.reference import load_reference

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained")
EAGLE_HEAD = os.path.join(os.path.dirname(__file__), "..", "models", "blockffn-tiny-trained-eagle")


def test_model_card_figures_match_the_weights():
    """TLS / CLS-8 on sample documentation text: trained sparsity, near the card's held-out figure."""
    with open(os.path.join(MODEL, "eval.json")) as f:
        card = json.load(f)
    reference = load_reference(MODEL)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(MODEL, "tokenizer.json"))
    text = " ".join(m.__doc__ for m in (json, os, torch.nn.Module) if m.__doc__)
    ids = tok(text)["input_ids"][:256]
    _, traces = reference(torch.tensor(ids), return_router=True)
    tls = sum(token_sparsity(t.active) for t in traces) / len(traces)
    cls8 = sum(chunk_sparsity(t.active, 8) for t in traces) / len(traces)
    assert tls > 0.65 and cls8 > 0.5, (tls, cls8)  # a random router gives ~0.5 and ~0.01
    assert abs(tls - card["tls"]) < 0.1


def test_card_figures_are_the_weights_and_the_routing_is_dynamic():
    """Issue 12: the card's held-out figures (eval.json) are what the weights give, recomputed here
    by the reference model on the same held-out split; and they are routing, not pruning:
    every layer has TLS >= 75% and CLS-8 >= 60%, at most 5% of its experts never active and
    at most 10% active on more than 90% of the tokens, and at least 85% of them dynamic."""
    from training.evaluate import evaluate

    with open(os.path.join(MODEL, "eval.json")) as f:
        card = json.load(f)
    got = evaluate(MODEL, seq_len=card["seq_len"], max_windows=card["windows"])
    assert got["corpus_fingerprint"] == card["corpus_fingerprint"]
    assert got["heldout_loss"] == pytest.approx(card["heldout_loss"], rel=1e-4)
    E = card["num_experts"]
    for mine, theirs in zip(got["layers"], card["layers"], strict=True):
        assert mine["tls"] == pytest.approx(theirs["tls"], abs=1e-4)
        assert mine["cls"]["8"] == pytest.approx(theirs["cls"]["8"], abs=1e-4)
        for key in ("dead_experts", "always_on_experts", "dynamic_experts"):
            assert mine[key] == theirs[key], key
        assert mine["tls"] >= 0.75 and mine["cls"]["8"] >= 0.60, mine
        assert mine["dead_experts"] <= 0.05 * E and mine["always_on_experts"] <= 0.10 * E, mine
        assert mine["dynamic_experts"] >= 0.85 * E, mine


@pytest.mark.slow
def test_vllm_serves_the_bundled_model_exactly(engine_factory):
    reference = load_reference(MODEL)
    engine = engine_factory(MODEL, dtype="float32")
    worst, same = compare_to_reference(engine.greedy(PROMPTS, prompt_logprobs=True), reference)
    assert worst <= 1e-3 and all(same)


@pytest.mark.slow
def test_bundled_eagle_head_is_accepted_and_keeps_greedy_outputs(engine_factory, record_figure):
    """The shipped draft head, served through the plugin: greedy text unchanged, drafts mostly accepted
    (68% on held-out prompts per its card; a random head gets ~0%)."""
    from test_spec_decode import _spec_counts

    plain = engine_factory(MODEL, dtype="float32")
    expected = [list(o.outputs[0].token_ids) for o in plain.greedy(PROMPTS, max_tokens=32)]
    plain.close()
    engine = engine_factory(MODEL, dtype="float32", disable_log_stats=False, speculative_config={
        "method": "eagle", "model": EAGLE_HEAD, "num_speculative_tokens": 3})
    got = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, max_tokens=32)]
    drafted, accepted = _spec_counts(engine)
    record_figure("bundled eagle head: accepted/drafted", f"{accepted}/{drafted}")
    assert got == expected
    assert drafted > 0 and accepted / drafted > 0.4, (accepted, drafted)
