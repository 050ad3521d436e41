"""`vllm-blockffn` command line: make-tiny, check, demo (serve the bundled model and ask it once),
analyze (token- and chunk-level sparsity of a checkpoint on a text), inflate (a trained model padded
to an official release's expert bytes and depth, computing the same function)."""

from __future__ import annotations

import argparse
import os
import sys

from vllm_blockffn.tools.demo import DEFAULT_DEMO_DIR


def _make_tiny(args: argparse.Namespace) -> int:
    from vllm_blockffn.tools.tiny import TinyOptions, make_tiny

    opts = TinyOptions(attention=args.attention, layout=args.layout, norm=args.norm, dtype=args.dtype,
                       seed=args.seed, weight_format=args.format, shards=args.shards,
                       tie_word_embeddings=args.tie, remote_code=args.remote_code,
                       hidden_size=args.hidden_size, num_layers=args.layers,
                       num_experts=args.experts, expert_size=args.expert_size)
    print(make_tiny(args.out, opts))
    if args.eagle_head:  # a tiny EAGLE head for it, in the official BlockFFN/FR-Spec format (eagle.py)
        from vllm_blockffn.tools.tiny_eagle import TinyEagleOptions, make_tiny_eagle

        print(make_tiny_eagle(args.eagle_head, args.out, TinyEagleOptions(seed=args.seed,
                                                                          draft_vocab_size=args.eagle_vocab)))
    return 0


def _check(args: argparse.Namespace) -> int:
    """config.json, every weight file, every weight's name, shape, dtype and values (NaN/Inf), of a
    BlockFFN checkpoint or of a BlockFFN/FR-Spec EAGLE head folder. Errors: one line, exit 2."""
    from vllm_blockffn.serving import checkpoint as ck
    from vllm_blockffn.serving.config import BlockFFNSpec

    if args.env:
        return _check_env()
    if args.model is None:
        raise ValueError("check: give a checkpoint folder (MODEL), or --env")
    path = args.model
    cfg = ck.read_config(path)
    # Every weight file first (whatever the folder is): a broken file is named before anything else.
    infos = ck.check_folder_files(path, load_legacy_bin=False)
    if ck.is_eagle_head(infos):
        return _check_head(path, cfg, infos)
    spec = BlockFFNSpec.from_config(cfg, source=os.path.join(path, "config.json"))  # names a non-BlockFFN ffn_type
    infos = ck.check_weights(path, spec)
    scales = [n for n in ck.int8_tensors(spec, spec.int8_linears) if n.endswith("_scale")] if spec.int8 else []
    _fail_on_nonfinite(ck.nonfinite_weights(infos, [*ck.expected_shapes(spec), *scales]))
    quant = f", int8 weights ({'experts and linears' if spec.int8_linears else 'experts'})" if spec.int8 else ""
    print(f"{args.model}: BlockFFN checkpoint OK ({spec.attention_type} attention, {spec.ffn_type} layout{quant}, "
          f"E={spec.num_experts}, d_e={spec.expert_size}, router norm {spec.norm_after_router}; "
          f"{len(infos)} tensors, all finite)")
    return 0


