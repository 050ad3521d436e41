"""Where a compiled CPU decode step goes: each native kernel call, vLLM's attention kernels, and the
gaps between them (Python, torch dispatch, vLLM's attention wrappers, the engine between steps).

Why: a decode step of a BlockFFN model on a CPU is its weight reads plus a fixed time that reads
no weights; the memory-speed limit (bytes ÷ read bandwidth) is only reachable when the second is
small. cProfile inflates Python several fold and hides C time inside its callers; this probe only
timestamps the entry and exit of the ctypes calls into ``cpu_native`` (linears by their output
width, experts per layer) and of vLLM's two CPU attention ops, and the entry of our Python
wrappers, so the step splits into kernel time (with bytes, GB/s) and gaps, at ~1 µs per probe. The C++ ops
(``torch.ops.blockffn_native``, kernels/sparse_ffn/cpu_ops.py) are timed at their entry from the
compiled graph: their calls include the dispatcher's few µs. It runs inductor's Python wrapper
(``VLLM_BLOCKFFN_CPP_WRAPPER=off``, unless set): the C++ wrapper served by default calls the ops past the probes
and takes the gaps' Python share away (serving/cpu_compile.py).

    scripts/dev python benchmarks/step_breakdown_cpu.py /tmp/xl [--quantization blockffn_int8]
        [--tokens 64] [--batch N] [--json FILE] [--dump-calls DIR]

One engine, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), compiled as ``vllm serve`` runs it,
batch 1 (or N distinct prompts), greedy; the first (prefill) step is left out. The expert bytes per
layer are the layer's mean step union (the router's active experts over the step's tokens, recomputed
by the probe outside the timed calls) × one expert's bytes; each layer's line gives its tokens an expert too
(the step's active (token, expert) pairs over its union: from ~4 a call is as much arithmetic as memory on
CPUs without AMX). Beside the memory-speed limit the step's multiply-adds (linears: batch × N × H; experts:
pairs × 2 × d_e × H, plus the router) at the FMA peak measured in the same run (``cpu_native.fma_peak``: fp32
FMAs on the path's widest vectors), and the two in sequence: a step on a CPU that does not overlap its
arithmetic with its reads cannot beat that sum. ``--dump-calls DIR`` saves one step's expert calls for
benchmarks/replay_experts_cpu.py. Figures drift with the machine's bandwidth: compare runs taken minutes
apart, or within one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

PROMPT = "The json module exposes an API familiar to users of the standard library"
WORDS = ["parsing", "streams", "encoders", "floats", "unicode", "files", "errors", "schemas"]


def batch_prompts(batch: int) -> list[str]:
    """batch distinct prompts of about the same length (the first is PROMPT)."""
    return [PROMPT] + [f"{PROMPT}, example {i}: {WORDS[i % len(WORDS)]}" for i in range(1, batch)]


class Probe:
    """Timestamps of probed calls: per tag the call durations, per (previous, next) the gaps."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = collections.defaultdict(list)
        self.gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        self.last: tuple[str, float] | None = None
        self.steps = 0  # lm_head calls seen: decode steps start after the first
        self.unions: dict[int, list[int]] = collections.defaultdict(list)  # layer -> the step's expert union
        self.pairs: dict[int, list[int]] = collections.defaultdict(list)  # layer -> its active (token, expert) pairs
        self.secs: dict[int, list[float]] = collections.defaultdict(list)  # layer -> its calls' durations
        self.dump: str | None = None  # --dump-calls DIR

    def reset(self) -> None:
        self.calls.clear()
        self.gaps.clear()
        self.last, self.steps = None, 0
        self.unions.clear()
        self.pairs.clear()
        self.secs.clear()

    def enter(self, tag: str) -> float:
        t = time.perf_counter()
        if self.last is not None and self.steps >= 1:
            self.gaps[(self.last[0], tag)].append(t - self.last[1])
        return t

    def leave(self, tag: str, t0: float, call: bool = True) -> None:
        t = time.perf_counter()
        if call and self.steps >= 1:
            self.calls[tag].append(t - t0)
        self.last = (tag, t if call else t0)

    def wrap_c(self, fn, tag_of):
        def probed(*args):
            tag = tag_of(args)
            t0 = self.enter(tag)
            r = fn(*args)
            self.leave(tag, t0)
            if tag == LM_HEAD[0]:
                self.steps += 1
            return r
        return probed

    def wrap_py(self, fn, tag: str):
        def probed(*args, **kwargs):
            self.leave(tag, self.enter(tag), call=False)
            return fn(*args, **kwargs)
        return probed


