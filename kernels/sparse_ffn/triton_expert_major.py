"""Expert-major sparse BlockFFN experts on GPUs, through vLLM's fused-MoE Triton kernel.

The per-segment kernels (``triton_sparse_ffn.py``) read each segment's union of active
experts separately: right for one request, wasteful for a batch (8 decode requests read 8
unions) and for long segments (every token of a segment is multiplied by every expert of its
union). Expert-major execution groups the step's active (token, expert) pairs by expert, so
each active expert's weights are read once per block of the tokens that use it and only
active pairs are computed, whatever the segments. That is what a top-k MoE layer does, and
vLLM ships a tuned kernel for it; a BlockFFN layer is a MoE whose k varies per token:

1. routing: ``topk_ids`` [T, E] = e where score[t, e] > 0, else the dummy id E (K = E is fixed
   per layer, so no shape depends on the routing; NaN scores count as inactive); the fp32
   scores are the ``topk_weights`` (only active slots are ever read);
2. ``moe_align_block_size`` with ``num_experts = E + 1``, the expert map ``[0..E-1, -1]`` and
   ``ignore_invalid_experts``: the dummy pairs are dropped before any GEMM (vLLM's CUDA op
   when it is there, else :func:`align_block_size`, a sync-free torch equivalent);
3. ``fused_moe_kernel`` (vLLM): ``h = x · w_up[e]ᵀ`` for every active pair → [T·E, D]
   (only the active pairs' rows are written);
4. SiLU in place over that buffer (vLLM's ``SILU_NO_MUL`` activation is ``F.silu`` on the whole
   buffer too: rows of inactive pairs hold garbage and are never read);
5. ``fused_moe_kernel`` (vLLM): ``o = silu(h) · w_down[e]`` per active pair → [T·E, H];
6. ``moe_fused_mul_sum_kernel`` (vLLM): ``y_t = Σ_e score[t, e] · o[t, e]`` in fp32 over the
   token's active pairs only (the expert map marks the dummy id invalid), cast once. It unrolls
   over the E slots, which stops fitting above 64 experts (spills, minutes of compilation):
   there :func:`_pair_sum_kernel`, ours, loops instead.

vLLM's kernel code stays in vLLM: the raw Python functions are taken from the installed
package and decorated with ``triton.jit`` here (:class:`VllmKernel`), with real ``triton`` /
``tl`` globals (vLLM's CPU build swaps them for placeholders) and per interpreter mode, so the
same kernels run compiled on a GPU and in Triton's CPU interpreter in the tests. Only the
launch arguments are ours (as vLLM's ``invoke_fused_moe_triton_kernel`` passes them, with
strides that read ``w_down_t`` [E, D, H] as vLLM's ``w2`` [E, H, D] without a copy).

int8 weight-only experts (``kernels/quant.py``: int8 ``w_up`` / ``w_down_t`` with fp32 scales per
output row of W_up,e [E, D] and of W_down,e [E, H]): both GEMMs run vLLM's own ``use_int8_w8a16``
variant with ``per_channel_quant``, as vLLM launches it for int8 weight-only MoE layers: each B
tile is widened to the activations' dtype (exact: |q| ≤ 127), the fp32 accumulator multiplied by
the output channel's scale (``up_scale`` is already [E, N = D]; ``down_scale`` [E, H] is [E, N = H]
of the down GEMM, whose B is the [E, H, D] view of ``w_down_t``), so every pair's output is its
own expert's, scaled, before the weighted sum adds the experts up. Under the interpreter,
:func:`_interpreter_bf16_casts` makes the int8 → bf16 widening numeric (Triton 3.9's interpreter
casts it to a bit pattern).

Graph safety: every grid depends on shapes only (programs past ``num_tokens_post_padded``
return at once); nothing reads device data on the host or copies host data to the device.
Long steps run in chunks of tokens so the [T·E, H] pair buffer stays bounded
(:func:`default_config`); each chunk re-reads its experts' weights.

What it costs beyond the weights (``benchmarks/gpu_on_paper.py`` counts it): the SiLU pass over
T·E·D elements (read + write), the per-pair outputs (P·H written and read back, P = active
pairs) and the x rows (read once per D tile of each pair block). A kernel of ours could fuse
the first two away (SiLU·score in the up GEMM's epilogue, fp32 atomics into y in the down
one); the on-paper model shows how much that would save (RESULTS "GPU, on paper").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._triton import cdiv, interpret_mode, lazy_jit, next_pow2, tl, triton
from ..layout import check_ffn_shapes
from .triton_sparse_ffn import check_scales

VLLM_FUSED_MOE = "vllm.model_executor.layers.fused_moe.fused_moe"
VLLM_MUL_SUM = "vllm.model_executor.layers.fused_moe.moe_fused_mul_sum"
VLLM_ALIGN = "vllm.model_executor.layers.fused_moe.moe_align_block_size"
MAX_EXPERTS = 256
# Bound on the per-pair output buffer [chunk · E, H] (vLLM's own fused-MoE chunking allows GBs).
MAX_CACHE_BYTES = 512 << 20
CONFIG_DIR_ENV = "VLLM_BLOCKFFN_MOE_CONFIG_DIR"
"""A folder of tuned configs (``benchmarks/bench_kernels_gpu.py --tune`` writes them)."""
TORCH_ALIGN_ENV = "VLLM_BLOCKFFN_TORCH_ALIGN"
"""Set to 1 to align with :func:`align_block_size` even where vLLM's CUDA op exists."""


