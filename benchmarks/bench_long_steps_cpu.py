"""Long CPU steps (prefill chunks, big batches): compute-bound, against the machine's GEMM FLOP bound.

Why this benchmark: a step of hundreds of tokens reads each weight once and multiplies it by every
token that uses it, so it is bounded by arithmetic, not memory. Which route is fastest decides the
dispatch thresholds of `kernels/dispatch.py` (``cpu_grouped_min_tokens_by_path``, ``cpu_amx_min_tokens``,
``cpu_linear_rows``); this script measures the candidates side by side, in one process:

- experts, XLarge shape (H 1792, E 56, d_e 128), T tokens in 4 segments (chunk-sparse routing, ~10% of
  the experts per token as in bench_memory_cpu.py), float weights in x's dtype (``--x-dtype``: bf16, or fp32
  as vLLM serves on CPUs without native bf16) and int8 weights with the same x:
  ``grouped`` (each active expert's tokens as one oneDNN GEMM pair, int8 dequantized first),
  the native kernel on each ISA path this CPU runs from ``avx512_bf16`` up (``amx``: AMX units from
  ``cpu_amx_min_tokens`` tokens), and ``auto`` (what ``sparse_ffn_cpu`` picks);
  GFLOP/s count the active (token, expert) pairs only (2 · 2 · d_e · H per pair);
- linears [5376, 1792] (an XLarge qkv) at M rows: ``F.linear`` (oneDNN, AMX for bf16 where present)
  against the native kernel per path, float and int8, torch's weight-only int8 GEMM
  (``_weight_int8pack_mm``), and ``auto`` (the served layers' ops, ``torch.ops.blockffn_native``: the K-major
  linears on the paths that pack weights at load, ``THRESHOLDS.cpu_linear_kmajor`` / ``cpu_linear_kmajor_int8``,
  else what ``cpu_ops.native_rows`` and the int8 rule pick);
- the FLOP bound: a large GEMM through torch (oneDNN) in the same run, in x's dtype and for bf16 x in fp32 too
  (the faster of the two: without AMX the long bf16 routes run fp32 GEMMs on widened weights, since oneDNN has
  no bf16 GEMM on AVX2 and runs it at about half its fp32 rate with AVX512_BF16).

Weights stay in the cache between calls here (12-26 MB a layer): a compute-bound step does not care.
Median of ``--repeats`` calls after two untimed ones, the routes interleaved per repeat.

Run: ``scripts/dev python benchmarks/bench_long_steps_cpu.py [--x-dtype fp32] [--tokens 128 256 512 1024 2048]
[--narrower] [--out F.md]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_cpu import DTYPES, SHAPES, Pool, cpu_model, emit, md_table, routed_scores  # noqa: E402

from kernels.layout import pack_kmajor  # noqa: E402
from kernels.quant import quantize_rows  # noqa: E402
from kernels.sparse_ffn import cpu_native, cpu_ops  # noqa: E402
from kernels.sparse_ffn.cpu import sparse_ffn_cpu, sparse_ffn_grouped  # noqa: E402
from vllm_blockffn.serving.layers.cpu_linear import packs_kmajor  # noqa: E402


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns interleaved per repeat."""
    for f in fns.values():
        f()
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def flop_bound(dt: torch.dtype) -> float:
    """GFLOP/s of a 1024 x 1792 x 4096 GEMM in ``dt`` (torch / oneDNN: AMX for bf16 where present)."""
    a, b = torch.randn(1024, 1792).to(dt), torch.randn(1792, 4096).to(dt)
    t = timed({"mm": lambda: a @ b}, 7)["mm"]
    return 2 * 1024 * 1792 * 4096 / t / 1e9


FLOOR = "avx512_bf16"
"""The narrowest kernel path timed beside the best (``--narrower``: from ``avx2``, the narrower paths' kernel
side on this CPU; their GEMM side is this CPU's oneDNN, so a crossover holds for CPUs of this kind only)."""


def native_paths() -> list[str]:
    best = cpu_native.best_isa()
    if best is None:
        return []
    return [p for p in cpu_native.ISAS if cpu_native.ISAS.index(FLOOR) <= cpu_native.ISAS.index(p)
            <= cpu_native.ISAS.index(best)] or [best]


def expert_routes(x, s, wu, wd, cu, su, sd, rows=None) -> dict:
    """The routes of one expert step: grouped GEMMs (on the served layout, and on the experts as loaded: what
    ``VLLM_BLOCKFFN_CPU_EXPERTS=rowmajor`` would give), the native kernel per path, and auto. ``rows``: the experts
    as loaded (w_up, w_down) when (wu, wd) are packed K-major as the served layer packs them on this path; the
    narrower paths, which a CPU of their own would not pack, run on these."""
    ru, rd = rows if rows is not None else (wu, wd)
    fns = {"grouped": lambda: sparse_ffn_grouped(x, s, wu, wd, cu, su, sd),
           "grouped, as loaded": lambda: sparse_ffn_grouped(x, s, ru, rd, cu, su, sd)}
    for p in native_paths():
        pu, pd = rows if rows is not None and p != cpu_native.cpu_isa() else (wu, wd)
        fns[f"native {p}"] = lambda p=p, pu=pu, pd=pd: cpu_native.sparse_ffn_native(
            x, s, pu, pd, cu, up_scale=su, down_scale=sd, isa=p, allow_dense=False)
    fns["auto"] = lambda: sparse_ffn_cpu(x, s, wu, wd, cu, up_scale=su, down_scale=sd)
    return fns


