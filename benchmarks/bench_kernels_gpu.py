"""BlockFFN expert part on a GPU: sparse Triton kernels vs dense torch matmuls.

For the GPU machine (H100/H200, torch 2.11 + triton 3.6). Imports only torch, triton and the
repository's ``kernels/``; the expert-major rows also need vLLM installed (its fused-MoE kernel
sources: ``pip install "vllm>=0.32,<0.33"``), and are left out without it.

    python benchmarks/bench_kernels_gpu.py OUT.json            # full sweep (~minutes)
    python benchmarks/bench_kernels_gpu.py OUT.json --quick    # a handful of configs
    python benchmarks/bench_kernels_gpu.py OUT.json --sizes 0  # only H=1792, E=56, D=128
    python benchmarks/bench_kernels_gpu.py OUT.json --quick --tune   # + tile sweep (run it on its own)
    python benchmarks/bench_kernels_gpu.py OUT.json --quick --tune --tune-dir DIR   # + expert-major configs
        # → DIR/blockffn_E=..,D=..,H=..,dtype=bf16,device_name=....json; serve with
        #   VLLM_BLOCKFFN_MOE_CONFIG_DIR=DIR (kernels/sparse_ffn/triton_expert_major.py reads it)
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py /tmp/x.json --dry-run   # CPU smoke test

Sweep: layer sizes (H, E, D) ∈ {(1792, 56, 128), (4096, 128, 128)} (``--official``: the four
official BlockFFN shapes), bf16; tokens per segment L ∈ {1, 2, 4, 8, 16, 32, 64} × segments
S ∈ {1, 4, 8, 16, 32, 64, 128}; chunk-level sparsity
CLS ∈ {50, 60, 70, 80, 90, 95}% (each segment's union has exactly round((1-CLS)·E) experts,
each of its tokens uses each union expert with probability 1/2).

"expert-major" (``expert_major_ffn_triton``: vLLM's fused-MoE GEMMs over the step's active
(token, expert) pairs) is timed beside them when vLLM is importable; "rule" is the path
``kernels.dispatch.cuda_path`` picks for the row's shapes (S + 1 segments, as the served layer
passes them: one per request and the padding segment).

Timing: all paths are captured in CUDA graphs (as vLLM runs decode) and replayed; each
replay is timed with CUDA events after the L2 cache is flushed (a real model's other layers
evict a layer's weights between steps); the median over ``--repeats`` replays is reported.
"sparse" = segment unions + sparse up + sparse down (``sparse_ffn_triton``); "dense" =
``dense_ffn`` (two cuBLAS GEMMs + SiLU + score scaling). The router is timed apart.
Bandwidth: bytes the sparse path must move (active experts' w_up and w_down_t rows per
segment, x, the intermediate h and y) / time, vs the device's peak and vs a measured
device-to-device copy.

Writes JSON (all rows + environment) to OUT.json and a markdown table to OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import (  # noqa: E402
    THRESHOLDS,
    dense_ffn_torch,
    router_naive,
    router_triton,
    sparse_ffn_triton,
)
from kernels.dispatch import cuda_path  # noqa: E402
from kernels.sparse_ffn import triton_expert_major as em  # noqa: E402
from kernels.sparse_ffn.triton_sparse_ffn import SparseFFNConfig, default_config  # noqa: E402
from kernels.testing import make_scores, rel_err  # noqa: E402

SIZES = [(1792, 56, 128), (4096, 128, 128)]
OFFICIAL = {"0.1B Small": (768, 48, 64), "0.5B Medium": (1280, 40, 128), "0.8B Large": (1536, 48, 128),
            "1.2B XLarge": (1792, 56, 128)}  # (H, E, D), as benchmarks/gpu_on_paper.py
SEG_LENS = [1, 2, 4, 8, 16, 32, 64]
NUM_SEGS = [1, 4, 8, 16, 32, 64, 128]  # 8 / 32 / 128: batched decode, where expert-major should win
CLS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
# Peak HBM bandwidth by device name (GB/s); override with --peak-gbps.
PEAKS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0}


class Timer:
    """Times a callable on the GPU (CUDA graph, L2 flushed per replay) or on the CPU (dry run)."""

    def __init__(self, device: str, repeats: int, use_graphs: bool) -> None:
        self.device = device
        self.repeats = repeats
        self.use_graphs = use_graphs and device == "cuda"
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device) if device == "cuda" else None

    def __call__(self, fn) -> float:
        if self.device != "cuda":
            fn()
            ts = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3
        run = fn
        if self.use_graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        else:
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for i in range(self.repeats):
            self.flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_gbps(device: str) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time): the practical peak."""
    if device != "cuda":
        return None
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(10):
        b.copy_(a)
    t1.record()
    torch.cuda.synchronize()
    return 2 * n * 10 / (t0.elapsed_time(t1) * 1e-3) / 1e9


