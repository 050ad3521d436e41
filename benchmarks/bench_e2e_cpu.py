"""End-to-end decoding on vLLM's CPU backend: dense vs sparse experts, with and without speculation.

One in-process engine per speculation setting; the expert backend is switched on the live
model, so dense and sparse run side by side on the same engine, prompts and machine.
Prints a markdown table (and writes JSON with --json): decode tokens/s, speed-up of
sparse over dense, mean accepted draft length, and the sparsity the FFN saw (token-level
and per executed segment — at a verify step a segment is the k+1-token chunk); "auto,
stats off" repeats `auto` with the live sparsity counters off; "counters' cost" is how much
faster that runs (their overhead; negative = within noise). Columns are timed round-robin,
repeat after repeat, so a shared machine's drift hits them alike.

    python benchmarks/bench_e2e_cpu.py --model models/blockffn-tiny-trained \\
        [--eagle-head DIR] [--batch 1,8] [--tokens 64] [--repeats 3]
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


def spec_configs(args) -> dict[str, dict | None]:
    configs: dict[str, dict | None] = {"none": None,
                                       "ngram k=3": {"method": "ngram", "num_speculative_tokens": 3,
                                                     "prompt_lookup_max": 4, "prompt_lookup_min": 2}}
    if args.eagle_head:
        configs["eagle k=3"] = {"method": "eagle", "model": args.eagle_head, "num_speculative_tokens": 3}
    if args.draft_model:
        configs["draft k=3"] = {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": 3}
    return configs


def metric(llm, name: str) -> float:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0) or 0)
    return 0.0


def sparsity(llm) -> tuple[float, float]:
    def read(model):
        from vllm_blockffn.observe.stats import RECORDER

        rows = RECORDER.snapshot()
        RECORDER.reset()
        tls = statistics.mean(r.token_sparsity for r in rows)
        cls = statistics.mean(r.chunk_sparsity for r in rows)
        return tls, cls

    return llm.apply_model(read)[0]


def set_backend(llm, backend: str) -> None:
    def apply(model):
        from vllm_blockffn.serving.layers.blockffn import BlockFFN

        for m in model.modules():
            if isinstance(m, BlockFFN):
                m.backend = backend

    llm.apply_model(apply)


BACKENDS = ["dense", "sparse", "auto", "auto/stats-off"]


def use_backend(llm, backend: str) -> None:
    """`auto/stats-off`: the auto backend with the live sparsity counters off."""
    os.environ["VLLM_BLOCKFFN_STATS"] = "0" if backend.endswith("stats-off") else "1"
    set_backend(llm, backend.split("/")[0])


def run(args) -> list[dict]:
    from vllm import LLM, SamplingParams

    rows = []
    for spec_name, spec in spec_configs(args).items():
        llm = LLM(args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.15,
                  max_num_seqs=max(args.batch), seed=0, disable_log_stats=False, speculative_config=spec)
        params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        for batch in args.batch:
            prompts = (PROMPTS * ((batch + len(PROMPTS) - 1) // len(PROMPTS)))[:batch]
            result = {"spec": spec_name, "batch": batch}
            for backend in BACKENDS:  # warm-up
                use_backend(llm, backend)
                llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
            drafts0 = metric(llm, "vllm:spec_decode_num_drafts")
            accepted0 = metric(llm, "vllm:spec_decode_num_accepted_tokens")
            times: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for repeat in range(args.repeats):
                # round-robin, rotated each repeat: drift of a shared machine hits every column alike
                for backend in BACKENDS[repeat % len(BACKENDS):] + BACKENDS[:repeat % len(BACKENDS)]:
                    use_backend(llm, backend)
                    sparsity(llm)  # reset the counters
                    t = time.perf_counter()
                    outs = llm.generate(prompts, params, use_tqdm=False)
                    times[backend].append(time.perf_counter() - t)
                    if not backend.endswith("stats-off"):
                        result[f"{backend}_tls"], result[f"{backend}_segment_sparsity"] = sparsity(llm)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            for backend in BACKENDS:
                result[f"{backend}_tok_s"] = tokens / statistics.median(times[backend])
            drafts = metric(llm, "vllm:spec_decode_num_drafts") - drafts0
            accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens") - accepted0
            result["mean_accepted"] = accepted / drafts if drafts else None
            rows.append(result)
            print(json.dumps(result), flush=True)
        from vllm.distributed import cleanup_dist_env_and_memory

        del llm
        cleanup_dist_env_and_memory()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| speculation | batch | dense tok/s | sparse tok/s | auto tok/s | auto, stats off | sparse/dense "
             "| auto/dense | counters' cost | mean accepted | TLS | segment sparsity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "—"
        lines.append(f"| {r['spec']} | {r['batch']} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | "
                     f"{r['auto_tok_s']:.1f} | {r['auto/stats-off_tok_s']:.1f} | "
                     f"{r['sparse_tok_s'] / r['dense_tok_s']:.2f}× | "
                     f"{r['auto_tok_s'] / r['dense_tok_s']:.2f}× | "
                     f"{r['auto/stats-off_tok_s'] / r['auto_tok_s'] - 1:+.1%} | {acc} | "
                     f"{r['sparse_tls']:.1%} | {r['sparse_segment_sparsity']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--eagle-head")
    parser.add_argument("--draft-model")
    parser.add_argument("--batch", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__} ({torch.get_num_threads()} threads); commit {commit}; model {args.model}; "
              f"dtype {args.dtype}; {args.tokens} new tokens per prompt, median of {args.repeats}")
    rows = run(args)
    print(header)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