LM_HEAD = [""]
ROUTER_EXPERTS = "router+experts"


class ProbedLib:
    """The kernel's ctypes library with its two compute entries timed."""

    def __init__(self, lib, probe: Probe) -> None:
        self._lib = lib
        self.blockffn_linear = probe.wrap_c(lib.blockffn_linear, lambda a: f"linear N={a[6]}")
        if hasattr(lib, "blockffn_linear_kmajor"):  # bf16 weights packed K-major (absent before 6f29c9b)
            self.blockffn_linear_kmajor = probe.wrap_c(lib.blockffn_linear_kmajor, lambda a: f"linear N={a[5]}")
        if hasattr(lib, "blockffn_linear_kmajor_f32"):  # fp32 weights packed K-major (absent before 2026-12-07)
            self.blockffn_linear_kmajor_f32 = probe.wrap_c(lib.blockffn_linear_kmajor_f32,
                                                           lambda a: f"linear N={a[5]}")
        if hasattr(lib, "blockffn_linear_kmajor_i8"):  # int8 weights packed K-major
            self.blockffn_linear_kmajor_i8 = probe.wrap_c(lib.blockffn_linear_kmajor_i8, lambda a: f"linear N={a[5]}")
        self.blockffn_sparse_ffn = probe.wrap_c(lib.blockffn_sparse_ffn, lambda a: "experts")
        if hasattr(lib, "blockffn_router_sparse_ffn"):  # (absent before 46128dc: A/Bs against older code)
            self.blockffn_router_sparse_ffn = probe.wrap_c(lib.blockffn_router_sparse_ffn, lambda a: "router+experts")

    def __getattr__(self, name):
        return getattr(self._lib, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=1,
                    help="requests decoded together (distinct prompts; expert bytes = each step's union)")
    ap.add_argument("--dump-calls", default=None, metavar="DIR",
                    help="save one decode step's router_experts call a layer (its arguments) into DIR, for "
                         "benchmarks/replay_experts_cpu.py (C++ ops only)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # the probes wrap the ops as the graph's Python wrapper calls them: inductor's C++ wrapper (the default for
    # BlockFFN on CPU, serving/cpu_compile.py) would call them past the probes, so this tool uses Python's
    os.environ.setdefault("VLLM_BLOCKFFN_CPP_WRAPPER", "off")

    import torch
    import vllm._custom_ops as vops
    from vllm import LLM, SamplingParams
    from vllm_blockffn.kernels.sparse_ffn import cpu as cpu_experts
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    import vllm_blockffn.serving.layers.blockffn as blockffn_layer
    from vllm_blockffn.observe.stats import RECORDER, SEGMENTS, UNION

    probe = Probe()
    if args.dump_calls:
        os.makedirs(args.dump_calls, exist_ok=True)
        probe.dump = args.dump_calls
    assert cpu_native.native_available(), "the native CPU kernel is needed"
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    cpu_ops.implementation()  # bound to the kernel's own entry points before the probe wraps them
    cpu_native._lib = ProbedLib(cpu_native._load(), probe)
    for name in ("cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache"):
        fn = getattr(vops, name)
        setattr(vops, name, (lambda f, n: lambda *a, **k: _timed(probe, n, f, a, k))(fn, name))
    blockffn_layer.run_experts = probe.wrap_py(blockffn_layer.run_experts, "py run_experts")
    if hasattr(blockffn_layer, "bound_experts"):
        blockffn_layer.bound_experts = probe.wrap_py(blockffn_layer.bound_experts, "py bound_experts")
    cpu_experts.sparse_ffn_native = probe.wrap_py(cpu_experts.sparse_ffn_native, "py sparse_ffn_native")
    cpu_native.linear_native = probe.wrap_py(cpu_native.linear_native, "py linear_native")

    kw = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(args.model, dtype=args.dtype, max_model_len=512, seed=0, max_num_seqs=args.batch,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False, **kw)
    cfg = llm.llm_engine.model_config.hf_config
    LM_HEAD[0] = f"linear N={cfg.vocab_size}"
    probe_cpp_ops(probe)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompts = batch_prompts(args.batch)
    llm.generate(prompts, params, use_tqdm=False)
    RECORDER.reset()
    probe.reset()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    steps = probe.steps - 1  # decode steps measured (the prefill step is left out)
    buf = torch.ones(1 << 28)
    bw = max(buf.numel() * 4 / _secs(cpu_native.stream_read, buf) for _ in range(3)) / 1e9
    peak = max(cpu_native.fma_peak() for _ in range(3)) / 1e9  # multiply-adds a ns, fp32 FMAs

    D, H = cfg.expert_size, cfg.hidden_size
    elt = 1 if args.quantization == "blockffn_int8" else getattr(torch, args.dtype).itemsize
    if probe.unions:  # the step's union seen by the C++ op's probe (a batch's tokens share one read)
        layers = [(i, statistics.fmean(u)) for i, u in sorted(probe.unions.items())]
    else:  # ctypes path: the live counters' segment union (= the step's at batch 1)
        assert args.batch == 1, "--batch needs the C++ ops (the step's union is read from their arguments)"
        layers = [(i, float(r[UNION] / max(r[SEGMENTS], 1))) for i, r in sorted(RECORDER._totals.items())]
    expert_mb = [u * 2 * D * H * elt / 1e6 for _, u in layers]
    ex = probe.calls.get("experts") or probe.calls[ROUTER_EXPERTS]
    # a layer's mean time beside its mean union (the mean bytes): a median time beside a mean union overstates
    # GB/s where a layer's union varies from step to step (3 experts most steps, 30 on a few)
    per_layer = [statistics.fmean(probe.secs[i]) if probe.secs.get(i) else statistics.fmean(ex[k::len(layers)])
                 for k, (i, _) in enumerate(layers)]

    rows = []
    print(f"{args.model} {args.dtype} {args.quantization or ''} batch {args.batch}: {steps} decode steps, "
          f"{wall / (steps + 1) * 1e3:.2f} ms per step (all steps), read bandwidth {bw:.1f} GB/s (2 threads)")
    from vllm_blockffn.serving.layers.cpu_experts import describe

    print(f"  {llm.apply_model(describe)[0]}")  # the experts' layout: a figure names what it measured
    kernel_ms = step_mb = 0.0
    macs = {"linears": 0.0, "router + experts": 0.0}  # multiply-adds a step (G)
    for tag, v in sorted(probe.calls.items()):
        ms = sum(v) / steps * 1e3
        kernel_ms += ms
        mb = None
        if tag.startswith("linear"):
            n = int(tag.removeprefix("linear N="))
            # the router (N = E) stays in the model's dtype under int8 (quantization.py SKIPPED_LINEARS)
            lin_elt = getattr(torch, args.dtype).itemsize if n == cfg.num_experts else elt
            mb = n * H * lin_elt / 1e6 * len(v) / steps  # [N, H] weights per step
            macs["linears"] += n * H * args.batch * len(v) / steps / 1e9  # a decode step: batch rows
        elif tag == "experts":
            mb = sum(expert_mb)  # every layer's union, per step
        elif tag == ROUTER_EXPERTS:  # the router read inside the expert kernel (VLLM_BLOCKFFN_CPU_ROUTER=fused)
            mb = sum(expert_mb) + len(layers) * cfg.num_experts * H * getattr(torch, args.dtype).itemsize / 1e6
        step_mb += mb or 0.0
        gbs = f"{mb / ms:5.1f} GB/s over {mb:6.1f} MB" if mb else ""
        print(f"  call {tag:34s} {len(v) / steps:5.1f}/step  median {statistics.median(v) * 1e6:7.1f} µs  "
              f"{ms:6.2f} ms/step  {gbs}")
        rows.append({"kind": "call", "tag": tag, "per_step": len(v) / steps, "median_us": statistics.median(v) * 1e6,
                     "ms_per_step": ms, "mb_per_step": mb})
    gap_ms = 0.0
    for (a, b), v in sorted(probe.gaps.items(), key=lambda kv: -sum(kv[1])):
        ms = sum(v) / steps * 1e3
        gap_ms += ms
        print(f"  gap  {a:>30s} -> {b:30s} median {statistics.median(v) * 1e6:7.1f} µs  {ms:6.2f} ms/step")
        rows.append({"kind": "gap", "from": a, "to": b, "median_us": statistics.median(v) * 1e6, "ms_per_step": ms})
    step_ms = kernel_ms + gap_ms
    limit_ms = step_mb / bw
    print(f"  in probed calls {kernel_ms:.2f} ms/step, between them {gap_ms:.2f} ms/step: a decode step "
          f"{step_ms:.2f} ms; its weights {step_mb:.0f} MB at {bw:.1f} GB/s = {limit_ms:.2f} ms, so "
          f"{100 * limit_ms / step_ms:.0f}% of the memory-speed limit")
    # the step's arithmetic: every weight times its tokens (pairs for the experts), at the FMA peak
    if probe.pairs:
        macs["router + experts"] = sum(statistics.fmean(probe.pairs[i]) * 2 * D * H + cfg.num_experts * H * args.batch
                                       for i, _ in layers) / 1e9
    compute_ms = sum(macs.values()) / peak * 1e3  # G multiply-adds over G a second
    print(f"  its multiply-adds {sum(macs.values()):.2f} G (" + ", ".join(f"{k} {v:.2f}" for k, v in macs.items())
          + f"; attention's not counted) at the FMA peak {peak:.0f} G/s (fp32 FMAs, measured now) = "
          f"{compute_ms:.2f} ms: memory and arithmetic in sequence {limit_ms + compute_ms:.2f} ms "
          f"({100 * limit_ms / (limit_ms + compute_ms):.0f}% of the limit), overlapped {max(limit_ms, compute_ms):.2f}")
    for (i, u), mb, us in zip(layers, expert_mb, per_layer):
        tpe = f", {statistics.fmean(probe.pairs[i]) / u:4.1f} tokens an expert" if probe.pairs.get(i) and u else ""
        print(f"  layer {i:2d}: union {u:5.1f} experts{tpe}, {mb:5.2f} MB, mean {us * 1e6:6.1f} µs, "
              f"{mb / us / 1e3:5.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "quantization": args.quantization, "batch": args.batch,
                       "steps": steps,
                       "bandwidth_gbs": bw, "fma_peak_gmacs": peak, "gmacs": macs, "compute_ms": compute_ms,
                       "step_ms": step_ms, "step_mb": step_mb, "limit_ms": limit_ms, "rows": rows,
                       "layers": [{"layer": i, "union": u, "mb": mb, "mean_us": us * 1e6,
                                   "pairs": statistics.fmean(probe.pairs[i]) if probe.pairs.get(i) else None}
                                  for (i, u), mb, us in zip(layers, expert_mb, per_layer)]}, f, indent=1)


