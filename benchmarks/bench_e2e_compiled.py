"""One vLLM engine per (dtype, expert backend) with torch.compile on — what `vllm serve` runs — and
the ms of a batch-1 generate of 32 new tokens (median of 5, after one warm-up).

bench_e2e_cpu.py switches the backend on a live engine, which a compiled graph does not see, so it
runs eager; this script gives the compiled figures beside it (benchmarks/RESULTS.md, "Compiled
engine"). The backend is read from VLLM_BLOCKFFN_BACKEND when the model is built.

    scripts/dev python benchmarks/bench_e2e_compiled.py /tmp/xl bfloat16 auto [blockffn_int8]

With ``--rows-from=E2E.json`` (a bench_e2e_cpu.py ``--json`` of the same model): its batch 1/4/8 rows
instead (its prompts, 32 tokens, 5 runs after a warm-up), each with its memory-speed limit: the row's
weight bytes from that run's router probe (routing does not depend on the execution mode) over the read
bandwidth measured right before each run; % of limit is the median of the runs' own ratios (this VM's
bandwidth drifts by ±20% within minutes: a figure from another minute would mislead).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def batch_rows(llm, rows_json: str) -> None:
    """bench_e2e_cpu.py's batch rows on this compiled engine, each against its memory-speed limit."""
    from bench_e2e_cpu import PROMPTS, read_bandwidth
    from vllm import SamplingParams

    with open(rows_json) as f:
        data = json.load(f)
    need = {r["row"]: r["bytes_needed"] for r in (data["rows"] if isinstance(data, dict) else data)}

    for n in (n for n in (1, 4, 8) if f"batch {n}" in need):  # the rows the file has
        prompts = (PROMPTS * 8)[:n]
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
        runs, bws, pcts = [], [], []
        for _ in range(5):  # each run beside the bandwidth measured right before it (the VM drifts)
            bws.append(read_bandwidth())
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            runs.append(time.perf_counter() - t)
            pcts.append(need[f"batch {n}"] / (bws[-1] * 1e9) / runs[-1])
        t, gbs = statistics.median(runs), statistics.median(bws)
        limit = need[f"batch {n}"] / (gbs * 1e9)
        print("ROW " + json.dumps(dict(row=f"batch {n}", ms=t * 1e3, runs=[round(x * 1e3) for x in runs],
                                       read_gbs=gbs, reads_gbs=[round(b, 1) for b in bws], limit_ms=limit * 1e3,
                                       pct_of_limit=statistics.median(pcts), pcts=[round(p, 3) for p in pcts],
                                       tok_s=32 * n / t)), flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--rows-from")]
    rows_json = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rows-from=")), None)
    model, dtype, backend = args[0], args[1], args[2]
    quantization = args[3] if len(args) > 3 else None  # e.g. blockffn_int8
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_BLOCKFFN_BACKEND"] = backend
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_model_len=256, seed=0, max_num_seqs=8 if rows_json else 1,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False, quantization=quantization)
    if rows_json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        batch_rows(llm, rows_json)
        return
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompt = "The json module exposes an API familiar to users of the standard library"
    llm.generate([prompt], params, use_tqdm=False)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        runs.append(time.perf_counter() - t)
    ms = statistics.median(runs) * 1e3
    print("RESULT " + json.dumps(dict(dtype=dtype, quantization=quantization, backend=backend, ms=ms,
                                      runs=[round(x * 1e3) for x in runs],
                                      tok_s=32e3 / ms, tokens=list(out[0].outputs[0].token_ids)[:8])))


if __name__ == "__main__":
    main()
