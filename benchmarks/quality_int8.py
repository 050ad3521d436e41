"""Quality of weight-only int8 (issue 18 item 4): the bundled model, int8 against its bf16 weights.

    scripts/dev python benchmarks/quality_int8.py [--json out.json]

1. ``vllm-blockffn quantize`` writes the int8 checkpoint of --model to a temporary folder.
2. Held-out loss and sparsity (``training/evaluate.py``'s own held-out windows and metric code) of the
   plain-PyTorch reference, fp32 compute, once on the saved bf16 weights and once on the int8
   checkpoint's dequantized weights (int8 · row scale, what the int8 kernels compute up to fp32
   rounding). The router is float in both, so TLS moves only through the hidden states it sees.
3. In vLLM (CPU, in-process engines one after another, eager): greedy decoding of held-out prompts
   (``training.eagle.heldout_prompts``: ``<s>`` + the first 31 tokens of the first N held-out
   documents that have at least 64 tokens; never training text) for --tokens new tokens, ignore_eos,
   with the float checkpoint in bf16 (vLLM's default for it) and with ``quantization="blockffn_int8"``
   (bf16 activations): exact-match fraction, mean agreed prefix and the histogram of the first
   position where the two differ. Yardsticks: fp32 vs bf16 activations without quantization (what
   mere rounding does), int8 vs bf16 weights in fp32 activations and in the fp32 reference (the
   weights' effect alone). The int8 checkpoint loaded with no flag must give the quantize-at-load
   tokens. At every first divergence, the fp32 reference's logit gap between the two tokens (a near
   tie is flipped by any rounding). The bf16, int8 and fp32 engines also score the held-out windows of step 2
   through vLLM (prompt logprobs): the served loss.
4. EAGLE (--eagle-head, k = --spec-tokens) with the bf16 target, the int8 target (bf16 activations)
   and the int8 target in fp32: accepted / drafted from vLLM's spec-decode counters, and on how many
   prompts the greedy tokens equal those without EAGLE.
5. A markdown table on stdout; --json writes every figure (and every token).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process (get_metrics, teardown)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `training` is a top-level package of the repository

DEFAULT_MODEL = os.path.join(ROOT, "models", "blockffn-tiny-trained")
DEFAULT_HEAD = os.path.join(ROOT, "models", "blockffn-tiny-trained-eagle")
BUCKET = 8
NAME = "blockffn_int8"


# ----------------------------------------------------------------------------------- reference
def quantize(src: str, out: str) -> float:
    """``python -m vllm_blockffn.tools.cli quantize src out``; returns its wall time in s."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vllm_blockffn.tools.cli", "quantize", src, out], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def reference_eval(path: str, seq_len: int, max_windows: int | None) -> dict[str, Any]:
    """training.evaluate.evaluate on ``path`` (fp32 reference), without the per-expert rates."""
    from training.evaluate import evaluate

    r = evaluate(path, seq_len=seq_len, max_windows=max_windows)
    keep = ("heldout_loss", "heldout_ppl", "tls", "cls", "windows", "seq_len", "tokens", "corpus_fingerprint",
            "dead_experts", "always_on_experts", "dynamic_experts")
    out = {k: r[k] for k in keep}
    out["layer_tls"] = [lay["tls"] for lay in r["layers"]]
    out["layer_cls8"] = [lay["cls"]["8"] for lay in r["layers"]]
    return out


