"""The live sparsity counters (vllm_blockffn.observe.stats) against the reference model's routers."""

from __future__ import annotations

import pytest
import torch

from vllm_blockffn.reference import load_reference


def snapshot(engine):
    def read(model):
        from vllm_blockffn.observe.stats import RECORDER

        return [vars(s) for s in RECORDER.snapshot()]

    return engine.llm.apply_model(read)[0]


def reset(engine):
    def clear(model):
        from vllm_blockffn.observe.stats import RECORDER

        RECORDER.reset()

    engine.llm.apply_model(clear)


@pytest.mark.slow
def test_prefill_and_decode_counters_equal_reference_routers(tiny_factory, engine_factory):
    path = tiny_factory(attention="mla", norm="sum")
    reference = load_reference(path)
    engine = engine_factory(path)
    prompt = "The logging module defines functions and classes for applications."
    reset(engine)
    out = engine.greedy([prompt], max_tokens=6)[0]
    ids = out.prompt_token_ids + list(out.outputs[0].token_ids)
    _, traces = reference(torch.tensor(ids[:-1]), return_router=True)  # the last token is never run
    layers = snapshot(engine)
    assert [row["layer"] for row in layers] == [0, 1]
    n_prompt = len(out.prompt_token_ids)
    for row, trace in zip(layers, traces):
        active = trace.active
        assert row["tokens"] == len(ids) - 1
        assert row["active"] == int(active.sum())
        # one prefill segment, then one single-token segment per decode step
        assert row["segments"] == 1 + 5
        prefill_union = int(active[:n_prompt].any(0).sum())
        assert row["union"] == prefill_union + int(active[n_prompt:].sum())
        assert row["segment_tokens"] == len(ids) - 1


@pytest.mark.slow
def test_counters_can_be_switched_off(tiny_factory, engine_factory, monkeypatch):
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS", "0")
    engine = engine_factory(tiny_factory())
    reset(engine)
    engine.greedy(["Hello there"], max_tokens=3)
    assert all(row["tokens"] == 0 for row in snapshot(engine))


@pytest.mark.slow
def test_a_new_model_in_the_same_process_starts_from_zero(tiny_factory, engine_factory):
    """In-process engines built one after another: the second sees only its own layers."""
    first = engine_factory(tiny_factory(num_layers=3))
    first.greedy(["Hello there"], max_tokens=2)
    assert [row["layer"] for row in snapshot(first)] == [0, 1, 2]
    first.close()
    second = engine_factory(tiny_factory())
    # rows are allocated when the layers are built (never inside a CUDA graph): its own two, at zero
    assert [(row["layer"], row["tokens"]) for row in snapshot(second)] == [(0, 0), (1, 0)]
    second.greedy(["Hello there"], max_tokens=2)
    assert [row["layer"] for row in snapshot(second)] == [0, 1]


@pytest.mark.parametrize("host_path", ["native", "numpy"])
def test_host_counters_equal_the_device_counters(host_path, monkeypatch):
    """The CPU backend's counters (the native kernel's C scan, or numpy without it) against the
    torch ops an accelerator runs, on random masks and segmentations (decode-only, one prefill
    chunk, mixed, padded, empty segments)."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    from vllm_blockffn.observe.stats import NUM_COLUMNS, SparsityRecorder, _add_on_device

    if host_path == "numpy":
        monkeypatch.setattr(cpu_native, "count_native", lambda *args: False)
    else:
        assert cpu_native.native_available(), "the native CPU kernel did not build on this machine"

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        T, E = (int(torch.randint(1, 40, (1,), generator=g)) for _ in range(2))
        scores = torch.relu(torch.randn(T, E, generator=g) - 0.8)
        if trial % 3 == 0:
            cu = list(range(T + 1))
        else:
            start, end = (0, T) if trial % 3 == 1 else (min(1, T - 1), T - 1 if T > 1 else T)
            cuts = torch.randint(start, end + 1, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
            cu = sorted([start, end, *cuts.tolist()])  # repeats: empty segments
        cu = torch.tensor(cu, dtype=torch.int32)
        recorder = SparsityRecorder()
        recorder.record(0, scores, cu, expert_bytes=10)
        device = torch.zeros(NUM_COLUMNS, dtype=torch.int64)
        _add_on_device(device, scores, cu)
        host = vars(recorder.snapshot()[0])
        got = [host[k] for k in ("tokens", "active", "segments", "union", "segment_tokens")]
        assert got == device.tolist(), (trial, cu.tolist())
