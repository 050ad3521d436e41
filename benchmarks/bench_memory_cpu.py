"""CPU expert kernels against the machine's memory: cold weights, GB/s and % of read bandwidth.

Why this benchmark: a kernel called again and again on one weight set reads from the last-level
cache (260 MB on the Xeon VMs here) and looks faster than memory allows. A forward pass reads each
layer's weights once per step, so here every call runs on a different layer's weights, cycling
through a pool of layers large enough that the calls read 3× the LLC between two calls on a layer
(sized by the bytes the calls read, not the bytes the layers hold: Pool): every weight byte comes
from DRAM, as in decoding.

Rows (official BlockFFN shapes, SPEC.md; fp32 and bf16; 2 threads = what vLLM pins here):
- read bandwidth, measured in the same run: torch.sum over 1 GiB fp32, and the native kernel's
  own streaming loop (blockffn_stream_read) with the same threads; the larger is "read BW";
- the engine's per-layer call (router + experts, the C++ op) issued from Python, and issued from a TorchScript loop
  (no Python between calls: as a served step issues it from the compiled graph's C++ wrapper, cpu_compile.py);
- the calls' read floor, in rounds interleaved with the TorchScript loop's: the same bytes (router, union of
  experts) read by the streaming loop in one parallel region a call, split evenly over the threads
  (`cpu_native.read_floor`): what a call of those bytes costs at least here (the region's fork and join, short
  streams' first misses), so "C++ / floor" is the kernel's own share and the floor's % what memory allows a call;
  and "warm": the first of the calls again and again (its bytes in the caches), what a call costs besides its
  memory — a cold call at floor + warm overlaps none of its work with its reads;
- the native sparse kernel (ISA path named) for 1 token, decode batches of 4 and 8 requests,
  one 4-token verify chunk, two 4-token verify chunks; ~10% of experts active per token, tokens
  of a chunk sharing most of theirs (BlockFFN's chunk sparsity); bytes = the step's union of
  experts (W_up and W_down rows), each read once;
- the dense baselines on all experts: `dense_ffn_gemm` (torch GEMMs) and vLLM's own CPU GEMM path
  (`ops.create_onednn_mm` / `onednn_mm`, what `dispatch_cpu_unquantized_gemm` installs for a
  linear layer: AMX for bf16 where present), and the native kernel with every expert active.

Run: `scripts/dev python benchmarks/bench_memory_cpu.py [--quick] [--out FILE.md]`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.dispatch import THRESHOLDS  # noqa: E402
from kernels.layout import expert_dims, experts_packable, pack_experts_kmajor, pack_kmajor  # noqa: E402
from kernels.quant import float_experts, quantize_experts, quantize_rows  # noqa: E402
from kernels.sparse_ffn import cpu_native  # noqa: E402
from kernels.sparse_ffn.cpu import dense_ffn_gemm  # noqa: E402
from kernels.sparse_ffn.naive import experts_reference  # noqa: E402
from vllm_blockffn.serving import hugepages  # noqa: E402
from vllm_blockffn.serving.layers.cpu_experts import kmajor_paths  # noqa: E402
from vllm_blockffn.serving.layers.cpu_linear import packs_kmajor  # noqa: E402

HUGE_PAGES = True
"""Weights and the bandwidth probe's buffers in 2 MiB pages, as the engine places weights after loading
(vllm_blockffn/serving/hugepages.py); --pages 4k leaves them in 4 KiB pages."""


def placed(t: torch.Tensor) -> torch.Tensor:
    """``t``, in 2 MiB pages when HUGE_PAGES (the engine's placement)."""
    if HUGE_PAGES and hugepages.thp_mode() not in (None, "never"):
        hugepages.advise(t)
    return t

SHAPES = {"Small": (768, 48, 64), "Medium": (1280, 40, 128), "Large": (1536, 48, 128), "XLarge": (1792, 56, 128)}
"""name → (H, E, d_e), SPEC.md."""
SCENARIOS = {"1 tok": [1], "decode x4": [1, 1, 1, 1], "decode x8": [1] * 8, "verify 1x4": [4], "verify 2x4": [4, 4]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
"""Weight dtypes. int8: weight-only with per-output-row scales (kernels/quant.py), x in bf16 (what
vLLM serves a bf16 checkpoint in); its bytes count the scales too."""


def x_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dt == torch.int8 else dt


def expert_bytes(D: int, H: int, dt: torch.dtype) -> int:
    """Bytes of one expert (W_up and W_down rows, plus int8's fp32 scales: D + H per expert)."""
    esz = torch.tensor([], dtype=dt).element_size()
    return 2 * D * H * esz + ((D + H) * 4 if dt == torch.int8 else 0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def llc_bytes() -> int:
    """Last-level cache size (lscpu), 32 MiB if unknown."""
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
        sizes = [int(line.split(":")[1].split()[0]) for line in out.splitlines()
                 if line.startswith(("L3 cache", "L2 cache")) and line.split(":")[1].strip()]
        return max(sizes) if sizes else 32 << 20
    except (OSError, ValueError, subprocess.SubprocessError):
        return 32 << 20


def read_bandwidth(threads: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of a 1 GiB fp32 read: torch.sum (torch's threads) and the native streaming loop."""
    buf = placed(torch.ones(1 << 28))
    out = {}
    for name, fn in {"torch.sum": lambda: buf.sum(),
                     "native stream": lambda: cpu_native.stream_read(buf, threads)}.items():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = buf.numel() * 4 / min(ts) / 1e9
    return out


def routed_scores(lengths: list[int], E: int, rotate: int, seed: int) -> torch.Tensor:
    """~10% of experts per token; the tokens of a segment share most of them (chunk sparsity).
    ``rotate`` shifts every expert id (a different set of experts per cycle over the pool)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(0.1 * E))
    rows = []
    for n in lengths:
        base = torch.randperm(E, generator=g)[:k]
        for _ in range(n):
            s = torch.zeros(E)
            keep = torch.rand(k, generator=g) < 0.85
            s[base[keep]] = 0.2 + torch.rand(int(keep.sum()), generator=g)
            if torch.rand(1, generator=g).item() < 0.3:
                s[torch.randint(E, (1,), generator=g)] = 0.5
            if not (s > 0).any():
                s[base[0]] = 0.5
            rows.append(torch.roll(s, rotate))
    return torch.stack(rows)


READ_SHARE = 0.09
"""The share of a layer's expert bytes a 1-token call reads (its union: ~9% of E, :func:`routed_scores`)."""


class Pool:
    """Layers of expert weights, each call on the next layer: enough layers that the calls read ``min_bytes`` (3× the
    LLC) between two calls on a layer, at the 1-token calls' :data:`READ_SHARE` of each. Why by the bytes read, not
    the bytes held: a call's experts are random, so an expert read one visit ago is read again by ~the union's share
    of the calls; with a pool of 3× the LLC in layers (4 XLarge layers) the 1-token calls read 11 MB between visits
    and part of their bytes came from the LLC (2026-12-06: a plain reader of their bytes at 98–109% of the read
    bandwidth)."""

    def __init__(self, H: int, E: int, D: int, dtype: torch.dtype, min_bytes: int):
        self.H, self.E, self.D, self.dtype = H, E, D, dtype
        layer_bytes = E * expert_bytes(D, H, dtype)
        self.n = max(4, math.ceil(min_bytes / (READ_SHARE * layer_bytes)))
        g = torch.Generator().manual_seed(0)
        w_up = torch.randn(E, D, H, generator=g) / H**0.5
        w_down = torch.randn(E, D, H, generator=g) / D**0.5
        self.rowmajor = self.kmajor = None
        su = sd = None
        if dtype == torch.int8:  # (q_up, q_down, up_scale, down_scale)
            w_up, su, w_down, sd = quantize_experts(w_up, w_down)
        else:
            w_up, w_down = w_up.to(dtype), w_down.to(dtype)
        copy = (lambda s: s.clone()) if su is not None else (lambda s: None)
        self.rowmajor = [(placed(w_up.clone()), placed(w_down.clone()), copy(su), copy(sd)) for _ in range(self.n)]
        self.layers = self.rowmajor
        if experts_packable(w_up, w_down):  # the served layout where the rule packs them (--ab kmajor_experts=1,0)
            pu, pd = pack_experts_kmajor(w_up, w_down)
            self.kmajor = [(placed(pu.clone()), placed(pd.clone()), copy(su), copy(sd)) for _ in range(self.n)]
            if cpu_native.cpu_isa() in kmajor_paths(dtype):
                self.layers = self.kmajor
        self.bytes = self.n * layer_bytes


_STREAM: torch.Tensor | None = None


def probe_bandwidth(threads: int) -> float:
    """Bytes per second of one read of a 512 MiB stream with ``threads`` (the probe beside every timed round)."""
    global _STREAM
    if _STREAM is None:
        _STREAM = placed(torch.ones(1 << 27))
    t0 = time.perf_counter()
    cpu_native.stream_read(_STREAM, threads)
    return _STREAM.numel() * 4 / (time.perf_counter() - t0)


def adjacent(run, calls: int, nbytes: float, threads: int, rounds: int) -> tuple[float, float, float]:
    """Seconds per call of ``run()`` (``calls`` calls reading ``nbytes`` each), the read bandwidth
    measured right before each round (a 512 MiB stream with the same threads), and the median of
    the per-round ratios. Interleaved because this VM's memory bandwidth drifts with its neighbours
    (10-28 GB/s seen within minutes): a ratio to a figure from another minute would mislead."""
    run()  # untimed: the first pass
    secs, bws, ratios = [], [], []
    for _ in range(rounds):
        bw = probe_bandwidth(threads)
        t0 = time.perf_counter()
        run()
        dt = (time.perf_counter() - t0) / calls
        secs.append(dt)
        bws.append(bw / 1e9)
        ratios.append(nbytes / dt / bw)
    return statistics.median(secs), statistics.median(bws), statistics.median(ratios)


def time_calls(pool: Pool, calls: list, fn, nbytes: float, threads: int, rounds: int = 5, layers: list | None = None):
    """:func:`adjacent` over ``calls`` = [(layer, x, scores, cu)], each on its layer's weights (``layers``: the
    pool's served layout, or the row-major copies for the GEMM baselines)."""
    layers = pool.layers if layers is None else layers

    def run():
        for layer, x, s, cu in calls:
            fn(*layers[layer], x, s, cu)

    return adjacent(run, len(calls), nbytes, threads, rounds)


def onednn_dense(pool: Pool):
    """vLLM's CPU GEMM path on every layer's experts (two linears per layer), or None."""
    try:
        from vllm import _custom_ops as ops  # noqa: F401  (loads torch.ops._C)
    except Exception:  # noqa: BLE001
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    handlers = {}
    try:
        for w_up, w_down, _, _ in pool.rowmajor:
            E, D, H = w_up.shape
            handlers[id(w_up)] = (ops.create_onednn_mm(w_up.reshape(E * D, H).t(), 32),
                                  ops.create_onednn_mm(w_down.reshape(E * D, H), 32))
    except RuntimeError:  # bf16 without AVX512_BF16/AMX: oneDNN has no such matmul; vLLM falls back to
        return None       # torch's linear, which the "torch GEMMs" column times

    def run(w_up, w_down, su, sd, x, s, cu):
        E, D, H = w_up.shape
        up, down = handlers[id(w_up)]
        h = torch.nn.functional.silu(ops.onednn_mm(up, x, None))
        h.view(-1, E, D).mul_(s.to(h.dtype).unsqueeze(-1))
        return ops.onednn_mm(down, h, None)

    return run


class EngineCall:
    """The per-layer call a decode step makes in the engine (``torch.ops.blockffn_native.router_experts``,
    C++): the layer's ReLU + RMS-norm router and its sparse experts in one kernel call, no Python between
    them. Each pool layer gets a router ``[I_E | 0]`` (x's dtype), and each call's x carries its designed
    scores in its first E features (active: the score, inactive: -1), so the router turns on exactly the
    experts :func:`routed_scores` chose. Bytes: the union of experts plus the router's E x H weights.
    None-like (``ok`` False) without the C++ build (VLLM_BLOCKFFN_CPU_OPS=python, no compiler)."""

    def __init__(self, pool: Pool, dt: torch.dtype):
        from kernels.sparse_ffn import cpu_ops

        self.ok = cpu_ops.implementation() == "cpp"
        E, _, H = expert_dims(pool.layers[0][0])
        xdt = x_dtype(dt)
        self.router_bytes = E * H * torch.tensor([], dtype=xdt).element_size()
        self.norm = torch.ones(E)
        self.routers, self.row_sums = [], {}
        for _ in pool.layers:
            r = torch.zeros(E, H, dtype=xdt)
            r[:, :E] = torch.eye(E, dtype=xdt)
            self.routers.append(placed(r))
        for layers in (pool.rowmajor, pool.kmajor or []) if dt == torch.int8 else ():  # row sums by their W_up
            for w_up, w_down, _, _ in layers:
                self.row_sums[w_up.data_ptr()] = cpu_native.expert_row_sums(w_up, w_down)

    @staticmethod
    def encode(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x with the scores s [T, E] in its first E features (what the identity router reads back)."""
        x = x.clone()
        x[:, : s.shape[1]] = torch.where(s > 0, s, torch.full_like(s, -1.0)).to(x.dtype)
        return x

    def time(self, pool: Pool, calls: list, seg: torch.Tensor, nbytes: float, threads: int):
        """:func:`adjacent` over ``calls`` = [(layer, x, scores, cu)] through the engine's op."""

        def run():
            for layer, x, _, _ in calls:
                self(layer, pool, x, seg)

        return adjacent(run, len(calls), nbytes, threads, 5)

    def time_cpp(self, pool: Pool, calls: list, seg: torch.Tensor, nbytes: float, threads: int):
        """(:meth:`time` with the calls issued by a TorchScript loop: no Python between them, as a served step issues
        the op from the compiled graph's C++ wrapper (a TorchScript call of an op costs no less than that)), and the
        same for the calls' read floor (:meth:`floor`) and for the first call again and again (its weights then in the
        caches: what the call costs besides waiting for memory), the three in interleaved rounds."""

        def script(calls):
            layers = [pool.layers[layer] for layer, _, _, _ in calls]
            args = ([x for _, x, _, _ in calls], [self.routers[layer] for layer, _, _, _ in calls],
                    [w[0] for w in layers], [w[1] for w in layers], [w[2] for w in layers], [w[3] for w in layers],
                    [self.row_sums.get(w[0].data_ptr()) for w in layers], self.norm, seg)
            return lambda w, i: scripted_calls()(*args)

        floor = self.floor(pool, calls, threads)
        res = interleaved({"C++": ([None], script(calls), nbytes * len(calls)),
                           "floor": ([None], lambda w, i: floor(), nbytes * len(calls)),
                           "warm": ([None], script(calls[:1] * len(calls)), nbytes * len(calls))}, threads)
        return tuple((t / len(calls), bw, r) for t, bw, r in (res["C++"], res["floor"], res["warm"]))

    def floor(self, pool: Pool, calls: list, threads: int):
        """The calls' read floor (``cpu_native.read_floor``): each call's bytes (its router, and its union of experts'
        W_up and W_down, int8's scales) read by the streaming loop in one parallel region, split evenly."""
        ranges = []
        for layer, _, s, _ in calls:
            w_up, w_down, su, sd = pool.layers[layer]
            ts = [self.routers[layer]]
            for e in (s > 0).any(0).nonzero().flatten().tolist():
                ts += [w_up[e], w_down[e], *((su[e], sd[e]) if su is not None else ())]
            ranges.append(ts)
        return cpu_native.read_floor(ranges, threads)

    def __call__(self, layer: int, pool: Pool, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        w_up, w_down, su, sd = pool.layers[layer]
        return torch.ops.blockffn_native.router_experts(
            x, self.routers[layer], self.norm, 1e-6, w_up, w_down, seg, None, su, sd,
            self.row_sums.get(w_up.data_ptr()), "auto", 0, 0, False)


_SCRIPTED = None


def scripted_calls():
    """A TorchScript loop over the engine's op (compiled once; the op must be registered first)."""
    global _SCRIPTED
    if _SCRIPTED is None:

        def calls(xs: list[torch.Tensor], routers: list[torch.Tensor], ups: list[torch.Tensor],
                  downs: list[torch.Tensor], su: list[torch.Tensor | None], sd: list[torch.Tensor | None],
                  rs: list[torch.Tensor | None], norm: torch.Tensor, seg: torch.Tensor) -> list[torch.Tensor]:
            out: list[torch.Tensor] = []  # (kept: a result TorchScript cannot drop)
            for i in range(len(xs)):
                out.append(torch.ops.blockffn_native.router_experts(xs[i], routers[i], norm, 1e-6, ups[i], downs[i],
                                                                    seg, None, su[i], sd[i], rs[i], "auto", 0, 0,
                                                                    False))
            return out

        _SCRIPTED = torch.jit.script(calls)
    return _SCRIPTED


def scenario_calls(pool: Pool, lengths: list[int], cu) -> tuple[list, float]:
    """One scenario's calls over the pool (each call's layer, encoded x and scores, its scores, ``cu``) and their
    mean union bytes: the active experts rotate by ~10% of E each pass over the pool, so a weight byte comes from
    DRAM."""
    H, E, D, dt = pool.H, pool.E, pool.D, pool.dtype
    T = sum(lengths)
    calls, union_bytes = [], 0
    ncalls = max(3 * pool.n, 60)
    for i in range(ncalls):
        s = routed_scores(lengths, E, rotate=(i // pool.n) * max(1, round(0.1 * E)), seed=i % 97)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(i)).to(x_dtype(dt))
        calls.append((i % pool.n, EngineCall.encode(x, s), s, cu))
        union_bytes += int((s > 0).any(0).sum()) * expert_bytes(D, H, dt)
    return calls, union_bytes / ncalls


def kernel_rows(args, threads: int, bw: float) -> list[list[str]]:
    rows = []
    isa = cpu_native.cpu_isa()
    shapes = {"Small": SHAPES["Small"], "XLarge": SHAPES["XLarge"]} if args.quick else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in SHAPES.items() if k in args.shapes}
    for sname, (H, E, D) in shapes.items():
        for dname in args.dtypes:
            dt = DTYPES[dname]
            pool = Pool(H, E, D, dt, 3 * llc_bytes())
            onednn = onednn_dense(pool) if not args.quick and dt != torch.int8 else None
            engine = EngineCall(pool, dt)
            for scen, lengths in SCENARIOS.items():
                T = sum(lengths)
                cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                calls, union_bytes = scenario_calls(pool, lengths, cu)
                # correctness on one call before timing
                w_up, w_down, su, sd = pool.layers[0]
                _, x, s, _ = calls[0]
                y = cpu_native.sparse_ffn_native(x, s, w_up, w_down, cu, num_threads=threads, up_scale=su,
                                                 down_scale=sd)
                ref_up, ref_down = (w.float() for w in float_experts(w_up, su, w_down, sd, torch.float32))
                ref = experts_reference(x.float(), s, ref_up, ref_down.transpose(1, 2), "block")
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert err < (3e-2 if x.dtype == torch.bfloat16 else 1e-4), (sname, dname, scen, err)
                wrapped, bw_w, r_w = time_calls(
                    pool, calls, lambda wu, wd, su, sd, x, s, cu: cpu_native.sparse_ffn_native(
                        x, s, wu, wd, cu, num_threads=threads, up_scale=su, down_scale=sd), union_bytes, threads)
                if engine.ok:  # the engine's call: router + experts in C++, its bytes include the router's
                    seg = torch.tensor([T, len(lengths), *cu.tolist()], dtype=torch.int32)
                    ye = engine(0, pool, x, seg)
                    assert ye.shape == y.shape and bool(torch.isfinite(ye.float()).all()), (sname, dname, scen)
                    step_bytes = union_bytes + engine.router_bytes
                    sparse, bw_s, r_s = engine.time(pool, calls, seg, step_bytes, threads)
                    (cpp, _, r_c), (flo, _, r_f), (warm, _, _) = engine.time_cpp(pool, calls, seg, step_bytes,
                                                                                  threads)
                else:
                    sparse, bw_s, r_s, step_bytes = wrapped, bw_w, r_w, union_bytes
                    cpp = r_c = flo = r_f = warm = float("nan")
                dense_bytes = E * expert_bytes(D, H, dt)
                few = calls[: pool.n]
                dense, _, r_d = (time_calls(pool, few, lambda wu, wd, su, sd, x, s, cu: dense_ffn_gemm(x, s, wu, wd),
                                            dense_bytes, threads, 3, pool.rowmajor) if dt != torch.int8
                                 else (float("nan"),) * 3)
                allk, _, r_a = time_calls(pool, few, lambda wu, wd, su, sd, x, s, cu: cpu_native.sparse_ffn_native(
                    x, s, wu, wd, cu, num_threads=threads, all_experts=True, up_scale=su, down_scale=sd),
                    dense_bytes, threads, 3)
                odn, _, r_o = (time_calls(pool, few, onednn, dense_bytes, threads, 3, pool.rowmajor) if onednn
                               else (float("nan"),) * 3)
                rows.append([
                    sname, dname, scen, f"{union_bytes / dense_bytes:.0%}", f"{step_bytes / 1e6:.2f}",
                    f"{bw_s:.1f}", f"{sparse * 1e6:.0f}", f"{step_bytes / sparse / 1e9:.1f}", f"**{r_s:.0%}**",
                    f"{cpp * 1e6:.0f}", f"**{r_c:.0%}**", f"{flo * 1e6:.0f}", f"{r_f:.0%}", f"{cpp / flo:.2f}",
                    f"{warm * 1e6:.0f}",
                    f"{step_bytes / (bw_s * 1e9) * 1e6:.0f}",
                    f"{wrapped * 1e6:.0f}", f"{r_w:.0%}",
                    *((f"{dense * 1e6:.0f}", f"{r_d:.0%}") if dt != torch.int8 else ("-", "-")),
                    f"{odn * 1e6:.0f}" if onednn else "-", f"{r_o:.0%}" if onednn else "-",
                    f"{allk * 1e6:.0f}", f"**{r_a:.0%}**", isa,
                ])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
            del pool, engine, onednn  # (the oneDNN handles hold packed copies of the pool's weights)
    return rows


AB_SWITCHES = ("split_tokens", "prefetch", "kmajor_prefetch", "group_major", "pairdown", "unit_floor", "kmajor_experts",
               "expert_flags", "int8_experts_l2", "kmajor_ahead", "work_stealing")
"""The kernel's switches ``--ab`` compares (``cpu_native.set_<name>``; ``kmajor_experts``: int8 experts packed
K-major, 1, or as loaded, 0 — the pool's two copies; bf16 and int8)."""


def ab_switch(text: str) -> tuple[str, int, int]:
    """``--ab SWITCH=A,B`` → (switch, A, B)."""
    name, _, vals = text.partition("=")
    try:
        a, b = (int(v) for v in vals.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SWITCH=A,B with integers A and B") from None
    if name not in AB_SWITCHES:
        raise argparse.ArgumentTypeError(f"{text!r}: the switch must be one of {', '.join(AB_SWITCHES)}")
    return name, a, b


def ab_rows(args) -> list[list[str]]:
    """Engine calls (cold, as kernel_rows) with one of the kernel's switches at two values, ``--ab NAME=A,B``, in
    alternate rounds of all the calls, either one first as often: ``A / B`` (> 1: B faster) is the median of the
    pairs' ratios, each pair seconds apart (this VM's bandwidth and compute drift within minutes). The switch is left
    at A (give the default as A)."""
    name, a, b = args.ab
    rows = []
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or k in args.shapes}
    for sname, (H, E, D) in shapes.items():
        for dname in args.dtypes:
            dt = DTYPES[dname]
            pool = Pool(H, E, D, dt, 3 * llc_bytes())
            engine = EngineCall(pool, dt)
            if not engine.ok:
                return rows
            if name == "kmajor_experts":
                if pool.kmajor is None:
                    continue

                def setter(v, pool=pool):
                    pool.layers = pool.kmajor if v else pool.rowmajor
            else:
                setter = getattr(cpu_native, f"set_{name}")
            for scen, lengths in SCENARIOS.items():
                T = sum(lengths)
                cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
                seg = torch.tensor([T, len(lengths), *cu], dtype=torch.int32)
                calls, union_bytes = scenario_calls(pool, lengths, None)
                step_bytes = union_bytes + engine.router_bytes
                res = {a: [], b: []}
                try:
                    for r in range(4):
                        for v in ((a, b) if r % 2 == 0 else (b, a)):  # either order first, as often
                            setter(v)
                            res[v].append(engine.time(pool, calls, seg, step_bytes, args.threads))
                finally:
                    setter(a)
                ratio = statistics.median(y[0] / x[0] for x, y in zip(res[b], res[a]))
                ta, tb = (statistics.median(r[0] for r in res[k]) for k in (a, b))
                pa, pb = (statistics.median(r[2] for r in res[k]) for k in (a, b))
                bw = statistics.median(r[1] for k in res for r in res[k])
                rows.append([sname, dname, scen, f"{union_bytes / (E * expert_bytes(D, H, dt)):.0%}",
                             f"{step_bytes / 1e6:.2f}", f"{bw:.1f}", f"{ta * 1e6:.0f}", f"{pa:.0%}", f"{tb * 1e6:.0f}",
                             f"{pb:.0%}", f"**{ratio:.3f}×**", cpu_native.cpu_isa()])
                print(" | ".join(rows[-1]), flush=True)
            del pool, engine
    return rows


LINEARS = {"XLarge qkv": (1792 * 3, 1792), "XLarge o_proj": (1792, 1792), "lm_head 32k": (32000, 1792)}
"""name → (N, K) of decode-size linears (vanilla attention of an XLarge-sized model; a 32k-vocab head)."""


def linear_rows(args, threads: int) -> list[list[str]]:
    """Streaming linear vs vLLM's oneDNN handler vs F.linear, cold weights, M = 1, 4, 8, timed in interleaved
    rounds, each % against the read bandwidth probed right before it (:func:`interleaved`).

    int8 rows: our weight-only int8 (x bf16, per-row scales) against vLLM's own CPU int8 GEMM
    (`create_onednn_scaled_mm` + dynamic per-token int8 activations: what its W8A8 linear method
    runs), the fastest int8 linear a vLLM CPU user has."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001
        ops = None
    rows = []
    for name, (N, K) in LINEARS.items():
        for dname in args.dtypes:
            dt = DTYPES[dname]
            xdt = x_dtype(dt)
            b, n = linear_pool(N, K, dt)
            w0 = torch.randn(N, K) / K**0.5
            if dt == torch.int8:
                q0, s0 = quantize_rows(w0)
                ws, scales = [placed(q0.clone()) for _ in range(n)], [s0.clone() for _ in range(n)]
                w_ref = q0.float() * s0[:, None]
            else:
                w0 = w0.to(dt)
                ws, scales, w_ref = [placed(w0.clone()) for _ in range(n)], [None] * n, w0.float()
            # weights the served model packs K-major (fp32, bf16: serving/layers/cpu_linear.py, int8: quantization.py):
            # the same pool packed, int8 with the row-major weight's row sums
            packed = [placed(pack_kmajor(w)) for w in ws] if packs_kmajor(ws[0]) else None
            sums = cpu_native.int8_row_sums(ws[0]) if dt == torch.int8 else None
            handlers = None
            if ops is not None and getattr(ops, "_supports_onednn", False):
                try:
                    if dt == torch.int8:
                        handlers = [ops.create_onednn_scaled_mm(w.t(), sc.view(1, -1), xdt, True, False, 32)
                                    for w, sc in zip(ws, scales)]
                    else:
                        handlers = [ops.create_onednn_mm(w.t(), 32) for w in ws]
                except RuntimeError:  # as vLLM (dispatch_cpu_unquantized_gemm): torch's linear instead
                    handlers = "torch" if dt != torch.int8 else None

            def vllm_mm(w, i, x, dt=dt, handlers=handlers, N=N):
                if handlers == "torch":
                    return torch.nn.functional.linear(x, w)
                if dt != torch.int8:
                    return ops.onednn_mm(handlers[i], x, None)
                x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
                out = torch.empty((x.shape[0], N), dtype=x.dtype)
                return ops.onednn_scaled_mm(handlers[i], x_q, out, x_s, None, None, None)

            for M in (1, 4, 8):
                x = torch.randn(M, K).to(xdt)
                ref = x.float() @ w_ref.t()
                got = cpu_native.linear_native(x, ws[0], num_threads=threads, weight_scale=scales[0]).float()
                assert ((got - ref).norm() / ref.norm()).item() < (2e-2 if xdt == torch.bfloat16 else 1e-5)
                if handlers:
                    got = vllm_mm(ws[0], 0, x).float()
                    assert ((got - ref).norm() / ref.norm()).item() < 5e-2, (name, dname, "vllm")

                runs = {"row-major": (ws, lambda w, i, x=x, sc=scales: cpu_native.linear_native(
                    x, w, num_threads=threads, weight_scale=sc[i]), b)}
                if packed:  # what the served model runs here: the K-major kernel; the row-dot one beside it
                    got = cpu_native.linear_kmajor_native(x, packed[0], num_threads=threads, weight_scale=scales[0],
                                                          row_sums=sums).float()
                    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
                    runs["K-major"] = (packed, lambda p, i, x=x, sc=scales, rs=sums: cpu_native.linear_kmajor_native(
                        x, p, num_threads=threads, weight_scale=sc[i], row_sums=rs), b)
                if handlers:
                    runs["oneDNN"] = (ws, lambda w, i, x=x: vllm_mm(w, i, x), b)
                if dt != torch.int8:
                    runs["F.linear"] = (ws, lambda w, i, x=x: torch.nn.functional.linear(x, w), b)
                res = interleaved(runs, threads)
                nan = (float("nan"),) * 3
                served = res["K-major" if packed else "row-major"]
                t_o, t_t = res.get("oneDNN", nan), res.get("F.linear", nan)
                g = lambda t, b=b: b / t / 1e9  # noqa: E731
                rows.append([name, dname, str(M), f"{b / 1e6:.1f}", "K-major" if packed else "row-major",
                             f"{statistics.median(r[1] for r in res.values()):.1f}",
                             f"{served[0] * 1e6:.0f}", f"{g(served[0]):.1f}", f"{served[2]:.0%}",
                             f"{res['row-major'][0] * 1e6:.0f} ({res['row-major'][2]:.0%})" if packed else "—",
                             f"{t_o[0] * 1e6:.0f}", f"{g(t_o[0]):.1f}", f"{t_o[2]:.0%}",
                             f"{t_t[0] * 1e6:.0f}", f"{g(t_t[0]):.1f}", cpu_native.cpu_isa()])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def linear_pool(N: int, K: int, dt: torch.dtype) -> tuple[int, int]:
    """A linear's bytes per call (int8: its fp32 row scales too) and how many copies the cold rows cycle through
    (≥ 3× the LLC)."""
    b = N * K * torch.tensor([], dtype=dt).element_size() + (N * 4 if dt == torch.int8 else 0)
    return b, max(4, math.ceil(3 * llc_bytes() / b))


def ab_linear_rows(args) -> list[list[str]]:
    """The served K-major linears (cold, as :func:`linear_rows`) with a kernel switch at A and B (``--ab`` with
    ``--linears-only``): both runs in every round of :func:`interleaved`, each setting the switch before its pass
    over the weights; ``A / B`` (> 1: B faster) of the medians. Rows only where the served layout is K-major."""
    name, a, b = args.ab
    setter = getattr(cpu_native, f"set_{name}")
    rows = []
    for lname, (N, K) in LINEARS.items():
        for dname in args.dtypes:
            dt = DTYPES[dname]
            if not packs_kmajor(torch.empty(N, K, dtype=dt)):  # the served rule (cpu_linear.py), fp32 included
                continue
            w0 = torch.randn(N, K) / K**0.5
            sc = sums = None
            if dt == torch.int8:
                w0, sc = quantize_rows(w0)
                sums = cpu_native.int8_row_sums(w0)
            else:
                w0 = w0.to(dt)
            nbytes, copies = linear_pool(N, K, dt)
            packed = [placed(pack_kmajor(w0)) for _ in range(copies)]
            try:
                for M in (1, 4, 8):
                    x = torch.randn(M, K).to(x_dtype(dt))

                    def run(v, x=x, sc=sc, sums=sums, packed=packed, nbytes=nbytes):
                        def fn(p, i):
                            if i == 0:
                                setter(v)
                            return cpu_native.linear_kmajor_native(x, p, num_threads=args.threads, weight_scale=sc,
                                                                   row_sums=sums)
                        return packed, fn, nbytes

                    res = interleaved({"A": run(a), "B": run(b)}, args.threads)
                    rows.append([lname, dname, str(M), f"{nbytes / 1e6:.1f}",
                                 f"{statistics.median(r[1] for r in res.values()):.1f}",
                                 f"{res['A'][0] * 1e6:.0f}", f"{res['A'][2]:.0%}", f"{res['B'][0] * 1e6:.0f}",
                                 f"{res['B'][2]:.0%}", f"**{res['A'][0] / res['B'][0]:.3f}×**", cpu_native.cpu_isa()])
                    print(" | ".join(rows[-1]), flush=True)
            finally:
                setter(a)
    return rows


def interleaved(runs: dict, threads: int, rounds: int = 5) -> dict[str, tuple[float, float, float]]:
    """{name: (seconds per call, adjacent read bandwidth GB/s, median ratio to it)} for ``runs`` = {name: (ws, fn,
    nbytes)}: each round calls fn(w, i) over the weights ws in turn for every run, one after the other, each
    right after its own read-bandwidth probe (as :func:`adjacent`). Why: the side-by-side figures of a row must come
    from the same minutes of this VM's drifting memory, and each % from the bandwidth of its own seconds."""
    for ws, fn, _ in runs.values():  # untimed: the first pass
        for i, w in enumerate(ws):
            fn(w, i)
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (ws, fn, nbytes) in runs.items():
            bw = probe_bandwidth(threads)
            t0 = time.perf_counter()
            for i, w in enumerate(ws):
                fn(w, i)
            dt = (time.perf_counter() - t0) / len(ws)
            got[name].append((dt, bw / 1e9, nbytes / dt / bw))
    return {k: tuple(statistics.median(r[j] for r in v) for j in range(3)) for k, v in got.items()}


def md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *["| " + " | ".join(r) + " |" for r in rows]]


def emit(md: list[str], out: str | None) -> None:
    """Print the markdown lines, and write them to ``out`` when given."""
    if out:
        with open(out, "w") as f:
            f.write("\n".join(md) + "\n")
    print("\n".join(md))


def amx_rules(args) -> str:
    """Where the amx path used the tiles in this run."""
    rows = THRESHOLDS.cpu_amx_min_rows if args.amx_min_rows is None else args.amx_min_rows
    toks = THRESHOLDS.cpu_amx_min_tokens if args.amx_min_tokens is None else args.amx_min_tokens
    return (f"; AMX tiles for linears from {rows} rows, experts from {toks} tokens per active expert, "
            "AVX512_BF16 code below")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Small and XLarge only, no oneDNN baseline")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--linears-only", action="store_true", help="only the decode-size linear rows")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="expert shapes (default: all)")
    ap.add_argument("--pages", choices=["2m", "4k"], default="2m",
                    help="weights in 2 MiB pages as the engine places them (default) or 4 KiB pages")
    ap.add_argument("--no-pairdown", action="store_true",
                    help="bf16 down pass by widening to fp32 in column order instead of VDPBF16PS row pairs or the "
                         "split FMA form (cpu_native.set_pairdown)")
    ap.add_argument("--ab", metavar="SWITCH=A,B", default=None, type=ab_switch,
                    help="only the engine calls, with a kernel switch (cpu_native.set_SWITCH: "
                         f"{', '.join(AB_SWITCHES)}) at A and B in alternate rounds, e.g. split_tokens=3,0")
    ap.add_argument("--amx-min-tokens", type=int, default=None,
                    help="on the amx path, run the AMX expert units from this many tokens per active expert "
                         "(default: dispatch.py's)")
    ap.add_argument("--amx-min-rows", type=int, default=None,
                    help="on the amx path, run AMX linears from this many rows (default: dispatch.py's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu_native.set_amx_rules(args.amx_min_rows, args.amx_min_tokens)
    if args.no_pairdown:
        cpu_native.set_pairdown(False)
    global HUGE_PAGES
    HUGE_PAGES = args.pages == "2m"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = (f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, kernel ISA path "
            f"{cpu_native.cpu_isa()} (best {cpu_native.best_isa()}"
            f"{amx_rules(args) if cpu_native.cpu_isa() == 'amx' else ''}), "
            f"bf16 down pass {'widening' if args.no_pairdown else 'row pairs'}, pages {args.pages}, "
            f"LLC {llc_bytes() >> 20} MiB, commit {commit}, "
            f"torch {torch.__version__}")
    print(head, flush=True)
    bws = read_bandwidth(args.threads)
    bw = max(bws.values())
    print("read bandwidth (1 GiB fp32): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bws.items()), flush=True)
    cols = ["shape", "dtype", "step", "union", "MB read", "BW GB/s (adjacent)", "engine call µs", "GB/s",
            "% of BW", "from C++ µs", "% of BW", "read floor µs", "% of BW", "C++ / floor", "warm µs",
            "ideal µs",
            "experts via ctypes µs", "% of BW", "torch GEMMs µs", "% of BW", "vLLM oneDNN µs", "% of BW",
            "kernel, all experts µs", "% of BW", "ISA"]
    print(" | ".join(cols), flush=True)
    if args.ab and args.linears_only:
        name, a, b = args.ab
        acols = ["linear", "dtype", "M", "MB", "BW GB/s (adjacent)", f"{a} µs", "% of BW", f"{b} µs", "% of BW",
                 f"{a} / {b}", "ISA"]
        print(" | ".join(acols), flush=True)
        emit([head + f", A/B {name}={a},{b}, K-major linears", "", "read bandwidth (1 GiB fp32, same run): " +
              ", ".join(f"{k} **{v:.1f} GB/s**" for k, v in bws.items()), "", *md_table(acols, ab_linear_rows(args))],
             args.out)
        return
    if args.ab:
        name, a, b = args.ab
        acols = ["shape", "dtype", "step", "union", "MB read", "BW GB/s (adjacent)", f"{a} µs", "% of BW",
                 f"{b} µs", "% of BW", f"{a} / {b}", "ISA"]
        print(" | ".join(acols), flush=True)
        emit([head + f", A/B {name}={a},{b}", "", "read bandwidth (1 GiB fp32, same run): " + ", ".join(
            f"{k} **{v:.1f} GB/s**" for k, v in bws.items()), "", *md_table(acols, ab_rows(args))], args.out)
        return
    rows = kernel_rows(args, args.threads, bw) if not args.linears_only else []
    lcols = ["linear", "dtype", "M", "MB", "served layout", "BW GB/s (adjacent)", "streaming µs", "GB/s", "% of BW",
             "row-major kernel µs (% of BW)", "vLLM oneDNN µs", "GB/s", "% of BW",
             "F.linear µs", "GB/s", "ISA"]
    print(" | ".join(lcols), flush=True)
    lrows = linear_rows(args, args.threads)
    md = [head, "", "read bandwidth (1 GiB fp32, same run): " + ", ".join(f"{k} **{v:.1f} GB/s**"
                                                                         for k, v in bws.items()), ""]
    if rows:
        md += md_table(cols, rows)
    md += ["", *md_table(lcols, lrows)]
    emit(md, args.out)


if __name__ == "__main__":
    main()
