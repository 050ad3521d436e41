"""Issue 11 item 2: the CUDA forward path of a BlockFFN layer never syncs the host and never
copies host→device, checked on this GPU-less machine.

A BlockFFN layer is built as vLLM builds it (vLLM config, a single-process gloo TP group,
``VLLM_BLOCKFFN_BACKEND`` read at construction) and run with a vLLM-shaped forward context
(``attn_metadata`` a dict of per-layer metadata whose ``query_start_loc`` is a slice of a
persistent device buffer, ``num_reqs_padded + 1`` long, its tail repeating the last value,
as vLLM 0.32's GPU runner builds it; or no attention metadata, as under piecewise CUDA-graph
capture). The GPU is emulated (ENV.md, "Emulating a GPU on this machine"):

- device tensors are ``meta`` tensors (shapes and dtypes, no data), and the code's CUDA
  decisions take them for CUDA: ``Tensor.is_cuda`` is true for them and ``triton_usable``
  accepts their device;
- the custom ops (``torch.ops.vllm.blockffn_experts``, ``torch.ops.blockffn.*``) run their real
  implementations (on meta tensors the dispatcher would run their fake ones);
- Triton launches are recorded instead of run: kernel, grid, arguments. Each launch is bound to
  its kernel's signature, its grid must be plain ints and its tensors must live on the device;
- what would sync the host or copy host→device on a GPU is flagged where it happens:
  ``.item()`` / ``bool()`` / ``int()`` of a device tensor (``_local_scalar_dense``), ops with
  data-dependent output shapes (``nonzero``...), ``.tolist()`` / ``.numpy()`` of a device tensor,
  blocking device→host copies, host→device copies (``torch.tensor(..., device=dev)``,
  ``.to(dev)`` / ``copy_`` of a host tensor) and host tensors used as operands of device ops.

Every step asserts that the Triton kernels were launched (so the CPU path cannot pass for the
CUDA one) and that nothing forbidden was seen. Covered: decode, speculative verify chunks,
prefill, mixed steps, CUDA-graph padding of the token count and of ``query_start_loc``,
the piecewise case, the live counters on and off, and the backends; every step also through the
expert-major path (vLLM's fused-MoE kernel, the torch alignment: vLLM's CUDA op is absent here),
whichever path the static rule picks at these tiny shapes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEV = torch.device("meta")  # the emulated GPU
DTYPE = torch.bfloat16
H, E, D = 64, 8, 32  # hidden size, experts, expert size (tiny: nothing is computed)
NUM_LAYERS = 2  # the last one publishes the live counters
STEPS_PER_TEST = 2
MAX_NUM_REQS = 16  # length of vLLM's persistent query_start_loc buffer, minus one

aten = torch.ops.aten
# Ops whose output shape depends on the data: on a GPU they copy a count to the host.
_DATA_DEPENDENT = {
    aten.nonzero.default, aten.nonzero_numpy.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
    aten.is_nonzero.default, aten.equal.default,
}  # fmt: skip
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "warmup"}


# ------------------------------------------------------------------------------ the sentinel
@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]  # tensors as (shape, dtype), the rest as passed


@dataclass
class Sentinel:
    """Emulated GPU for the duration of a ``with`` block: records launches and violations."""

    violations: list[str] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # allowed but worth knowing (non-blocking D2H)
    _stack: contextlib.ExitStack | None = None

    # -- bookkeeping
    def flag(self, what: str) -> None:
        self.violations.append(f"{what} at {_where()}")

    def report(self) -> str:
        return "\n".join(["forbidden on the CUDA forward path:", *(f"  - {v}" for v in self.violations)])

    def launched(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]

    # -- the emulation
    def __enter__(self) -> Sentinel:
        _import_forward_path()  # before patching: the forward imports some of it lazily
        stack = self._stack = contextlib.ExitStack()
        patch = stack.enter_context
        # CUDA decisions: meta tensors are CUDA tensors.
        patch(mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: t.device.type in ("cuda", "meta"))))
        for module, name, original in _module_attrs("triton_usable"):
            patch(mock.patch.object(module, name, _meta_is_cuda(original)))
        # Triton launches: recorded, never run.
        for cls in {cls for _, _, cls in _module_attrs("lazy_jit")}:
            patch(mock.patch.object(cls, "__getitem__", lambda kernel, grid: self._launcher(kernel, grid)))
        # Host→device copies and host reads that do not reach the dispatcher on meta tensors.
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
            patch(mock.patch.object(owner, name, self._creation(getattr(owner, name), name)))
        for name in ("tolist", "numpy"):
            patch(mock.patch.object(torch.Tensor, name, self._host_read(getattr(torch.Tensor, name), name)))
        patch(mock.patch.object(torch.cuda, "synchronize", lambda *_, **__: self.flag("host sync: cuda.synchronize()")))
        patch(_Dispatch(self))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()

    def _launcher(self, kernel: Any, grid: Any) -> Callable[..., None]:
        sentinel = self

        def launch(*args: Any, **kwargs: Any) -> None:
            name = kernel.__name__
            params = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
            try:
                bound = inspect.signature(kernel.fn).bind(*args, **params)
            except TypeError as e:
                sentinel.flag(f"launch of {name} does not match its signature ({e})")
                return
            g = grid(bound.arguments) if callable(grid) else grid
            g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
            if not all(type(n) is int and n >= 0 for n in g):
                sentinel.flag(f"launch of {name}: grid {g!r} is not made of shape-only ints")
            recorded: dict[str, Any] = {}
            for arg, value in bound.arguments.items():
                if isinstance(value, torch.Tensor):
                    if value.device.type != DEV.type:
                        sentinel.flag(f"launch of {name}: argument {arg} is a {value.device} tensor")
                    recorded[arg] = (tuple(value.shape), value.dtype)
                else:
                    recorded[arg] = value
            sentinel.launches.append(Launch(name, g, recorded))

        return launch

    def _creation(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def create(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type != "cpu":
                self.flag(f"host→device copy: torch.{name}(host data, device={out.device})")
            return out

        return create

    def _host_read(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if t.device.type == "cpu":
                return original(t, *args, **kwargs)
            self.flag(f"host sync: Tensor.{name}() of a {t.device} tensor")
            return original(torch.zeros(t.shape, dtype=t.dtype), *args, **kwargs)

        return read


class _Dispatch(TorchDispatchMode):
    """Sees every aten op on the way to the meta kernels; runs the custom ops' real code."""

    def __init__(self, sentinel: Sentinel) -> None:
        super().__init__()
        self.sentinel = sentinel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        flag = self.sentinel.flag
        real = _real_custom_op(func)
        if real is not None:
            with self:
                return real(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            flag(f"host sync: reading a {args[0].device} scalar on the host (.item() / bool() / int())")
            return False if args[0].dtype == torch.bool else 0
        if func in _DATA_DEPENDENT:
            flag(f"host sync: {func} has a data-dependent output shape")
            if func is aten.nonzero.default:
                return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
            raise RuntimeError(f"{func} on the CUDA forward path")
        if func.overloadpacket in (aten._to_copy, aten.to, aten.copy_):
            a = dict(zip((arg.name for arg in func._schema.arguments), args), **kwargs)
            if func.overloadpacket is aten.copy_:
                src, dst = a["src"].device, a["self"].device
            else:
                src = a["self"].device
                dst = torch.device(a["other"].device if "other" in a else (a.get("device") or src))
            if src.type == "cpu" and dst.type != "cpu":
                flag(f"host→device copy: {func} {src} → {dst}")
            elif src.type != "cpu" and dst.type == "cpu":
                if not a.get("non_blocking", False):
                    flag(f"host sync: blocking device→host copy {func} {src} → {dst}")
                else:
                    self.sentinel.notes.append(f"non-blocking device→host copy at {_where()}")
                if func.overloadpacket is aten.copy_:
                    return a["self"]
                return torch.zeros(a["self"].shape, dtype=a.get("dtype") or a["self"].dtype)
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type != "cpu" for t in tensors) and any(t.device.type == "cpu" and t.dim() for t in tensors):
            flag(f"host→device copy: host tensor used as an operand of {func} on the device")
            args, kwargs = _to_device((args, kwargs))
        return func(*args, **kwargs)