def linear_routes(x, wf, q, sc, rs, dname: str) -> dict:
    """The routes of one linear: F.linear, the native kernel per path and auto on the float weight; torch's
    weight-only int8 GEMM, the native kernel per path and auto on the int8 one."""
    ones = torch.ones(q.shape[0], dtype=x.dtype)
    fns = {f"F.linear {dname}": lambda: torch.nn.functional.linear(x, wf)}
    for p in native_paths():
        fns[f"native {p} {dname}"] = lambda p=p: cpu_native.linear_native(x, wf, isa=p)
    if packs_kmajor(wf):
        wk = pack_kmajor(wf)  # what the served layer holds on this path (cpu_linear.py)
        fns[f"auto {dname}"] = lambda: cpu_ops.linear_kmajor(x, wk)
    else:
        fns[f"auto {dname}"] = lambda: cpu_ops.linear(x, wf)
    fns["torch int8pack"] = lambda: (torch.ops.aten._weight_int8pack_mm(x, q, ones).float() * sc).to(x.dtype)
    for p in native_paths():
        fns[f"native {p} int8"] = lambda p=p: cpu_native.linear_native(x, q, isa=p, weight_scale=sc)
    if packs_kmajor(q):
        qk = pack_kmajor(q)
        fns["auto int8"] = lambda: cpu_ops.int8_linear_kmajor(x, qk, sc, rs)
    else:
        fns["auto int8"] = lambda: cpu_ops.int8_linear(x, q, sc, rs)
    return fns


def expert_rows(tokens: list[int], repeats: int, bound: float, xname: str) -> list[list[str]]:
    H, E, D = SHAPES["XLarge"]
    rows = []
    for dname in (xname, "int8"):
        pool = Pool(H, E, D, DTYPES[dname], 1)
        wu, wd, su, sd = pool.layers[0]  # the served layout (packed K-major where the rule says)
        loaded = pool.rowmajor[0][:2] if pool.rowmajor and pool.layers is not pool.rowmajor else None
        for T in tokens:
            lengths = [T // 4] * 4
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            s = routed_scores(lengths, E, 0, 1)
            x = torch.randn(sum(lengths), H).to(DTYPES[xname])
            flop = int((s > 0).sum()) * 4 * D * H
            fns = expert_routes(x, s, wu, wd, cu, su, sd, loaded)
            t = timed(fns, repeats)
            cells = [f"{t[k] * 1e3:.2f} ms ({flop / t[k] / 1e9:.0f})" for k in fns]
            best = min(t.values())
            rows.append([dname, str(sum(lengths)), *cells, f"{flop / t['auto'] / 1e9 / bound:.0%}",
                         min(t, key=t.get) if t["auto"] > 1.05 * best else "auto (best)"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def linear_rows(ms: list[int], repeats: int, xname: str) -> list[list[str]]:
    N, K = 5376, 1792
    w = torch.randn(N, K) / K**0.5
    wf = w.to(DTYPES[xname])
    q, sc = quantize_rows(w)
    rs = cpu_native.int8_row_sums(q)
    rows = []
    for M in ms:
        x = torch.randn(M, K).to(DTYPES[xname])
        fns = linear_routes(x, wf, q, sc, rs, xname)
        t = timed(fns, repeats)
        flop = 2 * M * N * K
        rows.append([str(M), *[f"{t[k] * 1e6:.0f} µs ({flop / t[k] / 1e9:.0f})" for k in fns]])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 256, 512, 1024, 2048])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512],
                    help="M of the linear rows")
    ap.add_argument("--x-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="activations (and the float weights): fp32 is what vLLM serves on CPUs without native bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--narrower", action="store_true", help="also time the kernel's paths from avx2 up")
    args = ap.parse_args()
    global FLOOR
    FLOOR = "avx2" if args.narrower else FLOOR
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # bf16 x: the faster of oneDNN's bf16 and fp32 GEMMs (the long bf16 routes run fp32 GEMMs without AMX)
    rates = {n: flop_bound(DTYPES[n]) for n in dict.fromkeys((args.x_dtype, "fp32"))}
    bname = max(rates, key=rates.get)
    bound = rates[bname]
    head = (f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, kernel paths "
            f"{', '.join(native_paths())} (best {cpu_native.best_isa()}), commit {commit}, torch {torch.__version__}; "
            f"1024 x 1792 x 4096 GEMM, same run: {', '.join(f'{n} {r:.0f}' for n, r in rates.items())} GFLOP/s; "
            f"FLOP bound ({bname}): **{bound:.0f} GFLOP/s**")
    print(head, flush=True)
    paths = native_paths()
    ecols = ["weights", "T", "grouped", "grouped, as loaded", *[f"native {p}" for p in paths], "auto",
             "auto % of bound", "fastest"]
    print(" | ".join(ecols), flush=True)
    erows = expert_rows(args.tokens, args.repeats, bound, args.x_dtype)
    d = args.x_dtype
    lcols = ["M", f"F.linear {d}", *[f"native {p} {d}" for p in paths], f"auto {d}", "torch int8pack",
             *[f"native {p} int8" for p in paths], "auto int8"]
    print(" | ".join(lcols), flush=True)
    lrows = linear_rows(args.rows, args.repeats, args.x_dtype)
    emit([head, "", "Experts (XLarge shape, 4 segments; ms per call, in brackets GFLOP/s on the active pairs):", "",
          *md_table(ecols, erows), "", "Linears [5376, 1792] (µs per call, in brackets GFLOP/s):", "",
          *md_table(lcols, lrows)], args.out)


if __name__ == "__main__":
    main()
