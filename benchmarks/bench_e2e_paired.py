"""Two compiled engines side by side, measured in turns: the ratio of two settings on a machine whose
speed drifts.

Why: the VMs here change memory bandwidth by ±30% within minutes (their neighbours), so two engines
measured one after the other (bench_e2e_compiled.py) can differ by more than the change under test.
Here each setting lives in its own process, both loaded at once, and a coordinator has them generate
in turns (A, B, A, B, …; only one runs at a time): every ratio is taken from two runs seconds apart,
and the table reports each setting's median and the median of the per-turn ratios. This assumes the
waiting engine takes no CPU: its CPU time over each turn is read (/proc) and the run is flagged when it
passes 5% of a CPU (`idle_cpu_max`; e.g. env.OMP_WAIT_POLICY=active spins the waiting engine's threads,
which made the other 3× slower, 2026-12-06).

    scripts/dev python benchmarks/bench_e2e_paired.py /tmp/xl --a "dtype=bfloat16" \
        --b "dtype=bfloat16 quantization=blockffn_int8" [--turns 8] [--tokens 32] [--json FILE]

A setting is `key=value` pairs for `vllm.LLM` (dtype, quantization) plus `env.NAME=value` for the
environment of its process (e.g. `env.VLLM_BLOCKFFN_HUGEPAGES=off`), `native.NAME=N` for a benchmark switch of
the CPU kernel called in its process before the engine is built (`cpu_native.NAME(N)`, e.g.
`native.set_group_major=0`; the engine runs in that process), and `eagle=HEAD` for EAGLE
speculative decoding with that draft head, 3 tokens per step (the verify chunks of 4 tokens).
`--batch N` generates N distinct prompts together (continuous batching, N requests per decode step).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

from step_breakdown_cpu import batch_prompts


def parse(setting: str) -> tuple[dict, dict]:
    kw, env = {}, {}
    for item in setting.split():
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"setting item {item!r}: expected key=value")
        (env if key.startswith("env.") else kw)[key.removeprefix("env.")] = value
    return kw, env


def apply_native(kw: dict) -> None:
    """Call the setting's ``native.NAME=N`` kernel switches (cpu_native.set_*), taking them out of ``kw``."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    for key in [k for k in kw if k.startswith("native.")]:
        name = key.removeprefix("native.")
        if not name.startswith("set_") or not callable(getattr(cpu_native, name, None)):
            raise SystemExit(f"setting {key}: expected native.set_<switch> of kernels/sparse_ffn/cpu_native.py")
        getattr(cpu_native, name)(int(kw.pop(key)))


def worker(model: str, setting: str, tokens: int, batch: int, conn) -> None:
    kw, env = parse(setting)
    if "eagle" in kw:
        kw["speculative_config"] = {"method": "eagle", "model": kw.pop("eagle"), "num_speculative_tokens": 3}
    os.environ.update(env)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    apply_native(kw)
    from vllm import LLM, SamplingParams

    llm = LLM(model, max_model_len=256, seed=0, max_num_seqs=batch, kv_cache_memory_bytes=1 << 30,
              enable_prefix_caching=False, **kw)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    texts = batch_prompts(batch)
    llm.generate(texts, params, use_tqdm=False)
    from vllm_blockffn.serving.layers.cpu_experts import describe

    conn.send(("ready", llm.apply_model(describe)[0]))  # the experts' layout: a figure names what it measured
    while conn.recv() == "go":
        t = time.perf_counter()
        out = llm.generate(texts, params, use_tqdm=False)
        conn.send((time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in out]))


IDLE_LIMIT = 0.05
"""The CPU share (of one CPU) the waiting engine may use during the other's turn before the run is flagged."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--a", required=True, help="setting A (key=value ...)")
    ap.add_argument("--b", required=True, help="setting B")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--batch", type=int, default=1, help="requests generated together")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    procs, conns, layouts = [], [], []
    for setting in (args.a, args.b):  # loaded one after the other (loading both at once halves each)
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(args.model, setting, args.tokens, args.batch, child))
        p.start()
        ready = parent.recv()
        if not (isinstance(ready, tuple) and ready[0] == "ready"):
            raise SystemExit(f"engine for {setting!r} did not start")
        layouts.append(ready[1])
        print(f"{'AB'[len(procs)]}: {setting}: {ready[1]}", flush=True)
        procs.append(p)
        conns.append(parent)
    secs: list[list[float]] = [[], []]
    tokens: list[list[int]] = [[], []]
    idle: list[float] = []  # the waiting engine's CPU seconds over each turn's wall seconds
    for turn in range(args.turns):
        order = (0, 1) if turn % 2 == 0 else (1, 0)  # alternate who goes first
        for i in order:
            other = procs[1 - i].pid
            cpu0 = cpu_seconds(other)
            conns[i].send("go")
            dt, toks = conns[i].recv()
            idle.append((cpu_seconds(other) - cpu0) / dt)
            secs[i].append(dt)
            tokens[i] = toks
    if max(idle) > IDLE_LIMIT:
        print(f"WARNING: the waiting engine used up to {max(idle):.0%} of a CPU while the other ran (a setting whose "
              "idle threads spin, e.g. OMP_WAIT_POLICY=active?): the turns are not independent, the ratio is not "
              "the settings' alone", flush=True)
    for c, p in zip(conns, procs):
        c.send("stop")
        p.join(timeout=60)
    ratios = [a / b for a, b in zip(*secs)]
    res = {
        "model": args.model, "a": args.a, "b": args.b, "tokens": args.tokens, "batch": args.batch, "turns": args.turns,
        "a_ms": [round(s * 1e3) for s in secs[0]], "b_ms": [round(s * 1e3) for s in secs[1]],
        "a_tok_s": args.batch * args.tokens / statistics.median(secs[0]),
        "b_tok_s": args.batch * args.tokens / statistics.median(secs[1]),
        "b_over_a_speed": statistics.median(ratios), "ratio_min_max": [min(ratios), max(ratios)],
        "same_tokens": tokens[0] == tokens[1], "idle_cpu_max": max(idle), "experts": layouts,
    }
    print("RESULT " + json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
