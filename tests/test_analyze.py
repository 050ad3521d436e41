"""Sparsity metrics (SPEC.md §3) on hand-built masks, and `vllm-blockffn analyze` end to end
on a tiny checkpoint, checked against a direct computation from the reference model's router."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from vllm_blockffn.observe.sparsity import chunk_sparsity, chunk_union_sizes, segment_union_sizes, token_sparsity


def mask(rows: list[set[int]], E: int) -> torch.Tensor:
    out = torch.zeros(len(rows), E, dtype=torch.bool)
    for t, active in enumerate(rows):
        out[t, list(active)] = True
    return out


# t0 {0}, t1 {1}, t2 {0}, t3 {0}, t4 {0,1,2,3}: the last token turns on every expert.
HAND = mask([{0}, {1}, {0}, {0}, {0, 1, 2, 3}], E=4)


def test_token_sparsity_hand_mask():
    m = mask([{0}, {0, 1}, set()], E=4)
    assert token_sparsity(m) == pytest.approx((3 / 4 + 2 / 4 + 4 / 4) / 3)
    # 1 − (1+1+1+1+4)/(5·4)
    assert token_sparsity(HAND) == pytest.approx(1 - 8 / 20)


def test_chunk_sparsity_hand_mask_leaves_out_trailing_chunk():
    # L=2: chunks (t0,t1) ∪ = {0,1} → 1/2, (t2,t3) ∪ = {0} → 3/4; t4 alone is left out.
    assert chunk_sparsity(HAND, 2) == pytest.approx((1 / 2 + 3 / 4) / 2)
    # Counting the partial chunk would give (1/2 + 3/4 + 0) / 3: make sure that is not what we get.
    assert chunk_sparsity(HAND, 2) != pytest.approx((1 / 2 + 3 / 4 + 0) / 3)
    # L=3: only (t0,t1,t2) ∪ = {0,1}; (t3,t4) is partial.
    assert chunk_sparsity(HAND, 3) == pytest.approx(1 / 2)
    # L=5: the whole mask is one chunk, all experts on.
    assert chunk_sparsity(HAND, 5) == 0.0
    assert chunk_union_sizes(HAND, 2).tolist() == [2, 1]
    assert chunk_union_sizes(HAND, 4).tolist() == [2]
    assert chunk_union_sizes(HAND, 6).tolist() == []


def test_chunk_sparsity_without_full_chunk_raises():
    with pytest.raises(ValueError, match="no full chunk of 6 tokens"):
        chunk_sparsity(HAND, 6)
    with pytest.raises(ValueError, match="no tokens"):
        token_sparsity(torch.zeros(0, 4, dtype=torch.bool))


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="boolean"):
        token_sparsity(torch.randn(3, 4))  # router logits, not a mask
    with pytest.raises(ValueError, match="positive int"):
        chunk_sparsity(HAND, 0)
    with pytest.raises(ValueError, match="2-D"):
        token_sparsity(torch.ones(4, dtype=torch.bool))


def test_cls1_equals_tls():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(37, 16, generator=gen) < 0.3
    assert chunk_sparsity(m, 1) == token_sparsity(m)
    assert chunk_sparsity(HAND, 1) == token_sparsity(HAND)


def test_all_and_none_active():
    on, off = torch.ones(8, 6, dtype=torch.bool), torch.zeros(8, 6, dtype=torch.bool)
    for L in (1, 2, 4, 8):
        assert chunk_sparsity(on, L) == 0.0
        assert chunk_sparsity(off, L) == 1.0
    assert token_sparsity(on) == 0.0
    assert token_sparsity(off) == 1.0


def test_cls_never_grows_when_chunks_double():
    """A 2L-chunk's union contains both of its L-chunks' unions."""
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(64, 32, generator=gen) < 0.1
    values = [chunk_sparsity(m, L) for L in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] > values[-1]


def test_segment_union_sizes():
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)  # segments [0,2), [2,2) (empty), [2,5)
    assert segment_union_sizes(HAND, cu).tolist() == [2, 0, 4]
    assert segment_union_sizes(HAND, torch.tensor([0, 4])).tolist() == [2]
    gen = torch.Generator().manual_seed(2)
    m = torch.rand(50, 24, generator=gen) < 0.15
    cu = torch.tensor([0, 1, 7, 20, 20, 33, 50])
    expected = [len({e for t in range(int(a), int(b)) for e in torch.nonzero(m[t]).flatten().tolist()})
                for a, b in zip(cu[:-1], cu[1:], strict=True)]
    assert segment_union_sizes(m, cu).tolist() == expected
    # Equal-length segments are exactly the full chunks.
    assert torch.equal(segment_union_sizes(m, torch.arange(0, 49, 8)), chunk_union_sizes(m, 8))


# ---------------------------------------------------------------------------------------------
# `vllm-blockffn analyze` on a tiny checkpoint

TEXT = (
    "The logging module defines functions and classes which implement a flexible event logging "
    "system for applications and libraries. The key benefit of having the logging API provided by "
    "a standard library module is that all Python modules can participate in logging, so your "
    "application log can include your own messages integrated with messages from third-party "
    "modules. A dataclass is a class which holds data; the decorator adds generated special "
    "methods such as __init__() and __repr__() to user-defined classes. Return the list of items "
    "in the dictionary, sorted by key, and raise KeyError if the key is not found."
)
WINDOW = 10  # short windows: several of them, and chunks of 4 and 8 would straddle their ends
SIZES = [1, 2, 4, 8]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from vllm_blockffn.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vllm_blockffn.tools.tiny import TinyOptions, make_tiny

    return make_tiny(tmp_path_factory.mktemp("analyze-tiny"), TinyOptions())


@pytest.fixture(scope="module")
def analyzed(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze-out")
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    rc, stdout, stderr = run_cli(["analyze", tiny, "--text", str(d / "text.txt"), "--chunk-sizes",
                                  ",".join(map(str, SIZES)), "--window", str(WINDOW),
                                  "--json", str(d / "out.json"), "--plot", str(d / "out.png")])
    assert rc == 0, stderr
    return {"stdout": stdout, "stderr": stderr, "json": json.loads((d / "out.json").read_text()),
            "png": d / "out.png"}


def direct_figures(tiny: str, ids: list[int], bos: int | None, window: int, straddle: bool = False) -> dict:
    """TLS / CLS-L per layer, computed with plain Python sets from the reference model's router."""
    from vllm_blockffn.reference import load_reference

    model = load_reference(tiny)
    E, n_layers = model.spec.num_experts, model.spec.num_hidden_layers
    # active_sets[layer][window] = list of the active expert sets of that window's text tokens
    active_sets: list[list[list[set[int]]]] = [[] for _ in range(n_layers)]
    for start in range(0, len(ids), window):
        piece = ids[start:start + window]
        inputs = torch.tensor(([bos] if bos is not None else []) + piece)
        _, traces = model(inputs, return_router=True)
        skip = 1 if bos is not None else 0
        for layer, trace in enumerate(traces):
            z = trace.logits[skip:]
            assert z.shape == (len(piece), E)
            active_sets[layer].append([{e for e in range(E) if z[t, e] > 0} for t in range(len(piece))])
    layers = []
    for per_window in active_sets:
        seqs = [sum(per_window, [])] if straddle else per_window
        tokens = [s for seq in seqs for s in seq]
        tls = sum(1 - len(s) / E for s in tokens) / len(tokens)
        cls = {}
        for L in SIZES:
            vals = [1 - len(set().union(*seq[i:i + L])) / E
                    for seq in seqs for i in range(0, len(seq) - L + 1, L)]
            cls[str(L)] = sum(vals) / len(vals)
        layers.append({"tls": tls, "cls": cls})
    return {"tls": sum(lay["tls"] for lay in layers) / n_layers,
            "cls": {str(L): sum(lay["cls"][str(L)] for lay in layers) / n_layers for L in SIZES},
            "layers": layers, "tokens": len(ids)}


