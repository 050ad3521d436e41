"""Speculative decoding with a BlockFFN target: ngram, draft_model and EAGLE heads in the official
BlockFFN/FR-Spec format (vllm_blockffn/serving/eagle.py).

Engine tests: greedy output with speculation on equals greedy output with it off, token for
token, for a concurrent batch of prompts of different lengths, with the dense and the sparse
expert backends; where every draft must be right (the target drafting for itself, an oracle
EAGLE head) the acceptance rate must be ~100%.
Fast tests: how a head folder is read (tensor names, FR-Spec vocabularies, config routing) and
the errors for heads that cannot be served.
"""

import json
import os
import pickle

import pytest
import torch
from conftest import PROMPTS, Engine

from vllm_blockffn.tools.tiny import TinyOptions, make_tiny
from vllm_blockffn.tools.tiny_eagle import TinyEagleOptions, make_oracle_head, make_oracle_target, make_tiny_eagle

MAX_TOKENS = 24
SPEC_TOKENS = 3
BACKENDS = ("dense", "sparse")
SMALL = dict(hidden_size=64, num_layers=1, num_experts=8, expert_size=16, seed=1)


def _generate(engine: Engine) -> dict[str, list[list[int]]]:
    out = {}
    for backend in BACKENDS:
        engine.set_backend(backend)
        out[backend] = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, max_tokens=MAX_TOKENS)]
    return out