_WEIGHTS: dict = {}


def layer_weights(H, E, D, dtype, device):
    """One layer's (w_up, w_down_t), made on the device once per size."""
    key = (H, E, D, dtype, device)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        g = torch.Generator(device=device).manual_seed(0)
        w_up = (torch.randn(E, D, H, generator=g, device=device) / H**0.5).to(dtype)
        w_down_t = (torch.randn(E, D, H, generator=g, device=device) / D**0.5).to(dtype)
        _WEIGHTS[key] = (w_up, w_down_t)
    return _WEIGHTS[key]


def make_case(H, E, D, L, S, cls, dtype, device, seed=0):
    w_up, w_down_t = layer_weights(H, E, D, dtype, device)
    lengths = [L] * S
    scores, unions = make_scores(lengths, E, 1.0 - cls, token_fraction=0.5, seed=seed)
    x = torch.randn(L * S, H, device=device).to(dtype)
    cu = torch.tensor([L * s for s in range(S + 1)], dtype=torch.int32, device=device)
    return x, scores.to(device), w_up, w_down_t, cu, unions


def sparse_bytes(unions, L, S, H, D, elt) -> int:
    """Bytes the sparse path must move: active weights per segment + activations."""
    weights = sum(len(u) for u in unions) * D * H * elt * 2
    tokens = L * S
    acts = tokens * H * elt * 2 + sum(len(u) for u in unions) * L * D * elt * 2
    return weights + acts


def bench_row(timer, H, E, D, L, S, cls, dtype, device, config=None, expert_major=True) -> dict:
    x, scores, w_up, w_down_t, cu, unions = make_case(H, E, D, L, S, cls, dtype, device)
    y_sparse = sparse_ffn_triton(x, scores, w_up, w_down_t, cu, config=config)
    y_dense = dense_ffn_torch(x, scores, w_up, w_down_t)
    err = rel_err(y_sparse, y_dense)
    t_sparse = timer(lambda: sparse_ffn_triton(x, scores, w_up, w_down_t, cu, config=config))
    t_dense = timer(lambda: dense_ffn_torch(x, scores, w_up, w_down_t))
    em_row = {}
    if expert_major and em.vllm_kernels_available():
        y_em = em.expert_major_ffn_triton(x, scores, w_up, w_down_t)
        t_em = timer(lambda: em.expert_major_ffn_triton(x, scores, w_up, w_down_t))
        em_row = {"em_ms": t_em, "em_ratio": t_em / t_dense, "em_rel_err_vs_dense": rel_err(y_em, y_dense),
                  "em_config": em.config_to_dict(em.default_config(L * S, E, D, H, dtype))}
    elt = x.element_size()
    nbytes = sparse_bytes(unions, L, S, H, D, elt)
    dense_nbytes = 2 * E * D * H * elt + L * S * (2 * H + E * D * 2) * elt
    return {
        "H": H, "E": E, "D": D, "tokens_per_segment": L, "segments": S, "tokens": L * S,
        "cls": cls, "union_sizes": [len(u) for u in unions],
        "sparse_ms": t_sparse, "dense_ms": t_dense, "ratio": t_sparse / t_dense,
        "sparse_gbps": nbytes / (t_sparse * 1e-3) / 1e9, "dense_gbps": dense_nbytes / (t_dense * 1e-3) / 1e9,
        "sparse_bytes": nbytes, "rel_err_vs_dense": err,
        "rule": cuda_path(L * S, S + 1, E, D, H, elt=x.element_size()),
        "config": (config or default_config(L * S, S, E, D, H)).__dict__, **em_row,
    }  # fmt: skip


