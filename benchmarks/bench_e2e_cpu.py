"""End-to-end generation on vLLM's CPU backend: dense vs sparse experts, against the Amdahl bound.

Made to run on a model inflated to an official size (`vllm-blockffn inflate`, whose expert bytes per
layer and depth equal BlockFFN-Small … XLarge and whose routing is the trained model's), in the dtype
given by --dtype (bf16, the checkpoints' dtype, by default; fp32 on CPUs without AVX512_BF16/AMX, where
vLLM's own bf16 GEMMs fall back to plain PyTorch).
One in-process engine per speculation setting; the expert backend is switched on the live model,
so all columns run on the same engine, prompts and machine, timed round-robin (the order rotated
every repeat, so a shared machine's drift hits them alike); each figure is the median of --repeats.

Rows: batch 1; batch 1 with EAGLE k=3 (--eagle-head); batch 4; batch 8; prefill-heavy (long
prompts, few new tokens). Columns, in ms per generate() call:
  dense, sparse, auto        the `VLLM_BLOCKFFN_BACKEND` values
  auto stats-off             auto with the live sparsity counters off
  skip = T_rest              benchmark-only backend: experts output zeros and read nothing (with
                             speculation, scaled to the dense run's number of verify steps, since
                             skipping changes what is accepted)
  a                          the fraction of expert bytes a step needs: |∪ of the active experts of
                             all tokens of the step| / E, averaged over steps and layers — one token
                             at batch 1, the k+1-token verify chunk with EAGLE, the whole batch at
                             batch > 1 (the CPU kernel reads each active expert once per step);
                             measured in a separate untimed run by wrapping every BlockFFN router
  bound B                    T_dense / (T_rest + (T_dense − T_rest)·a): the speed-up if the experts'
                             time fell exactly in proportion to the bytes they need
  auto vs bound              (T_dense / T_auto) / B
  limit                      the memory-speed limit of the auto run: the bytes its steps must read
                             (per step and layer, the union of active experts' W_up and W_down rows,
                             measured by the router probe; plus every non-expert weight except the
                             embedding table, once per step) ÷ the read bandwidth measured at the start
                             of the same run (the kernel's streaming loop, 1 GiB, the engine's threads)
                             (with EAGLE: the target's steps only; the head's reads are not counted)
  % of limit                 limit / T_auto
  … per run                  the median over the auto runs of each run's own ratio, its limit from the
                             bandwidth measured right before it (this VM's bandwidth drifts ±20% within
                             minutes; the column before uses the figure from the run's start)
  not experts                T_rest / T_auto: the share of the auto step that is not the experts

    scripts/dev vllm-blockffn inflate models/blockffn-tiny-trained /tmp/small --like small \\
        --eagle-head models/blockffn-tiny-trained-eagle /tmp/small-eagle
    scripts/dev python benchmarks/bench_e2e_cpu.py --model /tmp/small --eagle-head /tmp/small-eagle \\
        [--dtype bfloat16] [--tokens 64] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = [
    "The json module exposes an API familiar to users of the standard library",
    "Return a new dictionary initialized from an optional positional argument",
    "The logging module defines functions and classes which implement",
    "A dataclass is a class whose main purpose is to hold data",
    "Regular expressions are a powerful language for matching text patterns",
    "The pathlib module offers classes representing filesystem paths",
    "An iterator is an object representing a stream of data",
    "The argparse module makes it easy to write user-friendly command-line interfaces",
]
COLUMNS = ["dense", "sparse", "auto", "auto/stats-off", "skip"]
WEIGHTS: dict[str, float] = {}
"""expert_bytes (one expert's W_up + W_down rows), rest_bytes (all other weights but the embedding
table), read_gbs: filled by :func:`model_bytes` and :func:`read_bandwidth` before the rows run."""


def model_bytes(llm) -> None:
    """Weight bytes by role, from the served model (in the served dtype)."""

    def count(model):
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        expert = rest = 0
        one_expert = 0
        for name, p in model.named_parameters():
            b = p.numel() * p.element_size()
            if "embed_tokens" in name:
                continue
            if name.endswith(("mlp.up_proj", "mlp.down_proj", "mlp.up_proj_scale", "mlp.down_proj_scale")):
                expert += b
            else:
                rest += b
        for m in model.modules():
            if isinstance(m, BlockFFN):
                one_expert = m.expert_bytes // m.tp_size  # int8: + the expert's fp32 row scales
                break
        return one_expert, rest

    one_expert, rest = llm.apply_model(count)[0]
    WEIGHTS.update(expert_bytes=one_expert, rest_bytes=rest)


def read_bandwidth() -> float:
    """GB/s of a 1 GiB fp32 read with the native kernel's streaming loop (torch's threads), best of 5."""
    import torch
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    buf = torch.ones(1 << 28)
    best = 0.0
    for _ in range(6):
        t = time.perf_counter()
        cpu_native.stream_read(buf)
        best = max(best, (1 << 30) / (time.perf_counter() - t) / 1e9)
    return best


def rows_wanted(args: argparse.Namespace) -> list[dict]:
    """The table's rows: name, speculation, batch, prompt length (None = the short PROMPTS), new tokens."""
    rows = [{"row": "batch 1", "spec": "none", "batch": 1, "prompt_len": None, "tokens": args.tokens}]
    if args.eagle_head:
        rows.append({"row": "batch 1, EAGLE k=3", "spec": "eagle", "batch": 1, "prompt_len": None,
                     "tokens": args.tokens})
    rows += [{"row": f"batch {b}", "spec": "none", "batch": b, "prompt_len": None, "tokens": args.tokens}
             for b in (4, 8)]
    rows.append({"row": "prefill-heavy", "spec": "none", "batch": args.prefill_batch, "prompt_len": args.prefill_len,
                 "tokens": args.prefill_tokens})
    if args.rows:  # comma-separated names; a name may hold a comma itself ("batch 1, EAGLE k=3")
        listed = "," + ",".join(s.strip() for s in args.rows.split(",")) + ","
        rows = [r for r in rows if "," + ",".join(s.strip() for s in r["row"].split(",")) + "," in listed]
    return rows


