"""`vllm-blockffn analyze`: measure a checkpoint's token- and chunk-level sparsity on a text.

How it measures (SPEC.md §3):
- The text is tokenized with the checkpoint's own tokenizer (no special tokens), then cut
  into windows of at most ``window`` text tokens. The reference model (full attention, no
  KV cache) runs on each window as an independent sequence; when the tokenizer has a BOS
  token it is put in front of each window, as the model saw sequences in training, and
  its router row is left out of the figures (it is not text).
- Per layer, the active masks (router pre-activation > 0) give TLS over all text tokens
  and, for each L, CLS-L as the mean over all full L-token chunks of all windows; chunks
  never straddle windows and each window's trailing partial chunk is left out.
- The model's figures are the means over layers.
- Per layer, each expert's activation rate (share of text tokens on which it is active) sorts
  it into exactly one of: dead (never active), always on (rate > ALWAYS_RATE = 90%), or dynamic
  (active on at least one token and on at most 90%). High TLS with many dead or always-on
  experts is static pruning, not routing, so the counts sit next to TLS/CLS.
An L with no full chunk at all (text shorter than L) is reported as null / "n/a".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence

import torch

from vllm_blockffn.observe.sparsity import chunk_union_sizes

DEFAULT_CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_WINDOW = 512
ALWAYS_RATE = 0.9  # an expert active on more than this share of tokens counts as always on
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_chunk_sizes(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (sorted, de-duplicated); argparse-friendly errors."""
    bad = argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise bad from None
    if not sizes or sizes[0] < 1:
        raise bad
    return sizes


def _check_sizes(chunk_sizes: Sequence[int], window: int) -> None:
    if window < 1:
        raise ValueError(f"--window must be at least 1, got {window}")
    if not chunk_sizes or min(chunk_sizes) < 1:
        raise ValueError(f"chunk sizes must be positive integers, got {list(chunk_sizes)}")
    if max(chunk_sizes) > window:
        raise ValueError(f"chunk length {max(chunk_sizes)} is longer than --window {window}; chunks never "
                         "straddle windows, so CLS-L needs L <= window")


def windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive, non-overlapping pieces of at most `window` ids (the last may be shorter)."""
    if window < 1:
        raise ValueError(f"--window must be at least 1, got {window}")
    return [list(ids[i:i + window]) for i in range(0, len(ids), window)]


class SparsityStats:
    """Running sums for TLS and CLS-L per layer, fed one window (one sequence) at a time.

    Only counts are kept, never the masks, so memory does not grow with the text.
    """

    def __init__(self, num_layers: int, num_experts: int, chunk_sizes: Iterable[int]):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.chunk_sizes = list(chunk_sizes)
        self.tokens = 0
        self.windows = 0
        self.inactive_token_sum = [0.0] * num_layers  # Σ_t (1 − |A_t|/E) per layer
        self.inactive_chunk_sum = [[0.0] * len(self.chunk_sizes) for _ in range(num_layers)]
        self.chunks = [0] * len(self.chunk_sizes)  # full chunks seen per L (same for every layer)
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # tokens each expert is on

    def add(self, masks: Sequence[torch.Tensor]) -> None:
        """masks: one bool [T, E] per layer, all for the same T tokens of one sequence."""
        if len(masks) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer masks, got {len(masks)}")
        T = masks[0].shape[0]
        E = self.num_experts
        for layer, active in enumerate(masks):
            if tuple(active.shape) != (T, E):
                raise ValueError(f"layer {layer}: mask shape {tuple(active.shape)}, expected {(T, E)}")
            self.inactive_token_sum[layer] += T - float(active.sum(dtype=torch.float64)) / E
            self.expert_tokens[layer] += active.sum(0, dtype=torch.int64)
            for i, L in enumerate(self.chunk_sizes):
                sizes = chunk_union_sizes(active, L)
                self.inactive_chunk_sum[layer][i] += sizes.numel() - float(sizes.sum(dtype=torch.float64)) / E
        for i, L in enumerate(self.chunk_sizes):
            self.chunks[i] += T // L
        self.tokens += T
        self.windows += 1

    def expert_counts(self, layer: int) -> dict:
        """Dead / always-on / dynamic experts of one layer (counts, fractions of E, rates)."""
        counts = self.expert_tokens[layer]
        rate = counts.double() / self.tokens
        dead = int((counts == 0).sum())
        always = int((rate > ALWAYS_RATE).sum())
        E = self.num_experts
        return {"dead": dead / E, "always": always / E, "dead_experts": dead, "always_experts": always,
                "dynamic_experts": E - dead - always,
                "expert_activation_rate": [round(float(r), 6) for r in rate]}

    def result(self) -> dict:
        """The JSON document: {"tls", "cls": {"L": …}, "dead", "always", "dead_experts",
        "always_experts", "dynamic_experts", "num_experts", "layers": [{"tls", "cls", "dead",
        "always", "dead_experts", "always_experts", "dynamic_experts", "expert_activation_rate"}],
        "tokens"}.

        Fractions in [0, 1] ("dead"/"always": of the layer's experts, overall of all layers'
        experts); CLS-L is None where no full L-token chunk was seen.
        """
        if self.tokens == 0:
            raise ValueError("no tokens were analysed")
        layers = []
        for layer in range(self.num_layers):
            cls = {str(L): (self.inactive_chunk_sum[layer][i] / self.chunks[i] if self.chunks[i] else None)
                   for i, L in enumerate(self.chunk_sizes)}
            layers.append({"tls": self.inactive_token_sum[layer] / self.tokens, "cls": cls,
                           **self.expert_counts(layer)})
        mean_cls = {}
        for L in map(str, self.chunk_sizes):
            values = [lay["cls"][L] for lay in layers]
            mean_cls[L] = None if values[0] is None else sum(values) / len(values)
        total = self.num_layers * self.num_experts
        dead = sum(lay["dead_experts"] for lay in layers)
        always = sum(lay["always_experts"] for lay in layers)
        return {"tls": sum(lay["tls"] for lay in layers) / len(layers), "cls": mean_cls,
                "dead": dead / total, "always": always / total, "dead_experts": dead, "always_experts": always,
                "dynamic_experts": total - dead - always, "num_experts": self.num_experts,
                "layers": layers, "tokens": self.tokens}


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer. The config is read with our own class and remote code is
    refused: official configs carry an `auto_map`, and transformers would otherwise ask on
    stdin whether to run the checkpoint's code."""
    from transformers import AutoTokenizer

    from vllm_blockffn.serving.hf_config import BlockFFNConfig

    config = BlockFFNConfig.from_pretrained(model_path)
    return AutoTokenizer.from_pretrained(model_path, config=config, trust_remote_code=False)


