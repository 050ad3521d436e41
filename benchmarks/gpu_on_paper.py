"""The GPU path's memory traffic, on paper: derived from the kernels' grids and tiles, not measured.

No GPU is available to this project, so this script answers "what would the Triton kernels
cost on an H100 / H200?" the only way it can be answered here:

1. **Analytic traffic.** For every launch of the sparse path (router logits, router norm,
   segment unions, sparse up, sparse down, and the K-split reduction when ``default_config``
   picks one) and of the dense path (router + ``dense_ffn_torch``: two GEMMs and three
   elementwise kernels), count the global-memory bytes loaded and stored per kernel
   argument, from the grid and tile sizes the code would pick. Programs that exit early
   (padding token blocks, slots past a segment's active count) are counted with the few
   scalar loads they make before returning. Two figures per launch: *requested* (every
   load/store instruction of every program: an upper bound on DRAM traffic, as if L2 never
   hit) and *distinct* (each byte once per launch: the lower bound a perfect L2 would give).
2. **Interpreter confirmation** (:func:`confirm`, used by ``tests/test_gpu_on_paper.py``):
   the same kernels run under the Triton CPU interpreter with ``tl.load`` / ``tl.store``
   intercepted (:func:`interpreter_traffic`), masked-out lanes excluded, and every
   launch's grid and per-argument bytes must equal the analytic model's.
3. **Registers / spills / shared memory**: every kernel is compiled ahead of time for
   sm_80 and sm_90 with Triton's bundled ptxas (no GPU needed) and the cubin is read with
   the bundled ``cuobjdump --dump-resource-usage``.

int8 weight-only experts (``kernels/quant.py``; issue 18): every model above takes ``int8=True``
(int8 weights at 1 byte, their fp32 scales as the kernels load them); the interpreter confirms it
the same way, the register table covers the int8 variants, and :func:`int8_rows` puts the three
paths with int8 experts next to bf16 at the XLarge shapes (the official one and the XLarge-sized
E 48, d_e 149 model of the CPU benchmarks). Dense with int8 weights is costed as dequantize-then-
GEMM (what ``kernels/dispatch.py`` assumes). On paper, not run on a GPU.

Times are bytes / peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s): what the traffic
would cost at full memory bandwidth, nothing more. Launch overhead is an *assumption*
(``--launch-us``, 3 µs per kernel launch by default), reported separately.

    python benchmarks/gpu_on_paper.py                  # markdown tables on stdout (~10 s; benchmarks/RESULTS.md)
    python benchmarks/gpu_on_paper.py --full --json OUT.json   # every swept point
    python benchmarks/gpu_on_paper.py --no-compile --no-confirm  # the traffic tables only

Imports only torch, triton and the repository's ``kernels/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels._triton import cdiv, next_pow2  # noqa: E402
from kernels.segments.triton_segments import num_token_blocks  # noqa: E402

rt = importlib.import_module("kernels.router.triton_router")
sg = importlib.import_module("kernels.segments.triton_segments")
sf = importlib.import_module("kernels.sparse_ffn.triton_sparse_ffn")
em = importlib.import_module("kernels.sparse_ffn.triton_expert_major")

# The official BlockFFN MLA models (SPEC.md §1): name → (H, E, d_e).
SHAPES = {
    "0.1B Small": (768, 48, 64),
    "0.5B Medium": (1280, 40, 128),
    "0.8B Large": (1536, 48, 128),
    "1.2B XLarge": (1792, 56, 128),
}
PEAK_TBPS = {"H100": 3.35, "H200": 4.8}
LAUNCH_US = 3.0  # assumption: fixed cost per kernel launch (eager launch; CUDA graphs cost less)
BF16 = 2
FP32 = 4


# ---------------------------------------------------------------- traffic records
@dataclass
class Launch:
    """Global-memory bytes of one kernel launch, per kernel argument."""

    kernel: str
    grid: tuple[int, int, int]
    loads: dict[str, int] = field(default_factory=dict)  # requested bytes (all programs, all loads)
    stores: dict[str, int] = field(default_factory=dict)
    distinct_loads: dict[str, int] = field(default_factory=dict)  # each byte once
    distinct_stores: dict[str, int] = field(default_factory=dict)
    flops: int = 0  # tensor-core work as tiled (padded rows included); 0 where not modelled
    useful_flops: int = 0  # the active pairs' (or, dense, all pairs') multiply-adds × 2

    def add(self, kind: str, arg: str, requested: int, distinct: int | None = None) -> None:
        req = self.loads if kind == "load" else self.stores
        dis = self.distinct_loads if kind == "load" else self.distinct_stores
        req[arg] = req.get(arg, 0) + int(requested)
        dis[arg] = dis.get(arg, 0) + int(requested if distinct is None else distinct)

    def cleaned(self) -> Launch:
        """The same record without zero entries (so two records compare by what moved)."""

        def nz(d: dict[str, int]) -> dict[str, int]:
            return {k: v for k, v in sorted(d.items()) if v}

        return Launch(
            self.kernel, self.grid, nz(self.loads), nz(self.stores), nz(self.distinct_loads), nz(self.distinct_stores)
        )


def total(launches: Sequence[Launch], distinct: bool = False) -> int:
    """Bytes loaded + stored by ``launches`` (requested, or distinct per launch)."""
    if distinct:
        return sum(sum(x.distinct_loads.values()) + sum(x.distinct_stores.values()) for x in launches)
    return sum(sum(x.loads.values()) + sum(x.stores.values()) for x in launches)


# ---------------------------------------------------------------- analytic model
def router_tiles(T: int, E: int, H: int) -> dict[str, int]:
    """The tile choice of ``router_triton`` (its own ``router_config``), as a dict."""
    return asdict(rt.router_config(T, E, H))


def router_model(T: int, E: int, H: int, w_bytes: int = BF16, norm_w_bytes: int | None = BF16) -> list[Launch]:
    """``router_triton`` in ``rms`` mode (``norm_w_bytes=None``: no norm weight is read)."""
    c = router_tiles(T, E, H)
    logits = Launch("_router_logits_kernel", (c["n_tb"], c["n_eb"], c["split"]))
    # Every (token block, expert block) pair reads its rows of x and its columns of w over all of H.
    logits.add("load", "x_ptr", c["n_eb"] * T * H * w_bytes, T * H * w_bytes)
    logits.add("load", "w_ptr", c["n_tb"] * E * H * w_bytes, E * H * w_bytes)
    logits.add("store", "zp_ptr", c["split"] * T * E * FP32)
    n_prog = cdiv(T, c["BT2"])
    norm = Launch("_router_norm_kernel", (n_prog, 1, 1))
    norm.add("load", "zp_ptr", c["split"] * T * E * FP32)
    if norm_w_bytes:
        norm.add("load", "nw_ptr", n_prog * E * norm_w_bytes, E * norm_w_bytes)
    norm.add("store", "scores_ptr", T * E * FP32)
    norm.add("store", "mask_ptr", T * E)
    return [logits, norm]


def token_blocks(lens: Sequence[int], block_t: int) -> tuple[list[tuple[int, int]], int]:
    """The token-block table: ``[(segment, rows), ...]`` of the real blocks, and its static length NB."""
    blocks = [(s, min(block_t, n - i)) for s, n in enumerate(lens) for i in range(0, n, block_t)]
    return blocks, num_token_blocks(sum(lens), len(lens), block_t)


def segment_union_model(lens: Sequence[int], E: int, block_t: int, act_bytes: int = FP32) -> Launch:
    """``segment_union_triton`` over ``act`` (the fp32 scores, as ``sparse_ffn_triton`` passes them)."""
    S, T = len(lens), sum(lens)
    blocks, NB = token_blocks(lens, block_t)
    L = Launch("_segment_union_kernel", (S, 1, 1))
    # cu[s], cu[s+1], then cu[j] and cu[j+1] for every j < s.
    L.add("load", "cu_ptr", sum(8 + 8 * s for s in range(S)), (S + 1) * 4)
    L.add("load", "act_ptr", T * E * act_bytes)
    L.add("store", "ids_ptr", S * E * 4)
    L.add("store", "counts_ptr", S * 4)
    # Real blocks by their segment, the unused tail by the last segment: every entry once.
    L.add("store", "block_seg_ptr", NB * 4)
    L.add("store", "block_t0_ptr", NB * 4)
    return L


def sparse_up_model(
    lens: Sequence[int], counts: Sequence[int], n_distinct: int, E: int, D: int, H: int, cfg: Any, w_bytes: int = BF16,
    int8: bool = False,
) -> Launch:
    """``_sparse_up_kernel``; ``n_distinct``: experts in the union of all segments' (non-empty) unions.
    ``w_bytes``: activations' (and float weights') element size; ``int8``: int8 weights (1 byte)
    and their fp32 row scales ``s_ptr`` (one BD slice per program)."""
    q = 1 if int8 else w_bytes
    blocks, NB = token_blocks(lens, cfg.block_t)
    n_db = cdiv(D, cfg.up_block_d)
    L = Launch("_sparse_up_kernel", (NB, E * n_db, 1))
    L.add("load", "block_seg_ptr", NB * E * n_db * 4, NB * 4)  # every program, padding ones too
    L.add("load", "counts_ptr", len(blocks) * E * n_db * 4, len(lens) * 4)
    live = [(s, rows) for s, rows in blocks if counts[s] > 0]
    for s, rows in live:
        k = counts[s]  # k · n_db programs get past the count check
        L.add("load", "ids_ptr", k * n_db * 4, 0)
        L.add("load", "block_t0_ptr", k * n_db * 4, 4)
        L.add("load", "x_ptr", k * n_db * rows * H * w_bytes, 0)
        L.add("load", "w_ptr", k * D * H * q, 0)
        if int8:
            L.add("load", "s_ptr", k * D * FP32, 0)
        L.add("load", "r_ptr", k * n_db * rows * FP32, rows * k * FP32)
        L.add("store", "h_ptr", rows * k * D * w_bytes)
    live_segs = {s for s, _ in live}
    L.add("load", "ids_ptr", 0, sum(counts[s] * 4 for s in live_segs))
    L.add("load", "cu_ptr", sum(counts[s] * n_db * 4 for s, _ in live), len(live_segs) * 4)
    L.add("load", "x_ptr", 0, sum(lens[s] for s in live_segs) * H * w_bytes)
    L.add("load", "w_ptr", 0, n_distinct * D * H * q)
    if int8:
        L.add("load", "s_ptr", 0, n_distinct * D * FP32)
    return L


def sparse_down_model(
    lens: Sequence[int],
    counts: Sequence[int],
    n_distinct: int,
    E: int,
    D: int,
    H: int,
    cfg: Any,
    w_bytes: int = BF16,
    out_bytes: int = BF16,
    int8: bool = False,
) -> Launch:
    """``_sparse_down_kernel`` (fp32 partials when ``cfg.split_k`` > 1); ``int8``: int8 weights
    and their fp32 column scales ``s_ptr`` (one BN slice per program and active slot)."""
    q = 1 if int8 else w_bytes
    blocks, NB = token_blocks(lens, cfg.block_t)
    n_nb, split = cdiv(H, cfg.down_block_n), cfg.split_k
    y_bytes = FP32 if split > 1 else out_bytes
    L = Launch("_sparse_down_kernel", (NB, n_nb, split))
    L.add("load", "block_seg_ptr", NB * n_nb * split * 4, NB * 4)
    per_block = len(blocks) * n_nb * split * 4
    L.add("load", "counts_ptr", per_block, len(lens) * 4)
    L.add("load", "block_t0_ptr", per_block, len(blocks) * 4)
    L.add("load", "cu_ptr", per_block, len(lens) * 4)
    for s, rows in blocks:
        k = counts[s]
        L.add("load", "ids_ptr", n_nb * k * 4, 0)
        L.add("load", "h_ptr", n_nb * k * rows * D * w_bytes, 0)
        L.add("load", "w_ptr", k * D * H * q, 0)
        if int8:
            L.add("load", "s_ptr", k * H * FP32, 0)
        L.add("store", "y_ptr", split * rows * H * y_bytes)  # written even when k == 0
    L.add("load", "ids_ptr", 0, sum(counts) * 4)
    L.add("load", "h_ptr", 0, sum(n * k for n, k in zip(lens, counts, strict=True)) * D * w_bytes)
    L.add("load", "w_ptr", 0, n_distinct * D * H * q)
    if int8:
        L.add("load", "s_ptr", 0, n_distinct * H * FP32)
    return L


def reduction_model(T: int, H: int, split: int, out_bytes: int = BF16) -> list[Launch]:
    """``y.sum(dim=0).to(out_dtype)`` after a K-split down projection: two torch kernels."""
    if split <= 1:
        return []
    red = Launch("torch sum (K split)", (0, 0, 0))
    red.add("load", "y_partials", split * T * H * FP32)
    red.add("store", "y_fp32", T * H * FP32)
    cast = Launch("torch cast to bf16", (0, 0, 0))
    cast.add("load", "y_fp32", T * H * FP32)
    cast.add("store", "y", T * H * out_bytes)
    return [red, cast]


def sparse_path_model(
    lens: Sequence[int], unions: Sequence[Sequence[int]], E: int, D: int, H: int, cfg: Any = None, router: bool = True,
    int8: bool = False,
) -> list[Launch]:
    """Every launch of router + ``sparse_ffn_triton`` for segments ``lens`` with active sets ``unions``
    (bf16 activations; bf16 expert weights, or int8 + fp32 scales with ``int8``)."""
    T = sum(lens)
    cfg = cfg or sf.default_config(T, len(lens), E, D, H, w_int8=int8)
    counts = [len(u) for u in unions]
    distinct = len({e for n, u in zip(lens, unions, strict=True) if n for e in u})
    out = router_model(T, E, H) if router else []
    out.append(segment_union_model(lens, E, cfg.block_t))
    out.append(sparse_up_model(lens, counts, distinct, E, D, H, cfg, int8=int8))
    out.append(sparse_down_model(lens, counts, distinct, E, D, H, cfg, int8=int8))
    return out + reduction_model(T, H, cfg.split_k)


def dense_path_model(T: int, E: int, D: int, H: int, router: bool = True, int8: bool = False) -> list[Launch]:
    """Router + ``dense_ffn_torch`` on CUDA: GEMM, SiLU, score cast, score multiply, GEMM (bf16).

    Each GEMM is counted at its ideal traffic (every operand read once, the output written
    once): the best cuBLAS could do, so the dense figures are a lower bound. ``int8``: the
    experts are dequantized to bf16 first (one elementwise launch per projection: int8 weights
    and fp32 scales in, bf16 weights out), as ``kernels/dispatch.py`` costs dense int8; a
    weight-only int8 GEMM would read the int8 bytes once instead (not modelled: none exists here).
    """
    ED = E * D
    out = router_model(T, E, H) if router else []
    if int8:
        for name, n_scales in (("up", ED), ("down", E * H)):
            dq = Launch(f"dequantize w_{name} (int8 → bf16)", (0, 0, 0))
            dq.add("load", f"w_{name}_q", ED * H)
            dq.add("load", f"{name}_scale", n_scales * FP32)
            dq.add("store", f"w_{name}", ED * H * BF16)
            out.append(dq)
    g1 = Launch("GEMM x·W_upᵀ", (0, 0, 0))
    g1.add("load", "x", T * H * BF16)
    g1.add("load", "w_up", ED * H * BF16)
    g1.add("store", "h", T * ED * BF16)
    silu = Launch("SiLU", (0, 0, 0))
    silu.add("load", "h", T * ED * BF16)
    silu.add("store", "h", T * ED * BF16)
    cast = Launch("scores.to(bf16)", (0, 0, 0))
    cast.add("load", "scores", T * E * FP32)
    cast.add("store", "scores_bf16", T * E * BF16)
    mul = Launch("h *= scores", (0, 0, 0))
    mul.add("load", "h", T * ED * BF16)
    mul.add("load", "scores_bf16", T * E * BF16)
    mul.add("store", "h", T * ED * BF16)
    g2 = Launch("GEMM h·W_down", (0, 0, 0))
    g2.add("load", "h", T * ED * BF16)
    g2.add("load", "w_down", ED * H * BF16)
    g2.add("store", "y", T * H * BF16)
    return out + [g1, silu, cast, mul, g2]


# ---------------------------------------------------------------- the sweep
@dataclass
class Row:
    model: str
    tokens_per_segment: int
    segments: int
    idle: float
    active_per_segment: int
    distinct_active: int
    split_k: int
    sparse_bytes: int
    sparse_distinct_bytes: int
    dense_bytes: int
    weight_fraction: float  # of the sparse path's loaded bytes, those of active experts' weights
    weight_fraction_experts: float  # the same without the router (which the dense path reads too)
    launches_sparse: int
    launches_dense: int


def random_unions(E: int, k: int, S: int, seed: int) -> list[list[int]]:
    """S independent random unions of k experts (no preference for popular experts: the least overlap)."""
    rng = random.Random(seed)
    return [sorted(rng.sample(range(E), k)) for _ in range(S)]


def sweep_row(model: str, L: int, S: int, idle: float, seed: int = 0) -> Row:
    """One point: S segments of L tokens, each segment's union leaving ``idle`` of the experts unused."""
    H, E, D = SHAPES[model]
    k = round((1 - idle) * E)
    unions = random_unions(E, k, S, seed)
    lens = [L] * S
    sp = sparse_path_model(lens, unions, E, D, H)
    dn = dense_path_model(L * S, E, D, H)
    loads = sum(sum(x.loads.values()) for x in sp)
    router_loads = sum(sum(x.loads.values()) for x in sp if x.kernel.startswith("_router"))
    weights = sum(x.loads.get("w_ptr", 0) for x in sp if x.kernel in ("_sparse_up_kernel", "_sparse_down_kernel"))
    return Row(
        model, L, S, idle, k, len({e for u in unions for e in u}), sf.default_config(L * S, S, E, D, H).split_k,
        total(sp), total(sp, distinct=True), total(dn), weights / loads, weights / (loads - router_loads),
        len(sp), len(dn),
    )  # fmt: skip


