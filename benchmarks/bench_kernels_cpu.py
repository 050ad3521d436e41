"""BlockFFN expert part on this CPU: the native sparse kernel vs dense, the old PyTorch
sparse path and the "ideal" (one contiguous GEMM pair over the active bytes).

Default table (issue 10): the official shapes (Small H768 E48 D64, Medium H1280 E40 D128,
Large H1536 E48 D128, XLarge H1792 E56 D128) × {1 token, one 4-token chunk, batches of 4
and 8 one-token segments, a batch of 4 four-token chunks} × {70%, 85% of experts idle in
each segment's union} (each segment's union drawn at random, so batch unions are the
no-overlap worst case). Columns: dense (``dense_ffn``), old (``sparse_ffn_cpu_torch``,
per-segment unions), new (``sparse_ffn_native``, expert-major over the step), ideal (two
``torch.mm`` over a contiguous slab of the step's union of experts, all tokens), their
ratios and the weight bytes the new kernel reads per second. Timings are medians of many
repeats, the methods interleaved round-robin (in a shuffled order) so that load from other
processes on a shared machine hits all of them alike.

    python benchmarks/bench_kernels_cpu.py --threads 2                 # the table (fp32)
    python benchmarks/bench_kernels_cpu.py --threads 2 --dtypes bf16   # bf16 weights
    python benchmarks/bench_kernels_cpu.py --dispatch                  # native vs dense crossover
    python benchmarks/bench_kernels_cpu.py --legacy [--alternatives]   # the older single-segment table

Legacy table: sizes like BlockFFN-XLarge and a bigger layer; one segment of 1 or 8 tokens;
"dense" is the library's ``dense_ffn``; ``--plain`` adds ``dense_ffn_plain`` (x W_up^T,
then h W_down); ``--alternatives`` other PyTorch sparse variants.

Imports only torch and the repository's ``kernels/`` (no vLLM).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.sparse_ffn.cpu import _runs, dense_ffn, dense_ffn_plain, sparse_ffn_cpu_torch  # noqa: E402
from kernels.sparse_ffn.cpu_native import native_available, sparse_ffn_native  # noqa: E402
from kernels.sparse_ffn.naive import experts_reference  # noqa: E402
from kernels.testing import cu_seqlens_of, make_scores  # noqa: E402

SIZES = {"xlarge": (1792, 56, 128), "big": (4096, 128, 128)}
OFFICIAL = {"Small": (768, 48, 64), "Medium": (1280, 40, 128), "Large": (1536, 48, 128), "XLarge": (1792, 56, 128)}
SCENARIOS = {"1 tok": [1], "chunk 4": [4], "batch 4x1": [1] * 4, "batch 8x1": [1] * 8, "batch 4x4": [4] * 4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- alternative sparse variants
def alt_gather(x, scores, w_up, w_down_t, ids):
    """index_select the active experts' weights, then two GEMMs."""
    E, D, H = w_up.shape
    idx = torch.tensor(ids)
    k = len(ids)
    wu = w_up.index_select(0, idx).view(k * D, H)
    wd = w_down_t.index_select(0, idx).view(k * D, H)
    h = F.silu(x @ wu.t())
    h.view(-1, k, D).mul_(scores.index_select(1, idx).to(h.dtype).unsqueeze(-1))
    return h @ wd


def alt_loop(x, scores, w_up, w_down_t, ids):
    """One expert at a time on weight views (no copies, 4 ops per expert)."""
    y = torch.zeros((x.shape[0], w_up.shape[2]), dtype=x.dtype)
    for e in ids:
        h = F.silu(x @ w_up[e].t())
        h.mul_(scores[:, e : e + 1].to(h.dtype))
        y.addmm_(h, w_down_t[e])
    return y


def alt_runs_simple(x, scores, w_up, w_down_t, ids):
    """Runs of consecutive experts on views, SiLU and scaling per run."""
    E, D, H = w_up.shape
    wu, wd = w_up.view(E * D, H), w_down_t.view(E * D, H)
    y = torch.zeros((x.shape[0], H), dtype=x.dtype)
    for e0, e1 in _runs(ids):
        h = F.silu(x @ wu[e0 * D : e1 * D].t())
        h.view(-1, e1 - e0, D).mul_(scores[:, e0:e1].to(h.dtype).unsqueeze(-1))
        y.addmm_(h, wd[e0 * D : e1 * D])
    return y