def _spec_counts(engine: Engine) -> tuple[int, int]:
    """(draft tokens, accepted tokens) so far."""
    values = {m.name: m.value for m in engine.llm.get_metrics()
              if m.name in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")}
    return int(values.get("vllm:spec_decode_num_draft_tokens", 0)), \
        int(values.get("vllm:spec_decode_num_accepted_tokens", 0))


def _baseline(path: str) -> dict[str, list[list[int]]]:
    engine = Engine(path)
    try:
        return _generate(engine)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def target(tiny_factory) -> str:
    return tiny_factory()


@pytest.fixture(scope="module")
def baseline(target) -> dict[str, list[list[int]]]:
    return _baseline(target)


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle-heads")
    return {
        # thunlp/BlockFFN style: no layer-0 input norm, fc with bias, unprefixed names, bare config.
        "eagle": make_tiny_eagle(root / "official", target, TinyEagleOptions(seed=3)),
        # CPM.cu MiniCPM4 style with an FR-Spec vocabulary read as thunlp/BlockFFN reads it
        # (freq_V.pkl), `model.` names, .bin weights, a config copied from the BlockFFN target.
        "eagle_frspec": make_tiny_eagle(root / "frspec", target, TinyEagleOptions(
            seed=4, layer0_input_norm=True, prefix="model.", weight_format="bin", draft_vocab_size=256,
            remap_format="pkl", config_style="target", fc_bias=False)),
    }


def _spec_config(case: str, target: str, small: str, heads: dict[str, str]) -> dict:
    if case == "ngram":
        return {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    if case == "draft_small":
        return {"method": "draft_model", "model": small}
    if case == "draft_self":
        return {"method": "draft_model", "model": target}
    return {"method": "eagle", "model": heads[case]}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ngram", "draft_small", "draft_self", "eagle", "eagle_frspec"])
def test_speculation_keeps_greedy_outputs(case, target, baseline, heads, tiny_factory, engine_factory,
                                          record_figure):
    spec = {**_spec_config(case, target, tiny_factory(**SMALL), heads), "num_speculative_tokens": SPEC_TOKENS}
    engine = engine_factory(target, speculative_config=spec, disable_log_stats=False)
    got = _generate(engine)
    for backend in BACKENDS:
        assert got[backend] == baseline[backend], f"{case}/{backend}: speculation changed the greedy output"
    drafted, accepted = _spec_counts(engine)
    record_figure(f"spec {case}: accepted/drafted", f"{accepted}/{drafted}")
    if case != "ngram":  # a random tiny model rarely repeats itself, so ngram may find nothing to draft
        assert drafted > 0, f"{case}: nothing was drafted"
    if case == "draft_self":
        assert accepted >= 0.95 * drafted, f"target drafting for itself: only {accepted}/{drafted} accepted"


@pytest.fixture(scope="module")
def oracle_target(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("oracle")
    return make_oracle_target(make_tiny(root / "src", TinyOptions(num_layers=1, seed=5)), root / "target")


@pytest.fixture(scope="module")
def oracle_baseline(oracle_target) -> dict[str, list[list[int]]]:
    return _baseline(oracle_target)


ORACLE_HEADS = {
    # thunlp/BlockFFN: no layer-0 input norm, residual scale 1, a config with only the fields its
    # loader reads (no vocab_size, hidden_size, eps), FR-Spec map as a stored tensor that permutes
    # the whole vocabulary (a wrong mapping direction would reject every draft).
    "blockffn": dict(prefix="eagle.", remap_format="tensor", config_style="minimal"),
    # CPM.cu MiniCPM4: layer-0 input norm, residual scale scale_depth / sqrt(L + 1) from a config
    # copied from the target, vLLM-style `model.` names, .bin weights, EAGLE-3 style `d2t`.
    "cpmcu": dict(prefix="model.", layer0_input_norm=True, config_style="target", weight_format="bin",
                  remap_format="d2t", fc_bias=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("style", list(ORACLE_HEADS))
def test_oracle_eagle_head_is_always_accepted(style, oracle_target, oracle_baseline, tmp_path, engine_factory,
                                              record_figure):
    """A rigged target/head pair (tiny_eagle.make_oracle_*) whose drafts are always right: a wrong
    FR-Spec mapping, input scaling, layer-0 norm or residual scale rule, head attention/KV cache
    or position would show as rejected drafts."""
    with open(os.path.join(oracle_target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    head = make_oracle_head(oracle_target, tmp_path / "head", TinyEagleOptions(
        draft_vocab_size=vocab, **ORACLE_HEADS[style]))
    engine = engine_factory(oracle_target, disable_log_stats=False, speculative_config={
        "method": "eagle", "model": head, "num_speculative_tokens": SPEC_TOKENS})
    assert _generate(engine) == oracle_baseline
    drafted, accepted = _spec_counts(engine)
    record_figure(f"spec eagle oracle ({style}): accepted/drafted", f"{accepted}/{drafted}")
    assert drafted > 0 and accepted >= 0.95 * drafted, f"oracle head: only {accepted}/{drafted} accepted"


@pytest.mark.slow
def test_oracle_head_in_bf16_reads_the_target_lm_head(oracle_target, tmp_path, engine_factory, record_figure):
    """bf16, where the target's lm_head may be packed K-major (serving/layers/cpu_linear.py, on the paths of
    THRESHOLDS.cpu_linear_kmajor): the head's FR-Spec logits gather rows of that shared lm_head
    (cpu_linear.row_major_weight); a wrongly unpacked weight would draft wrong tokens and be rejected."""
    from vllm_blockffn.kernels.dispatch import THRESHOLDS
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    from vllm_blockffn.serving.layers.cpu_linear import linear_mode

    with open(os.path.join(oracle_target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    head = make_oracle_head(oracle_target, tmp_path / "head", TinyEagleOptions(
        draft_vocab_size=vocab, **ORACLE_HEADS["blockffn"]))
    engine = engine_factory(oracle_target, dtype="bfloat16", disable_log_stats=False, speculative_config={
        "method": "eagle", "model": head, "num_speculative_tokens": SPEC_TOKENS})
    packed = engine.llm.apply_model(lambda m: bool(getattr(m.lm_head, "blockffn_kmajor", False)))[0]
    assert packed == (cpu_native.native_available() and linear_mode() == "auto"
                      and cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor)
    _generate(engine)
    drafted, accepted = _spec_counts(engine)
    record_figure("spec eagle oracle, bf16: accepted/drafted", f"{accepted}/{drafted}")
    # bf16 rounding flips some of the rig's margins: 176/192 with the lm_head packed and as loaded alike
    # (VLLM_BLOCKFFN_CPU_LINEAR=rowmajor); rows gathered from a wrongly unpacked weight draft noise (~0 accepted)
    assert drafted > 0 and accepted >= 0.85 * drafted, f"oracle head in bf16: only {accepted}/{drafted} accepted"


# ---------------------------------------------------------------------------------------------
# Reading head folders (no engine)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_target(tmp_path_factory) -> str:
    return make_tiny(tmp_path_factory.mktemp("small-target"), TinyOptions(**SMALL))


def _fields(path) -> dict:
    from vllm_blockffn.serving.eagle import head_config_dict

    return head_config_dict(os.fspath(path))


def test_official_layout_is_read(small_target, tmp_path):
    from vllm_blockffn.serving.eagle import ARCHITECTURE

    cfg = _fields(make_tiny_eagle(tmp_path / "h", small_target, TinyEagleOptions(num_layers=2)))
    assert cfg["architectures"] == [ARCHITECTURE]
    assert (cfg["eagle_prefix"], cfg["eagle_fc_bias"], cfg["eagle_layer0_input_norm"]) == ("", True, False)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (64, 2, 128)
    assert cfg["eagle_draft_vocab_size"] is None


def test_minimal_head_config_takes_the_rest_from_the_target(small_target, tmp_path):
    cfg = _fields(make_tiny_eagle(tmp_path / "h", small_target, TinyEagleOptions(config_style="minimal")))
    assert cfg["eagle_vocab_size_unknown"] and cfg["hidden_size"] == 64  # hidden size from fc.weight


@pytest.mark.parametrize("prefix", ["model.", "eagle."])
def test_prefixed_and_vllm_numbered_layers_are_read(small_target, tmp_path, prefix):
    from safetensors.torch import load_file, save_file

    path = make_tiny_eagle(tmp_path / "h", small_target, TinyEagleOptions(prefix=prefix, layer0_input_norm=True))
    # vLLM's EagleMiniCPM numbers head layers after the target's: eagle_layers.{L_target + i}.
    file = os.path.join(path, "model.safetensors")
    tensors = {k.replace(f"{prefix}layers.0.", f"{prefix}eagle_layers.1."): v for k, v in load_file(file).items()}
    save_file(tensors, file)
    cfg = _fields(path)
    assert (cfg["eagle_prefix"], cfg["eagle_layer_offset"], cfg["eagle_layer0_input_norm"]) == (prefix, 1, True)


@pytest.mark.parametrize("fmt", ["pt", "pkl", "tensor", "d2t"])
def test_frspec_vocabulary_sources(small_target, tmp_path, fmt):
    from vllm_blockffn.serving.eagle import read_head_tensor, read_remap_file
    from vllm_blockffn.tools.tiny_eagle import frequency_ranked_ids

    path = make_tiny_eagle(tmp_path / "h", small_target, TinyEagleOptions(draft_vocab_size=100, remap_format=fmt))
    cfg = _fields(path)
    assert cfg["eagle_draft_vocab_size"] == 100
    ids = frequency_ranked_ids(small_target, 100)
    if fmt in ("pt", "pkl"):
        assert cfg["eagle_remap_source"] == f"file:freq_100.{fmt}"
        assert read_remap_file(os.path.join(path, f"freq_100.{fmt}")).tolist() == ids
    else:
        name = "token_id_remap" if fmt == "tensor" else "d2t"
        assert cfg["eagle_remap_source"] == f"tensor:{name}"
        stored = read_head_tensor(path, name).long()
        assert (stored if fmt == "tensor" else stored + torch.arange(100)).tolist() == ids


def test_frspec_vocabulary_choice(small_target, tmp_path, monkeypatch):
    from vllm_blockffn.serving.eagle import VOCAB_ENV, EagleHeadError

    path = make_tiny_eagle(tmp_path / "h", small_target, TinyEagleOptions(draft_vocab_size=100))
    torch.save(list(range(50)), os.path.join(path, "freq_50.pt"))
    with pytest.raises(EagleHeadError, match="several FR-Spec vocabularies"):
        _fields(path)
    monkeypatch.setenv(VOCAB_ENV, "50")
    assert _fields(path)["eagle_draft_vocab_size"] == 50
    monkeypatch.setenv(VOCAB_ENV, "0")  # full vocabulary
    assert _fields(path)["eagle_draft_vocab_size"] is None
    monkeypatch.setenv(VOCAB_ENV, "64")
    with pytest.raises(EagleHeadError, match="no freq_64.pt or freq_64.pkl"):
        _fields(path)
    monkeypatch.delenv(VOCAB_ENV)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "draft_vocab_size": 100}, f)
    assert _fields(path)["eagle_draft_vocab_size"] == 100


def test_pickled_vocabulary_cannot_run_code(tmp_path):
    from vllm_blockffn.serving.eagle import EagleHeadError, read_remap_file

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    file = tmp_path / "freq_4.pkl"
    file.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(EagleHeadError, match="refusing to load"):
        read_remap_file(str(file))
    file.write_bytes(pickle.dumps({7: 10, 3: 5}))  # a frequency dict: its keys, in order
    assert read_remap_file(str(file)).tolist() == [7, 3]


def _edit(path: str, drop: tuple[str, ...] = (), add: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = {k: v for k, v in load_file(file).items() if k not in drop}
    save_file({**tensors, **(add or {})}, file)


@pytest.mark.parametrize("change,message", [
    (dict(add={"fc.weight": torch.zeros(64, 64)}), r"'fc.weight' has shape \[64, 64\]; expected \[H, 2H\]"),
    (dict(drop=("layers.0.mlp.down_proj.weight",)), "head layer 0 lacks 'mlp.down_proj.weight'"),
    (dict(add={"layers.0.mlp.router_proj.weight": torch.zeros(8, 64)}), "not part of a BlockFFN/FR-Spec EAGLE"),
    (dict(add={"layers.2.input_layernorm.weight": torch.ones(64)}), "not consecutive"),
    (dict(add={"token_id_remap": torch.zeros(2, 3, dtype=torch.int32)}), r"expected \[V\]"),
])
def test_bad_heads_are_named(small_target, tmp_path, change, message):
    from vllm_blockffn.serving.eagle import EagleHeadError

    path = make_tiny_eagle(tmp_path / "h", small_target)
    _edit(path, **change)
    with pytest.raises(EagleHeadError, match=message):
        _fields(path)


def test_config_conflicts_are_named(small_target, tmp_path):
    from vllm_blockffn.serving.eagle import EagleHeadError

    path = make_tiny_eagle(tmp_path / "h", small_target)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for field, value, message in (("num_hidden_layers", 40, "num_hidden_layers = 40"),
                                  ("hidden_size", 96, "hidden_size = 96"),
                                  ("num_key_value_heads", 3, "k_proj has")):
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg, field: value}, f)
        with pytest.raises(EagleHeadError, match=message):
            _fields(path)


def test_residual_scale_rules():
    from types import SimpleNamespace as NS

    from vllm_blockffn.serving.eagle import residual_scale

    target = NS(num_hidden_layers=8)
    assert residual_scale(NS(eagle_layer0_input_norm=False, scale_depth=1.4), target) == 1.0  # thunlp/BlockFFN
    assert residual_scale(NS(eagle_layer0_input_norm=True, scale_depth=1.5), target) == pytest.approx(0.5)  # CPM.cu
    assert residual_scale(NS(eagle_layer0_input_norm=True, scale_depth=1.4, mup_denominator=49), target) \
        == pytest.approx(0.2)  # vLLM EagleMiniCPM
    assert residual_scale(NS(eagle_residual_scale=0.7, scale_depth=1.4), target) == 0.7


def test_head_config_is_routed_to_the_eagle_model(target, tmp_path):
    """A head whose config.json is a copy of the BlockFFN target's (ffn_type: block, num_experts)
    must come out as an EAGLE head, not be taken for a BlockFFN model; the target is untouched."""
    from vllm.transformers_utils.config import get_config

    import vllm_blockffn
    from vllm_blockffn.serving.eagle import ARCHITECTURE

    vllm_blockffn.register()
    head = make_tiny_eagle(tmp_path / "h", target, TinyEagleOptions(config_style="target"))
    cfg = get_config(head, trust_remote_code=False)
    assert cfg.architectures == [ARCHITECTURE]
    assert not hasattr(cfg, "num_experts") and not hasattr(cfg, "ffn_type")
    assert get_config(target, trust_remote_code=False).architectures == ["BlockFFNForCausalLM"]


def test_cli_writes_a_head(tmp_path):
    from vllm_blockffn.tools.cli import main

    assert main(["make-tiny", str(tmp_path / "t"), "--hidden-size", "64", "--layers", "1",
                 "--eagle-head", str(tmp_path / "h"), "--eagle-vocab", "32"]) == 0
    cfg = _fields(tmp_path / "h")
    assert (cfg["hidden_size"], cfg["eagle_draft_vocab_size"]) == (64, 32)


def test_engines_can_start_after_an_ngram_engine():
    """vLLM's ngram proposer imports numba/llvmlite, whose library wrapper broke the kernel-override
    scan of every later engine start in the process (patches/triton_kernel_rebind)."""
    import llvmlite.binding.ffi  # noqa: F401
    from vllm.triton_utils import dispatcher

    import vllm_blockffn

    vllm_blockffn.register()
    dispatcher._rebind_kernels([])