def bench_router(timer, H, E, T, device, dtype) -> dict:
    x = torch.randn(T, H, device=device, dtype=dtype)
    w_r = (torch.randn(E, H, device=device) / H**0.5).to(dtype)
    nw = torch.rand(E, device=device)
    t_tr = timer(lambda: router_triton(x, w_r, nw, "rms"))
    t_torch = timer(lambda: router_naive(x, w_r, nw, "rms"))
    return {"H": H, "E": E, "tokens": T, "triton_ms": t_tr, "torch_ms": t_torch}


TUNE_SPACE = {
    "up_block_d": [16, 32, 64],
    "up_block_h": [64, 128, 256],
    "down_block_d": [32, 64, 128],
    "down_block_n": [32, 64, 128],
    "split_k": [1, 2, 4, 8],
    "num_warps": [2, 4, 8],
    "num_stages": [2, 3, 4],
}


def tune(timer, H, E, D, L, S, cls, dtype, device) -> dict:
    """Coordinate descent over the tile sizes from the default config (one pass)."""
    best = default_config(L * S, S, E, D, H)
    best_t = bench_row(timer, H, E, D, L, S, cls, dtype, device, best)["sparse_ms"]
    tried = []
    for field, values in TUNE_SPACE.items():
        for v in values:
            if getattr(best, field) == v:
                continue
            cand = SparseFFNConfig(**{**best.__dict__, field: v})
            try:
                t = bench_row(timer, H, E, D, L, S, cls, dtype, device, cand)["sparse_ms"]
            except Exception as exc:  # e.g. out of shared memory
                tried.append({"config": cand.__dict__, "error": repr(exc)[:200]})
                continue
            tried.append({"config": cand.__dict__, "sparse_ms": t})
            if t < best_t:
                best, best_t = cand, t
    return {
        "H": H, "E": E, "D": D, "L": L, "S": S, "cls": cls, "best": best.__dict__, "best_ms": best_t, "tried": tried,
    }  # fmt: skip


EM_TUNE_TOKENS = [1, 8, 32, 128, 512, 2048]
EM_TUNE_SPACE = {
    "block_m": [16, 32, 64, 128],
    "up.block_n": [32, 64, 128],
    "up.block_k": [64, 128, 256],
    "up.num_warps": [4, 8],
    "up.num_stages": [2, 3, 4],
    "down.block_n": [64, 128, 256],
    "down.block_k": [32, 64, 128],
    "down.num_warps": [4, 8],
    "down.num_stages": [2, 3, 4],
    "up.group_m": [1, 8, 16],
    "down.group_m": [1, 8, 16],
}


def _em_with(cfg, field: str, value: int):
    d = em.config_to_dict(cfg)
    if "." in field:
        part, key = field.split(".")
        d[part] = {**d[part], key: value}
    else:
        d[field] = value
    return em.config_from_dict(d)


