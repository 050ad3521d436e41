"""BlockFFN router: x @ W_r.T → ReLU → norm; fp32 scores and the active mask."""

from .._triton import HAS_TRITON
from .naive import ROUTER_MODES, router_naive

if HAS_TRITON:
    from .triton_router import router_triton
else:  # pragma: no cover
    router_triton = None

__all__ = ["ROUTER_MODES", "router_naive", "router_triton"]