# ---------------------------------------------------------------- vLLM's kernels, re-jitted
_AVAILABLE: list[bool] = []


def vllm_kernels_available() -> bool:
    """Whether vLLM's fused-MoE kernel sources are importable (a static, host-side fact)."""
    if not _AVAILABLE:
        ok = triton is not None
        if ok:
            try:
                ok = importlib.util.find_spec("vllm") is not None
            except (ImportError, ValueError):
                ok = False
        _AVAILABLE.append(ok)
    return _AVAILABLE[0]


def _raw(obj: Any) -> Any:
    """The Python function under a Triton ``JITFunction`` (or the function itself: vLLM's CPU
    build decorates with a placeholder that returns it unchanged)."""
    while hasattr(obj, "fn") and callable(obj.fn):
        obj = obj.fn
    if not hasattr(obj, "__code__"):  # e.g. a platform's KernelOverride (vllm.triton_utils.dispatcher)
        raise RuntimeError(f"{obj!r} is not a Triton kernel's Python function: cannot re-jit vLLM's kernel")
    return obj


def _rebuild(fn: Any, extra: dict[str, Any]) -> Any:
    """``fn`` with real ``triton`` / ``tl`` in its globals (plus ``extra``), same code object."""
    g = dict(fn.__globals__)
    g.update(triton=triton, tl=tl, **extra)
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__module__, new.__qualname__, new.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return new


class VllmKernel(lazy_jit):
    """A Triton kernel of the installed vLLM, jitted by us at launch time (see the module doc).

    ``helpers``: names of ``@triton.jit`` functions of the same vLLM module the kernel calls;
    they are re-jitted in the same interpreter mode as the kernel."""

    def __init__(self, module: str, name: str, helpers: tuple[str, ...] = ()) -> None:
        self.module_name, self.__name__, self.helpers = module, name, helpers
        self.__doc__ = f"{module}.{name} (vLLM's code, jitted by vllm_blockffn)"
        self._variants: dict[bool, Any] = {}

    def _build(self) -> Any:
        module = importlib.import_module(self.module_name)
        extra = {h: triton.jit(_rebuild(_raw(getattr(module, h)), {})) for h in self.helpers}
        return _rebuild(_raw(getattr(module, self.__name__)), extra)

    @property
    def fn(self) -> Any:  # type: ignore[override]
        """The plain kernel function (helpers jitted for the current mode): for signature
        binding and ahead-of-time compilation."""
        return self._build()

    def jitted(self) -> Any:
        if triton is None:
            raise RuntimeError("Triton is not installed; the Triton kernels are unavailable")
        mode = interpret_mode()
        kernel = self._variants.get(mode)
        if kernel is None:
            kernel = self._variants[mode] = triton.jit(self._build())
        return kernel

    def __getitem__(self, grid: Any) -> Any:
        run = super().__getitem__(grid)
        if not interpret_mode():
            return run

        def launch(*args: Any, **kwargs: Any) -> Any:
            with _interpreter_bf16_casts():
                return run(*args, **kwargs)

        return launch