def tune_expert_major(timer, H, E, D, dtype, device, cls=0.8) -> dict:
    """Coordinate descent over the expert-major tiles for each step size in EM_TUNE_TOKENS (decode
    batches of T one-token requests up to 128 tokens, one prefill segment above), from the
    default config: ``{str(T): config}``, the file format ``triton_expert_major.tuned_config`` reads."""
    table, log = {}, []
    for T in EM_TUNE_TOKENS:
        L, S = (1, T) if T <= 128 else (T, 1)
        x, scores, w_up, w_down_t, _, _ = make_case(H, E, D, L, S, cls, dtype, device)
        ref = dense_ffn_torch(x, scores, w_up, w_down_t)

        def run(cfg, x=x, scores=scores, w_up=w_up, w_down_t=w_down_t):
            return timer(lambda: em.expert_major_ffn_triton(x, scores, w_up, w_down_t, config=cfg))

        best = em.default_config(T, E, D, H, dtype)
        best_t = run(best)
        for field, values in EM_TUNE_SPACE.items():
            for v in values:
                cand = _em_with(best, field, v)
                if cand == best:
                    continue
                try:
                    if rel_err(em.expert_major_ffn_triton(x, scores, w_up, w_down_t, config=cand), ref) > 5e-2:
                        raise ValueError("wrong result")
                    t = run(cand)
                except Exception as exc:  # out of shared memory, register limits...
                    log.append({"T": T, "config": em.config_to_dict(cand), "error": repr(exc)[:200]})
                    continue
                log.append({"T": T, "config": em.config_to_dict(cand), "ms": t})
                if t < best_t:
                    best, best_t = cand, t
        table[str(T)] = em.config_to_dict(best)
        print(f"tuned expert-major H={H} E={E} D={D} T={T}: {best_t:.4f} ms with {table[str(T)]}", flush=True)
    return {"H": H, "E": E, "D": D, "table": table, "tried": log}


def write_em_configs(tuned: list[dict], folder: str, dtype: torch.dtype) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for t in tuned:
        name = em.config_file_name(t["E"], t["D"], t["H"], dtype, em._device_name())
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            json.dump(t["table"], f, indent=1)
        paths.append(path)
    return paths