def metric(llm, name: str) -> float:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0) or 0)
    return 0.0


def use_backend(llm, column: str) -> None:
    """`auto/stats-off`: the auto backend with the live sparsity counters off."""
    stats_off = column.endswith("stats-off")
    os.environ["VLLM_BLOCKFFN_STATS"] = "0" if stats_off else "1"

    def apply(model):
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        for m in model.modules():
            if isinstance(m, BlockFFN):
                m.backend = column.split("/")[0]
                if hasattr(m, "record_stats"):  # read when the layer is built: its counters exist only if on then
                    m._bench_record_stats = getattr(m, "_bench_record_stats", m.record_stats)
                    m.record_stats = m._bench_record_stats and not stats_off

    llm.apply_model(apply)


def router_probe(llm, install: bool) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Install (or remove and return) a wrapper on every BlockFFN router recording, per call (= one
    layer in one step): experts in the union over the step's tokens, active (token, expert) pairs, tokens."""

    def apply(model):
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        out = []
        for m in model.modules():
            if not isinstance(m, BlockFFN):
                continue
            if install:
                m._bench_probe = []

                def router(x, _m=m, _orig=BlockFFN.router):
                    scores = _orig(_m, x)
                    active = scores > 0
                    _m._bench_probe.append((int(active.any(0).sum()), int(active.sum()), x.shape[0]))
                    return scores

                m.router = router
            else:
                out.append((m.spec.num_experts, m._bench_probe))
                del m.router, m._bench_probe
        return out

    return llm.apply_model(apply)[0]