def alt_bmm(x, scores, w_up, w_down_t, ids):
    """Gathered weights, batched matmul per expert."""
    idx = torch.tensor(ids)
    wu, wd = w_up.index_select(0, idx), w_down_t.index_select(0, idx)
    h = F.silu(torch.bmm(x.unsqueeze(0).expand(len(ids), -1, -1), wu.transpose(1, 2)))
    h.mul_(scores.index_select(1, idx).t().to(h.dtype).unsqueeze(-1))
    return torch.bmm(h, wd).sum(0)


def alt_runs_fp32(x, scores, w_up, w_down_t, ids):
    """bf16 weights upcast to fp32 per run (for CPUs without fast bf16 GEMMs)."""
    E, D, H = w_up.shape
    wu, wd = w_up.view(E * D, H), w_down_t.view(E * D, H)
    xf = x.float()
    y = torch.zeros((x.shape[0], H), dtype=torch.float32)
    for e0, e1 in _runs(ids):
        h = F.silu(xf @ wu[e0 * D : e1 * D].float().t())
        h.view(-1, e1 - e0, D).mul_(scores[:, e0:e1].unsqueeze(-1))
        y.addmm_(h, wd[e0 * D : e1 * D].float())
    return y.to(x.dtype)


ALTERNATIVES = {
    "gather": alt_gather,
    "loop": alt_loop,
    "runs_simple": alt_runs_simple,
    "bmm": alt_bmm,
    "runs_fp32": alt_runs_fp32,
}


# ---------------------------------------------------------------- inputs
def make_inputs(H, E, D, T, union_sparsity, dtype, seed=0):
    """Weights, x and router scores whose union over the T tokens is exactly a chosen set.

    The union has round((1 - sparsity) · E) experts picked at random (so runs of
    consecutive ids occur as often as chance makes them); each token activates each union
    expert with probability 1/2, and every union expert is used by at least one token.
    """
    g = torch.Generator().manual_seed(seed)
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(dtype)
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    k = max(1, round((1.0 - union_sparsity) * E))
    rng = random.Random(seed)
    union = sorted(rng.sample(range(E), k))
    scores = torch.zeros(T, E)
    for e in union:
        users = [t for t in range(T) if rng.random() < 0.5] or [rng.randrange(T)]
        for t in users:
            scores[t, e] = 0.1 + rng.random()
    return x, scores, w_up, w_down_t, union