def env_info(device: str) -> dict:
    import triton

    info = {
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": device,
    }  # fmt: skip
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    return info


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def to_markdown(result: dict) -> str:
    env = result["env"]
    peak = result.get("peak_gbps")
    lines = [
        "# BlockFFN expert part: sparse Triton vs dense (GPU)",
        "",
        f"Environment: {json.dumps(env)}",
        f"Peak bandwidth (spec): {peak} GB/s; measured D2D copy: {result.get('copy_gbps')} GB/s",
        "Times: CUDA-graph replays, L2 flushed before each, median. ratio = sparse / dense (< 1: sparse wins).",
        "",
        "| H,E,D | L/seg | segs | CLS | union (mean) | dense ms | sparse ms | ratio | expert-major ms | ratio "
        "| sparse GB/s | % peak | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mean_u = sum(r["union_sizes"]) / max(len(r["union_sizes"]), 1)
        pct = f"{100 * r['sparse_gbps'] / peak:.0f}%" if peak else "-"
        em_cells = f"{r['em_ms']:.4f} | {r['em_ratio']:.2f}" if "em_ms" in r else "- | -"
        lines.append(
            f"| {r['H']},{r['E']},{r['D']} | {r['tokens_per_segment']} | {r['segments']} | {r['cls']:.0%} "
            f"| {mean_u:.1f} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['ratio']:.2f} | {em_cells} "
            f"| {r['sparse_gbps']:.0f} | {pct} | {r['rule']} |"
        )
    if result.get("router"):
        lines += ["", "| router H,E | tokens | triton ms | torch ms |", "|---|---|---|---|"]
        for r in result["router"]:
            lines.append(f"| {r['H']},{r['E']} | {r['tokens']} | {r['triton_ms']:.4f} | {r['torch_ms']:.4f} |")
    if result.get("tune"):
        lines += ["", "## Tile tuning (coordinate descent from the default config)", ""]
        for t in result["tune"]:
            lines.append(f"- H={t['H']} E={t['E']} L={t['L']} S={t['S']}: best {t['best_ms']:.4f} ms with {t['best']}")
    if result.get("tune_em"):
        lines += ["", "## Expert-major tiles (coordinate descent from default_config)", ""]
        for t in result["tune_em"]:
            lines.append(f"- H={t['H']} E={t['E']} D={t['D']}: {json.dumps(t['table'])}")
        lines += [f"- written: {p}" for p in result.get("tune_em_files", [])]
    lines += ["", f"Dispatch thresholds in force: {THRESHOLDS}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON output path (markdown goes next to it, .md)")
    p.add_argument("--quick", action="store_true", help="a few configs only")
    p.add_argument("--sizes", default="0,1", help="indices into SIZES to run (0: H=1792 E=56, 1: H=4096 E=128)")
    p.add_argument("--tune", action="store_true", help="also sweep tile sizes at decode-like shapes")
    p.add_argument("--tune-dir", default=None,
                   help="with --tune: also tune the expert-major path and write its config files here")
    p.add_argument("--official", action="store_true",
                   help="the four official BlockFFN shapes (H, E, D) instead of SIZES")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graphs")
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (needs TRITON_INTERPRET=1)")
    args = p.parse_args()

    random.seed(0)
    torch.manual_seed(0)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run with TRITON_INTERPRET=1 to smoke-test on a CPU)")
    dtype = torch.bfloat16
    seg_lens, num_segs, cls_list = SEG_LENS, NUM_SEGS, CLS
    sizes = [SIZES[int(i)] for i in args.sizes.split(",")]
    if args.official:
        sizes = list(OFFICIAL.values())
    if args.quick:
        seg_lens, num_segs, cls_list = [1, 4, 64], [1, 8, 32, 128], [0.7, 0.9]
    if args.dry_run:
        sizes, seg_lens, num_segs, cls_list = [(64, 12, 16)], [1, 3], [1, 2], [0.7]
        args.repeats = 2
        EM_TUNE_TOKENS[:] = [1, 4]
        for key in list(EM_TUNE_SPACE)[2:]:
            del EM_TUNE_SPACE[key]
    timer = Timer(device, args.repeats, not args.no_graphs)
    env = env_info(device)
    result = {
        "env": env, "copy_gbps": copy_bandwidth_gbps(device),
        "peak_gbps": peak_gbps(env.get("gpu", ""), args.peak_gbps), "rows": [], "router": [], "tune": [],
        "expert_major": em.vllm_kernels_available(),
    }  # fmt: skip
    if not result["expert_major"]:
        print("vLLM is not importable: the expert-major rows are left out", flush=True)
    print(json.dumps(env), flush=True)
    t_start = time.time()
    for H, E, D in sizes:
        for S in num_segs:
            for L in seg_lens:
                for cls in cls_list:
                    row = bench_row(timer, H, E, D, L, S, cls, dtype, device)
                    result["rows"].append(row)
                    print(
                        f"H={H} E={E} D={D} L={L} S={S} CLS={cls:.0%}: dense {row['dense_ms']:.4f} ms, "
                        f"sparse {row['sparse_ms']:.4f} ms, ratio {row['ratio']:.2f}, "
                        f"expert-major {row.get('em_ms', float('nan')):.4f} ms, "
                        f"{row['sparse_gbps']:.0f} GB/s, err {row['rel_err_vs_dense']:.1e}",
                        flush=True,
                    )
        for T in seg_lens:
            result["router"].append(bench_router(timer, H, E, T, device, dtype))
    if args.tune:
        for H, E, D in sizes:
            for L, S in [(1, 1), (8, 1), (8, 4), (64, 1)]:
                result["tune"].append(tune(timer, H, E, D, L, S, 0.8, dtype, device))
                print(f"tuned H={H} L={L} S={S}: {result['tune'][-1]['best']}", flush=True)
        if args.tune_dir and result["expert_major"]:
            result["tune_em"] = [tune_expert_major(timer, H, E, D, dtype, device) for H, E, D in sizes]
            result["tune_em_files"] = write_em_configs(result["tune_em"], args.tune_dir, dtype)
    result["elapsed_s"] = time.time() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(to_markdown(result))
    print(f"wrote {args.out} and {md_path} in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
