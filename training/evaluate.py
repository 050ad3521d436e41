"""Held-out LM loss, TLS and CLS-L of a saved checkpoint (SPEC.md §3).

    python -m training.evaluate models/blockffn-tiny-trained [--json out.json]

The checkpoint is loaded with `vllm_blockffn.reference.load_reference` (fp32 compute on the
saved bf16 weights), so the figures describe exactly what is shipped. The held-out text is the
5% of documents `training.data.load_corpus` sets aside, encoded with the checkpoint's own
tokenizer as in training (`<s> doc </s>` concatenated) and cut into consecutive windows of
seq_len + 1 tokens; each window is one sequence. Loss: mean next-token cross-entropy over all
predicted positions. Sparsity: active = router pre-activation > 0 for the seq_len input tokens;
TLS per layer over all tokens, CLS-L per layer over all full L-token chunks of all windows
(chunks never straddle windows); the model's figure is the mean over layers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from training import data as data_mod

CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)

try:  # shared with the serving metrics when present
    from vllm_blockffn.observe.sparsity import chunk_union_sizes
except ImportError:  # pragma: no cover - fallback with the same definition
    def chunk_union_sizes(active: torch.Tensor, chunk_size: int) -> torch.Tensor:
        T, E = active.shape
        n = T // chunk_size
        return active[: n * chunk_size].reshape(n, chunk_size, E).any(dim=1).sum(dim=-1)


@torch.no_grad()
def keep_most_used_experts(model, rates: list[list[float]], k: int) -> None:
    """Turn the routed model into a pruned one: per layer only the k experts with the highest
    activation rates stay (their router rows kept, the others' zeroed: z = 0 is never active).
    A model whose sparsity is pruning loses nothing to this at k = its active experts per token."""
    with torch.no_grad():
        for layer, rate in zip(model.layers, rates, strict=True):
            drop = torch.tensor(rate).argsort(descending=True)[k:]
            layer.mlp.router_proj[drop] = 0.0


def heldout_windows(model_path: str, seq_len: int = 256, heldout_fraction: float = 0.05, seed: int = 0,
                    max_windows: int | None = None) -> tuple[list[torch.Tensor], data_mod.Corpus]:
    """The held-out windows :func:`evaluate` scores (seq_len + 1 token ids each, in order), and the corpus.

    Encoded with the checkpoint's own tokenizer; other evaluations (e.g. in vLLM) reuse them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
    corpus = data_mod.load_corpus(heldout_fraction, seed=seed)
    ids, _ = data_mod.encode_stream(tokenizer, corpus.heldout)
    n = (ids.numel() - 1) // (seq_len + 1)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError("held-out text is shorter than one window")
    return [ids[w * (seq_len + 1): (w + 1) * (seq_len + 1)] for w in range(n)], corpus


def evaluate(model_path: str, seq_len: int = 256, heldout_fraction: float = 0.05, seed: int = 0,
             max_windows: int | None = None, chunk_sizes=CHUNK_SIZES,
             fixed_experts: tuple[list[list[float]], int] | None = None) -> dict:
    """fixed_experts=(per-layer activation rates, k): evaluate the pruned model of
    :func:`keep_most_used_experts` instead."""
    from vllm_blockffn.reference import load_reference

    model = load_reference(model_path)
    if fixed_experts is not None:
        keep_most_used_experts(model, *fixed_experts)
    spec = model.spec
    windows, corpus = heldout_windows(model_path, seq_len, heldout_fraction, seed, max_windows)
    n = len(windows)
    E, L = spec.num_experts, spec.num_hidden_layers
    nll_sum, n_pred = 0.0, 0
    active_sum = [0.0] * L
    expert_tokens = torch.zeros(L, E, dtype=torch.float64)  # tokens on which each expert is active
    inactive_chunks = [[0.0] * len(chunk_sizes) for _ in range(L)]
    n_chunks = [0] * len(chunk_sizes)
    for window in windows:
        logits, traces = model(window[:-1], return_router=True)
        nll_sum += F.cross_entropy(logits, window[1:], reduction="sum").item()
        n_pred += seq_len
        for layer, trace in enumerate(traces):
            active = trace.active
            active_sum[layer] += float(active.sum(dtype=torch.float64))
            expert_tokens[layer] += active.sum(0, dtype=torch.float64)
            for i, c in enumerate(chunk_sizes):
                sizes = chunk_union_sizes(active, c)
                inactive_chunks[layer][i] += sizes.numel() - float(sizes.sum(dtype=torch.float64)) / E
        for i, c in enumerate(chunk_sizes):
            n_chunks[i] += seq_len // c
    tokens = n * seq_len
    layers: list[dict] = []
    for layer in range(L):
        rate = expert_tokens[layer] / tokens
        layers.append({"tls": 1 - active_sum[layer] / (tokens * E),
                       "cls": {str(c): inactive_chunks[layer][i] / n_chunks[i] for i, c in enumerate(chunk_sizes)},
                       # how the work is spread: experts never active on the held-out text, experts
                       # active on more than 90% of its tokens, and each expert's activation rate
                       "dead_experts": int((rate == 0).sum()), "always_on_experts": int((rate > 0.9).sum()),
                       # active on at least one token and on at most 90% (as `vllm-blockffn analyze`)
                       "dynamic_experts": int(((rate > 0) & (rate <= 0.9)).sum()),
                       "expert_activation_rate": [round(float(r), 4) for r in rate]})
    return {
        "model": os.path.abspath(model_path),
        "heldout_loss": nll_sum / n_pred,
        "heldout_ppl": float(torch.tensor(nll_sum / n_pred).exp()),
        "tls": sum(lay["tls"] for lay in layers) / L,
        "cls": {str(c): sum(lay["cls"][str(c)] for lay in layers) / L for c in chunk_sizes},
        "dead_experts": sum(lay["dead_experts"] for lay in layers),
        "always_on_experts": sum(lay["always_on_experts"] for lay in layers),
        "dynamic_experts": sum(lay["dynamic_experts"] for lay in layers),
        "num_experts": E,
        "layers": layers,
        "windows": n, "seq_len": seq_len, "tokens": tokens,
        "corpus_fingerprint": corpus.fingerprint,
    }


def format_result(result: dict) -> str:
    keys = list(result["cls"])
    lines = [f"held-out loss {result['heldout_loss']:.4f} (ppl {result['heldout_ppl']:.1f}) on "
             f"{result['tokens']} tokens in {result['windows']} windows of {result['seq_len']}",
             "layer    TLS  " + "  ".join(f"CLS-{k:>2}" for k in keys) + "  dead  >90%  dynamic"]
    for i, lay in enumerate(result["layers"]):
        lines.append(f"{i:>5}  {100 * lay['tls']:5.1f}  " + "  ".join(f"{100 * lay['cls'][k]:6.1f}" for k in keys)
                     + f"  {lay['dead_experts']:4d}  {lay['always_on_experts']:4d}  {lay['dynamic_experts']:7d}")
    mean = "  ".join(f"{100 * result['cls'][k]:6.1f}" for k in keys)
    lines.append(" mean  " + f"{100 * result['tls']:5.1f}  " + mean + f"  {result['dead_experts']:4d}  "
                 f"{result['always_on_experts']:4d}  {result['dynamic_experts']:7d}   (totals of "
                 f"{len(result['layers'])}x{result['num_experts']} experts)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--fixed-experts", type=int, nargs="*", default=[], metavar="K",
                   help="also the held-out loss with each layer's routing replaced by its K most used experts "
                        "(routing or pruning? a pruned model loses nothing at K = its experts per token)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.seq_len, args.heldout_fraction, args.seed, args.max_windows)
    print(format_result(result))
    rates = [lay["expert_activation_rate"] for lay in result["layers"]]
    result["fixed_experts"] = {}
    for k in args.fixed_experts:
        loss = evaluate(args.model, args.seq_len, args.heldout_fraction, args.seed, args.max_windows,
                        fixed_experts=(rates, k))["heldout_loss"]
        result["fixed_experts"][str(k)] = loss
        print(f"{k} most used experts per layer, fixed: held-out loss {loss:.4f} "
              f"({100 * (loss / result['heldout_loss'] - 1):+.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