def _check_env() -> int:
    """Which CPU expert path this machine will run, and why (build, ISA, threads, cache)."""
    import torch

    from vllm_blockffn.kernels.sparse_ffn import cpu_native

    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA "
             f"{'available' if torch.cuda.is_available() else 'not available'}"]
    if cpu_native.native_available():
        lines.append(f"native CPU kernel: {cpu_native.lib_path}; ISA path {cpu_native.cpu_isa()} "
                     f"(widest this CPU runs: {cpu_native.best_isa()}; {cpu_native.ISA_ENV} forces a narrower one)")
        from vllm_blockffn.kernels.dispatch import NEVER, THRESHOLDS
        from vllm_blockffn.kernels.sparse_ffn.cpu import gemm_dtype

        route = cpu_native.route_path()
        steps = "/".join(map(str, THRESHOLDS.cpu_grouped_min_tokens_by_path[route]))
        for name, table in (("bf16", THRESHOLDS.cpu_grouped_min_tokens_kmajor_bf16),
                            ("int8", THRESHOLDS.cpu_grouped_min_tokens_kmajor_int8)):
            packed = table.get(route)
            if packed is not None:
                steps += f" ({name} packed K-major: {'never' if packed == NEVER else packed})"
        gemm = "bf16 GEMMs" if gemm_dtype(torch.bfloat16) == torch.bfloat16 else "fp32 GEMMs on widened weights"
        lines.append(f"CPU experts: native expert-major kernel; grouped GEMMs (bf16 experts: {gemm}) from "
                     f"{steps} tokens a step for fp32/bf16/int8 experts (kernels/dispatch.py, entry {route}); "
                     "decode-size linears: streaming kernel")
        pairs = cpu_native.isa_at_least("avx512_bf16")
        int8 = ("VPDPBUSD dots on x rounded to int16, VPDPWSSD down pass on row pairs" if pairs
                else "VPMADDWD dots on x rounded to int16 (the same integers as VNNI)"
                if cpu_native.isa_at_least("avx2") else "int8 widened to fp32")
        int8_kernel = ("VPDPBUSD" if pairs else "VPMADDWD" if cpu_native.isa_at_least("avx2") else "fp32")
        lines.append(f"int8 weights (--quantization blockffn_int8): native kernel, {int8}")
        fast = pairs and cpu_native.vdpbf16ps_fast()
        if pairs:
            lines.append("bf16 experts as loaded (4-row units): VDPBF16PS dots, down pass on row pairs" + (
                " at every size (this CPU issues VDPBF16PS as fast as an FMA)" if fast else
                "; from 3 tokens an expert the split FMA forms (VDPBF16PS issues slower than 1.5 FMAs here)"))
        from vllm_blockffn.serving.layers.cpu_linear import LINEAR_ENV, linear_mode

        kmajor = linear_mode() == "auto" and cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor
        form = "one VDPBF16PS a line and token" if cpu_native.kmajor_dot() else "lines widened, two FMAs a token"
        from vllm_blockffn.kernels.sparse_ffn.cpu_ops import kmajor_widen_from

        wide = kmajor_widen_from(cpu_native.cpu_isa() or "portable")
        sizes = "at every M" if wide >= NEVER else (
            f"at every M for fp32 activations and below {wide} rows for bf16 ones (from {wide}: oneDNN's fp32 GEMM on "
            "blocks unpacked and widened from the packed weight)")
        lines.append("bf16 attention projections and lm_head: " + (
            f"packed K-major at load, the outer-product kernel {sizes}, {form} for bf16 activations "
            f"({LINEAR_ENV}=rowmajor keeps them as loaded)" if kmajor
            else f"as loaded (K-major packing: paths {list(THRESHOLDS.cpu_linear_kmajor)}, {LINEAR_ENV}=auto)"))
        kmajor32 = linear_mode() == "auto" and cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor_fp32
        lines.append("fp32 attention projections and lm_head: " + (
            f"packed K-major at load, the outer-product kernel at every M ({LINEAR_ENV}=rowmajor keeps them as "
            "loaded)" if kmajor32
            else f"as loaded (K-major packing: paths {list(THRESHOLDS.cpu_linear_kmajor_fp32)}, {LINEAR_ENV}=auto)"))
        kmajor8 = linear_mode() == "auto" and cpu_native.cpu_isa() in THRESHOLDS.cpu_linear_kmajor_int8
        lines.append("int8 attention projections and lm_head: " + (
            f"packed K-major at load, the outer-product {int8_kernel} kernel at every M ({LINEAR_ENV}=rowmajor keeps "
            "them as loaded)" if kmajor8
            else f"as loaded (K-major packing: paths {list(THRESHOLDS.cpu_linear_kmajor_int8)}, {LINEAR_ENV}=auto)"))
        pf = [cpu_native.kmajor_prefetch_tokens(int8) for int8 in (False, True)]
        lines.append("K-major streams' software prefetch: " + (
            "every stream" if pf == [0, 0] else
            f"bf16 streams serving >= {pf[0]} tokens, int8 >= {pf[1]} (lighter ones: the hardware prefetchers)")
            + "; int8 linears at 1 / 4 rows: " + " / ".join(
                cpu_native.INT8_PREFETCH_MODES[cpu_native.kmajor_i8_linear_prefetch(m)] for m in (1, 4))
            + "; int8 experts at 1 / 3 / 5 tokens: " + " / ".join(
                cpu_native.INT8_PREFETCH_MODES[cpu_native.int8_experts_prefetch(m)] for m in (1, 3, 5))
            + f" ({cpu_native.PREFETCH_ENV}=auto|all|n)")
        from vllm_blockffn.serving.layers.cpu_experts import EXPERTS_ENV, experts_mode, kmajor_paths

        for dt, name, how in ((torch.float32, "fp32", "K-major fp32"), (torch.bfloat16, "bf16", "K-major bf16"),
                              (torch.int8, "int8", f"K-major {int8_kernel}")):
            kx = experts_mode() == "auto" and cpu_native.cpu_isa() in kmajor_paths(dt)
            lines.append(f"{name} experts: " + (
                f"packed K-major at load where d_e and H are multiples of 16 (each expert two {how} linears, one "
                f"stream a panel; {EXPERTS_ENV}=rowmajor keeps the 4-row units)" if kx
                else f"as loaded, 4-row units (K-major packing: paths {list(kmajor_paths(dt))}, {EXPERTS_ENV}=auto)"))
        if cpu_native.isa_at_least("amx"):
            from vllm_blockffn.kernels.dispatch import THRESHOLDS as T

            lines.append(f"AMX tiles: linears from {T.cpu_amx_min_rows} row(s) (bf16 and int8), bf16 experts from "
                         f"{T.cpu_amx_min_tokens} token(s) per active expert (kernels/dispatch.py), no software "
                         "prefetch on the tile paths; int8 experts and smaller steps run the AVX512_BF16 code")
        from vllm_blockffn.kernels.sparse_ffn import cpu_ops

        impl = cpu_ops.implementation()
        lines.append("per-layer calls (linears, router + experts): " + (
            "C++ torch ops (torch.ops.blockffn_native)" if impl == "cpp" else
            f"the Python implementation of torch.ops.blockffn_native ({cpu_ops.OPS_ENV}=python or no C++ build: "
            f"~20-80 µs more per call)"))
        from vllm_blockffn.serving.layers import cpu_attention

        try:
            attn = cpu_attention.mode()
        except ValueError as exc:  # reported here as the engine would refuse it
            attn = str(exc)
        lines.append("attention: " + (
            "one C++ call per layer over vLLM's CPU kernels (GQA layers)" if impl == "cpp" and attn == "auto" else
            f"vLLM's attention ops ({cpu_attention.ATTENTION_ENV}: {attn}, C++ ops: {impl})"))
    else:
        lines.append("native CPU kernel: unavailable (the warning says why, or VLLM_BLOCKFFN_CPU_NATIVE=0); "
                     "CPU experts: PyTorch path; linears: vLLM's own")
    from vllm_blockffn.serving import hugepages

    thp = hugepages.thp_mode()
    placed = hugepages.mode() == "auto" and thp not in (None, "never")
    lines.append(f"weights in 2 MiB pages after loading: {'yes' if placed else 'no'} (transparent huge pages: "
                 f"{thp or 'unknown'}; {hugepages.ENV}={hugepages.mode()})")
    print("\n".join(lines))
    return 0


