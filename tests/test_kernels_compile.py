"""Compile every Triton kernel for NVIDIA GPUs ahead of time, without a GPU.

Triton's NVIDIA backend (with its bundled ptxas) compiles kernels to cubins on any
machine, so kernel code that the CPU interpreter accepts but the real compiler rejects
(unsupported constructs, type errors, too much shared memory) fails here, on CI, instead
of on the scarce GPU machine.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    import vllm_blockffn.kernels as K
except ImportError:  # a bare checkout (the GPU machine): import the folder itself
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels as K

rt = importlib.import_module(K.__name__ + ".router.triton_router")
sg = importlib.import_module(K.__name__ + ".segments.triton_segments")
sf = importlib.import_module(K.__name__ + ".sparse_ffn.triton_sparse_ffn")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover
        return False


pytestmark = [
    pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]

I32 = "*i32"
SEG_PTRS = dict(ids_ptr=I32, counts_ptr=I32, block_seg_ptr=I32, block_t0_ptr=I32, cu_ptr=I32)


def _compile(lazy, pointer_types, constexprs, arch=90, **options):
    fn = triton.jit(lazy.fn)
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
    # Hopper: 228 KiB of shared memory per SM (227 usable by one block).
    assert kernel.metadata.shared <= 227 * 1024
    return kernel


@pytest.mark.parametrize(
    "arch,dt,shape",
    [
        (90, "bf16", (1, 1, 56, 128, 1792)),  # decode
        (90, "bf16", (64, 4, 128, 128, 4096)),  # 4 verify chunks of 16
        (90, "fp16", (512, 1, 256, 256, 8192)),  # a long segment: the largest tiles
        (80, "fp32", (8, 1, 56, 128, 1792)),  # fp32 (IEEE dots) on Ampere
    ],
)
def test_sparse_ffn_kernels_compile(arch, dt, shape):
    cfg = sf.default_config(*shape)
    p = "*" + dt
    dot = 1 if dt == "fp32" else 0
    _compile(
        sf._sparse_up_kernel,
        dict(x_ptr=p, r_ptr="*fp32", w_ptr=p, h_ptr=p, **SEG_PTRS),
        dict(BT=cfg.block_t, BD=cfg.up_block_d, BH=cfg.up_block_h, DOT_MODE=dot, s_ptr=None, W_INT8=False),
        arch,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    _compile(
        sf._sparse_down_kernel,
        dict(h_ptr=p, w_ptr=p, y_ptr="*fp32" if cfg.split_k > 1 else p, **SEG_PTRS),
        dict(SPLIT_K=cfg.split_k, BT=cfg.block_t, BD=cfg.down_block_d, BN=cfg.down_block_n, DOT_MODE=dot, s_ptr=None,
             W_INT8=False),
        arch,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@pytest.mark.parametrize("mode,dt,e_pad", [(1, "bf16", 64), (2, "fp16", 256), (0, "fp32", 64)])
def test_router_kernels_compile(mode, dt, e_pad):
    _compile(
        rt._router_logits_kernel,
        dict(x_ptr="*" + dt, w_ptr="*" + dt, zp_ptr="*fp32"),
        dict(SPLIT=14, BT=16, BE=64, BH=128, DOT_MODE=1 if dt == "fp32" else 0),
    )
    _compile(
        rt._router_norm_kernel,
        dict(zp_ptr="*fp32", nw_ptr="*bf16", scores_ptr="*fp32", mask_ptr="*u8", norm_scale="fp32", eps="fp32"),
        dict(SPLIT=14, MODE=mode, HAS_W=mode == 1, BT=16, E_PAD=e_pad),
    )


@pytest.mark.parametrize("act,e_pad,s_pad", [("*fp32", 64, 16), ("*u8", 256, 128)])
def test_segment_kernel_compiles(act, e_pad, s_pad):
    _compile(
        sg._segment_union_kernel,
        dict(act_ptr=act, ids_ptr=I32, counts_ptr=I32, block_seg_ptr=I32, block_t0_ptr=I32, cu_ptr=I32),
        dict(BLOCK_T=16, E_PAD=e_pad, S_PAD=s_pad, SCAN_T=max(1, min(64, 4096 // e_pad)), VEC=64),
    )


# ---------------------------------------------------------------- no spills at the official shapes
_RESOURCES: dict[tuple, dict] = {}


def _on_paper():
    """benchmarks/gpu_on_paper.py: the launch specs (tiles as the code picks them) and the cubin reader."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("gpu_on_paper")


# Spills found when the check moved from the cubin's LOCAL field (which stays 0 for spills) to
# ptxas' own report: the per-segment up kernel at up_block_d = 64 with up_block_h = 128 spills 124
# bytes per thread on sm_80 (255 registers). up_block_h = 64 (247 registers) or 8 warps (224)
# compile without spills; kernels/sparse_ffn/triton_sparse_ffn.py's default_config has to change.
KNOWN_SPILLS = {(80, "sparse up", (("BD", 64), ("BH", 128), ("BT", 16), ("DOT_MODE", 0), ("W_INT8", False),
                                   ("s_ptr", None)))}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("model", ["0.1B Small", "0.5B Medium", "0.8B Large", "1.2B XLarge"])
def test_no_spills_at_official_default_configs(arch, model):
    """Every kernel of a bf16 step, at the tiles the code picks for the official BlockFFN shapes
    (1 token, one 8-token chunk, 8 segments of 1 and of 8 tokens), compiles without register spills
    (ptxas -v, see gpu_on_paper.resource_usage)."""
    gp = _on_paper()
    H, E, D = gp.SHAPES[model]
    for T, S in gp.RESOURCE_POINTS:
        for label, lazy, ptrs, consts, opts in gp.kernel_specs(T, S, E, D, H):
            _check_resources(gp, arch, label, lazy, ptrs, consts, opts)


def _check_resources(gp, arch, label, lazy, ptrs, consts, opts):
    key = (arch, label, tuple(sorted(consts.items(), key=str)), tuple(sorted(opts.items())))
    if key not in _RESOURCES:
        _RESOURCES[key] = gp.resource_usage(_compile(lazy, ptrs, consts, arch, **opts))
    use = _RESOURCES[key]
    known = (arch, label, tuple(sorted(consts.items()))) in KNOWN_SPILLS
    assert (use["spill_stores"] == 0) != known, f"{label} {consts} on sm_{arch}: {use} (known spill: {known})"
    assert use["n_regs"] <= 255 and use["shared"] <= 227 * 1024, (label, consts, use)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("model", ["0.1B Small", "1.2B XLarge"])
def test_expert_major_kernels_compile_without_spills(arch, model):
    """vLLM's fused-MoE GEMM (up and down) and weighted sum, re-jitted from the installed vLLM, at
    the tiles ``triton_expert_major.default_config`` picks for one token, 64 and 2048 tokens (its
    three M buckets): they compile for sm_80 / sm_90 without spills. (0.5B / 0.8B: in
    ``python benchmarks/gpu_on_paper.py``'s register table.)"""
    gp = _on_paper()
    if not gp.em.vllm_kernels_available():
        pytest.skip("vLLM (the fused-MoE kernel sources) is not installed")
    H, E, D = gp.SHAPES[model]
    for T in gp.EM_RESOURCE_TOKENS:
        for label, lazy, ptrs, consts, opts in gp.expert_major_specs(T, E, D, H):
            _check_resources(gp, arch, label, lazy, ptrs, consts, opts)