@pytest.fixture(scope="module")
def token_ids(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny, trust_remote_code=False)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    # The test needs several windows, the last one partial, and windows not a multiple of 4.
    assert len(ids) > 3 * WINDOW and len(ids) % WINDOW != 0 and WINDOW % 4 != 0
    assert tok.bos_token_id is not None
    return ids, tok.bos_token_id


def test_analyze_json_shape(analyzed, tiny):
    from vllm_blockffn.serving.config import BlockFFNSpec

    doc = analyzed["json"]
    spec = BlockFFNSpec.from_pretrained(tiny)
    assert set(doc) == {"tls", "cls", "layers", "tokens", "dead", "always", "dead_experts", "always_experts",
                        "dynamic_experts", "num_experts"}
    assert isinstance(doc["tls"], float) and isinstance(doc["tokens"], int)
    assert list(doc["cls"]) == [str(L) for L in SIZES]
    assert len(doc["layers"]) == spec.num_hidden_layers
    E = spec.num_experts
    assert doc["num_experts"] == E
    for lay in doc["layers"]:
        assert set(lay) == {"tls", "cls", "dead", "always", "dead_experts", "always_experts", "dynamic_experts",
                            "expert_activation_rate"}
        assert list(lay["cls"]) == [str(L) for L in SIZES]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in [lay["tls"], *lay["cls"].values()])
        assert lay["dead_experts"] + lay["always_experts"] + lay["dynamic_experts"] == E
        assert lay["dead"] == lay["dead_experts"] / E and lay["always"] == lay["always_experts"] / E
        assert len(lay["expert_activation_rate"]) == E
        # TLS is the mean of (1 − rate) over experts
        assert lay["tls"] == pytest.approx(1 - sum(lay["expert_activation_rate"]) / E, abs=1e-5)
    n = len(doc["layers"]) * E
    assert doc["dead_experts"] == sum(lay["dead_experts"] for lay in doc["layers"])
    assert doc["dead"] == doc["dead_experts"] / n and doc["always"] == doc["always_experts"] / n
    assert doc["dead_experts"] + doc["always_experts"] + doc["dynamic_experts"] == n
    assert doc["cls"]["1"] == doc["tls"]