def us(nbytes: int, gpu: str) -> float:
    """Microseconds to move ``nbytes`` at the GPU's peak memory bandwidth."""
    return nbytes / (PEAK_TBPS[gpu] * 1e12) * 1e6


def _us_cell(r: Row, gpu: str) -> str:
    sp = f"{us(r.sparse_distinct_bytes, gpu):.2f}–{us(r.sparse_bytes, gpu):.2f}"
    return f"{sp} / {us(r.dense_bytes, gpu):.2f}"


def traffic_table(rows: Sequence[Row], launch_us: float = LAUNCH_US) -> str:
    """Markdown table of the sweep (sparse µs shown as distinct–requested, i.e. perfect L2 – no L2 reuse)."""
    head = (
        "| model (H, E, d_e) | tok/seg | seg | idle | active/seg (distinct) | K split | sparse MB req (distinct) "
        "| dense MB | ratio req (distinct) | active-weight % of loads (w/o router) | H100 µs sparse / dense "
        "| H200 µs sparse / dense | launches sparse / dense | + launches @ H100 µs sparse / dense |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        H, E, D = SHAPES[r.model]
        lines.append(
            f"| {r.model} ({H}, {E}, {D}) | {r.tokens_per_segment} | {r.segments} | {r.idle:.0%} "
            f"| {r.active_per_segment} ({r.distinct_active}) | {r.split_k} "
            f"| {r.sparse_bytes / 1e6:.3f} ({r.sparse_distinct_bytes / 1e6:.3f}) | {r.dense_bytes / 1e6:.3f} "
            f"| {r.sparse_bytes / r.dense_bytes:.3f} ({r.sparse_distinct_bytes / r.dense_bytes:.3f}) "
            f"| {r.weight_fraction:.1%} ({r.weight_fraction_experts:.1%}) "
            f"| {_us_cell(r, 'H100')} | {_us_cell(r, 'H200')} | {r.launches_sparse} / {r.launches_dense} "
            f"| {us(r.sparse_bytes, 'H100') + launch_us * r.launches_sparse:.1f} / "
            f"{us(r.dense_bytes, 'H100') + launch_us * r.launches_dense:.1f} |"
        )
    return "\n".join(lines)


def _ratio_with(model: str, L: int, S: int, idle: float, **tiles: int) -> float:
    """Requested sparse/dense bytes of one point with some tiles of ``default_config`` replaced."""
    H, E, D = SHAPES[model]
    cfg = sf.SparseFFNConfig(**{**asdict(sf.default_config(L * S, S, E, D, H)), **tiles})
    unions = random_unions(E, round((1 - idle) * E), S, 0)
    return total(sparse_path_model([L] * S, unions, E, D, H, cfg)) / total(dense_path_model(L * S, E, D, H))


def targets(rows: Sequence[Row]) -> list[str]:
    """The design targets checked on the swept rows: one line per model and target."""
    out = []
    for model in SHAPES:
        r8 = [r for r in rows if r.model == model and r.segments == 1 and r.tokens_per_segment == 8 and r.idle == 0.7]
        r1 = [r for r in rows if r.model == model and r.tokens_per_segment == 1 and r.segments == 1]
        H, E, D = SHAPES[model]
        if r8:
            r = r8[0]
            ratio = r.sparse_bytes / r.dense_bytes
            bd_now = sf.default_config(8, 1, E, D, H).up_block_d
            alt = ", ".join(f"up_block_d={bd}: {_ratio_with(model, 8, 1, 0.7, up_block_d=bd):.3f}" for bd in (32, 64))
            out.append(
                f"{model}: 1 seg × 8 tok, 70% idle: sparse/dense = {ratio:.3f} requested, "
                f"{r.sparse_distinct_bytes / r.dense_bytes:.3f} distinct (target ≤ 0.4: "
                f"{'met' if ratio <= 0.4 else 'MISSED'} on requested bytes; up_block_d={bd_now} "
                f"now, with {alt})"
            )
        if r1:
            worst = min(r1, key=lambda r: r.weight_fraction)
            out.append(
                f"{model}: 1 token: active-weight share of loads ≥ {worst.weight_fraction:.1%} "
                f"({worst.weight_fraction_experts:.1%} without the router; worst at {worst.idle:.0%} idle; "
                f"target ≥ 90%: {'met' if worst.weight_fraction >= 0.9 else 'MISSED'})"
            )
    return out


def launch_breakdown(model: str, L: int, S: int, idle: float) -> str:
    """Per-launch table of one point (where the bytes go)."""
    H, E, D = SHAPES[model]
    unions = random_unions(E, round((1 - idle) * E), S, 0)
    lines = ["| launch | grid | loads B (distinct) | stores B |", "|---|---|---|---|"]
    for x in sparse_path_model([L] * S, unions, E, D, H):
        ld, dl, st = sum(x.loads.values()), sum(x.distinct_loads.values()), sum(x.stores.values())
        grid = "×".join(map(str, x.grid)) if any(x.grid) else "torch"
        lines.append(f"| {x.kernel} | {grid} | {ld} ({dl}) | {st} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- interpreter confirmation
@contextlib.contextmanager
def interpreter_traffic() -> Iterator[list[Launch]]:
    """Count the bytes every interpreted launch loads and stores, per kernel argument.

    Wraps the Triton 3.9 interpreter's ``InterpreterBuilder.create_masked_load`` /
    ``create_masked_store`` (every ``tl.load`` / ``tl.store`` ends there; unmasked ones
    with an all-true mask) and ``GridExecutor.__call__`` (one record per launch). Only
    lanes whose mask is true count; addresses are attributed to the tensor argument whose
    memory they fall in. CPU tensors only (the interpreter then works on them in place).
    """
    import numpy as np
    from triton.runtime import interpreter as ti

    records: list[Launch] = []
    state: list[dict[str, Any]] = []
    orig_call = ti.GridExecutor.__call__
    orig_load = ti.InterpreterBuilder.create_masked_load
    orig_store = ti.InterpreterBuilder.create_masked_store

    def note(kind: str, ptrs: Any, mask: Any) -> None:
        if not state:
            return
        st = state[-1]
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        addr = np.asarray(ptrs.data, dtype=np.uint64)[m]
        if addr.size == 0:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        idx = np.searchsorted(st["starts"], addr, side="right") - 1
        ok = (idx >= 0) & (addr < st["ends"][np.clip(idx, 0, None)])
        if not ok.all():
            raise AssertionError(f"{st['name']}: {int((~ok).sum())} accesses outside every tensor argument")
        for i in np.unique(idx):
            st[kind][st["names"][i]].append((addr[idx == i], size))

    def load(self: Any, ptrs: Any, mask: Any, other: Any, cache_policy: Any, is_volatile: Any) -> Any:
        note("load", ptrs, mask)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self: Any, ptrs: Any, value: Any, mask: Any, cache_policy: Any) -> Any:
        note("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, cache_policy)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = list(inspect.signature(self.fn).parameters)
        bound = dict(zip(params, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        spans = sorted(
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
            for name, t in bound.items()
            if isinstance(t, torch.Tensor) and t.numel()
        )
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        st = dict(
            name=self.fn.__name__, grid=grid, names=[s[2] for s in spans],
            starts=np.array([s[0] for s in spans], dtype=np.uint64),
            ends=np.array([s[1] for s in spans], dtype=np.uint64),
            load=defaultdict(list), store=defaultdict(list),
        )  # fmt: skip
        state.append(st)
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state.pop()
            rec = Launch(st["name"], grid)
            for kind in ("load", "store"):
                for name, parts in st[kind].items():
                    size = parts[0][1]
                    allv = np.concatenate([p[0] for p in parts])
                    rec.add(kind, name, allv.size * size, np.unique(allv).size * size)
            records.append(rec)

    ti.GridExecutor.__call__ = call
    ti.InterpreterBuilder.create_masked_load = load
    ti.InterpreterBuilder.create_masked_store = store
    try:
        yield records
    finally:
        ti.GridExecutor.__call__ = orig_call
        ti.InterpreterBuilder.create_masked_load = orig_load
        ti.InterpreterBuilder.create_masked_store = orig_store


# Small cases for the interpreter: (H, E, D, segment lengths, union fraction per segment, config or None).
CONFIRM_CASES: list[tuple[int, int, int, list[int], list[float], Any]] = [
    (96, 12, 32, [1], [0.3], None),  # decode: one token, K split, the padding-free table
    (80, 12, 24, [1, 3, 20], [0.25, 0.0, 0.5], None),  # partial tiles, an empty union, a 2-block segment
    (64, 10, 16, [2, 3], [0.3, 0.6], None),  # a padding token block (-1)
    (136, 8, 40, [4, 4], [0.5, 0.25], "nosplit"),  # no K split: bf16 output straight from the kernel
]


# int8 weight-only experts (kernels/quant.py), same format: the W_INT8 variants of the same kernels.
INT8_CONFIRM_CASES: list[tuple[int, int, int, list[int], list[float], Any]] = [
    (96, 12, 32, [1], [0.3], None),  # decode with a K split
    (80, 12, 24, [1, 3, 20], [0.25, 0.0, 0.5], "nosplit"),  # partial tiles, an empty union, 2 token blocks
]


def run_case(H: int, E: int, D: int, lens: list[int], fracs: list[float], cfg: Any = None, int8: bool = False
             ) -> dict[str, Any]:
    """Run router + ``sparse_ffn_triton`` in the interpreter; return measured and modelled launches
    (bf16; ``int8``: the experts quantized with ``kernels.quant.quantize_experts``)."""
    from kernels.quant import quantize_experts
    from kernels.router.triton_router import router_triton
    from kernels.sparse_ffn.triton_sparse_ffn import SparseFFNConfig, default_config, sparse_ffn_triton
    from kernels.testing import cu_seqlens_of, make_scores, make_weights

    T, S = sum(lens), len(lens)
    scores, unions = make_scores(lens, E, fracs, seed=T * 7 + E)
    if cfg == "nosplit":
        cfg = SparseFFNConfig(**{**asdict(default_config(T, S, E, D, H, w_int8=int8)), "split_k": 1})
    g = torch.Generator().manual_seed(H)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w_r = (torch.randn(E, H, generator=g) / H**0.5).to(torch.bfloat16)
    norm_w = (torch.rand(E, generator=g) + 0.5).to(torch.bfloat16)
    w_up, w_down_t = make_weights(E, D, H, torch.bfloat16, seed=E)
    scales: dict[str, torch.Tensor] = {}
    if int8:
        w_up, scales["up_scale"], w_down_t, scales["down_scale"] = quantize_experts(w_up, w_down_t)
    cu = cu_seqlens_of(lens)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with interpreter_traffic() as measured:
            router_triton(x, w_r, norm_w, "rms")
            sparse_ffn_triton(x, scores, w_up, w_down_t, cu, config=cfg, **scales)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    model = [x for x in sparse_path_model(lens, unions, E, D, H, cfg, int8=int8) if any(x.grid)]  # torch launches aside
    return dict(measured=[m.cleaned() for m in measured], model=[m.cleaned() for m in model], unions=unions)


# Small expert-major cases for the interpreter: (H, E, D, segment lengths, union fractions, chunk tokens or None).
EM_CONFIRM_CASES: list[tuple[int, int, int, list[int], list[float], int | None]] = [
    (96, 12, 32, [1] * 6, [0.3] * 6, None),  # a decode batch: one M block per active expert
    (80, 10, 24, [20, 1, 3], [0.6, 0.2, 0.4], None),  # partial N / K tiles, an expert with 2 row blocks
    (64, 8, 16, [9, 9], [0.5, 0.25], 8),  # 3 chunks of ≤ 8 tokens
]


INT8_EM_CONFIRM_CASES: list[tuple[int, int, int, list[int], list[float], int | None]] = [
    (80, 10, 24, [20, 1, 3], [0.6, 0.2, 0.4], None),  # partial N / K tiles, an expert with 2 row blocks
]


def run_em_case(H: int, E: int, D: int, lens: list[int], fracs: list[float], chunk: int | None = None,
                int8: bool = False) -> dict[str, Any]:
    """``expert_major_ffn_triton`` in the interpreter (bf16): measured vs modelled Triton launches
    (``int8``: int8 experts + scales, vLLM's ``use_int8_w8a16`` GEMMs)."""
    from kernels.quant import quantize_experts
    from kernels.testing import make_scores, make_weights

    T = sum(lens)
    scores, _ = make_scores(lens, E, fracs, seed=T * 5 + E, zero_token_prob=0.1)
    g = torch.Generator().manual_seed(H)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w_up, w_down_t = make_weights(E, D, H, torch.bfloat16, seed=E)
    scales: dict[str, torch.Tensor] = {}
    if int8:
        w_up, scales["up_scale"], w_down_t, scales["down_scale"] = quantize_experts(w_up, w_down_t)
    cfg = em.default_config(T, E, D, H, torch.bfloat16, w_int8=int8)
    if chunk:
        cfg = em.ExpertMajorConfig(**{**asdict(cfg), "chunk_tokens": chunk, "up": cfg.up, "down": cfg.down})
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with interpreter_traffic() as measured:
            em.expert_major_ffn_triton(x, scores, w_up, w_down_t, config=cfg, **scales)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    model = []
    for t0 in range(0, T, cfg.chunk_tokens):
        sc = scores[t0:t0 + cfg.chunk_tokens]
        act = sc > 0
        n_ids = len(set(torch.where(act, torch.arange(E), E).flatten().tolist()))
        model += [y for y in expert_major_model(sc.shape[0], E, D, H, act.sum(0).tolist(), cfg,
                                                active_tokens=int(act.any(1).sum()), distinct_ids=n_ids, int8=int8)
                  if any(y.grid)]
    return dict(measured=[m.cleaned() for m in measured], model=[m.cleaned() for m in model])


def confirm_em(cases: Sequence[tuple] = EM_CONFIRM_CASES, int8: bool = False) -> list[str]:
    """Interpreter counts vs :func:`expert_major_model` (the Triton launches: both fused-MoE GEMMs
    and the weighted sum): the list of disagreements (empty = exact)."""
    problems = []
    for case in cases:
        got = run_em_case(*case, int8=int8)
        meas, model = got["measured"], got["model"]
        if [m.kernel for m in meas] != [re.sub(r" \(.*", "", m.kernel) for m in model]:
            problems.append(f"{case[:4]}: launches {[m.kernel for m in meas]} != {[m.kernel for m in model]}")
            continue
        for m, a in zip(meas, model, strict=True):
            for attr in ("grid", "loads", "stores", "distinct_loads", "distinct_stores"):
                if getattr(m, attr) != getattr(a, attr):
                    problems.append(
                        f"{case[:4]} {a.kernel}.{attr}: measured {getattr(m, attr)} model {getattr(a, attr)}")
    return problems


def confirm(cases: Sequence[tuple] = CONFIRM_CASES, int8: bool = False) -> list[str]:
    """Interpreter counts vs the analytic model on small shapes: the list of disagreements (empty = exact)."""
    problems = []
    for case in cases:
        got = run_case(*case, int8=int8)
        meas, model = got["measured"], got["model"]
        if [m.kernel for m in meas] != [m.kernel for m in model]:
            problems.append(f"{case[:4]}: launches {[m.kernel for m in meas]} != {[m.kernel for m in model]}")
            continue
        for m, a in zip(meas, model, strict=True):
            for attr in ("grid", "loads", "stores", "distinct_loads", "distinct_stores"):
                if getattr(m, attr) != getattr(a, attr):
                    problems.append(
                        f"{case[:4]} {m.kernel}.{attr}: measured {getattr(m, attr)} model {getattr(a, attr)}"
                    )
    return problems


# ---------------------------------------------------------------- registers, spills, shared memory
def compile_kernel(
    lazy: Any, pointer_types: dict[str, str], constexprs: dict[str, Any], arch: int, **options: Any
) -> Any:
    """AOT-compile one of our ``lazy_jit`` kernels for ``sm_<arch>`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(lazy.fn)
    sig = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(kernel: Any) -> dict[str, int]:
    """Registers per thread, spills and shared bytes of an AOT-compiled kernel.

    Without a GPU Triton never loads the cubin, so ``n_regs`` / ``n_spills`` are not set. They
    are read from ``ptxas -v`` on the kernel's PTX, with the ptxas Triton itself compiles that
    target with (``ptxas-blackwell`` for sm_90+): ``spill_stores`` / ``spill_loads`` bytes and
    the ``stack`` frame (where spills live: the cubin's LOCAL field stays 0 for them, so
    ``cuobjdump --dump-resource-usage`` alone misses spills). ``n_spills`` = spill-store bytes / 4
    (words, as Triton's ``n_spills``). Shared bytes: Triton's dynamic + the cubin's static.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    arch = kernel.metadata.target.arch
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
    log = res.stdout + res.stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    r = re.search(r"Used (\d+) registers", log)
    if res.returncode or m is None or r is None:
        raise RuntimeError(f"unexpected ptxas output: {log!r}")
    stack, stores, loads = map(int, m.groups())
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # static shared memory, beside Triton's dynamic
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip
    static = re.search(r"SHARED:(\d+)", dump)
    return dict(n_regs=int(r.group(1)), n_spills=stores // 4, spill_stores=stores, spill_loads=loads, stack=stack,
                shared=kernel.metadata.shared + (int(static.group(1)) if static else 0))


I32 = "*i32"
SEG_PTRS = dict(ids_ptr=I32, counts_ptr=I32, block_seg_ptr=I32, block_t0_ptr=I32, cu_ptr=I32)


def kernel_specs(T: int, S: int, E: int, D: int, H: int, int8: bool = False) -> list[tuple[str, Any, dict, dict, dict]]:
    """(label, kernel, pointer types, constexprs, options) of every launch of one bf16 step, as the code picks them.
    ``int8``: the expert kernels' int8 weight-only variants (labels "sparse up (int8)", ...)."""
    cfg = sf.default_config(T, S, E, D, H, w_int8=int8)
    r = router_tiles(T, E, H)
    e_pad = max(16, next_pow2(E))
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bf = "*bf16"
    # int8: an int8 weight pointer and an fp32 scale pointer; float: no scale pointer (None, a constexpr).
    tag, w, sp, sc = (" (int8)", "*i8", dict(s_ptr="*fp32"), dict(W_INT8=True)) if int8 else \
        ("", bf, {}, dict(s_ptr=None, W_INT8=False))
    return [
        ("router logits", rt._router_logits_kernel, dict(x_ptr=bf, w_ptr=bf, zp_ptr="*fp32"),
         dict(SPLIT=r["split"], BT=r["BT"], BE=r["BE"], BH=r["BH"], DOT_MODE=0), {}),
        ("router norm", rt._router_norm_kernel,
         dict(zp_ptr="*fp32", nw_ptr=bf, scores_ptr="*fp32", mask_ptr="*u8", norm_scale="fp32", eps="fp32"),
         dict(SPLIT=r["split"], MODE=1, HAS_W=True, BT=r["BT2"], E_PAD=e_pad), {}),
        ("segment union", sg._segment_union_kernel, dict(act_ptr="*fp32", **SEG_PTRS),
         dict(BLOCK_T=cfg.block_t, E_PAD=e_pad, S_PAD=max(16, next_pow2(S)), SCAN_T=max(1, min(64, 4096 // e_pad)),
              VEC=sg._VEC), {}),
        ("sparse up" + tag, sf._sparse_up_kernel, dict(x_ptr=bf, r_ptr="*fp32", w_ptr=w, h_ptr=bf, **sp, **SEG_PTRS),
         dict(BT=cfg.block_t, BD=cfg.up_block_d, BH=cfg.up_block_h, DOT_MODE=0, **sc), opts),
        ("sparse down" + tag, sf._sparse_down_kernel,
         dict(h_ptr=bf, w_ptr=w, y_ptr="*fp32" if cfg.split_k > 1 else bf, **sp, **SEG_PTRS),
         dict(SPLIT_K=cfg.split_k, BT=cfg.block_t, BD=cfg.down_block_d, BN=cfg.down_block_n, DOT_MODE=0, **sc), opts),
    ]  # fmt: skip


# (tokens, segments) whose default configs the register table covers: the corners of the sweep.
RESOURCE_POINTS = ((1, 1), (8, 1), (8, 8), (64, 8))
# Step sizes (tokens) whose expert-major default configs the register table covers (one per M bucket).
EM_RESOURCE_TOKENS = (1, 64, 2048)


def expert_major_specs(T: int, E: int, D: int, H: int, int8: bool = False) -> list[tuple[str, Any, dict, dict, dict]]:
    """(label, kernel, pointer types, constexprs, options) of the expert-major launches of one bf16
    step (vLLM's kernels, as ``expert_major_ffn_triton`` launches them with ``default_config``).
    ``int8``: the two GEMMs with int8 weights (``use_int8_w8a16``, per-channel fp32 scales; labels
    "fused-MoE up (int8)", ...); the weighted sum is the same kernel either way."""
    import triton.language as tl

    cfg = em.default_config(T, E, D, H, torch.bfloat16, w_int8=int8)
    bf = "*bf16"
    tag = " (int8)" if int8 else ""
    out = []
    for label, g, top_k in (("fused-MoE up" + tag, cfg.up, E), ("fused-MoE down" + tag, cfg.down, 1)):
        consts = dict(b_bias_ptr=None, a_scale_ptr=None, topk_weights_ptr=None, group_n=0,
                      group_k=0, naive_block_assignment=False, BLOCK_SIZE_M=cfg.block_m, BLOCK_SIZE_N=g.block_n,
                      BLOCK_SIZE_K=g.block_k, GROUP_SIZE_M=g.group_m, SPLIT_K=1, MUL_ROUTED_WEIGHT=False,
                      top_k=top_k, compute_type=tl.bfloat16, use_fp8_w8a8=False, use_int8_w8a8=False,
                      use_int8_w8a16=int8, per_channel_quant=int8, HAS_BIAS=False, SWAP_AB=False, USE_TD=False)
        ptrs = dict(a_ptr=bf, b_ptr="*i8" if int8 else bf, c_ptr=bf, sorted_token_ids_ptr=I32, expert_ids_ptr=I32,
                    num_tokens_post_padded_ptr=I32)
        if int8:
            ptrs["b_scale_ptr"] = "*fp32"
        else:
            consts["b_scale_ptr"] = None
        out.append((label, em.fused_moe_kernel, ptrs, consts, dict(num_warps=g.num_warps, num_stages=g.num_stages)))
    if E <= em.VLLM_SUM_MAX_EXPERTS and not int8:
        out.append(("weighted sum", em.moe_fused_mul_sum_kernel,
                    dict(inputs_ptr=bf, topk_weights_ptr="*fp32", outputs_ptr=bf, top_ids_ptr=I32, expert_map_ptr=I32),
                    dict(num_valid_tokens_ptr=None, has_topk_ids=True, has_expert_map=True, has_num_valid=False,
                         top_k=E, hidden_size=H, BLOCK_K=cfg.sum_block),
                    dict(num_warps=cfg.sum_warps, num_stages=3)))
    return out  # fmt: skip


def resource_rows(points: Sequence[tuple[int, int]] = RESOURCE_POINTS, archs: Sequence[int] = (80, 90),
                  int8: bool = True) -> list[dict]:
    """Compile every kernel at the default configs of the official shapes for ``points`` (T, S); dedupe.
    ``int8``: also the expert kernels' int8 weight-only variants."""
    seen: dict[tuple, dict] = {}
    for arch in archs:
        for H, E, D in SHAPES.values():
            specs = []
            for q in (False, True) if int8 else (False,):
                specs += [spec for T, S in points for spec in kernel_specs(T, S, E, D, H, q)]
                if em.vllm_kernels_available():
                    specs += [spec for T in EM_RESOURCE_TOKENS for spec in expert_major_specs(T, E, D, H, q)]
            for label, lazy, ptrs, consts, opts in specs:
                    key = (arch, label, tuple(sorted(consts.items())), tuple(sorted(opts.items())))
                    if key not in seen:
                        use = resource_usage(compile_kernel(lazy, ptrs, consts, arch, **opts))
                        seen[key] = dict(arch=arch, kernel=label, constexprs=consts, **opts, **use)
    return list(seen.values())


def resource_table(rows: Sequence[dict]) -> str:
    """Markdown table; configs that differ only in their split count share a line (regs as a range)."""
    order = ["router logits", "router norm", "segment union", "sparse up", "sparse down", "sparse up (int8)",
             "sparse down (int8)", "fused-MoE up", "fused-MoE down", "fused-MoE up (int8)", "fused-MoE down (int8)",
             "weighted sum"]
    vllm = [k for k in order if k.startswith(("fused-MoE", "weighted"))]
    shown = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "top_k", "hidden_size", "BLOCK_K")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        rest = tuple((k, v) for k, v in r["constexprs"].items()
                     if k not in ("SPLIT", "SPLIT_K", "DOT_MODE", "s_ptr", "W_INT8")
                     and (r["kernel"] not in vllm or k in shown))
        groups[(r["arch"], order.index(r["kernel"]), rest)].append(r)
    lines = [
        "| arch | kernel | constexprs (split counts) | warps / stages | regs | spill stores B | shared B |",
        "|---|---|---|---|---|---|---|",
    ]
    for (arch, _, rest), rs in sorted(groups.items()):
        splits = sorted({r["constexprs"].get("SPLIT", r["constexprs"].get("SPLIT_K")) for r in rs
                         if r["kernel"] not in vllm} - {None})
        c = ", ".join(f"{k}={v}" for k, v in rest) + (f" (split {', '.join(map(str, splits))})" if splits else "")

        def span(key: str, rs: list[dict] = rs) -> str:
            lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
            return str(lo) if lo == hi else f"{lo}–{hi}"

        ws = f"{rs[0].get('num_warps', 4)} / {rs[0].get('num_stages', 3)}"
        lines.append(
            f"| sm_{arch} | {rs[0]['kernel']} | {c} | {ws} | {span('n_regs')} | {span('spill_stores')} "
            f"| {span('shared')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the three CUDA paths under real load
ROUTING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_on_paper_routing.json")
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "blockffn-tiny-trained")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense tensor-core peak (SXM)
GRAPH_LAUNCH_US = 1.0  # assumption: per launch inside a CUDA graph (the dispatch model's cuda_launch_us)
# (name, segment lengths, key of the routing sample set)
SCENARIOS = [
    ("decode, 8 requests", [1] * 8, "decode8"),
    ("decode, 32 requests", [1] * 32, "decode32"),
    ("decode, 128 requests", [1] * 128, "decode128"),
    ("8 verify chunks of 4", [4] * 8, "verify8x4"),
    ("prefill, 2048 tokens", [2048], "prefill2048"),
]


def measure_routing(path: str = ROUTING_FILE, window: int = 128, samples: int = 200, seed: int = 0,
                    scenario_draws: int = 25) -> dict:
    """The bundled model's routing on its held-out text (needs the repository's environment:
    ``vllm_blockffn.reference``, ``training.data``, ``tokenizers``). Writes ``path``:

    - ``grid["S,L"]``: S independent requests (distinct held-out windows of ``window`` tokens),
      L consecutive tokens each from a random position ≥ 8: mean fraction of the experts in a
      segment's union, in the step's union, and of (token, expert) pairs active — over
      ``samples`` draws and the 4 layers (what ``kernels/dispatch.py``'s routing model is fitted to);
    - ``scenarios[key]``: ``scenario_draws`` draws × 4 layers of each scenario's actual routing
      (prefill: 3 stretches × 4 layers): every segment's active experts and every expert's
      active-pair count (E = 48);
    - ``prefill_2048``: union and pair fractions of 3 stretches of 2048 consecutive tokens.
    """
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tokenizers import Tokenizer

    from training import data as data_mod
    from vllm_blockffn.reference import load_reference

    model = load_reference(BUNDLED_MODEL, torch.float32)
    tok = Tokenizer.from_file(os.path.join(BUNDLED_MODEL, "tokenizer.json"))
    ids, _ = data_mod.encode_stream(tok, data_mod.load_corpus().heldout)
    E = model.spec.num_experts
    n_win = ids.numel() // window

    def active(tokens: torch.Tensor) -> torch.Tensor:  # [layers, T, E] bool
        _, traces = model(tokens, return_router=True)
        return torch.stack([tr.active for tr in traces])

    acts = torch.stack([active(ids[w * window:(w + 1) * window]) for w in range(n_win)])  # [W, layers, window, E]
    rng = random.Random(seed)

    def draw(S: int, L: int) -> torch.Tensor:  # [S, layers, L, E]
        segs = []
        for w in rng.sample(range(n_win), S):
            p = rng.randrange(8, window - L + 1)
            segs.append(acts[w, :, p:p + L])
        return torch.stack(segs)

    grid = {}
    for S in (1, 2, 4, 8, 16, 32, 64, 128):
        for L in (1, 2, 4, 8, 16, 32, 64):
            seg_u = all_u = pairs = 0.0
            for _ in range(samples):
                a = draw(S, L)
                su = a.any(2)
                seg_u += su.float().mean().item()
                all_u += su.any(0).float().mean().item()
                pairs += a.float().mean().item()
            grid[f"{S},{L}"] = dict(segment_union=seg_u / samples, step_union=all_u / samples, pairs=pairs / samples)
    long = [active(ids[k * 2048:(k + 1) * 2048]) for k in range(3)]
    scenarios: dict[str, list] = {}
    for _name, lens, key in SCENARIOS:
        draws = []
        for d in range(len(long) if key == "prefill2048" else scenario_draws):
            a = long[d].unsqueeze(0) if key == "prefill2048" else draw(len(lens), lens[0])  # [S, layers, L, E]
            for layer in range(a.shape[1]):
                la = a[:, layer]  # [S, L, E]
                draws.append(dict(segments=[torch.nonzero(seg.any(0)).flatten().tolist() for seg in la],
                                  pairs=la.sum((0, 1)).tolist()))
        scenarios[key] = draws
    out = dict(model="models/blockffn-tiny-trained", num_experts=E, layers=model.spec.num_hidden_layers,
               heldout_tokens=int(ids.numel()), window=window, samples=samples, seed=seed, grid=grid,
               token_active_fraction=acts[:, :, 8:].float().mean().item(),
               prefill_2048=dict(union=sum(x.any(1).float().mean().item() for x in long) / 3,
                                 pairs=sum(x.float().mean().item() for x in long) / 3),
               scenario_draws=scenario_draws, scenarios=scenarios)  # fmt: skip
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def load_routing(path: str = ROUTING_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


def rescale_routing(draw: dict, E: int, E0: int) -> tuple[list[list[int]], list[int]]:
    """A routing draw of the E0-expert bundled model carried to E experts: expert i of the E
    experts plays expert ⌊i·E0/E⌋ (a union of k of E0 becomes one of ≈ k·E/E0 of E, the pair
    counts follow their experts), so fractions of experts and of pairs are kept."""
    src = [int(i * E0 / E) for i in range(E)]
    segs = [[i for i in range(E) if src[i] in set(seg)] for seg in draw["segments"]]
    return segs, [int(draw["pairs"][src[i]]) for i in range(E)]


def _gemm_flops(rows: int, n: int, k: int) -> int:
    return 2 * rows * n * k


def expert_major_model(
    T: int, E: int, D: int, H: int, pairs_per_expert: Sequence[int], cfg: Any = None, w_bytes: int = BF16,
    active_tokens: int | None = None, distinct_ids: int | None = None, int8: bool = False,
) -> list[Launch]:
    """Every launch of ``expert_major_ffn_triton`` (one chunk; bf16), requested bytes as the code
    reads them (vLLM's kernels: B tiles over all of K for every real row block, an x row per valid
    pair per N tile, h rows per N tile of the down GEMM; early-exit blocks read the padded count),
    distinct = each byte once. FLOPs as tiled (every row of a row block) and useful (active pairs).
    ``active_tokens`` (tokens with an active pair) and ``distinct_ids`` (distinct values in
    ``topk_ids``, the dummy id included) make the distinct x and expert-map bytes exact; by
    default min(T, pairs) and E + 1. ``int8``: int8 weights (1 byte) and vLLM's ``use_int8_w8a16``
    per-channel scales ``b_scale_ptr``: one [BN] fp32 slice per real row block and N tile, loaded
    before the K loop (the N offsets wrap mod N, so every lane is in bounds)."""
    cfg = cfg or em.default_config(T, E, D, H, torch.bfloat16, w_int8=int8)
    q = 1 if int8 else w_bytes
    BM = cfg.block_m
    P = int(sum(pairs_per_expert))
    blocks = [cdiv(p, BM) for p in pairs_per_expert if p]  # real row blocks per active expert
    nb, n_act = sum(blocks), len(blocks)
    EM = em.max_num_tokens_padded(T * E, E + 1, BM)
    n_mb = cdiv(EM, BM)
    out = []
    gt = Launch("scores > 0", (0, 0, 0))
    gt.add("load", "scores", T * E * FP32)
    gt.add("store", "active", T * E)
    wh = Launch("where(active, ids, E)", (0, 0, 0))
    wh.add("load", "active", T * E)
    wh.add("load", "ids", T * E * 4, E * 4)
    wh.add("store", "topk_ids", T * E * 4)
    al = Launch("moe_align_block_size (vLLM CUDA op" + (")" if T * E < 1024 and E < 64 else ", 2 kernels)"), (0, 0, 0))
    al.add("load", "topk_ids", T * E * 4)
    al.add("store", "sorted_token_ids", EM * 4)
    al.add("store", "expert_ids", n_mb * 4)
    al.add("store", "num_tokens_post_padded", 4)
    out += [gt, wh, al]
    if not (T * E < 1024 and E < 64):  # vLLM's op: align, then count-and-sort
        out.append(Launch("moe_align_block_size: sort kernel", (0, 0, 0)))
    gemms = (("fused_moe_kernel (up)", D, H, E, "x"), ("fused_moe_kernel (down)", H, D, 1, "h"))
    for label, N, K, top_k, a_rows in gemms:
        g = cfg.up if top_k == E else cfg.down
        n_nb = cdiv(N, g.block_n)
        L = Launch(label, (n_mb * n_nb, 1, 1))
        L.add("load", "num_tokens_post_padded_ptr", n_mb * n_nb * 4, 4)
        L.add("load", "sorted_token_ids_ptr", nb * n_nb * BM * 4, nb * BM * 4)
        L.add("load", "expert_ids_ptr", nb * n_nb * 4, nb * 4)
        # B: every real block loads its expert's [BN (wrapped mod N), K] tile for each N tile.
        L.add("load", "b_ptr", nb * n_nb * g.block_n * K * q, n_act * N * K * q)
        if int8:
            L.add("load", "b_scale_ptr", nb * n_nb * g.block_n * FP32, n_act * N * FP32)
        if a_rows == "x":  # a valid pair's x row, once per N tile; distinct: the tokens with a pair (≤ T)
            rows = min(T, P) if active_tokens is None else active_tokens
            L.add("load", "a_ptr", P * n_nb * K * w_bytes, rows * K * w_bytes)
        else:
            L.add("load", "a_ptr", P * n_nb * K * w_bytes, P * K * w_bytes)
        L.add("store", "c_ptr", P * N * w_bytes)
        L.flops = _gemm_flops(nb * BM, n_nb * g.block_n, K)
        L.useful_flops = _gemm_flops(P, N, K)
        out.append(L)
        if a_rows == "x":
            silu = Launch("SiLU in place over [T·E, D]", (0, 0, 0))
            silu.add("load", "h", T * E * D * w_bytes)
            silu.add("store", "h", T * E * D * w_bytes)
            out.append(silu)
    vllm_sum = E <= em.VLLM_SUM_MAX_EXPERTS
    ms = Launch("moe_fused_mul_sum_kernel" if vllm_sum else "_pair_sum_kernel", (T, 1, 1))
    ms.add("load", "top_ids_ptr", T * E * 4)
    ms.add("load", "topk_weights_ptr", (T * E if vllm_sum else P) * FP32)
    if vllm_sum:
        ms.add("load", "expert_map_ptr", T * E * 4, (E + 1 if distinct_ids is None else distinct_ids) * 4)
    ms.add("load", "inputs_ptr", P * H * w_bytes)
    ms.add("store", "outputs_ptr", T * H * w_bytes)
    out.append(ms)
    return out


def sparse_path_flops(lens: Sequence[int], unions: Sequence[Sequence[int]], E: int, D: int, H: int,
                      cfg: Any = None) -> tuple[int, int]:
    """(tiled, useful) FLOPs of ``sparse_ffn_triton``: every token of a segment times every expert
    of its union, twice (up and down); tiled: token blocks padded to ``block_t`` rows."""
    T = sum(lens)
    cfg = cfg or sf.default_config(T, len(lens), E, D, H)
    tiled = sum(cdiv(n, cfg.block_t) * cfg.block_t * len(u) for n, u in zip(lens, unions, strict=True) if n)
    useful = sum(n * len(u) for n, u in zip(lens, unions, strict=True))
    return 2 * _gemm_flops(tiled, D, H), 2 * _gemm_flops(useful, D, H)


def launch_us(x: Launch, gpu: str, distinct: bool = False) -> float:
    """One launch at the device's peak: max(bytes / bandwidth, tiled FLOPs / tensor-core peak)."""
    nbytes = total([x], distinct)
    return max(nbytes / (PEAK_TBPS[gpu] * 1e12), x.flops / (PEAK_TFLOPS[gpu] * 1e12)) * 1e6


@dataclass
class PathFigures:
    bytes: float
    distinct_bytes: float
    flops: float  # tiled
    useful_flops: float
    weight_bytes: float  # expert weights requested
    launches: int
    us: dict[str, float]  # per GPU: Σ launches at peak (requested bytes)
    us_distinct: dict[str, float]


WEIGHT_ARGS = ("w_ptr", "b_ptr", "w_up", "w_down", "s_ptr", "b_scale_ptr", "w_up_q", "w_down_q", "up_scale",
               "down_scale")
"""Arguments whose loads are expert weights (int8 scales included)."""


def _figures(launches: Sequence[Launch]) -> PathFigures:
    w = sum(x.loads.get(k, 0) for x in launches for k in WEIGHT_ARGS)
    return PathFigures(
        total(launches), total(launches, True), sum(x.flops for x in launches), sum(x.useful_flops for x in launches),
        w, len(launches), {g: sum(launch_us(x, g) for x in launches) for g in PEAK_TBPS},
        {g: sum(launch_us(x, g, True) for x in launches) for g in PEAK_TBPS},
    )  # fmt: skip


def path_figures(model: str, lens: Sequence[int], segs: Sequence[Sequence[int]], pairs: Sequence[int],
                 int8: bool = False, shape: tuple[int, int, int] | None = None) -> dict[str, PathFigures]:
    """The three paths' figures for one routing draw (experts only: the router is the same for all).
    ``int8``: int8 expert weights + fp32 scales (bf16 activations); ``shape``: (H, E, D) instead
    of ``SHAPES[model]``."""
    H, E, D = shape or SHAPES[model]
    T = sum(lens)
    seg = sparse_path_model(lens, segs, E, D, H, router=False, int8=int8)
    tiled, useful = sparse_path_flops(lens, segs, E, D, H)
    for x in seg:
        if x.kernel in ("_sparse_up_kernel", "_sparse_down_kernel"):
            x.flops, x.useful_flops = tiled // 2, useful // 2
    dense = dense_path_model(T, E, D, H, router=False, int8=int8)
    for x in dense:
        if x.kernel.startswith("GEMM"):
            x.flops = x.useful_flops = _gemm_flops(T, E * D, H)
    chunk = em.chunk_tokens(E, D, H, BF16)
    emm: list[Launch] = []
    for t0 in range(0, T, chunk):  # one chunk at every scenario here (2048 tokens fit)
        n = min(chunk, T - t0)
        emm += expert_major_model(n, E, D, H, [round(p * n / T) for p in pairs], int8=int8)
    return {"segments": _figures(seg), "expert_major": _figures(emm), "dense": _figures(dense)}


def scenario_rows(routing: dict | None = None) -> list[dict]:
    """Per official shape and scenario: the three paths' bytes, FLOPs and µs at H100 / H200 peak,
    averaged over the scenario's routing draws (100: 25 draws × 4 layers of the bundled model;
    prefill: 3 stretches × 4 layers)."""
    from kernels.dispatch import cuda_costs, cuda_path

    routing = routing or load_routing()
    E0 = routing["num_experts"]
    rows = []
    for model, (H, E, D) in SHAPES.items():
        for name, lens, key in SCENARIOS:
            draws = routing["scenarios"][key]
            acc: dict[str, list[PathFigures]] = defaultdict(list)
            unions, seg_sizes, pair_fr = [], [], []
            for d in draws:
                segs, pairs = rescale_routing(d, E, E0)
                for path, fig in path_figures(model, lens, segs, pairs).items():
                    acc[path].append(fig)
                unions.append(len({e for u in segs for e in u}))
                seg_sizes.append(sum(map(len, segs)) / len(segs))
                pair_fr.append(sum(pairs) / (sum(lens) * E))
            mean = {p: PathFigures(*(sum(getattr(f, a) for f in fs) / len(fs) for a in
                                     ("bytes", "distinct_bytes", "flops", "useful_flops", "weight_bytes", "launches")),
                                   {g: sum(f.us[g] for f in fs) / len(fs) for g in PEAK_TBPS},
                                   {g: sum(f.us_distinct[g] for f in fs) / len(fs) for g in PEAK_TBPS})
                    for p, fs in acc.items()}  # fmt: skip
            T, S = sum(lens), len(lens)
            served_S = S + (0 if key == "prefill2048" else 1)  # + the padding segment run_experts appends
            rows.append(dict(
                model=model, scenario=name, T=T, S=S, union=sum(unions) / len(unions),
                segment_union=sum(seg_sizes) / len(seg_sizes), pair_fraction=sum(pair_fr) / len(pair_fr),
                paths={p: asdict(f) for p, f in mean.items()},
                best={g: min(mean, key=lambda p, g=g: mean[p].us[g] + GRAPH_LAUNCH_US * mean[p].launches)
                      for g in PEAK_TBPS},
                best_distinct={g: min(mean, key=lambda p, g=g: mean[p].us_distinct[g] + GRAPH_LAUNCH_US
                                      * mean[p].launches) for g in PEAK_TBPS},
                rule=cuda_path(T, served_S, E, D, H), rule_costs=cuda_costs(T, served_S, E, D, H),
            ))  # fmt: skip
    return rows


def _short(path: str) -> str:
    return {"segments": "seg", "expert_major": "EM", "dense": "dense"}[path]


def scenario_table(rows: Sequence[dict]) -> str:
    head = ("| model | step | union / E (per segment) | active pairs | MB dense / segments / expert-major "
            "| weights MB seg / EM | GFLOP dense / seg / EM (useful EM) | H100 µs dense / seg / EM "
            "| H200 µs dense / seg / EM | launches | best H100 / H200 (perfect L2) | rule |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        H, E, D = SHAPES[r["model"]]
        p = r["paths"]
        d, sg, x = p["dense"], p["segments"], p["expert_major"]

        def t(g: str, f: dict) -> str:
            lo, hi = f["us_distinct"][g], f["us"][g]
            return f"{hi:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}–{hi:.1f}"

        lines.append(
            f"| {r['model']} | {r['scenario']} | {r['union']:.1f} / {E} ({r['segment_union']:.1f}) "
            f"| {r['pair_fraction']:.1%} | {d['bytes'] / 1e6:.1f} / {sg['bytes'] / 1e6:.1f} / {x['bytes'] / 1e6:.1f} "
            f"| {sg['weight_bytes'] / 1e6:.1f} / {x['weight_bytes'] / 1e6:.1f} "
            f"| {d['flops'] / 1e9:.2f} / {sg['flops'] / 1e9:.2f} / {x['flops'] / 1e9:.2f} "
            f"({x['useful_flops'] / 1e9:.2f}) "
            f"| {t('H100', d)} / {t('H100', sg)} / {t('H100', x)} | {t('H200', d)} / {t('H200', sg)} / {t('H200', x)} "
            f"| {d['launches']:.0f} / {sg['launches']:.0f} / {x['launches']:.0f} "
            f"| {_short(r['best']['H100'])} / {_short(r['best']['H200'])} "
            f"({_short(r['best_distinct']['H100'])} / {_short(r['best_distinct']['H200'])}) | {_short(r['rule'])} |"
        )
    return "\n".join(lines)


def issue19_targets(rows: Sequence[dict]) -> list[str]:
    """The issue's two numeric targets, checked on the scenario rows."""
    out = []
    for r in rows:
        H, E, D = SHAPES[r["model"]]
        x = r["paths"]["expert_major"]
        if r["scenario"] == "decode, 8 requests":
            union_bytes = r["union"] * 2 * D * H * BF16
            out.append(f"{r['model']}: 8 decode requests: expert-major weight bytes {x['weight_bytes'] / 1e6:.2f} MB "
                       f"vs the step union once {union_bytes / 1e6:.2f} MB (per-segment: "
                       f"{r['paths']['segments']['weight_bytes'] / 1e6:.2f} MB) — "
                       f"{'met' if x['weight_bytes'] <= union_bytes * 1.0001 else 'MISSED'}")
        if r["scenario"].startswith("prefill"):
            dense = r["paths"]["dense"]["flops"]
            P10 = 0.10 * r["T"] * E
            pairs = [round(P10 / E)] * E  # 10% of the pairs, spread evenly
            at10 = sum(y.flops for y in expert_major_model(r["T"], E, D, H, pairs))
            out.append(f"{r['model']}: 2048-token prefill: expert-major FLOPs / dense = {x['flops'] / dense:.3f} "
                       f"at the bundled model's {r['pair_fraction']:.1%} active pairs, {at10 / dense:.3f} at 10% "
                       f"(target ≤ 0.2: {'met' if at10 <= 0.2 * dense else 'MISSED'})")
    return out


# ---------------------------------------------------------------- int8 weight-only experts
# (H, E, d_e): the XLarge-sized model the CPU benchmarks serve (the bundled model inflated to the
# 1.2B XLarge's expert bytes: E = 48, d_e = 149) and the official 1.2B XLarge.
INT8_SHAPES = {
    "1.2B XLarge-sized (E 48, d_e 149)": (1792, 48, 149),
    "1.2B XLarge": (1792, 56, 128),
}
INT8_SCENARIOS = [("decode, 1 request", [1], "decode8")] + SCENARIOS  # 1 request: each 8-draw's first
CUDA_PATHS = ("dense", "segments", "expert_major")


def int8_rows(routing: dict | None = None, shapes: dict[str, tuple[int, int, int]] | None = None) -> list[dict]:
    """Per shape and scenario: the three paths with bf16 experts and with int8 experts (+ fp32
    scales; bf16 activations either way), on the same routing draws as :func:`scenario_rows`.
    One request: the first segment of each 8-request draw (its pairs are its union)."""
    from kernels.dispatch import cuda_path

    routing = routing or load_routing()
    E0 = routing["num_experts"]
    rows = []
    for model, (H, E, D) in (shapes or INT8_SHAPES).items():
        for name, lens, key in INT8_SCENARIOS:
            acc: dict[tuple[str, bool], list[PathFigures]] = defaultdict(list)
            unions = []
            for d in routing["scenarios"][key]:
                segs, pairs = rescale_routing(d, E, E0)
                if len(lens) < len(segs):
                    segs = segs[:len(lens)]
                    pairs = [int(i in set(segs[0])) for i in range(E)]
                unions.append(len({e for u in segs for e in u}))
                for q in (False, True):
                    for path, fig in path_figures(model, lens, segs, pairs, int8=q, shape=(H, E, D)).items():
                        acc[(path, q)].append(fig)
            mean = {k: {a: sum(getattr(f, a) for f in fs) / len(fs)
                        for a in ("bytes", "distinct_bytes", "weight_bytes", "launches")}
                    | {"us": sum(f.us["H100"] for f in fs) / len(fs),
                       "us_distinct": sum(f.us_distinct["H100"] for f in fs) / len(fs)}
                    for k, fs in acc.items()}  # fmt: skip
            T, S = sum(lens), len(lens)
            served_S = S + (0 if key == "prefill2048" else 1)

            def at_h100(p: str, q: bool, mean: dict = mean) -> float:
                return mean[(p, q)]["us"] + GRAPH_LAUNCH_US * mean[(p, q)]["launches"]

            best = {q: min(CUDA_PATHS, key=lambda p, q=q: at_h100(p, q)) for q in (False, True)}
            rows.append(dict(
                model=model, shape=(H, E, D), scenario=name, T=T, S=S, union=sum(unions) / len(unions),
                bf16={p: mean[(p, False)] for p in CUDA_PATHS}, int8={p: mean[(p, True)] for p in CUDA_PATHS},
                best_bf16=best[False], best_int8=best[True],
                rule_bf16=cuda_path(T, served_S, E, D, H), rule_int8=cuda_path(T, served_S, E, D, H, elt=1),
            ))  # fmt: skip
    return rows


def int8_table(rows: Sequence[dict]) -> str:
    """Markdown: bf16 and int8 experts side by side per path (requested MB, expert-weight MB incl.
    scales, H100 µs at peak bandwidth: distinct–requested), the best path with 1 µs per launch
    and what ``cuda_path`` picks."""
    head = ("| model (H, E, d_e) | step | union / E | MB bf16 → int8: dense / seg / EM | weights MB bf16 → int8: "
            "dense / seg / EM | H100 µs bf16: dense / seg / EM | H100 µs int8: dense / seg / EM "
            "| int8 / bf16 µs of the best path | best bf16 / int8 | rule bf16 / int8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def mb(d: dict, key: str) -> str:
        return " / ".join(f"{d[p][key] / 1e6:.1f}" for p in CUDA_PATHS)

    def t(d: dict) -> str:
        out = []
        for p in CUDA_PATHS:
            lo, hi = f"{d[p]['us_distinct']:.1f}", f"{d[p]['us']:.1f}"
            out.append(hi if lo == hi else f"{lo}–{hi}")
        return " / ".join(out)

    for r in rows:
        H, E, D = r["shape"]
        b, q = r["bf16"], r["int8"]
        tb = b[r["best_bf16"]]["us"] + GRAPH_LAUNCH_US * b[r["best_bf16"]]["launches"]
        tq = q[r["best_int8"]]["us"] + GRAPH_LAUNCH_US * q[r["best_int8"]]["launches"]
        lines.append(
            f"| {r['model']} ({H}, {E}, {D}) | {r['scenario']} | {r['union']:.1f} / {E} "
            f"| {mb(b, 'bytes')} → {mb(q, 'bytes')} | {mb(b, 'weight_bytes')} → {mb(q, 'weight_bytes')} "
            f"| {t(b)} | {t(q)} | {tq / tb:.2f} ({tq:.1f} / {tb:.1f}) "
            f"| {_short(r['best_bf16'])} / {_short(r['best_int8'])} "
            f"| {_short(r['rule_bf16'])} / {_short(r['rule_int8'])} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every point: S ∈ 1,2,4,8 and idle ∈ 70,75,80,85%%")
    p.add_argument("--json", help="write all rows (and resource rows) here")
    p.add_argument("--launch-us", type=float, default=LAUNCH_US, help="assumed cost per kernel launch (µs)")
    p.add_argument("--no-compile", action="store_true", help="skip the sm_80 / sm_90 register table")
    p.add_argument("--no-confirm", action="store_true", help="skip the interpreter confirmation")
    p.add_argument("--measure-routing", action="store_true",
                   help=f"re-measure the bundled model's routing into {os.path.basename(ROUTING_FILE)} (~2 min)")
    a = p.parse_args(argv)
    if a.measure_routing:
        measure_routing()
    segs = (1, 2, 4, 8) if a.full else (1, 8)
    idles = (0.70, 0.75, 0.80, 0.85) if a.full else (0.70, 0.85)
    rows = [sweep_row(m, L, S, i) for m in SHAPES for L in (1, 4, 8) for S in segs for i in idles]
    print("### Traffic per FFN layer step (bf16; router + experts; derived, not measured)\n")
    print(traffic_table(rows, a.launch_us))
    print("\n### Design targets\n")
    print("\n".join(f"- {t}" for t in targets(rows)))
    print("\n### Where the bytes go: 1.2B XLarge, 1 segment × 8 tokens, 70% idle\n")
    print(launch_breakdown("1.2B XLarge", 8, 1, 0.70))
    out: dict[str, Any] = dict(rows=[asdict(r) for r in rows], peak_tbps=PEAK_TBPS, launch_us=a.launch_us)
    if os.path.exists(ROUTING_FILE):
        srows = scenario_rows()
        print("\n### The three CUDA paths under load (experts only; bundled model's routing)\n")
        print(scenario_table(srows))
        print("\n" + "\n".join(f"- {t}" for t in issue19_targets(srows)))
        out["scenarios"] = srows
        qrows = int8_rows()
        print("\n### int8 weight-only experts next to bf16 (on paper, not run on a GPU; experts only)\n")
        print(int8_table(qrows))
        out["int8"] = qrows
    if not a.no_confirm:
        problems = confirm()
        print("\n### Interpreter confirmation\n")
        print(f"{len(CONFIRM_CASES)} cases, {len(problems)} disagreements" + "".join(f"\n- {q}" for q in problems))
        out["confirm_problems"] = problems
        if em.vllm_kernels_available():
            em_problems = confirm_em()
            print(f"\nExpert-major: {len(EM_CONFIRM_CASES)} cases, {len(em_problems)} disagreements"
                  + "".join(f"\n- {q}" for q in em_problems))
            out["confirm_em_problems"] = em_problems
        q_problems = confirm(INT8_CONFIRM_CASES, int8=True)
        if em.vllm_kernels_available():
            q_problems += confirm_em(INT8_EM_CONFIRM_CASES, int8=True)
        n_q = len(INT8_CONFIRM_CASES) + (len(INT8_EM_CONFIRM_CASES) if em.vllm_kernels_available() else 0)
        print(f"\nint8 experts: {n_q} cases, {len(q_problems)} disagreements" + "".join(f"\n- {q}" for q in q_problems))
        out["confirm_int8_problems"] = q_problems
    if not a.no_compile:
        res = resource_rows()
        print("\n### Registers, spills, shared memory (AOT-compiled, ptxas -v)\n")
        print(resource_table(res))
        out["resources"] = res
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
