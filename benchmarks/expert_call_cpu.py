"""Where a decode-size router + experts call's time goes: its timeline against the bytes it reads, cold.

Why: a decode step makes one such call a layer (~35 in an XLarge-sized model). bench_memory_cpu.py gives a
call's time beside its read floor; this splits the time at fixed points of the call, read by a timeline build
of the kernel (``VLLM_BLOCKFFN_CPU_MARKS=1``, cpu_native.c BLOCKFFN_MARKS, set by this script; the served build
reads no clock): the router's linear (its E x H weight, cold), the scores and the experts' set-up, the fork, the
up pass (W_up of the union), the down pass (W_down), and the tail (the threads' imbalance and the join). The up
and down passes are the streaming; everything else is the call's fixed cost, which issue 17 wants at ~10 µs.

The calls are bench_memory_cpu.py's engine calls (``torch.ops.blockffn_native.router_experts``, packed experts,
each call on the next layer of a pool read 3× the LLC between visits: cold), issued from Python; the timeline is
taken inside the C call, so Python adds nothing to it. Each figure is the median over rounds of the rounds' mean
calls; each round beside the read bandwidth probed right before it. Each shape and dtype runs in a process of
its own.

    scripts/dev python benchmarks/expert_call_cpu.py [--shapes Small XLarge] [--dtypes fp32 int8]
        [--steps "1 tok" "verify 1x4"] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

os.environ["VLLM_BLOCKFFN_CPU_MARKS"] = "1"  # before the kernel is first loaded in this process

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_memory_cpu import (  # noqa: E402
    DTYPES,
    SCENARIOS,
    SHAPES,
    EngineCall,
    Pool,
    cpu_model,
    llc_bytes,
    probe_bandwidth,
    scenario_calls,
)

from kernels.sparse_ffn import cpu_native  # noqa: E402

COLUMNS = ["shape", "dtype", "step", "MB a call", "BW GB/s", "call µs", "ideal µs", "% of BW", "router µs",
           "router GB/s", "set-up µs", "fork µs", "up µs", "up GB/s", "down µs", "down GB/s", "tail µs",
           "fixed µs", "ISA"]


def split_bytes(pool: Pool, calls: list) -> tuple[float, float]:
    """Mean bytes a call's up and down passes read: the union's W_up rows (+ int8's D row scales) and W_down
    rows (+ int8's H column scales)."""
    H, D = pool.H, pool.D
    esz = torch.tensor([], dtype=pool.dtype).element_size()
    experts = statistics.mean(int((s > 0).any(0).sum()) for _, _, s, _ in calls)
    extra = pool.dtype == torch.int8
    return experts * (D * H * esz + (D * 4 if extra else 0)), experts * (D * H * esz + (H * 4 if extra else 0))


def timeline(engine: EngineCall, pool: Pool, calls: list, seg: torch.Tensor, threads: int,
             rounds: int) -> tuple[dict[str, float], float]:
    """The points' medians over ``rounds`` (each the mean over all the calls) and the median probed bandwidth."""
    for layer, x, _, _ in calls:  # the first pass, untimed
        engine(layer, pool, x, seg)
    per_round, bws = [], []
    for _ in range(rounds):
        bws.append(probe_bandwidth(threads) / 1e9)
        cpu_native.call_marks(reset=True)
        for layer, x, _, _ in calls:
            engine(layer, pool, x, seg)
        n, marks = cpu_native.call_marks(reset=True)
        if n != len(calls):
            raise SystemExit(f"expected {len(calls)} timed calls, the kernel counted {n} (a call off the packed path?)")
        per_round.append(marks)
    return {k: statistics.median(r[k] for r in per_round) for k in cpu_native.MARK_NAMES}, statistics.median(bws)


def row(sname: str, dname: str, step: str, pool: Pool, engine: EngineCall, calls: list, threads: int,
        rounds: int) -> list[str]:
    lengths = SCENARIOS[step]
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seg = torch.tensor([T, len(lengths), *cu.tolist()], dtype=torch.int32)
    m, bw = timeline(engine, pool, calls, seg, threads, rounds)
    up_b, down_b = split_bytes(pool, calls)
    total_b = up_b + down_b + engine.router_bytes
    entered = max(m["in: calling thread"], m["in: last thread"])
    up_end = max(m["up: calling thread"], m["up: last thread"])
    down_end = max(m["down: calling thread"], m["down: last thread"])
    up, down = up_end - entered, down_end - up_end
    call = m["returned"]
    fixed = call - up - down
    ideal = total_b / (bw * 1e3)
    return [sname, dname, step, f"{total_b / 1e6:.2f}", f"{bw:.1f}", f"{call:.1f}", f"{ideal:.1f}",
            f"**{ideal / call:.0%}**", f"{m['router']:.1f}", f"{engine.router_bytes / m['router'] / 1e3:.1f}",
            f"{m['set-up'] - m['router']:.1f}", f"{entered - m['set-up']:.1f}", f"{up:.1f}",
            f"{up_b / up / 1e3:.1f}", f"{down:.1f}", f"{down_b / down / 1e3:.1f}",
            f"{call - down_end:.1f}", f"**{fixed:.1f}**", cpu_native.cpu_isa() or "-"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["Small", "XLarge"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=list(DTYPES))
    ap.add_argument("--steps", nargs="+", default=["1 tok", "decode x4", "verify 1x4"], choices=list(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--pool-bytes", type=int, default=None, help="bytes the calls read between visits to a layer "
                    "(default 3x the last-level cache: cold)")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # one (shape, dtype): a child run
    args = ap.parse_args()
    if not args.rows_only:
        header(args)
        # each shape and dtype in a process of its own: in one process, the pools allocated after earlier ones were
        # freed read slower (XLarge fp32 down passes at 8-12 GB/s, 25-28 alone; RESULTS.md 2026-12-07 15:54 UTC)
        for sname in args.shapes:
            for dname in args.dtypes:
                cmd = [sys.executable, os.path.abspath(__file__), "--rows-only", "--shapes", sname, "--dtypes",
                       dname, "--steps", *args.steps, "--rounds", str(args.rounds), "--threads", str(args.threads)]
                if args.pool_bytes:
                    cmd += ["--pool-bytes", str(args.pool_bytes)]
                if subprocess.run(cmd).returncode != 0:
                    raise SystemExit(f"the {sname} {dname} rows failed")
        return
    rows(args)


def header(args) -> None:
    """The run's CPU line and the table's head (the rows come from the children)."""
    torch.set_num_threads(args.threads)
    if cpu_native.call_marks() is None:
        raise SystemExit("the kernel's timeline build did not load (VLLM_BLOCKFFN_CPU_MARKS=1; see the log above)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, kernel ISA path "
          f"{cpu_native.cpu_isa()}, LLC {llc_bytes() >> 20} MiB, commit {commit}, torch {torch.__version__}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)


def rows(args) -> None:
    """The rows of one process's shapes and dtypes."""
    torch.set_num_threads(args.threads)
    if cpu_native.call_marks() is None:
        raise SystemExit("the kernel's timeline build did not load (VLLM_BLOCKFFN_CPU_MARKS=1; see the log above)")
    for sname in args.shapes:
        H, E, D = SHAPES[sname]
        for dname in args.dtypes:
            dt = DTYPES[dname]
            pool = Pool(H, E, D, dt, args.pool_bytes or 3 * llc_bytes())
            if pool.layers is not pool.kmajor:
                print(f"| {sname} | {dname} | (experts not packed on this path: no timeline) |", flush=True)
                continue
            engine = EngineCall(pool, dt)
            if not engine.ok:
                raise SystemExit("the C++ op is not built (VLLM_BLOCKFFN_CPU_OPS=python or no compiler)")
            for step in args.steps:
                lengths = SCENARIOS[step]
                cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                calls, _ = scenario_calls(pool, lengths, cu)
                print("| " + " | ".join(row(sname, dname, step, pool, engine, calls, args.threads, args.rounds))
                      + " |", flush=True)
            del pool, engine


if __name__ == "__main__":
    main()
