"""Checkpoint expert weights → the internal layout every kernel here reads.

Internal layout: ``w_up`` [E, D, H] and ``w_down_t`` [E, D, H], both contiguous. The down
projection is stored transposed so that one expert's down block is a contiguous [D, H]
slab, exactly like its up block: a sparse kernel (or a CPU matmul on a view) then reads
only the bytes of the experts it runs, in long contiguous runs.
"""

from __future__ import annotations

import torch

LAYOUTS = ("block", "block_linear")


def to_internal_layout(
    up: torch.Tensor, down: torch.Tensor, layout: str, num_experts: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert one layer's ``mlp.up_proj`` / ``mlp.down_proj`` to ``(w_up, w_down_t)``.

    ``layout="block"``: up [E, D, H], down [E, H, D].
    ``layout="block_linear"``: up [E·D, H], down [H, E·D]; ``num_experts`` is required
    because E and D cannot be told apart from the shapes. Run once at load time: the
    down projection is copied into its transposed form.
    """
    if layout == "block":
        if up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"block layout wants 3-D up/down, got {tuple(up.shape)} / {tuple(down.shape)}")
        e, d, h = up.shape
        if tuple(down.shape) != (e, h, d):
            raise ValueError(f"block layout: down {tuple(down.shape)} does not match up {tuple(up.shape)}")
        if num_experts is not None and num_experts != e:
            raise ValueError(f"block layout: up has {e} experts, expected {num_experts}")
        return up.contiguous(), down.transpose(1, 2).contiguous()
    if layout == "block_linear":
        if num_experts is None:
            raise ValueError("block_linear layout needs num_experts")
        if up.dim() != 2 or down.dim() != 2:
            raise ValueError(f"block_linear layout wants 2-D up/down, got {tuple(up.shape)} / {tuple(down.shape)}")
        ed, h = up.shape
        if ed % num_experts:
            raise ValueError(f"block_linear: {ed} up rows do not split into {num_experts} experts")
        d = ed // num_experts
        if tuple(down.shape) != (h, ed):
            raise ValueError(f"block_linear: down {tuple(down.shape)} does not match up {tuple(up.shape)}")
        w_up = up.reshape(num_experts, d, h).contiguous()
        w_down_t = down.t().reshape(num_experts, d, h).contiguous()
        return w_up, w_down_t
    raise ValueError(f"unknown BlockFFN weight layout {layout!r}; expected one of {LAYOUTS}")


def down_rows(down: torch.Tensor, layout: str, num_experts: int) -> torch.Tensor:
    """A checkpoint's ``mlp.down_proj`` as the rows of each W_down,e, [E, H, D] (a view): itself for
    ``block``, ``[H, E·D]`` regrouped for ``block_linear``. The per-output-row int8 scales (quant.py)
    are taken over these rows."""
    if layout == "block":
        return down
    h, ed = down.shape
    return down.reshape(h, num_experts, ed // num_experts).permute(1, 0, 2)


def down_from_rows(rows: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of :func:`down_rows`: [E, H, D] back to the checkpoint's own shape."""
    if layout == "block":
        return rows
    e, h, d = rows.shape
    return rows.permute(1, 0, 2).reshape(h, e * d)


def from_internal_layout(w_up: torch.Tensor, w_down_t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_internal_layout` (for tests and for writing checkpoints)."""
    e, d, h = w_up.shape
    if layout == "block":
        return w_up.contiguous(), w_down_t.transpose(1, 2).contiguous()
    if layout == "block_linear":
        return w_up.reshape(e * d, h).contiguous(), w_down_t.reshape(e * d, h).t().contiguous()
    raise ValueError(f"unknown BlockFFN weight layout {layout!r}; expected one of {LAYOUTS}")


KMAJOR_ROWS = 16
"""Output rows per line of the K-major linear layout (:func:`pack_kmajor`): one AVX-512 vector of fp32 sums."""


KMAJOR_GROUP = {torch.float32: 1, torch.bfloat16: 2, torch.int8: 4}
"""Consecutive k of one output row in a line of the K-major layout, by weight dtype: fp32 one, bf16 pairs (widened by a
shift and a mask), int8 quads (what one VPDPBUSD lane takes)."""
KMAJOR_MAX_K_INT8 = 16384
"""int8: K at most, so that every int32 lane of the kernel's sums stays exact (cpu_native.c KQ_MAXK)."""
KMAJOR_MAX_D_EXPERTS = 512
"""Packed int8 experts: d_e at most (cpu_native.c KX_MAXD: the down pass's int32 sums stay exact)."""


def kmajor_packable(weight: torch.Tensor) -> bool:
    """Whether a linear weight [N, K] can be packed K-major: fp32, bf16 with K even, or int8 with K a multiple of 4 up
    to 16384; N a multiple of 16."""
    g = KMAJOR_GROUP.get(weight.dtype)
    return (g is not None and weight.dim() == 2 and weight.shape[0] % KMAJOR_ROWS == 0 and weight.shape[1] % g == 0
            and weight.shape[0] > 0 and (weight.dtype != torch.int8 or weight.shape[1] <= KMAJOR_MAX_K_INT8))


def pack_kmajor(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [N, K] → [N / 16, K / g, 16, g]: each 64-byte line holds g consecutive k (fp32: one, bf16: a
    pair, int8: a quad) of 16 output rows, the layout of the native kernel's outer-product linears
    (``blockffn_linear_kmajor``, ``blockffn_linear_kmajor_f32``, ``blockffn_linear_kmajor_i8`` in
    kernels/sparse_ffn/cpu_native.c): a line serves every token, no horizontal sums. Run once at load; the same bytes
    as the weight."""
    if not kmajor_packable(weight):
        raise ValueError(f"pack_kmajor: weight {weight.dtype} {list(weight.shape)}; expected a 2-D [N, K] with N a "
                         f"multiple of {KMAJOR_ROWS}: torch.float32, torch.bfloat16 with K even, or torch.int8 with K "
                         f"a multiple of 4 up to {KMAJOR_MAX_K_INT8}")
    n, k = weight.shape
    g = KMAJOR_GROUP[weight.dtype]
    return weight.reshape(n // KMAJOR_ROWS, KMAJOR_ROWS, k // g, g).permute(0, 2, 1, 3).contiguous()


def unpack_kmajor(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_kmajor`: the weight [N, K] (a copy)."""
    if packed.dim() != 4 or packed.shape[2] != KMAJOR_ROWS or packed.shape[3] != KMAJOR_GROUP.get(packed.dtype):
        raise ValueError(f"unpack_kmajor: packed {packed.dtype} {list(packed.shape)}; expected [N / {KMAJOR_ROWS}, "
                         f"K / g, {KMAJOR_ROWS}, g] with g 1 (fp32), 2 (bf16) or 4 (int8)")
    b, kg, _, g = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(b * KMAJOR_ROWS, kg * g)


def check_ffn_shapes(x, scores, w_up, w_down_t) -> None:
    """x [T, H], scores [T, E], w_up and w_down_t [E, D, H], or a ValueError naming every shape."""
    T, H = x.shape
    E, D, H2 = w_up.shape
    if H2 != H or tuple(w_down_t.shape) != (E, D, H) or tuple(scores.shape) != (T, E):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, scores {tuple(scores.shape)}, "
            f"w_up {tuple(w_up.shape)}, w_down_t {tuple(w_down_t.shape)}"
        )


def experts_packable(w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Whether experts [E, D, H] can be packed K-major (:func:`pack_experts_kmajor`): fp32, bf16 or int8, D and H
    multiples of 16; int8 D up to 512 and H up to 16384 (the kernel's exact int32 sums)."""
    if w_up.dtype not in KMAJOR_GROUP or w_down_t.dtype != w_up.dtype or w_up.dim() != 3 \
            or w_down_t.shape != w_up.shape:
        return False
    _, d, h = w_up.shape
    return (d > 0 and h > 0 and d % KMAJOR_ROWS == 0 and h % KMAJOR_ROWS == 0
            and (w_up.dtype != torch.int8 or (d <= KMAJOR_MAX_D_EXPERTS and h <= KMAJOR_MAX_K_INT8)))


def experts_kmajor(w_up: torch.Tensor) -> bool:
    """True for experts packed by :func:`pack_experts_kmajor` (5-D), False for the internal [E, D, H] layout."""
    return w_up.dim() == 5


def expert_dims(w_up: torch.Tensor) -> tuple[int, int, int]:
    """(E, D, H) of ``w_up`` in either layout."""
    if experts_kmajor(w_up):
        e, db, h4, _, g = w_up.shape
        return e, db * KMAJOR_ROWS, h4 * g
    e, d, h = w_up.shape
    return e, d, h


def pack_experts_kmajor(w_up: torch.Tensor, w_down_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts [E, D, H] (fp32, bf16 or int8) → each expert's W_up [D, H] and W_down [H, D] packed as
    :func:`pack_kmajor` packs a linear: ``w_up`` [E, D / 16, H / g, 16, g], ``w_down`` [E, H / 16, D / g, 16, g] (g: 1
    fp32, 2 bf16, 4 int8). The native kernel then runs an expert as two K-major linears (cpu_native.c ``kx_run``):
    one sequential stream a panel, every token of a line served from it, instead of 4-row units. Run once at load;
    the same bytes."""
    if not experts_packable(w_up, w_down_t):
        raise ValueError(f"pack_experts_kmajor: experts {w_up.dtype} {list(w_up.shape)} / {w_down_t.dtype} "
                         f"{list(w_down_t.shape)}; expected fp32, bf16 or int8 [E, D, H] with D and H multiples of "
                         f"{KMAJOR_ROWS} (int8: D up to {KMAJOR_MAX_D_EXPERTS} and H up to {KMAJOR_MAX_K_INT8})")
    e, d, h = w_up.shape
    g = KMAJOR_GROUP[w_up.dtype]
    up = w_up.reshape(e, d // KMAJOR_ROWS, KMAJOR_ROWS, h // g, g).permute(0, 1, 3, 2, 4).contiguous()
    down = w_down_t.reshape(e, d // g, g, h // KMAJOR_ROWS, KMAJOR_ROWS).permute(0, 3, 1, 4, 2).contiguous()
    return up, down


def unpack_experts(w_up: torch.Tensor, w_down_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_experts_kmajor` ([E, D, H] copies); experts in the internal layout as they are."""
    if not experts_kmajor(w_up):
        return w_up, w_down_t
    e, d, h = expert_dims(w_up)
    up = w_up.permute(0, 1, 3, 2, 4).reshape(e, d, h)
    down = w_down_t.permute(0, 2, 4, 1, 3).reshape(e, d, h)
    return up, down
