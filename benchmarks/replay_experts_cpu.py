"""Replay a served decode step's expert calls, cold and warm: the engine's own routing on the kernel alone.

Why: bench_memory_cpu.py times the expert kernel on synthetic routing (a fixed number of experts a token,
rotated); a served step's layers differ — at batch 8 one layer's 8 tokens share 3 experts (8 tokens an
expert), another's use 27 (3 an expert) — and how many tokens share an expert decides whether a call is
memory- or compute-bound. step_breakdown_cpu.py ``--dump-calls DIR`` saves one decode step's
``router_experts`` call a layer (x, the router, the experts, the step's segments); this script calls each
again through the served C++ op:

- cold: the call on one of N copies of the layer's weights in turn, the bytes the N calls read > 3 x the
  last-level cache (every call reads its weights from memory, as the engine's layer after layer does);
- warm: the same call on one copy again and again (its weights in the caches: L2 when they fit, else the
  LLC — this VM's LLC streams at ~60 GB/s, twice its memory, so "warm" is not pure arithmetic above ~4 MB);
- beside them the call's bytes (the union of experts plus the router) at the read bandwidth and its
  multiply-adds (pairs x 2 x d_e x H, plus the router's) at the FMA peak, both measured in the same run.

    scripts/dev python benchmarks/step_breakdown_cpu.py /tmp/xl --batch 8 --dump-calls /tmp/calls8
    scripts/dev python benchmarks/replay_experts_cpu.py /tmp/calls8 [--layers 5 22 30] [--split N]

``--split N``: cpu_native.set_split_tokens(N) first (the split FMA forms from N tokens an expert; 0 never; -1 by
the CPU, the default).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_cpu import cpu_model, llc_bytes, placed  # noqa: E402
from step_breakdown_cpu import _secs  # noqa: E402

from kernels.sparse_ffn import cpu_native, cpu_ops  # noqa: E402


def replay(path: str, bw: float, peak: float, rounds: int = 5) -> dict:
    """Cold and warm µs of one dumped call (argument list of ``router_experts``), with its ideals."""
    args = torch.load(path)
    x, w_r, norm_w, eps, w_up, w_down, seg = args[:7]
    if w_up.dtype == torch.int8 or args[8] is not None:
        raise SystemExit(f"{path}: int8 experts are not replayed (scales and row sums are bound per layer)")
    active = (x.float() @ w_r.float().t()) > 0
    union, pairs = int(active.any(0).sum()), int(active.sum())
    E, D, H = (w_up.shape[0], w_up.shape[1] * 16, w_up.shape[2] * 2) if w_up.dim() == 5 else w_up.shape  # packed
    esz = w_up.element_size()
    nbytes = union * 2 * D * H * esz + E * H * w_r.element_size()
    macs = pairs * 2 * D * H + x.shape[0] * E * H
    # enough copies that the bytes the calls read (not the layer's storage) pass 3 x the LLC between two reads
    copies = max(2, -(-3 * llc_bytes() // nbytes))
    pool = [(placed(w_up.clone()), placed(w_down.clone()), w_r.clone()) for _ in range(copies)]
    op = torch.ops.blockffn_native.router_experts

    def call(i: int):
        u, d, r = pool[i % copies]
        return op(x, r, norm_w, eps, u, d, seg, None, None, None, None, "auto", 0, 0, False)

    for i in range(copies):
        call(i)
    cold = statistics.median(_secs(lambda: [call(i) for i in range(copies)]) / copies for _ in range(rounds))
    warm = statistics.median(_secs(lambda: [call(0) for _ in range(copies)]) / copies for _ in range(rounds))
    return {"layer": int(args[12]), "tokens": int(x.shape[0]), "union": union, "pairs": pairs, "mb": nbytes / 1e6,
            "cold_us": cold * 1e6, "warm_us": warm * 1e6, "memory_us": nbytes / bw / 1e3,
            "compute_us": macs / peak * 1e6, "pct_bw": 100 * nbytes / cold / (bw * 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls", help="a directory of step_breakdown_cpu.py --dump-calls files (layerN.pt)")
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--split", type=int, default=None, help="cpu_native.set_split_tokens(N) first")
    args = ap.parse_args()
    if cpu_ops.implementation() != "cpp":
        raise SystemExit("the C++ ops are needed (the served op): VLLM_BLOCKFFN_CPU_OPS=python or no compiler")
    if args.split is not None:
        cpu_native.set_split_tokens(args.split)
    files = sorted(glob.glob(os.path.join(args.calls, "layer*.pt")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    if args.layers is not None:
        files = [p for p in files if int(re.findall(r"\d+", os.path.basename(p))[0]) in args.layers]
    if not files:
        raise SystemExit(f"{args.calls}: no layerN.pt files (step_breakdown_cpu.py --dump-calls {args.calls})")
    buf = placed(torch.ones(1 << 28))
    threads = cpu_native._THREADS or torch.get_num_threads()
    print(f"{cpu_model()}, path {cpu_native.cpu_isa()}, {threads} threads, split "
          f"{args.split if args.split is not None else 'default'}")
    print("| layer | tokens | union | tokens an expert | MB | cold µs | % of BW | warm µs | memory µs | FMA-peak µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in files:
        bw = max(buf.numel() * 4 / _secs(cpu_native.stream_read, buf) for _ in range(3)) / 1e9
        peak = max(cpu_native.fma_peak() for _ in range(3))
        r = replay(path, bw, peak)
        print(f"| {r['layer']} | {r['tokens']} | {r['union']} | {r['pairs'] / max(r['union'], 1):.1f} | {r['mb']:.2f} "
              f"| {r['cold_us']:.1f} | {r['pct_bw']:.0f}% ({bw:.1f} GB/s) | {r['warm_us']:.1f} | "
              f"{r['memory_us']:.1f} | {r['compute_us']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