def _check_head(path: str, cfg: dict, infos) -> int:
    """An EAGLE head folder: what `vllm serve --speculative-config` would check, and its values."""
    from vllm_blockffn.serving import checkpoint as ck

    _fail_on_nonfinite(ck.nonfinite_weights(infos))  # before the slow import of vLLM below
    from vllm_blockffn.serving.eagle import inspect_head, read_remap_file  # imports vLLM (seconds)

    fields = inspect_head(path, cfg)  # EagleHeadError naming the tensor or field at fault
    source = fields["eagle_remap_source"] or ""
    if source.startswith("file:"):
        read_remap_file(os.path.join(path, source[5:]))  # EagleHeadError naming the file
    vocab = fields["eagle_draft_vocab_size"]
    print(f"{path}: BlockFFN EAGLE head OK ({fields['num_hidden_layers']} layer(s), H={fields['hidden_size']}, "
          f"draft vocabulary {f'{vocab} ({source})' if vocab else 'full'}; {len(infos)} tensors, all finite)")
    return 0


def _fail_on_nonfinite(problems: list[str]) -> None:
    from vllm_blockffn.serving.checkpoint import BlockFFNFileError

    if problems:
        more = f" (and {len(problems) - 1} more tensor(s) with NaN/Inf)" if len(problems) > 1 else ""
        raise BlockFFNFileError(problems[0] + more)