def test_analyze_matches_direct_computation(analyzed, tiny, token_ids):
    ids, bos = token_ids
    doc = analyzed["json"]
    want = direct_figures(tiny, ids, bos, WINDOW)
    assert doc["tokens"] == len(ids)
    assert doc["tls"] == pytest.approx(want["tls"], rel=1e-12)
    assert doc["cls"] == pytest.approx(want["cls"], rel=1e-12, abs=1e-12)
    for got, exp in zip(doc["layers"], want["layers"], strict=True):
        assert got["tls"] == pytest.approx(exp["tls"], rel=1e-12)
        assert got["cls"] == pytest.approx(exp["cls"], rel=1e-12, abs=1e-12)
    # The comparison can tell the window rules apart: chunks straddling windows, or no BOS in
    # front of each window, give different figures on this text.
    straddled = direct_figures(tiny, ids, bos, WINDOW, straddle=True)
    assert straddled["cls"]["4"] != pytest.approx(want["cls"]["4"], rel=1e-9)
    no_bos = direct_figures(tiny, ids, None, WINDOW)
    assert no_bos["tls"] != pytest.approx(want["tls"], rel=1e-9)


def test_analyze_table(analyzed):
    doc, lines = analyzed["json"], analyzed["stdout"].splitlines()
    header = next(line for line in lines if line.split()[:2] == ["layer", "TLS"])
    assert header.split()[2:2 + len(SIZES)] == [f"CLS-{L}" for L in SIZES]
    assert header.split()[-3:] == ["dead", ">90%", "dynamic"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and
            (line.split()[0].isdigit() or line.split()[0] == "mean")}
    assert list(rows) == [str(i) for i in range(len(doc["layers"]))] + ["mean"]
    assert rows["mean"] == [f"{100 * doc['tls']:.1f}%", *(f"{100 * doc['cls'][str(L)]:.1f}%" for L in SIZES),
                            str(doc["dead_experts"]), str(doc["always_experts"]), str(doc["dynamic_experts"])]
    for i, lay in enumerate(doc["layers"]):
        assert rows[str(i)][0] == f"{100 * lay['tls']:.1f}%"
        assert rows[str(i)][len(SIZES)] == f"{100 * lay['cls'][str(SIZES[-1])]:.1f}%"
        assert rows[str(i)][-3:] == [str(lay["dead_experts"]), str(lay["always_experts"]),
                                     str(lay["dynamic_experts"])]
    assert f"{doc['tokens']} tokens" in analyzed["stdout"]