def bench_times(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Seconds per call of every method, ``repeats`` times each, interleaved in shuffled order."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {name: [] for name in fns}
    names = list(fns)
    for _ in range(repeats):
        random.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median ms per call of every method (see :func:`bench_times`)."""
    return {name: statistics.median(v) * 1e3 for name, v in bench_times(fns, repeats, warmup).items()}


def machine_info() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"CPU: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"ISA {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; "
        f"Python {platform.python_version()}; {platform.platform()}"
    )


def run_config(size, H, E, D, dname, T, sp, args) -> list[str]:
    """Check every method against the fp32 reference, then time them interleaved."""
    dtype = DTYPES[dname]
    x, scores, w_up, w_down_t, union = make_inputs(H, E, D, T, sp, dtype)
    cu = torch.tensor([0, T], dtype=torch.int32)
    fns = {
        "dense": partial(dense_ffn, x, scores, w_up, w_down_t),
        "sparse": partial(sparse_ffn_cpu_torch, x, scores, w_up, w_down_t, cu, allow_dense=False),
    }
    if args.plain:
        fns["dense_plain"] = partial(dense_ffn_plain, x, scores, w_up, w_down_t)
    if args.alternatives:
        for name, f in ALTERNATIVES.items():
            fns[name] = partial(f, x, scores, w_up, w_down_t, union)
    down = w_down_t.transpose(1, 2).float()
    ref = experts_reference(x.float(), scores, w_up.float(), down, "block")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, f in fns.items():
        err = ((f().float() - ref).norm() / ref.norm()).item()
        if err > tol:
            raise AssertionError(f"{name}: relative error {err:.2e} > {tol}")
    ms = bench_interleaved(fns, args.repeats)
    row = [
        f"{size} ({H},{E},{D})", dname, str(T), f"{sp:.0%}", f"{len(union)}/{E}",
        str(len(_runs(union))), f"{ms['dense']:.3f}", f"{ms['sparse']:.3f}",
        f"{ms['sparse'] / ms['dense']:.3f}",
    ]  # fmt: skip
    if args.plain:
        row += [f"{ms['dense_plain']:.3f}", f"{ms['sparse'] / ms['dense_plain']:.3f}"]
    if args.alternatives:
        row += [f"{ms[a]:.3f}" for a in ALTERNATIVES]
    return row


def official_row(name, H, E, D, dname, scen, idle, repeats) -> list[str]:
    """One row of the default table: check new/old against the reference, time all four."""
    dtype = DTYPES[dname]
    lengths = SCENARIOS[scen]
    T = sum(lengths)
    g = torch.Generator().manual_seed(1)
    w_up = (torch.randn(E, D, H, generator=g) / H**0.5).to(dtype)
    w_down_t = (torch.randn(E, D, H, generator=g) / D**0.5).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    scores, _ = make_scores(lengths, E, 1.0 - idle, seed=2)
    cu = cu_seqlens_of(lengths)
    active = (scores != 0).any(dim=0)
    k, pairs = int(active.sum()), int((scores != 0).sum())
    # the ideal: the same number of experts as the step's union, as one contiguous slab
    wu, wd = w_up[:k].reshape(k * D, H), w_down_t[:k].reshape(k * D, H)

    def ideal():
        return torch.mm(F.silu(torch.mm(wu, x.t())).t(), wd)

    fns = {
        "dense": partial(dense_ffn, x, scores, w_up, w_down_t),
        "old": partial(sparse_ffn_cpu_torch, x, scores, w_up, w_down_t, cu, allow_dense=False),
        "new": partial(sparse_ffn_native, x, scores, w_up, w_down_t, cu),
        "ideal": ideal,
    }
    ref = experts_reference(x.float(), scores, w_up.float(), w_down_t.transpose(1, 2).float(), "block")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for m in ("old", "new"):
        err = ((fns[m]().float() - ref).norm() / ref.norm()).item()
        if err > tol:
            raise AssertionError(f"{m}: relative error {err:.2e} > {tol}")
    times = bench_times(fns, repeats)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    best = {name: min(v) * 1e3 for name, v in times.items()}
    gbs = 2 * k * D * H * w_up.element_size() / (ms["new"] * 1e-3) / 1e9
    return [
        f"{name} ({H},{E},{D})", dname, scen, f"{idle:.0%}", f"{k}/{E}", str(pairs),
        f"{ms['dense']:.3f}", f"{ms['old']:.3f}", f"{ms['new']:.3f}", f"{ms['ideal']:.3f}",
        f"{ms['new'] / ms['ideal']:.2f}", f"{best['new'] / best['ideal']:.2f}", f"{ms['new'] / ms['dense']:.2f}",
        f"{gbs:.1f}",
    ]  # fmt: skip


def dispatch_rows(repeats: int) -> None:
    """Native kernel vs dense_ffn on one segment of n tokens, for the dispatch thresholds."""
    cols = ["size", "tokens", "union", "pairs", "dense ms", "new ms", "new/dense"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in ("Small", "XLarge"):
        H, E, D = OFFICIAL[name]
        g = torch.Generator().manual_seed(1)
        w_up = torch.randn(E, D, H, generator=g) / H**0.5
        w_down_t = torch.randn(E, D, H, generator=g) / D**0.5
        for T, frac, tok_frac in [(1, 1.0, 1.0), (4, 1.0, 1.0), (16, 0.3, 0.5), (64, 0.3, 0.5), (64, 1.0, 0.5),
                                  (64, 1.0, 1.0), (256, 1.0, 0.5), (256, 1.0, 1.0)]:  # fmt: skip
            x = torch.randn(T, H, generator=g)
            scores, _ = make_scores([T], E, frac, token_fraction=tok_frac, seed=3)
            cu = cu_seqlens_of([T])
            fns = {"dense": partial(dense_ffn, x, scores, w_up, w_down_t),
                   "new": partial(sparse_ffn_native, x, scores, w_up, w_down_t, cu)}  # fmt: skip
            ms = bench_interleaved(fns, max(5, repeats // (1 + T // 16)))
            k, pairs = int((scores != 0).any(0).sum()), int((scores != 0).sum())
            row = [name, str(T), f"{k}/{E}", str(pairs), f"{ms['dense']:.3f}", f"{ms['new']:.3f}",
                   f"{ms['new'] / ms['dense']:.2f}"]  # fmt: skip
            print("| " + " | ".join(row) + " |", flush=True)


def glue_rows(repeats: int) -> None:
    """Work outside the weight reads: the whole custom op with no active expert (XLarge)."""
    from kernels import ops  # registers torch.ops.blockffn (no vLLM)

    H, E, D = OFFICIAL["XLarge"]
    w_up, w_down_t = torch.zeros(E, D, H), torch.zeros(E, D, H)
    print("\n| call (XLarge shapes, no expert active) | µs per call |\n|---|---|")
    for lengths in ([1], [1] * 8, [4] * 4):
        T = sum(lengths)
        x, scores, cu = torch.randn(T, H), torch.zeros(T, E), cu_seqlens_of(lengths)
        fns = {
            "op": partial(ops.sparse_ffn, x, scores, w_up, w_down_t, cu),
            "native": partial(sparse_ffn_native, x, scores, w_up, w_down_t, cu, allow_dense=True),
        }
        us = {k: v * 1e3 for k, v in bench_interleaved(fns, repeats * 20).items()}
        print(f"| torch.ops.blockffn.sparse_ffn, {len(lengths)} segment(s), {T} token(s) | {us['op']:.1f} |")
        print(f"| sparse_ffn_native alone, {len(lengths)} segment(s), {T} token(s) | {us['native']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--legacy", action="store_true", help="the older single-segment table (below)")
    p.add_argument("--dispatch", action="store_true", help="native vs dense crossover rows")
    p.add_argument("--shapes", default=",".join(OFFICIAL), help=f"default table: comma list of {list(OFFICIAL)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"default table: {list(SCENARIOS)}")
    p.add_argument("--idle", default="0.7,0.85", help="default table: fraction of experts idle per segment")
    p.add_argument("--sizes", default="xlarge,big", help=f"comma list of {list(SIZES)}")
    p.add_argument("--dtypes", default=None, help="default: fp32 (table), fp32,bf16 (legacy)")
    p.add_argument("--tokens", default="1,8", help="tokens in the one segment")
    p.add_argument("--sparsity", default="0.8,0.7", help="union sparsity (fraction of experts inactive)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--alternatives", action="store_true", help="also time other sparse variants")
    p.add_argument("--plain", action="store_true", help="also time dense_ffn_plain (x W_up^T, then h W_down)")
    p.add_argument("--quick", action="store_true", help="xlarge only, 15 repeats")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats = "xlarge", 15
    torch.manual_seed(0)
    print(machine_info())
    print()
    if args.dispatch:
        dispatch_rows(args.repeats)
        return
    if not args.legacy:
        if not native_available():
            raise SystemExit("the native kernel could not be built (no C compiler?)")
        cols = ["shape (H,E,D)", "dtype", "step", "idle/segment", "step union", "pairs", "dense ms", "old ms",
                "new ms", "ideal ms", "new/ideal", "new/ideal (best)", "new/dense", "new GB/s"]  # fmt: skip
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for name in args.shapes.split(","):
            H, E, D = OFFICIAL[name]
            for dname in (args.dtypes or "fp32").split(","):
                for scen in args.scenarios.split(","):
                    for idle in (float(v) for v in args.idle.split(",")):
                        row = official_row(name, H, E, D, dname, scen, idle, args.repeats)
                        print("| " + " | ".join(row) + " |", flush=True)
        glue_rows(args.repeats)
        return
    args.dtypes = args.dtypes or "fp32,bf16"
    cols = [
        "size (H,E,D)",
        "dtype",
        "tokens",
        "union sparsity",
        "active",
        "runs",
        "dense ms",
        "sparse ms",
        "sparse/dense",
    ]
    if args.plain:
        cols += ["dense_plain ms", "sparse/dense_plain"]
    if args.alternatives:
        cols += [f"{a} ms" for a in ALTERNATIVES]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for size in args.sizes.split(","):
        H, E, D = SIZES[size]
        for dname in args.dtypes.split(","):
            for T in (int(t) for t in args.tokens.split(",")):
                for sp in (float(s) for s in args.sparsity.split(",")):
                    row = run_config(size, H, E, D, dname, T, sp, args)
                    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