def _demo(args: argparse.Namespace) -> int:
    from vllm_blockffn.tools.demo import run_demo

    return run_demo(model=args.model, port=args.port, prompt=args.prompt)


def _chunk_sizes(text: str) -> list[int]:
    from vllm_blockffn.observe.analysis import parse_chunk_sizes  # lazy: keeps torch out of `--help`

    return parse_chunk_sizes(text)


def _analyze(args: argparse.Namespace) -> int:
    from vllm_blockffn.observe.analysis import run_from_args

    return run_from_args(args)


def _inflate(args: argparse.Namespace) -> int:
    from vllm_blockffn.serving.config import BlockFFNSpec
    from vllm_blockffn.tools.inflate import inflate, inflate_eagle_head, share_table

    plan = inflate(args.src, args.out, args.like, dtype=args.dtype, expert_align=args.expert_align)
    target = plan.target
    print(f"{args.out}: {args.like} ({target['name']}): H {plan.hidden_size}, {plan.num_layers} layers "
          f"({plan.real.count(True)} source + {plan.real.count(False)} zero-output copies), "
          f"{plan.num_attention_heads}/{plan.num_key_value_heads} heads, d_e {plan.expert_size} "
          f"(expert params {plan.expert_params_error:+.2%} vs the official {target['num_experts']}·"
          f"{target['expert_size']}·{target['hidden_size']}), residual factor alpha {plan.alpha:.4f}")
    print(share_table(BlockFFNSpec.from_pretrained(args.out)))
    if args.eagle_head:
        inflate_eagle_head(args.eagle_head[0], args.eagle_head[1], args.src, plan, dtype=args.dtype)
        print(f"{args.eagle_head[1]}: EAGLE head padded to H {plan.hidden_size}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from vllm_blockffn.tools.quantize import quantize_checkpoint

    spec = quantize_checkpoint(args.src, args.out, linears=not args.experts_only)
    what = "experts" if args.experts_only else "experts, attention projections and lm_head"
    print(f"{args.out}: blockffn_int8 checkpoint ({what} int8 with per-output-row fp32 scales; "
          f"{spec.num_hidden_layers} layers, E={spec.num_experts}); serve it as any checkpoint")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-blockffn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a small random BlockFFN checkpoint in the official format")
    tiny.add_argument("out")
    tiny.add_argument("--attention", choices=["vanilla", "mla"], default="vanilla")
    tiny.add_argument("--layout", choices=["block", "block_linear"], default="block")
    tiny.add_argument("--norm", choices=["rms", "sum", "none"], default="rms")
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    tiny.add_argument("--shards", type=int, default=1)
    tiny.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    tiny.add_argument("--remote-code", action="store_true",
                      help="also write configuration_/modeling_minicpm.py stubs (which refuse to run)")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--experts", type=int, default=12)
    tiny.add_argument("--expert-size", type=int, default=32)
    tiny.add_argument("--eagle-head", metavar="DIR", help="also write a tiny random EAGLE head for it to DIR")
    tiny.add_argument("--eagle-vocab", type=int, metavar="V",
                      help="with --eagle-head: an FR-Spec reduced draft vocabulary of V tokens (freq_V.pt)")
    tiny.set_defaults(func=_make_tiny)

    check = sub.add_parser("check", help="check a checkpoint's (or EAGLE head's) config.json, weight files, "
                                         "weight names, shapes, dtypes and values (NaN/Inf)")
    check.add_argument("model", nargs="?", default=None)
    check.add_argument("--env", action="store_true", help="instead: which CPU kernel path this machine uses")
    check.set_defaults(func=_check)

    demo = sub.add_parser("demo", help="serve a BlockFFN model with `vllm serve` and answer one request")
    demo.add_argument("--model", default=None, help=f"checkpoint folder (default: a tiny one in {DEFAULT_DEMO_DIR})")
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--prompt", default="The list of items in the dictionary")
    demo.set_defaults(func=_demo)

    analyze = sub.add_parser(
        "analyze", help="measure token- and chunk-level sparsity (TLS, CLS-L) of a checkpoint on a text",
        description="Run the plain-PyTorch reference model over a text, window by window, and report per "
                    "layer and overall the token-level sparsity (TLS) and chunk-level sparsity (CLS-L): the "
                    "share of experts left inactive by a token, or by a whole chunk of L consecutive tokens.")
    analyze.add_argument("model", help="checkpoint folder")
    analyze.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to analyse ('-' for stdin)")
    analyze.add_argument("--chunk-sizes", type=_chunk_sizes, default="1,2,4,8,16,32,64", metavar="L1,L2,...",
                         help="chunk lengths L for CLS-L (default: %(default)s)")
    analyze.add_argument("--window", type=int, default=512, metavar="N",
                         help="text tokens per independent forward pass; chunks never straddle windows; "
                              "a BOS token (if the tokenizer has one) is put in front of each, not counted "
                              "(default: %(default)s)")
    analyze.add_argument("--json", metavar="OUT", help="write the figures as JSON (fractions in [0, 1])")
    analyze.add_argument("--plot", metavar="OUT.png", help="plot CLS-L against L, per layer and mean")
    analyze.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="reference model precision (default: %(default)s)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.set_defaults(func=_analyze)

    inflate = sub.add_parser(
        "inflate", help="pad a trained BlockFFN to an official size's expert bytes and depth (same function)",
        description="Write a model that computes exactly the same function as SRC, with the same routers, whose "
                    "expert bytes per layer and layer count equal an official BlockFFN release and whose hidden "
                    "size is as close to it as exactness allows (construction: vllm_blockffn/tools/inflate.py).")
    inflate.add_argument("src", help="trained BlockFFN checkpoint folder (official format)")
    inflate.add_argument("out", help="folder to write the inflated checkpoint to")
    inflate.add_argument("--like", required=True, choices=["small", "medium", "large", "xlarge"],
                         help="official configuration to match: 0.1B Small, 0.5B Medium, 0.8B Large, 1.2B XLarge")
    inflate.add_argument("--eagle-head", nargs=2, metavar=("SRC_HEAD", "OUT_HEAD"),
                         help="also pad SRC's EAGLE head (official BlockFFN/FR-Spec format) to match")
    inflate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                         help="weights' dtype (default: %(default)s: the padding's rescaled norms stay exact)")
    inflate.add_argument("--expert-align", type=int, default=1, metavar="N",
                         help="make d_e' a multiple of N, as the official releases' are (16: the grain the CPU kernel "
                              "packs int8 experts in); the hidden size then moves as little as that allows")
    inflate.set_defaults(func=_inflate)

    quantize = sub.add_parser(
        "quantize", help="write SRC with int8 weights (per-output-row scales), as --quantization blockffn_int8 does",
        description="Weight-only int8 (kernels/quant.py): experts, attention projections and an untied lm_head; "
                    "the router, norms and embedding stay as they are. The result loads like any checkpoint "
                    "(config.json names the method) and equals quantizing SRC at load.")
    quantize.add_argument("src", help="float BlockFFN checkpoint folder (official format)")
    quantize.add_argument("out", help="folder to write the int8 checkpoint to")
    quantize.add_argument("--experts-only", action="store_true", help="keep the dense linears in SRC's dtype")
    quantize.set_defaults(func=_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # config / weight errors: one clear line, no traceback
        print(f"vllm-blockffn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