# --------------------------------------------------------------------------------------- vLLM
def run_engine(path: str, dtype: str, prompts: list[list[int]], max_tokens: int, windows: list[list[int]] | None,
               quantization: str | None = None, spec: dict | None = None) -> dict[str, Any]:
    """One in-process engine: greedy tokens of ``prompts``, the held-out loss of ``windows`` (prompt
    logprobs) when given, the spec-decode counters when ``spec``; torn down before returning."""
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, quantization=quantization, speculative_config=spec, enforce_eager=True,
              max_model_len=512, max_num_seqs=len(prompts), gpu_memory_utilization=0.15, seed=0,
              disable_log_stats=spec is None)
    res: dict[str, Any] = {"dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
                           "quantization": llm.llm_engine.model_config.quantization}
    try:
        from training.eagle import _spec_counters  # vLLM's spec-decode counters (process-wide)

        before = _spec_counters(llm) if spec else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        if spec:
            after = _spec_counters(llm)
            d = {k: after[a] - before[a] for k, a in (("drafts", "drafts"), ("drafted", "draft_tokens"),
                                                       ("accepted", "accepted"))}
            per_pos = [a - b for a, b in zip(after["per_pos"], before["per_pos"] + [0.0] * len(after["per_pos"]))]
            res["spec"] = {"drafts": int(d["drafts"]), "drafted": int(d["drafted"]), "accepted": int(d["accepted"]),
                           "acceptance_rate": d["accepted"] / d["drafted"] if d["drafted"] else None,
                           "mean_acceptance_length": 1 + d["accepted"] / d["drafts"] if d["drafts"] else None,
                           "accepted_rate_per_position": [v / d["drafts"] for v in per_pos] if d["drafts"] else None}
        if windows:
            lp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
            outs = llm.generate([{"prompt_token_ids": w} for w in windows], lp, use_tqdm=False)
            nll, n = 0.0, 0
            for w, o in zip(windows, outs, strict=True):
                for tok, entry in zip(w[1:], o.prompt_logprobs[1:], strict=True):
                    nll -= entry[tok].logprob
                    n += 1
            res["heldout_loss"] = nll / n
            res["heldout_tokens"] = n
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def agreement(a: list[list[int]], b: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Exact-match fraction, mean agreed prefix and a histogram of first-divergence positions."""
    firsts = []
    for x, y in zip(a, b, strict=True):
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if first is None and len(x) != len(y):
            first = min(len(x), len(y))
        firsts.append(first)
    hist = {f"{lo}-{min(lo + BUCKET, max_tokens) - 1}": 0 for lo in range(0, max_tokens, BUCKET)}
    hist["never"] = 0
    for f in firsts:
        lo = None if f is None else f // BUCKET * BUCKET
        hist["never" if lo is None else f"{lo}-{min(lo + BUCKET, max_tokens) - 1}"] += 1
    agreed = [max_tokens if f is None else f for f in firsts]
    return {"prompts": len(firsts), "exact_match": sum(f is None for f in firsts) / len(firsts),
            "mean_agreed_prefix": sum(agreed) / len(agreed), "first_divergence": firsts, "histogram": hist}


def divergence_gaps(model: Any, prompts: list[list[int]], a: list[list[int]], b: list[list[int]],
                    firsts: list[int | None]) -> list[tuple[float, float]]:
    """At each first divergence: (|logit(a's token) − logit(b's token)|, the top logit) of the fp32
    reference ``model`` after the common prefix (a small gap = a near tie, which rounding may flip;
    bf16 spaces values near the top logit by 2^(⌊log2 top⌋ − 7))."""
    import torch

    gaps = []
    for p, x, y, f in zip(prompts, a, b, firsts, strict=True):
        if f is None or f >= min(len(x), len(y)):
            continue
        logits = model(torch.tensor(p + x[:f]))[-1]
        gaps.append((float((logits[x[f]] - logits[y[f]]).abs()), float(logits.max())))
    return gaps


# ----------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict[str, Any]) -> str:
    """The report's tables."""
    bf, q = r["reference"]["bf16"], r["reference"]["int8"]
    lines = [f"### Held-out text ({bf['tokens']} tokens in {bf['windows']} windows of {bf['seq_len']}, "
             "training/evaluate.py; reference model, fp32 compute)", "",
             "| weights | held-out loss (ppl) | TLS | CLS-8 | CLS-64 | per-layer TLS |", "|---|---|---|---|---|---|"]
    for name, e in (("bf16 (as saved)", bf), ("int8 (dequantized)", q)):
        lines.append(f"| {name} | {e['heldout_loss']:.4f} ({e['heldout_ppl']:.1f}) | {100 * e['tls']:.2f} | "
                     f"{100 * e['cls']['8']:.2f} | {100 * e['cls']['64']:.2f} | "
                     + " / ".join(f"{100 * t:.2f}" for t in e["layer_tls"]) + " |")
    d = r["reference"]["diff"]
    lines += ["", f"int8 vs bf16: loss {d['loss_rel_pct']:+.4f}% (done when |Δ| ≤ 0.5%), TLS "
                  f"{d['tls_points']:+.3f} points (≤ 0.5), max per-layer TLS Δ {d['max_layer_tls_points']:.3f} points, "
                  f"CLS-8 {d['cls8_points']:+.3f} points."]
    v = r.get("vllm")
    if not v:
        return "\n".join(lines)
    eng = v["engines"]
    lines += ["", f"### vLLM (CPU, eager): {v['prompts']} held-out prompts of {v['prompt_tokens']} tokens × "
                  f"{v['max_tokens']} new tokens, greedy, ignore_eos", "",
              "| engine | weights | activations | held-out loss (served, prompt logprobs) | vs bf16 engine |",
              "|---|---|---|---|---|"]
    base = eng["bf16"].get("heldout_loss")
    for name, e in eng.items():
        if "heldout_loss" in e:
            rel = f"{100 * (e['heldout_loss'] / base - 1):+.4f}%" if base else "–"
            lines.append(f"| {name} | {'int8' if e['quantization'] else 'bf16'} | {e['dtype']} | "
                         f"{e['heldout_loss']:.4f} | {rel} |")
    buckets = list(next(iter(v["agreement"].values()))["histogram"])
    lines += ["", "| greedy tokens | exact match | mean agreed prefix | first divergence: "
              + " · ".join(buckets) + " | logit gap at divergence (median / max) |", "|---|---|---|---|---|"]
    for name, a in v["agreement"].items():
        g = sorted(gap for gap, _ in a["gaps_at_divergence"])
        gap = f"{g[len(g) // 2]:.3f} / {g[-1]:.3f}" if g else "–"
        lines.append(f"| {name} | {a['exact_match'] * a['prompts']:.0f}/{a['prompts']} ({_pct(a['exact_match'])}) | "
                     f"{a['mean_agreed_prefix']:.1f} / {v['max_tokens']} | "
                     + " · ".join(str(a["histogram"][b]) for b in buckets) + f" | {gap} |")
    if v.get("eagle"):
        lines += ["", f"### EAGLE (k = {v['spec_tokens']}), the same prompts", "",
                  "| target | accepted / drafted | acceptance | per position | mean acceptance length | "
                  "greedy = without EAGLE |", "|---|---|---|---|---|---|"]
        for name, e in v["eagle"].items():
            s = e["spec"]
            per = " / ".join(f"{100 * p:.0f}%" for p in s["accepted_rate_per_position"] or [])
            mal = "–" if s["mean_acceptance_length"] is None else f"{s['mean_acceptance_length']:.2f}"
            lines.append(f"| {name} | {s['accepted']}/{s['drafted']} | {_pct(s['acceptance_rate'])} | {per} | "
                         f"{mal} | {e['greedy_equal_prompts']}/{v['prompts']} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables, write --json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="float (bf16) BlockFFN checkpoint")
    p.add_argument("--eagle-head", default=DEFAULT_HEAD, help="EAGLE head for --model ('' to skip EAGLE)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--spec-tokens", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256, help="held-out window length (evaluate.py's)")
    p.add_argument("--max-windows", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the reference evaluation")
    p.add_argument("--no-vllm", action="store_true", help="reference figures only")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32-vs-bf16 rounding yardstick")
    p.add_argument("--no-served-loss", action="store_true", help="skip the held-out loss through vLLM")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from training.eagle import heldout_prompts
    from training.evaluate import heldout_windows

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    result: dict[str, Any] = {"model": os.path.relpath(os.path.abspath(args.model), ROOT), "commit": commit,
                              "dirty_tree": dirty, "machine": f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPUs", "torch_threads_reference": args.threads}
    with tempfile.TemporaryDirectory(prefix="blockffn-int8-") as tmp:
        q8 = os.path.join(tmp, "int8")
        result["quantize_seconds"] = round(quantize(args.model, q8), 1)
        print(f"quantized {args.model} → {q8} in {result['quantize_seconds']} s", flush=True)

        ref = {"compute": "fp32 reference (vllm_blockffn.reference); bf16 = the saved bf16 weights widened to fp32, "
                          "int8 = the int8 checkpoint's q · scale in fp32"}
        for name, path in (("bf16", args.model), ("int8", q8)):
            ref[name] = reference_eval(path, args.seq_len, args.max_windows)
            print(f"reference {name}: held-out loss {ref[name]['heldout_loss']:.5f}, TLS {100 * ref[name]['tls']:.3f}",
                  flush=True)
        bf, q = ref["bf16"], ref["int8"]
        ref["diff"] = {"loss_rel_pct": 100 * (q["heldout_loss"] / bf["heldout_loss"] - 1),
                       "tls_points": 100 * (q["tls"] - bf["tls"]),
                       "cls8_points": 100 * (q["cls"]["8"] - bf["cls"]["8"]),
                       "max_layer_tls_points": max(100 * abs(a - b) for a, b in zip(q["layer_tls"], bf["layer_tls"]))}
        ref["done_when"] = abs(ref["diff"]["loss_rel_pct"]) <= 0.5 and abs(ref["diff"]["tls_points"]) <= 0.5
        result["reference"] = ref

        if not args.no_vllm:
            prompts = heldout_prompts(args.model, args.prompts, args.prompt_tokens)
            if len(prompts) < args.prompts:
                raise SystemExit(f"only {len(prompts)} held-out documents are long enough for a prompt")
            windows = None
            if not args.no_served_loss:
                windows = [w.tolist() for w in heldout_windows(args.model, args.seq_len,
                                                               max_windows=args.max_windows)[0]]
            runs: list[tuple[str, str, str, str | None, dict | None]] = [
                ("bf16", args.model, "bfloat16", None, None),
                ("int8", args.model, "bfloat16", NAME, None),
                ("int8 checkpoint", q8, "bfloat16", None, None)]
            spec = {"method": "eagle", "model": args.eagle_head, "num_speculative_tokens": args.spec_tokens}
            if args.eagle_head:
                runs += [("bf16 + EAGLE", args.model, "bfloat16", None, spec),
                         ("int8 + EAGLE", args.model, "bfloat16", NAME, spec)]
            if not args.no_fp32:
                runs += [("fp32", args.model, "float32", None, None), ("int8 fp32", args.model, "float32", NAME, None)]
                if args.eagle_head:
                    runs.append(("int8 fp32 + EAGLE", args.model, "float32", NAME, spec))
            engines: dict[str, dict[str, Any]] = {}
            for name, path, dtype, quant, sp in runs:
                scored = None if sp or name == "int8 fp32" else windows
                engines[name] = run_engine(path, dtype, prompts, args.tokens, scored, quant, sp)
                loss = engines[name].get("heldout_loss")
                print(f"vLLM {name}: {engines[name]['seconds']} s"
                      + (f", served held-out loss {loss:.5f}" if loss is not None else ""), flush=True)
            toks = {k: e.pop("tokens") for k, e in engines.items()}
            from vllm_blockffn.reference import load_reference

            refs = {"bf16": load_reference(args.model), "int8": load_reference(q8)}
            toks["reference bf16"] = [refs["bf16"].greedy(p, args.tokens) for p in prompts]
            toks["reference int8"] = [refs["int8"].greedy(p, args.tokens) for p in prompts]
            pairs = [("int8 vs bf16 (vLLM, bf16 activations)", "bf16", "int8", "bf16"),
                     ("int8 vs bf16 weights (fp32 reference)", "reference bf16", "reference int8", "bf16"),
                     ("int8 vs bf16 weights (vLLM, fp32 activations)", "fp32", "int8 fp32", "bf16"),
                     ("bf16 vs fp32 (vLLM, rounding only)", "fp32", "bf16", "bf16"),
                     ("int8: bf16 vs fp32 activations (vLLM)", "int8 fp32", "int8", "int8"),
                     ("int8 checkpoint vs quantize at load", "int8", "int8 checkpoint", "int8"),
                     ("bf16 + EAGLE vs bf16", "bf16", "bf16 + EAGLE", "bf16"),
                     ("int8 + EAGLE vs int8", "int8", "int8 + EAGLE", "int8"),
                     ("int8 fp32 + EAGLE vs int8 fp32", "int8 fp32", "int8 fp32 + EAGLE", "int8")]
            agree = {}
            for label, x, y, ref_name in pairs:
                if x in toks and y in toks:
                    a = agreement(toks[x], toks[y], args.tokens)
                    a["gaps_at_divergence"] = divergence_gaps(refs[ref_name], prompts, toks[x], toks[y],
                                                              a["first_divergence"])
                    a["gap_reference"] = f"fp32 reference on the {ref_name} weights"
                    agree[label] = a
            vres: dict[str, Any] = {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                                    "max_tokens": args.tokens, "spec_tokens": args.spec_tokens,
                                    "prompt_source": "training.eagle.heldout_prompts (held-out documents)",
                                    "agreement": agree, "engines": {}, "eagle": {}}
            for name, e in engines.items():
                if "spec" in e:
                    plain = toks[name.removesuffix(" + EAGLE")]
                    e["greedy_equal"] = toks[name] == plain
                    e["greedy_equal_prompts"] = sum(x == y for x, y in zip(toks[name], plain, strict=True))
                    vres["eagle"][f"{'int8' if e['quantization'] else 'bf16'} weights, {e['dtype']}"] = e
                else:
                    vres["engines"][name] = e
            vres["tokens"] = toks
            result["vllm"] = vres
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