@contextlib.contextmanager
def _interpreter_bf16_casts() -> Iterator[None]:
    """During an interpreted launch of vLLM's kernels: casts to bf16 from anything but fp32 go
    through fp32. Triton 3.9's interpreter stores bf16 as uint16 bit patterns and casts an int8
    tile (``b.to(compute_type)`` of the ``use_int8_w8a16`` GEMM) with a plain numpy ``astype``,
    i.e. to the *bit pattern* of the integer (−5 → 0xFFFB, a NaN). Compiled kernels are untouched;
    the builder's attribute is put back afterwards."""
    from triton.runtime.interpreter import InterpreterBuilder

    orig = InterpreterBuilder.__dict__["cast_impl"]

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar not in (tl.float32, tl.bfloat16):
            return orig(self, orig(self, src, tl.float32), dst_type)
        return orig(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_impl
    try:
        yield
    finally:
        InterpreterBuilder.cast_impl = orig


fused_moe_kernel = VllmKernel(VLLM_FUSED_MOE, "fused_moe_kernel", helpers=("write_zeros_to_output",))
moe_fused_mul_sum_kernel = VllmKernel(VLLM_MUL_SUM, "moe_fused_mul_sum_kernel")


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class GemmConfig:
    """Tiles of one ``fused_moe_kernel`` launch (vLLM's config keys, lower-cased)."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpertMajorConfig:
    block_m: int  # pairs per row block: the alignment unit, shared by both GEMMs
    up: GemmConfig  # x [T, H] · w_up[e]ᵀ → [T·E, D]: N = D, K = H
    down: GemmConfig  # silu(h) [T·E, D] · w_down[e] → [T·E, H]: N = H, K = D
    chunk_tokens: int  # tokens per chunk (bounds the [chunk·E, H] pair buffer)
    sum_block: int  # moe_fused_mul_sum's BLOCK_K (H tile)
    sum_warps: int


def _pow2_tile(n: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(n)))


def chunk_tokens(num_experts: int, expert_size: int, hidden: int, elt: int) -> int:
    """Tokens per chunk so that the pair buffers stay within :data:`MAX_CACHE_BYTES`."""
    per_token = num_experts * max(hidden, expert_size) * elt
    return max(16, MAX_CACHE_BYTES // per_token // 16 * 16)


def default_config(
    num_tokens: int, num_experts: int, expert_size: int, hidden: int, dtype: torch.dtype = torch.bfloat16,
    w_int8: bool = False,
) -> ExpertMajorConfig:
    """Tiles from static shapes: vLLM's ``get_default_config`` rule for bf16/fp16 (block M by
    batch size, tall K tiles at small batches), applied to each GEMM's own N and K; a tuned
    file in ``$VLLM_BLOCKFFN_MOE_CONFIG_DIR`` overrides it (:func:`tuned_config`). ``w_int8``
    (int8 weights, ``dtype`` still the activations'): the same tiles (they compile without
    spills, tests/test_triton_int8.py), never a tuned file (those were tuned for float weights)."""
    elt = torch.empty((), dtype=dtype).element_size()
    chunk = chunk_tokens(num_experts, expert_size, hidden, elt)
    M = max(1, min(num_tokens, chunk))
    tuned = None if w_int8 else tuned_config(M, num_experts, expert_size, hidden, dtype)
    if tuned is not None:
        return tuned
    # vLLM's M buckets; tiles chosen so that no default config spills registers on sm_80 / sm_90
    # (vLLM's own default of 64×128×64 with 4 warps spills 0.5 KB per thread, 128×128×64 with 8
    # warps 0.3 KB; tests/test_kernels_compile.py checks ours at the official shapes).
    if M <= 32:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif M <= 96:
        block_m, block_n, block_k, warps, stages = 32, 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 3
    if elt == 4:  # fp32 tiles: half the K depth keeps the shared memory of 3-4 stages in bounds
        block_k = min(block_k, 64)
    up = GemmConfig(_pow2_tile(expert_size, block_n), _pow2_tile(hidden, block_k), 1, warps, stages)
    down = GemmConfig(_pow2_tile(hidden, block_n), _pow2_tile(expert_size, block_k), 1, warps, stages)
    # The weighted sum: one program per token, H tiles of up to 2048 with 8 warps (vLLM's heuristic
    # takes 16 warps, which caps a thread at 128 registers: its E-way unrolled slot loop then
    # spills at E = 56).
    sum_block, sum_warps = max(128, min(next_pow2(hidden), 2048)), 8
    return ExpertMajorConfig(block_m, up, down, chunk, sum_block, sum_warps)


def config_file_name(num_experts: int, expert_size: int, hidden: int, dtype: torch.dtype, device_name: str) -> str:
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return f"blockffn_E={num_experts},D={expert_size},H={hidden},dtype={dt},device_name={device_name}.json"


_TUNED: dict[str, dict | None] = {}


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


def tuned_config(
    num_tokens: int, num_experts: int, expert_size: int, hidden: int, dtype: torch.dtype
) -> ExpertMajorConfig | None:
    """The tuned config nearest in tokens, from ``$VLLM_BLOCKFFN_MOE_CONFIG_DIR`` (read once per
    file; like vLLM's tuned fused-MoE configs: ``{tokens: config}``), or None."""
    folder = os.environ.get(CONFIG_DIR_ENV)
    if not folder:
        return None
    path = os.path.join(folder, config_file_name(num_experts, expert_size, hidden, dtype, _device_name()))
    if path not in _TUNED:
        try:
            with open(path) as f:
                _TUNED[path] = json.load(f)
        except (OSError, ValueError):
            _TUNED[path] = None
    table = _TUNED[path]
    if not table:
        return None
    best = table[min(table, key=lambda k: abs(int(k) - num_tokens))]
    return config_from_dict(best)


def config_to_dict(cfg: ExpertMajorConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> ExpertMajorConfig:
    return ExpertMajorConfig(**{**d, "up": GemmConfig(**d["up"]), "down": GemmConfig(**d["down"])})


# ---------------------------------------------------------------- routing and alignment
_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _expert_tables(num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(arange(E) int32, expert map [0..E-1, -1] int32) on the device, made by device fills and
    kept per (E, device): two launches fewer per layer call. Never created while a CUDA graph is
    being captured (the tensor would come from the graph's private pool); vLLM's profiling and
    warm-up runs make it before any capture."""
    key = (num_experts, str(device))
    emap = _TABLES.get(key)
    if emap is None:
        emap = torch.arange(num_experts + 1, dtype=torch.int32, device=device)
        emap[num_experts:].fill_(-1)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _TABLES[key] = emap
    return emap[:num_experts], emap


def route(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``topk_ids`` [T, E] int32: e where score[t, e] > 0, else the dummy id E (NaN is inactive).
    The scores themselves serve as ``topk_weights``: the weighted sum reads only the slots of
    active pairs, so inactive entries (0, negative, NaN) are never used."""
    return torch.where(scores > 0, ids, scores.shape[1]).to(torch.int32)


def max_num_tokens_padded(numel: int, num_experts: int, block_size: int) -> int:
    """The static length of ``sorted_token_ids``, as vLLM's ``moe_align_block_size`` sizes it."""
    n = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        n = min(numel * block_size, n)
    return n


def align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_valid_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``moe_align_block_size(topk_ids, block_size, E + 1, expert_map=[0..E-1, -1],
    ignore_invalid_experts=True)`` in torch ops with static shapes and no host sync.

    Returns ``sorted_token_ids`` (pair indices grouped by expert, each group padded to a
    multiple of ``block_size`` with the sentinel ``topk_ids.numel()``), ``expert_ids`` (one per
    block; 0 past the end, as vLLM fills it) and ``num_tokens_post_padded`` [1]. Pairs of an
    expert keep ascending pair order (vLLM's CUDA op may order them differently).
    """
    E, bs, dev = num_valid_experts, block_size, topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    N = ids.numel()
    L = max_num_tokens_padded(N, E + 1, bs)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + (bs - 1)) // bs * bs
    padded[E:].zero_()  # the dummy expert takes no room
    ends = padded.cumsum(0)
    starts = ends - padded
    first = counts.cumsum(0) - counts  # where each expert's pairs start in the sorted order
    sorted_e, order = torch.sort(ids, stable=True)
    rank = torch.arange(N, dtype=torch.int64, device=dev) - first[sorted_e]
    pos = torch.where(sorted_e < E, starts[sorted_e] + rank, L)  # dummy pairs → a dump slot
    sorted_ids = torch.full((L + 1,), N, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    block_starts = torch.arange(cdiv(L, bs), dtype=torch.int64, device=dev) * bs
    total = ends[E - 1 : E]
    expert_ids = torch.searchsorted(ends[:E], block_starts, right=True)
    expert_ids = torch.where(block_starts < total, expert_ids, 0).to(torch.int32)
    return sorted_ids[:L], expert_ids, total.to(torch.int32)


def _align(topk_ids: torch.Tensor, block_size: int, E: int, emap: torch.Tensor):
    if topk_ids.is_cuda and os.environ.get(TORCH_ALIGN_ENV, "0") != "1" and _has_vllm_align_op():
        align = importlib.import_module(VLLM_ALIGN).moe_align_block_size
        return align(topk_ids, block_size, E + 1, expert_map=emap, ignore_invalid_experts=True)
    return align_block_size(topk_ids, block_size, E)


def _has_vllm_align_op() -> bool:
    try:
        return hasattr(torch.ops._moe_C, "moe_align_block_size")
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------- launches
_COMPUTE_TYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_post_pad: torch.Tensor,
    top_k: int,
    num_valid: int,
    block_m: int,
    cfg: GemmConfig,
    b_scale: torch.Tensor | None = None,
) -> None:
    """One ``fused_moe_kernel`` launch: ``c[p] = a[p // top_k] · b[expert(p)]ᵀ`` for the aligned
    pairs p. ``b`` is [E, N, K] (any strides); ``c`` [pairs, N] with unit column stride. The
    arguments are those vLLM's ``invoke_fused_moe_triton_kernel`` passes for unquantized
    weights, without bias and router weights; with ``b_scale`` fp32 [E, N] (``b`` int8), those it
    passes for int8 weight-only with per-output-channel scales (``use_int8_w8a16``,
    ``per_channel_quant``): the kernel widens each B tile to the compute type and multiplies the
    fp32 accumulator by the column's scale before the single cast."""
    N, K = b.shape[1], b.shape[2]
    EM = sorted_ids.shape[0]
    grid = (cdiv(EM, block_m) * cdiv(N, cfg.block_n),)
    int8 = b_scale is not None
    bse, bsn = (b_scale.stride(0), b_scale.stride(1)) if int8 else (0, 0)
    fused_moe_kernel[grid](
        a, b, c, None, None, b_scale, None, sorted_ids, expert_ids, num_post_pad,
        N, K, EM, num_valid,
        a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(0), c.stride(1),
        0, 0, bse, 0, bsn, 0, 0,
        group_n=0, group_k=0, naive_block_assignment=False,
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=cfg.block_n, BLOCK_SIZE_K=cfg.block_k, GROUP_SIZE_M=cfg.group_m,
        SPLIT_K=1, MUL_ROUTED_WEIGHT=False, top_k=top_k, compute_type=getattr(tl, _COMPUTE_TYPE[c.dtype]),
        use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=int8, per_channel_quant=int8,
        HAS_BIAS=False, SWAP_AB=False, USE_TD=False,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


@lazy_jit
def _pair_sum_kernel(o_ptr, w_ptr, ids_ptr, y_ptr, H, K, NUM_EXPERTS, BH: tl.constexpr):
    """Ours, for E > :data:`VLLM_SUM_MAX_EXPERTS`: y[t] = Σ_k w[t, k] · o[t, k] (fp32) over the
    slots k whose id is a real expert, as a runtime loop (vLLM's kernel unrolls over k)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = offs < H
    row = t.to(tl.int64) * K
    acc = tl.zeros((BH,), dtype=tl.float32)
    for k in range(0, K):
        e = tl.load(ids_ptr + row + k)
        if e < NUM_EXPERTS:
            w = tl.load(w_ptr + row + k)
            o = tl.load(o_ptr + (row + k) * H + offs, mask=hmask, other=0.0)
            acc += o.to(tl.float32) * w
    tl.store(y_ptr + t.to(tl.int64) * H + offs, acc.to(y_ptr.dtype.element_ty), mask=hmask)


VLLM_SUM_MAX_EXPERTS = 64
"""vLLM's ``moe_fused_mul_sum_kernel`` unrolls its slot loop (K = E here): at E ≤ 56 it compiles
in ~2 s without spills (8 warps), at E = 256 it spills 2.7–6.7 KB per thread and takes 40–85 s
to compile. Above this E, :func:`_pair_sum_kernel` (ours) does the same sum."""


def mul_sum(
    pairs_out: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor,
    y: torch.Tensor,
    cfg: ExpertMajorConfig,
) -> None:
    """``y_t = Σ_k w[t, k] · pairs_out[t, k]`` (fp32) over the slots whose expert is valid."""
    T, K, H = pairs_out.shape
    if K > VLLM_SUM_MAX_EXPERTS:
        bh = min(cfg.sum_block, 1024)
        _pair_sum_kernel[(T, cdiv(H, bh))](pairs_out, topk_weights, topk_ids, y, H, K, K, BH=bh, num_warps=4)
        return
    moe_fused_mul_sum_kernel[(T,)](
        pairs_out, topk_weights, y, topk_ids, expert_map, None, K * H,
        has_topk_ids=True, has_expert_map=True, has_num_valid=False, top_k=K, hidden_size=H,
        BLOCK_K=cfg.sum_block, num_warps=cfg.sum_warps, num_stages=3,
    )  # fmt: skip


def expert_major_ffn_triton(
    x: torch.Tensor,
    scores: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    config: ExpertMajorConfig | None = None,
) -> torch.Tensor:
    """y [T, H] of the BlockFFN experts, expert-major over the whole step (no segments needed).

    ``scores`` fp32 [T, E] (active iff > 0); ``w_up`` / ``w_down_t`` [E, D, H] in x's dtype, or
    int8 weight-only (``kernels/quant.py``) with ``up_scale`` fp32 [E, D] and ``down_scale`` fp32
    [E, H]: vLLM's ``use_int8_w8a16`` GEMMs, each pair's output scaled per channel before the
    weighted sum adds the experts up.
    """
    T, H = x.shape
    E, D, _ = w_up.shape
    check_ffn_shapes(x, scores, w_up, w_down_t)
    int8 = check_scales(w_up, up_scale, w_down_t, down_scale)
    if E > MAX_EXPERTS:
        raise ValueError(f"the expert-major path supports at most {MAX_EXPERTS} experts, got {E}")
    if not int8 and (w_up.dtype != x.dtype or w_down_t.dtype != x.dtype):
        raise TypeError(f"x is {x.dtype} but w_up / w_down_t are {w_up.dtype} / {w_down_t.dtype}")
    y = torch.empty((T, H), device=x.device, dtype=x.dtype)
    if T == 0:
        return y
    cfg = config or default_config(T, E, D, H, x.dtype, w_int8=int8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w_up = w_up.contiguous()
    w_down = w_down_t.contiguous().transpose(1, 2)  # vLLM's w2 [E, H, D], a view
    if int8:  # [E, N] with unit column stride: the up GEMM's N is D, the down GEMM's N is H
        up_scale, down_scale = up_scale.contiguous(), down_scale.contiguous()
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        scores = scores.float().contiguous()
    ids, emap = _expert_tables(E, x.device)
    for t0 in range(0, T, cfg.chunk_tokens):
        t1 = min(T, t0 + cfg.chunk_tokens)
        n = t1 - t0
        topk_weights = scores[t0:t1]
        topk_ids = route(topk_weights, ids)
        sorted_ids, expert_ids, num_post_pad = _align(topk_ids, cfg.block_m, E, emap)
        h = torch.empty((n * E, D), device=x.device, dtype=x.dtype)
        moe_gemm(x[t0:t1], w_up, h, sorted_ids, expert_ids, num_post_pad, E, n * E, cfg.block_m, cfg.up, up_scale)
        torch.nn.functional.silu(h, inplace=True)
        o = torch.empty((n * E, H), device=x.device, dtype=x.dtype)
        moe_gemm(h, w_down, o, sorted_ids, expert_ids, num_post_pad, 1, n * E, cfg.block_m, cfg.down, down_scale)
        mul_sum(o.view(n, E, H), topk_weights, topk_ids, emap, y[t0:t1], cfg)
    return y


__all__ = [
    "ExpertMajorConfig",
    "GemmConfig",
    "align_block_size",
    "default_config",
    "expert_major_ffn_triton",
    "route",
    "vllm_kernels_available",
]