def test_analyze_plot_is_a_png(analyzed):
    from matplotlib.image import imread

    png = analyzed["png"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 600 and img.shape[2] in (3, 4)
    # Not a blank canvas: plenty of non-white pixels, and some dark ones (the bold mean line).
    rgb = img[..., :3]
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.01
    assert (rgb.max(axis=-1) < 0.2).sum() > 500


def test_analyze_short_text_reports_missing_chunk_lengths(tiny, tmp_path):
    (tmp_path / "short.txt").write_text("import json", encoding="utf-8")
    rc, stdout, stderr = run_cli(["analyze", tiny, "--text", str(tmp_path / "short.txt"),
                                  "--chunk-sizes", "1,64", "--json", str(tmp_path / "o.json"), "--quiet"])
    assert rc == 0, stderr
    doc = json.loads((tmp_path / "o.json").read_text())
    assert 0 < doc["tokens"] < 64
    assert doc["cls"]["64"] is None and all(lay["cls"]["64"] is None for lay in doc["layers"])
    assert doc["cls"]["1"] == doc["tls"]
    assert "n/a" in stdout and "no full chunk for L = 64" in stderr


def test_analyze_refuses_chunks_longer_than_window(tiny, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    rc, _, stderr = run_cli(["analyze", tiny, "--text", str(tmp_path / "t.txt"), "--chunk-sizes", "1,64",
                             "--window", "32"])
    assert rc == 2
    assert "chunk length 64 is longer than --window 32" in stderr
    rc, _, stderr = run_cli(["analyze", tiny, "--text", str(tmp_path / "missing.txt")])
    assert rc == 2 and "cannot read --text" in stderr


def test_expert_counts_hand_masks():
    """dead = never active, always = active on > 90% of tokens, dynamic = the rest."""
    from vllm_blockffn.observe.analysis import SparsityStats

    stats = SparsityStats(num_layers=1, num_experts=4, chunk_sizes=[1])
    T = 20
    m = torch.zeros(T, 4, dtype=torch.bool)
    m[:19, 1] = True  # 95%: always on
    m[:18, 2] = True  # exactly 90%: still dynamic (the bound is "more than 90%")
    m[7, 3] = True  # one token: dynamic, not dead
    stats.add([m[:10]])
    stats.add([m[10:]])  # counts add up across windows
    lay = stats.result()["layers"][0]
    assert (lay["dead_experts"], lay["always_experts"], lay["dynamic_experts"]) == (1, 1, 2)
    assert lay["dead"] == 0.25 and lay["always"] == 0.25
    assert lay["expert_activation_rate"] == [0.0, 0.95, 0.9, 0.05]


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """The tiny checkpoint with layer 0's expert 0 forced off (router row zero: z = 0 is inactive)
    and expert 1 forced on (every embedding gets a large constant in dimension 0, and the
    router row reads only that dimension, so z > 0 for every token). The other rows leave
    dimension 0 out, so they still route."""
    from safetensors.torch import load_file, save_file

    from vllm_blockffn.tools.tiny import TinyOptions, make_tiny

    path = make_tiny(tmp_path_factory.mktemp("analyze-forced"), TinyOptions())
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    emb = tensors["model.embed_tokens.weight"]
    emb[:, 0] = 50 * emb.abs().max()
    router = tensors["model.layers.0.mlp.router_proj.weight"]
    router[0] = 0.0
    router[1] = 0.0
    router[1, 0] = 1.0
    router[2:, 0] = 0.0  # the other experts ignore dimension 0 and keep routing on the rest
    save_file(tensors, weights)
    return path


def test_analyze_counts_forced_dead_and_always_on_experts(forced, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    rc, stdout, stderr = run_cli(["analyze", forced, "--text", str(tmp_path / "t.txt"), "--window", "64",
                                  "--json", str(tmp_path / "o.json"), "--quiet"])
    assert rc == 0, stderr
    doc = json.loads((tmp_path / "o.json").read_text())
    lay = doc["layers"][0]
    E = doc["num_experts"]
    assert lay["expert_activation_rate"][0] == 0.0 and lay["expert_activation_rate"][1] == 1.0
    assert lay["dead_experts"] >= 1 and lay["always_experts"] >= 1
    # The other experts of the random checkpoint route: about half the tokens each.
    assert lay["dead_experts"] + lay["always_experts"] <= 4 and lay["dynamic_experts"] >= E - 4
    assert doc["dead"] == pytest.approx(doc["dead_experts"] / (len(doc["layers"]) * E))
    row = next(line.split() for line in stdout.splitlines() if line.split()[:1] == ["0"])
    assert row[-3:] == [str(lay["dead_experts"]), str(lay["always_experts"]), str(lay["dynamic_experts"])]