def prompts_for(llm, row: dict) -> list:
    """Short text prompts, or (prefill-heavy) distinct token-id prompts of exactly prompt_len tokens."""
    n = row["batch"]
    if row["prompt_len"] is None:
        return (PROMPTS * ((n + len(PROMPTS) - 1) // len(PROMPTS)))[:n]
    ids = llm.get_tokenizer()(" ".join(PROMPTS))["input_ids"]
    ids = ids * (row["prompt_len"] // len(ids) + 2)
    return [{"prompt_token_ids": ids[7 * i: 7 * i + row["prompt_len"]]} for i in range(n)]


def measure_row(llm, row: dict, repeats: int) -> dict:
    from vllm import SamplingParams

    prompts = prompts_for(llm, row)
    params = SamplingParams(max_tokens=row["tokens"], temperature=0, ignore_eos=True)
    for column in COLUMNS:  # warm-up: every column's kernels and shapes (prefill, decode) once
        use_backend(llm, column)
        llm.generate(prompts, SamplingParams(max_tokens=min(8, row["tokens"]), ignore_eos=True), use_tqdm=False)

    # Untimed: how many experts each step's union needs (routing does not depend on the backend).
    use_backend(llm, "dense")
    router_probe(llm, install=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    layers = router_probe(llm, install=False)
    union = sum(u for _, calls in layers for u, _, _ in calls) / sum(e * len(calls) for e, calls in layers)
    n_steps = max(len(calls) for _, calls in layers)
    experts_read = sum(u for _, calls in layers for u, _, _ in calls) * WEIGHTS["expert_bytes"]
    need = experts_read + n_steps * WEIGHTS["rest_bytes"]
    token = sum(a for _, calls in layers for _, a, _ in calls) / sum(e * t for e, calls in layers for _, _, t in calls)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    times: dict[str, list[float]] = {c: [] for c in COLUMNS}
    steps: dict[str, list[float]] = {c: [] for c in COLUMNS}
    auto_pcts: list[float] = []  # each auto run against the bandwidth measured right before it
    accepted = drafts = 0.0
    for repeat in range(repeats):
        k = repeat % len(COLUMNS)
        for column in COLUMNS[k:] + COLUMNS[:k]:
            use_backend(llm, column)
            gbs = read_bandwidth() if column == "auto" else 0.0
            d0, a0 = metric(llm, "vllm:spec_decode_num_drafts"), metric(llm, "vllm:spec_decode_num_accepted_tokens")
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times[column].append(time.perf_counter() - t)
            if gbs:
                auto_pcts.append(need / (gbs * 1e9) / times[column][-1])
            d = metric(llm, "vllm:spec_decode_num_drafts") - d0
            steps[column].append(d)
            if column == "dense":
                drafts += d
                accepted += metric(llm, "vllm:spec_decode_num_accepted_tokens") - a0
    t = {c: statistics.median(v) for c, v in times.items()}
    rest = t["skip"]
    if row["spec"] != "none" and statistics.median(steps["skip"]) > 0:
        rest *= statistics.median(steps["dense"]) / statistics.median(steps["skip"])
    bound = t["dense"] / (rest + (t["dense"] - rest) * union)
    limit = need / (WEIGHTS["read_gbs"] * 1e9)
    result = dict(row, new_tokens=tokens, a=union, token_active=token, t_rest_ms=rest * 1e3, bound=bound,
                  steps=n_steps, bytes_needed=need, limit_ms=limit * 1e3, pct_of_limit=limit / t["auto"],
                  pct_of_limit_adjacent=statistics.median(auto_pcts),
                  pct_of_limit_runs=[round(p, 3) for p in auto_pcts],
                  not_experts=t["skip"] / t["auto"],
                  mean_accepted=accepted / drafts if drafts else None,
                  auto_vs_bound=(t["dense"] / t["auto"]) / bound)
    for c in COLUMNS:
        result[f"{c}_ms"] = t[c] * 1e3
        result[f"{c}_tok_s"] = tokens / t[c]
        result[f"{c}_runs_ms"] = [round(x * 1e3, 1) for x in times[c]]
    return result


def run(args: argparse.Namespace) -> list[dict]:
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    wanted = rows_wanted(args)
    results = []
    for spec_name in ("none", "eagle"):
        rows = [r for r in wanted if r["spec"] == spec_name]
        if not rows:
            continue
        spec = None if spec_name == "none" else {"method": "eagle", "model": args.eagle_head,
                                                 "num_speculative_tokens": 3}
        max_len = max((r["prompt_len"] or 64) + r["tokens"] for r in rows) + 64
        llm = LLM(args.model, dtype=args.dtype, enforce_eager=True, max_model_len=max_len, seed=0,
                  max_num_seqs=max(r["batch"] for r in rows), enable_prefix_caching=False,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), disable_log_stats=False,
                  speculative_config=spec, quantization=args.quantization)
        model_bytes(llm)
        for row in rows:
            results.append(measure_row(llm, row, args.repeats))
            print(json.dumps(results[-1]), flush=True)
        del llm
        cleanup_dist_env_and_memory()
    order = [r["row"] for r in wanted]
    return sorted(results, key=lambda r: order.index(r["row"]))


def table(rows: list[dict]) -> str:
    lines = ["| row | batch | prompt → new tokens | dense ms | sparse ms | auto ms | auto, stats off ms "
             "| skip = T_rest ms | a | bound B | auto/dense | sparse/dense | auto vs bound | dense tok/s | auto tok/s "
             "| limit ms | auto % of limit | … per run | not experts | mean accepted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "—"
        prompt = r["prompt_len"] or "short"
        lines.append(
            f"| {r['row']} | {r['batch']} | {prompt} → {r['tokens']} | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | "
            f"{r['auto_ms']:.0f} | {r['auto/stats-off_ms']:.0f} | {r['t_rest_ms']:.0f} | {r['a']:.1%} | "
            f"{r['bound']:.2f}× | {r['dense_ms'] / r['auto_ms']:.2f}× | {r['dense_ms'] / r['sparse_ms']:.2f}× | "
            f"{r['auto_vs_bound']:.0%} | {r['dense_tok_s']:.1f} | {r['auto_tok_s']:.1f} | {r['limit_ms']:.0f} | "
            f"{r['pct_of_limit']:.0%} | {r['pct_of_limit_adjacent']:.0%} | {r['not_experts']:.0%} | {acc} |")
    return "\n".join(lines)


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _isa() -> str:
    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    return str(cpu_native.cpu_isa())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="BlockFFN checkpoint folder (e.g. an inflated one)")
    parser.add_argument("--eagle-head", help="EAGLE head for the model (adds the 'batch 1, EAGLE k=3' row)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt in the decode rows")
    parser.add_argument("--prefill-len", type=int, default=448, help="prompt tokens in the prefill-heavy row")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-tokens", type=int, default=4, help="new tokens in the prefill-heavy row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", help="comma-separated row names to run (default: all)")
    parser.add_argument("--quantization", choices=["blockffn_int8"], help="int8 weights, quantized at load")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    import torch

    inflated = ""
    meta = os.path.join(args.model, "inflate.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            target = json.load(f)["plan"]["target"]
        inflated = f" (inflated like {target['name']})"
    WEIGHTS["read_gbs"] = read_bandwidth()
    header = (f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__} ({torch.get_num_threads()} threads); commit {commit}"
              f"{' + local changes' if dirty else ''}; model {args.model}{inflated}; "
              f"eagle head {args.eagle_head or '—'}; {args.dtype}, enforce_eager, kernel ISA "
              f"{_isa()}, read bandwidth {WEIGHTS['read_gbs']:.1f} GB/s (same run), "
              f"prefix caching off; {args.tokens} new tokens per prompt (prefill-heavy: {args.prefill_batch} × "
              f"{args.prefill_len} → {args.prefill_tokens}); median of {args.repeats}, columns round-robin")
    start = time.perf_counter()
    rows = run(args)
    header += f"; {time.perf_counter() - start:.0f} s"
    print(header)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