def _to_device(tree: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(DEV) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t, tree)


def _real_custom_op(func: Any) -> Callable[..., Any] | None:
    """The Python implementation of one of the plugin's custom ops, looked up at call time."""
    name = getattr(getattr(func, "_schema", None), "name", "")
    if name.startswith("vllm::blockffn"):  # registered by direct_register_custom_op from _<name>
        return getattr(sys.modules["vllm_blockffn.serving.layers.blockffn"], "_" + name.split("::")[1])
    if name.startswith("blockffn::"):
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(name)
        assert opdef is not None, f"{name} is not a torch.library.custom_op any more: adapt the sentinel"
        return opdef._init_fn
    return None


def _import_forward_path() -> None:
    import vllm_blockffn.kernels.ops  # noqa: F401
    import vllm_blockffn.kernels.router.triton_router  # noqa: F401
    import vllm_blockffn.kernels.segments.triton_segments  # noqa: F401
    import vllm_blockffn.kernels.sparse_ffn.triton_expert_major  # noqa: F401
    import vllm_blockffn.kernels.sparse_ffn.triton_sparse_ffn  # noqa: F401

    import vllm_blockffn.observe.metrics  # noqa: F401
    import vllm_blockffn.observe.stats  # noqa: F401
    import vllm_blockffn.serving.layers.blockffn  # noqa: F401
    import vllm_blockffn.serving.segments  # noqa: F401