def tokenize(tokenizer, text: str) -> list[int]:
    """The text's ids without special tokens (BOS is added per window by `analyze_ids`)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def analyze_ids(model, ids: Sequence[int], chunk_sizes: Sequence[int], window: int = DEFAULT_WINDOW,
                bos_id: int | None = None, progress: bool = True) -> SparsityStats:
    """Run `model` (a ReferenceModel) window by window over `ids` and gather the statistics."""
    from tqdm import tqdm

    spec = model.spec
    _check_sizes(chunk_sizes, window)
    if not ids:
        raise ValueError("the text has no tokens")
    stats = SparsityStats(spec.num_hidden_layers, spec.num_experts, chunk_sizes)
    skip = 0 if bos_id is None else 1
    with tqdm(total=len(ids), unit="tok", desc="analyze", file=sys.stderr, disable=not progress) as bar:
        for piece in windows(ids, window):
            inputs = torch.tensor(([bos_id] if skip else []) + piece, dtype=torch.long)
            _, traces = model(inputs, return_router=True)
            stats.add([trace.active[skip:] for trace in traces])
            bar.update(len(piece))
    return stats


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_table(result: dict, title: str = "") -> str:
    """Per-layer and mean TLS / CLS-L (% of experts off) and, per layer and in total, the
    numbers of dead, always-on (> 90% of tokens) and dynamic experts, as a fixed-width table."""
    keys = list(result["cls"])
    header = ["layer", "TLS", *(f"CLS-{L}" for L in keys), "dead", ">90%", "dynamic"]

    def counts(doc: dict) -> list[str]:
        return [str(doc["dead_experts"]), str(doc["always_experts"]), str(doc["dynamic_experts"])]

    rows = [[str(i), _percent(lay["tls"]), *(_percent(lay["cls"][L]) for L in keys), *counts(lay)]
            for i, lay in enumerate(result["layers"])]
    rows.append(["mean", _percent(result["tls"]), *(_percent(result["cls"][L]) for L in keys), *counts(result)])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    widths = [max(w, 6) for w in widths]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    return "\n".join(out)


def plot_cls(result: dict, out_path: str, model_name: str) -> None:
    """CLS-L against L (log-2 axis): one thin line per layer, the layer mean in bold."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI (renders with Agg)

    sizes = [int(L) for L in result["cls"]]

    def pct(values) -> list[float]:
        return [math.nan if v is None else 100 * v for v in values]

    layers = result["layers"]
    n = len(layers)
    viridis = colormaps["viridis"]
    cmap = ListedColormap([viridis(0.85 * k / 63) for k in range(64)], name="viridis_dark")  # no pale yellow
    norm = Normalize(vmin=0, vmax=max(n - 1, 1))
    per_layer_legend = n <= 12
    fig = Figure(figsize=(8, 5.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    for i, lay in enumerate(layers):
        ax.plot(sizes, pct(lay["cls"].values()), color=cmap(norm(i)), lw=1.2, alpha=0.85, marker=".", ms=4,
                label=f"layer {i}" if per_layer_legend else None)
    mean = pct(result["cls"].values())
    ax.plot(sizes, mean, color="black", lw=3, marker="o", ms=6, label="mean over layers", zorder=5)
    for x, y in zip(sizes, mean, strict=True):
        if not math.isnan(y):
            ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=8, fontweight="bold", zorder=6,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, labels=[str(s) for s in sizes])
    ax.minorticks_off()
    if len(sizes) > 1:
        ax.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
    ax.set_ylim(0, 105)
    ax.set_xlabel("chunk length L (tokens)")
    ax.set_ylabel("CLS-L: experts inactive in the whole chunk (%)")
    ax.set_title(f"Chunk-level sparsity of {model_name}\n{result['tokens']:,} tokens, "
                 f"TLS {100 * result['tls']:.1f}% (= CLS-1)", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=2 if n > 6 else 1, framealpha=0.9)
    if not per_layer_legend:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    fig.savefig(out_path)


def model_name(model_path: str) -> str:
    return os.path.basename(os.path.normpath(os.fspath(model_path))) or os.fspath(model_path)


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read --text {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def analyze(model_path: str, text: str, chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES,
            window: int = DEFAULT_WINDOW, dtype: str = "float32", progress: bool = True) -> tuple[dict, str]:
    """Tokenize `text`, measure; returns (the JSON document, the printed table)."""
    from vllm_blockffn.reference import load_reference

    _check_sizes(chunk_sizes, window)
    tokenizer = load_tokenizer(model_path)
    ids = tokenize(tokenizer, text)
    if not ids:
        raise ValueError("the text has no tokens")
    model = load_reference(model_path, DTYPES[dtype])
    spec = model.spec
    bos_id = tokenizer.bos_token_id
    if window + (bos_id is not None) > spec.max_position_embeddings:
        print(f"vllm-blockffn: warning: --window {window} (+ BOS) is longer than the model's "
              f"max_position_embeddings {spec.max_position_embeddings}", file=sys.stderr)
    stats = analyze_ids(model, ids, chunk_sizes, window, bos_id, progress)
    result = stats.result()
    missing = [L for L, v in result["cls"].items() if v is None]
    if missing:
        print(f"vllm-blockffn: warning: no full chunk for L = {', '.join(missing)} "
              f"({stats.tokens} tokens); reported as n/a", file=sys.stderr)
    title = (f"{model_name(model_path)}: {spec.num_hidden_layers} layers x {spec.num_experts} experts, "
             f"{stats.tokens} tokens in {stats.windows} window(s) of <= {window}"
             f"{' (+BOS)' if bos_id is not None else ''}; % of experts inactive; dead = never active, "
             f">90% = active on more than 90% of tokens, dynamic = the rest (the last row: totals)")
    return result, format_table(result, title)


def run_from_args(args: argparse.Namespace) -> int:
    """The CLI handler behind `vllm-blockffn analyze` (arguments defined in cli.py)."""
    text = _read_text(args.text)
    result, table = analyze(args.model, text, args.chunk_sizes, args.window, args.dtype,
                            progress=not args.quiet)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_cls(result, args.plot, model_name(args.model))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


__all__ = ["SparsityStats", "analyze", "analyze_ids", "format_table", "parse_chunk_sizes", "plot_cls",
           "tokenize", "windows"]
