"""One vLLM engine per (dtype, expert backend) with torch.compile on — what `vllm serve` runs — and
the ms of a batch-1 generate of 32 new tokens (median of 5, after one warm-up).

bench_e2e_cpu.py switches the backend on a live engine, which a compiled graph does not see, so it
runs eager; this script gives the compiled figures beside it (benchmarks/RESULTS.md, "Compiled
engine"). The backend is read from VLLM_BLOCKFFN_BACKEND when the model is built.

    scripts/dev python benchmarks/bench_e2e_compiled.py /tmp/xl bfloat16 auto [blockffn_int8]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main() -> None:
    model, dtype, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    quantization = sys.argv[4] if len(sys.argv) > 4 else None  # e.g. blockffn_int8
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_BLOCKFFN_BACKEND"] = backend
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_model_len=256, seed=0, max_num_seqs=1, kv_cache_memory_bytes=1 << 30,
              enable_prefix_caching=False, quantization=quantization)
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