class _ProbedOp:
    """A C++ op of torch.ops.blockffn_native as the compiled graph calls it (``<packet>.default(...)``),
    timed like the ctypes calls (so its time includes the dispatcher's, a few µs)."""

    def __init__(self, probe: Probe, op, tag_of) -> None:
        self.default, self._probe, self._op, self._tag_of = self, probe, op, tag_of

    def __call__(self, *args, **kwargs):
        tag = self._tag_of(args)
        t0 = self._probe.enter(tag)
        r = self._op(*args, **kwargs)
        self._probe.leave(tag, t0)
        secs = self._probe.last[1] - t0
        if tag == LM_HEAD[0]:
            self._probe.steps += 1
        if tag == ROUTER_EXPERTS and self._probe.steps >= 1:
            # the step's union of experts (what the kernel reads once each), from the router's own math,
            # outside the timed call and the gaps (the probe's clock restarts after it)
            x, w_r = args[0], args[1]
            active = (x.float() @ w_r.float().t()) > 0
            self._probe.unions[int(args[12])].append(int(active.any(0).sum()))
            self._probe.pairs[int(args[12])].append(int(active.sum()))
            self._probe.secs[int(args[12])].append(secs)
            if self._probe.dump and self._probe.steps == 8:  # one call a layer, for replay_experts_cpu.py
                import torch

                torch.save([a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                           os.path.join(self._probe.dump, f"layer{int(args[12])}.pt"))
            self._probe.last = (tag, time.perf_counter())
        return r


def probe_cpp_ops(probe: Probe) -> None:
    """Time the C++ ops (kernels/sparse_ffn/cpu_ops.py), which call the kernel without ctypes. Installed
    after the engine is built: the compiled graph looks the op up by name on every call, and dynamo must
    not trace the probe."""
    from vllm_blockffn.kernels.sparse_ffn import cpu_ops

    if cpu_ops.implementation() != "cpp":
        return
    import torch

    ns = torch.ops.blockffn_native
    for name, tag_of in (("linear", lambda a: f"linear N={a[1].shape[0]}"),
                         ("int8_linear", lambda a: f"linear N={a[1].shape[0]}"),
                         ("linear_kmajor", lambda a: f"linear N={a[1].shape[0] * a[1].shape[2]}"),
                         ("int8_linear_kmajor", lambda a: f"linear N={a[1].shape[0] * a[1].shape[2]}"),
                         ("router_experts", lambda a: ROUTER_EXPERTS),
                         ("attention", lambda a: "attention (C++: KV update + kernel)")):
        if hasattr(ns, name):
            setattr(ns, name, _ProbedOp(probe, getattr(ns, name).default, tag_of))


def _timed(probe: Probe, tag: str, fn, args, kwargs):
    t0 = probe.enter(tag)
    r = fn(*args, **kwargs)
    probe.leave(tag, t0)
    return r


def _secs(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