def _module_attrs(name: str) -> list[tuple[Any, str, Any]]:
    """(module, name, value) for every loaded plugin or kernels module that holds ``name``."""
    found = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name.split(".")[0] not in ("vllm_blockffn", "kernels"):
            continue
        if name in vars(module):
            found.append((module, name, vars(module)[name]))
    assert found, f"no loaded module defines {name!r}: adapt the sentinel"
    return found


def _meta_is_cuda(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def usable(device: Any) -> bool:
        return getattr(device, "type", device) in ("cuda", "meta") or original(device)

    return usable


def _where() -> str:
    """The innermost frame of the plugin's own code (where the violation happens)."""
    roots = {os.path.dirname(m.__file__) + os.sep
             for n, m in list(sys.modules.items())
             if n in ("vllm_blockffn", "vllm_blockffn.kernels", "kernels") and getattr(m, "__file__", None)}
    for frame in reversed(traceback.extract_stack()[:-2]):
        root = next((r for r in roots if frame.filename.startswith(r)), None)
        if root is not None:
            short = os.path.relpath(frame.filename, os.path.dirname(os.path.dirname(root)))
            return f"{short}:{frame.lineno} ({frame.name}: {frame.line})"
    return "?"


# ------------------------------------------------------------------------------ vLLM's side
@dataclass(frozen=True)
class Step:
    lens: tuple[int, ...]  # query tokens per request
    num_tokens: int | None = None  # padded token count (CUDA graphs); default: sum(lens)
    num_reqs_padded: int | None = None  # padded request count; default: len(lens)
    attn: bool = True  # False: piecewise capture, the forward context has no attention metadata

    @property
    def T(self) -> int:  # noqa: N802
        return self.num_tokens or sum(self.lens)

    @property
    def R(self) -> int:  # noqa: N802
        return self.num_reqs_padded or len(self.lens)


STEPS = {
    "decode": Step((1, 1, 1)),
    "decode-1": Step((1,)),
    "decode-padded": Step((1, 1, 1), num_tokens=8, num_reqs_padded=8),
    "verify": Step((4, 4)),  # speculative decoding, k = 3 drafts + 1
    "verify-padded": Step((4, 4, 4), num_tokens=16, num_reqs_padded=4),
    "prefill": Step((37,)),
    "prefill-padded": Step((29, 7), num_tokens=40),
    "mixed": Step((1, 4, 23)),
    "piecewise": Step((1, 1, 4), attn=False),
    "piecewise-padded": Step((1, 1, 4), num_tokens=8, attn=False),
}


def attn_metadata(step: Step) -> dict[str, Any] | None:
    """As vLLM 0.32's GPU runner builds it (gpu_model_runner.py): ``query_start_loc`` is a view
    of a persistent device buffer, ``[: num_reqs_padded + 1]``, whose tail repeats the last value
    (the values live on the host copy; the device buffer has no data here)."""
    if not step.attn:
        return None
    cpu = np.zeros(MAX_NUM_REQS + 1, dtype=np.int32)
    cpu[1:len(step.lens) + 1] = np.cumsum(step.lens)
    cpu[len(step.lens) + 1:] = cpu[len(step.lens)]
    gpu = torch.empty(MAX_NUM_REQS + 1, dtype=torch.int32, device=DEV)
    md = SimpleNamespace(
        query_start_loc=gpu[: step.R + 1],
        query_start_loc_cpu=torch.from_numpy(cpu)[: step.R + 1],
        num_actual_tokens=sum(step.lens),
        max_query_len=max(step.lens),
    )
    return {f"model.layers.{i}.self_attn.attn": md for i in range(NUM_LAYERS)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_config():
    """A vLLM config and a world-size-1 TP group (gloo), as a CPU worker sets them up."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    config = VllmConfig()
    ours = False
    with set_current_vllm_config(config):
        if not ps.model_parallel_is_initialized():
            if not torch.distributed.is_initialized():
                ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
            ps.initialize_model_parallel(1, 1)
            ours = True
    yield config
    if ours:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


@pytest.fixture
def recorder(monkeypatch):
    """The process-wide live counters, fresh for the test and restored afterwards."""
    from vllm_blockffn.observe.stats import RECORDER

    monkeypatch.setattr(RECORDER, "__dict__", type(RECORDER)().__dict__)
    return RECORDER


def build_layers(config: Any) -> list[torch.nn.Module]:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.utils import default_unquantized_gemm

    from vllm_blockffn.serving.config import BlockFFNSpec
    from vllm_blockffn.serving.layers.blockffn import BlockFFN

    spec = BlockFFNSpec(
        vocab_size=64, hidden_size=H, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=4,
        rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_position_embeddings=128, tie_word_embeddings=True,
        scale_emb=1.0, dim_model_base=float(H), scale_depth=1.0, attention_type="vanilla", ffn_type="block",
        num_experts=E, expert_size=D, hidden_act="silu", router_act="relu", norm_after_router="rms", norm_scale=1.0,
        block_implementation="torch",
    )  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # as vLLM's model loader builds a model: default dtype and device
    try:
        with set_current_vllm_config(config), torch.device(DEV):
            layers = [BlockFFN(spec, prefix=f"model.layers.{i}.mlp", model_name="sentinel") for i in range(NUM_LAYERS)]
    finally:
        torch.set_default_dtype(default)
    for layer in layers:
        assert layer.up_proj.device == DEV
        # On a CUDA platform vLLM's unquantized GEMM is F.linear (the CPU one needs weights
        # packed at load time).
        layer.router_proj.quant_method._gemm_impl = default_unquantized_gemm
    return layers


@contextlib.contextmanager
def spy(obj: Any, name: str) -> Iterator[list[tuple[tuple, dict]]]:
    calls: list[tuple[tuple, dict]] = []
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    with mock.patch.object(obj, name, wrapper):
        yield calls


def run_steps(config: Any, layers: list[torch.nn.Module], step: Step) -> Sentinel:
    from vllm.forward_context import set_forward_context

    x = torch.empty((step.T, H), dtype=DTYPE, device=DEV)
    with set_forward_context(attn_metadata(step), config, num_tokens=step.T), Sentinel() as sentinel:
        try:
            for _ in range(STEPS_PER_TEST):
                for layer in layers:
                    y = layer(x)
                    assert (y.shape, y.dtype, y.device) == (x.shape, x.dtype, x.device)
        except Exception as e:  # a violation that also broke the emulation: report both
            if sentinel.violations:
                raise AssertionError(sentinel.report() + f"\n(then: {e!r})") from e
            raise
    return sentinel


def assert_clean(sentinel: Sentinel) -> None:
    if sentinel.violations:
        pytest.fail(sentinel.report(), pytrace=False)


SPARSE_KERNELS = ("_segment_union_kernel", "_sparse_up_kernel", "_sparse_down_kernel")
EXPERT_MAJOR_KERNELS = ("fused_moe_kernel", "moe_fused_mul_sum_kernel")  # vLLM's, re-jitted


def kernel_segments(step: Step) -> int:
    """The segment count the expert op hands the kernels: one per (padded) request plus the
    padding segment, always appended on an accelerator; one without attention metadata."""
    return step.R + 1 if step.attn else 1


def expected_path(step: Step, backend: str) -> str:
    from vllm_blockffn.kernels.dispatch import cuda_path

    return cuda_path(step.T, kernel_segments(step), E, D, H, elt=DTYPE.itemsize, allow_dense=backend == "auto")


def check_expert_major_launches(sentinel: Sentinel, step: Step, forwards: int) -> None:
    """Two fused-MoE GEMMs and one weighted sum per forward (one chunk at these sizes), over
    every token: routing ids/weights [T, E], the pair buffers [T·E, ·], static grids."""
    gemms = sentinel.launched("fused_moe_kernel")
    sums = sentinel.launched("moe_fused_mul_sum_kernel")
    assert len(gemms) == 2 * forwards and len(sums) == forwards, sentinel.launches
    assert not any(sentinel.launched(k) for k in SPARSE_KERNELS), sentinel.launches
    for up, down in zip(gemms[::2], gemms[1::2]):
        assert up.args["a_ptr"][0] == (step.T, H) and up.args["c_ptr"][0] == (step.T * E, D), up
        assert up.args["b_ptr"][0] == (E, D, H) and up.args["top_k"] == E, up
        assert down.args["a_ptr"][0] == (step.T * E, D) and down.args["c_ptr"][0] == (step.T * E, H), down
        assert down.args["b_ptr"][0] == (E, H, D) and down.args["top_k"] == 1, down
        for g in (up, down):
            assert g.args["num_valid_tokens"] == step.T * E and g.args["MUL_ROUTED_WEIGHT"] is False, g
            ids_shape, ids_dtype = g.args["sorted_token_ids_ptr"]
            assert ids_dtype == torch.int32 and g.args["EM"] == ids_shape[0], g
    for ms in sums:
        assert ms.grid == (step.T,) and ms.args["inputs_ptr"][0] == (step.T, E, H), ms
        assert ms.args["top_ids_ptr"] == ((step.T, E), torch.int32) and ms.args["has_expert_map"] is True, ms
        assert ms.args["topk_weights_ptr"] == ((step.T, E), torch.float32), ms


def check_sparse_launches(sentinel: Sentinel, step: Step, forwards: int) -> None:
    for kernel in SPARSE_KERNELS:
        n = len(sentinel.launched(kernel))
        assert n == forwards, f"{kernel} launched {n} times for {forwards} forwards: {sentinel.launches}"
    for launch in sentinel.launched("_segment_union_kernel"):
        (shape_cu, _) = launch.args["cu_ptr"]
        assert launch.grid == (shape_cu[0] - 1,), launch  # one program per segment
        assert shape_cu[0] - 1 >= (len(step.lens) if step.attn else 1), launch  # every request covered
        assert launch.args["act_ptr"][0] == (step.T, E), launch
    for launch in sentinel.launched("_sparse_up_kernel") + sentinel.launched("_sparse_down_kernel"):
        shape = launch.args["x_ptr" if "x_ptr" in launch.args else "h_ptr"][0]
        assert shape[0] == step.T, launch


# ------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("stats", ["on", "off"])
@pytest.mark.parametrize("backend", ["sparse", "auto"])
@pytest.mark.parametrize("step", list(STEPS.values()), ids=list(STEPS))
def test_forward_never_syncs_nor_copies_to_device(vllm_config, recorder, step, backend, stats, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled (GPU) configuration
    monkeypatch.setenv("VLLM_BLOCKFFN_BACKEND", backend)
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS", "1" if stats == "on" else "0")
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_DIR", str(tmp_path))  # the counters would be published...
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_INTERVAL", "0")  # ...at every step
    layers = build_layers(vllm_config)

    with spy(recorder, "record") as recorded:
        sentinel = run_steps(vllm_config, layers, step)

    assert_clean(sentinel)
    forwards = STEPS_PER_TEST * NUM_LAYERS
    path = expected_path(step, backend)  # static: T, the segment count, E, D, H
    if path == "segments":
        check_sparse_launches(sentinel, step, forwards)
    elif path == "expert_major":
        check_expert_major_launches(sentinel, step, forwards)
    else:
        assert not any(sentinel.launched(k) for k in SPARSE_KERNELS + EXPERT_MAJOR_KERNELS), sentinel.launches
    if stats == "off":
        assert not recorded, "VLLM_BLOCKFFN_STATS=0 but the counters were updated"
    elif step.attn:
        assert len(recorded) == forwards, recorded
        for args, kwargs in recorded:
            scores = kwargs.get("scores", args[1] if len(args) > 1 else None)
            assert isinstance(scores, torch.Tensor) and scores.device == DEV, "counters not kept on the device"


@pytest.mark.parametrize("stats", ["on", "off"])
@pytest.mark.parametrize("step", list(STEPS.values()), ids=list(STEPS))
def test_expert_major_path_never_syncs_nor_copies_to_device(vllm_config, recorder, step, stats, monkeypatch,
                                                            tmp_path):
    """The expert-major path (vLLM's fused-MoE kernel) on every step, whatever the rule picks at
    these tiny shapes: routing, the torch alignment (vLLM's CUDA op is absent here), two GEMMs,
    the SiLU and the weighted sum, all sync-free with static grids."""
    from vllm_blockffn.kernels import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VLLM_BLOCKFFN_BACKEND", "sparse")
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS", "1" if stats == "on" else "0")
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_DIR", str(tmp_path))
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_INTERVAL", "0")
    monkeypatch.setattr(ops, "_cuda_path", lambda *a, **k: "expert_major")
    sentinel = run_steps(vllm_config, build_layers(vllm_config), step)
    assert_clean(sentinel)
    check_expert_major_launches(sentinel, step, STEPS_PER_TEST * NUM_LAYERS)


def test_rule_reaches_every_path():
    """Guard for the parametrized tests: at the official shapes the static rule sends a single
    decode request to the per-segment kernels, 8 decode requests to the expert-major path and a
    2048-token prefill to the expert-major path; and the steps above cover both sparse paths."""
    from vllm_blockffn.kernels.dispatch import cuda_path

    H_, E_, D_ = 1792, 56, 128  # 1.2B XLarge
    assert cuda_path(1, 2, E_, D_, H_) == "segments"  # one request + the padding segment
    assert cuda_path(8, 9, E_, D_, H_) == "expert_major"  # 8 decode requests
    assert cuda_path(32, 9, E_, D_, H_) == "expert_major"  # 8 verify chunks of 4
    assert cuda_path(2048, 2, E_, D_, H_) == "expert_major"  # a prefill
    assert cuda_path(2048, 2, E_, D_, H_, expert_major=False) == "dense"  # without vLLM's kernels
    assert cuda_path(1, 1, 512, D_, H_) == "dense"  # more experts than the Triton paths take
    paths = {expected_path(step, "sparse") for step in STEPS.values()}
    assert "segments" in paths, paths


def test_auto_backend_reaches_triton(vllm_config, recorder, monkeypatch):
    """Guard for the parametrized test: some auto steps do run the sparse kernels."""
    step = STEPS["decode-1"]
    assert expected_path(step, "auto") == "segments"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VLLM_BLOCKFFN_BACKEND", "auto")
    sentinel = run_steps(vllm_config, build_layers(vllm_config), step)
    assert_clean(sentinel)
    check_sparse_launches(sentinel, step, STEPS_PER_TEST * NUM_LAYERS)


@pytest.mark.parametrize("stats", ["on", "off"])
def test_dense_backend_never_syncs(vllm_config, recorder, stats, monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_BLOCKFFN_BACKEND", "dense")
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS", "1" if stats == "on" else "0")
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_DIR", str(tmp_path))
    monkeypatch.setenv("VLLM_BLOCKFFN_STATS_INTERVAL", "0")
    sentinel = run_steps(vllm_config, build_layers(vllm_config), STEPS["decode-padded"])
    assert_clean(sentinel)
    assert not sentinel.launches


@pytest.mark.parametrize("T", [1, 5, 40])
@pytest.mark.parametrize("mode", ["rms", "sum", "none"])
def test_kernel_ops_never_sync(T, mode, monkeypatch):
    """The kernels' own ops on CUDA tensors: the Triton router and the segment union."""
    from vllm_blockffn.kernels import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.empty((T, H), dtype=DTYPE, device=DEV)
    w_r = torch.empty((E, H), dtype=DTYPE, device=DEV)
    norm_w = torch.empty((E,), dtype=DTYPE, device=DEV) if mode == "rms" else None
    cu = torch.empty((3,), dtype=torch.int32, device=DEV)
    with Sentinel() as sentinel:
        scores, active = ops.router(x, w_r, norm_w, mode, 1.0, 1e-5)
        ids, counts = ops.segment_union(active, cu)
    assert_clean(sentinel)
    assert (scores.shape, scores.dtype, active.dtype) == ((T, E), torch.float32, torch.bool)
    assert (ids.shape, counts.shape) == ((2, E), (2,))
    assert [launch.kernel for launch in sentinel.launches] == [
        "_router_logits_kernel", "_router_norm_kernel", "_segment_union_kernel"]


def test_sentinel_sees_what_it_must():
    """The emulation itself: each forbidden pattern is flagged, device-only work is not."""
    host = torch.arange(4, dtype=torch.int32)
    dev = torch.empty(4, dtype=torch.int32, device=DEV)
    forbidden: dict[str, Callable[[], object]] = {
        "torch.tensor on the device": lambda: torch.tensor([1, 2], device=DEV),
        "new_tensor": lambda: dev.new_tensor([3]),
        ".to(device) of host data": lambda: host.to(DEV),
        "copy_ from the host": lambda: dev.copy_(host),
        "host operand": lambda: dev + host,
        ".item()": lambda: dev[0].item(),
        "bool()": lambda: bool(dev[0] > 0),
        ".cpu()": lambda: dev.cpu(),
        ".tolist()": lambda: dev.tolist(),
        "nonzero": lambda: dev.nonzero(),
        "synchronize": lambda: torch.cuda.synchronize(),
    }
    for what, fn in forbidden.items():
        with Sentinel() as sentinel:
            fn()
        assert sentinel.violations, f"{what} was not flagged"
    with Sentinel() as sentinel:
        y = dev[1:] - dev[:-1]
        y = torch.cat([dev, torch.full((1,), 7, dtype=torch.int32, device=DEV)]).cumsum(0) + y.sum()
        _ = dev.to("cpu", non_blocking=True), host.tolist(), torch.tensor([1]), dev.is_cuda
    assert_clean(sentinel)
    assert torch.empty(1, device=DEV).is_cuda is False  # restored on exit
