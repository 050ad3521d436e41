"""Tensor and pipeline parallel BlockFFN on vLLM's CPU backend, with the mp executor and with Ray.

Engines are expensive here (2 cores, ~40-60 s each), so each one is started once:
- per attention type, one TP=1 reference engine, and parallel engines whose greedy
  tokens must equal it: TP=2 (mp; vanilla only), TP=2 (Ray), PP=2 (Ray);
- one `vllm serve` with Ray TP=2, queried by the openai client (8 concurrent requests),
  stopped with SIGINT: no Ray worker actor may survive it;
- one more `vllm serve` with Ray TP=2 whose worker is SIGKILLed mid-request: the
  client must get an error within a bounded time, never a hang, and the server exits.
The Ray tests run against a private Ray head started here (`ray start --head --block`
with the `vllm_cpu` worker-slot resource), torn down at the end whatever happens.
Refusing TP sizes that do not fit is checked without starting any engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PROMPTS, Engine

from vllm_blockffn.serving.config import BlockFFNConfigError, BlockFFNSpec
from vllm_blockffn.serving.parallel import parallel_size_problems, valid_tensor_parallel_sizes
from vllm_blockffn.tools.tiny import TinyOptions, make_tiny, tiny_config

MAX_TOKENS = 16
RAY_RESOURCE = "vllm_cpu"  # patches/_ray_cpu_executor.DEFAULT_RESOURCE (not imported: that imports Ray)
WORKER_ACTOR = "ray::CpuRayWorkerProc"  # process title of our Ray worker actors

needs_ray = pytest.mark.skipif(shutil.which("ray") is None, reason="Ray is not installed (pip install 'ray[default]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omp_bind_for(n: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for n workers: vLLM's "auto" wants one NUMA node per worker,
    and CI machines have one, so split the CPUs we may use into n contiguous sets."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        return "nobind"
    share = len(cpus) // n
    return "|".join(",".join(map(str, cpus[i * share:(i + 1) * share])) for i in range(n))


# -- front-end refusal of TP sizes that do not fit (no engine) -------------------------------------------
def _spec(**opts) -> BlockFFNSpec:
    return BlockFFNSpec.from_config(tiny_config(TinyOptions(**opts), vocab_size=1024))


def test_parallel_size_problems_name_the_field():
    assert parallel_size_problems(_spec(), 2) == [] and parallel_size_problems(_spec(), 4) == []
    assert valid_tensor_parallel_sizes(_spec(), limit=8) == [1, 2, 4]
    (p,) = parallel_size_problems(_spec(expert_size=30), 4)
    assert p.startswith("expert_size=30 is not divisible by tensor_parallel_size=4")
    (p,) = parallel_size_problems(_spec(hidden_size=192), 2)  # 6 heads, 3 KV heads
    assert p.startswith("num_key_value_heads=3 does not fit tensor_parallel_size=2")
    assert parallel_size_problems(_spec(hidden_size=192, expert_size=36), 6) == []  # KV heads replicated twice
    assert parallel_size_problems(_spec(hidden_size=192, attention="mla"), 2) == []  # latent KV: no KV heads
    assert [p.split("=")[0] for p in parallel_size_problems(_spec(), 3)] == \
        ["expert_size", "num_attention_heads", "num_key_value_heads"]
    (p,) = parallel_size_problems(_spec(), 1, pipeline_parallel_size=3)
    assert p.startswith("num_hidden_layers=2 is smaller than pipeline_parallel_size=3")


@pytest.mark.parametrize("opts, tp, field", [
    (dict(expert_size=33), 2, "expert_size=33"),
    (dict(hidden_size=192), 2, "num_key_value_heads=3"),
    (dict(), 3, "num_attention_heads=4"),
])
def test_engine_config_refuses_tp_that_does_not_fit(tmp_path, opts, tp, field):
    """Raised while the front end builds VllmConfig: before any worker (or Ray actor) exists."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_blockffn

    vllm_blockffn.register()
    path = make_tiny(tmp_path / "ckpt", TinyOptions(**opts))
    with pytest.raises(Exception) as info:
        EngineArgs(path, tensor_parallel_size=tp, distributed_executor_backend="mp",
                   max_model_len=256).create_engine_config()
    message = str(info.value)
    assert f"cannot run with tensor_parallel_size={tp}" in message and field in message
    assert isinstance(info.value, BlockFFNConfigError) or "BlockFFN checkpoint" in message


@pytest.mark.slow
def test_serve_refuses_tp_that_does_not_fit(tmp_path):
    """`vllm serve --tensor-parallel-size 2` on expert_size=33 exits with the message, starting no worker."""
    path = make_tiny(tmp_path / "odd", TinyOptions(expert_size=33))
    t0 = time.time()
    proc = subprocess.run(["vllm", "serve", path, "--tensor-parallel-size", "2", "--port", str(free_port()),
                           "--max-model-len", "256"], capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "expert_size=33 is not divisible by tensor_parallel_size=2" in out
    assert "Worker" not in out and "EngineCore" not in out, "refused only after workers started"
    print(f"vllm serve refused TP=2 in {time.time() - t0:.0f} s")


# -- a private Ray head ------------------------------------------------------------------------------------
class RayHead:
    """`ray start --head --block` in its own session; stop() ends exactly its process tree
    (not `ray stop`, which would end every Ray instance of this user on the machine)."""

    def __init__(self, num_cpus: int = 2, slots: int = 4):
        self.slots = slots
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayb", dir="/tmp")  # short: Ray puts sockets in it
        # Processes that talk to this head: token auth as conftest._ray_token_auth set it up.
        self.env = {name: os.environ[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if name in os.environ}
        self.env["RAY_ADDRESS"] = self.address
        self.args = ["ray", "start", "--head", "--block", "--port", str(self.port),
                     "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                     "--num-cpus", str(num_cpus), "--resources", json.dumps({RAY_RESOURCE: slots}),
                     "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", self.temp_dir]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> RayHead:
        self.log = open(os.path.join(self.temp_dir, "head.log"), "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env, "RAY_USAGE_STATS_ENABLED": "0"})
        deadline = time.time() + timeout
        check = [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 f"sys.exit(0 if ray.cluster_resources().get({RAY_RESOURCE!r}) else 1)", self.address]
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            if subprocess.run(check, capture_output=True, timeout=60, env={**os.environ, **self.env}).returncode == 0:
                return self
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"Ray head not up after {timeout}s: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        try:
            with open(os.path.join(self.temp_dir, "head.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:  # Ray cleaned its temp dir up
            return "(head.log is gone)"

    def processes(self):
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def worker_actors(self) -> list:
        """Live vLLM worker actor processes of this Ray instance."""
        found = []
        for p in self.processes():
            try:
                if " ".join(p.cmdline()).startswith(WORKER_ACTOR) and p.status() != "zombie":
                    found.append(p)
            except Exception:
                pass
        return found

    def stop(self) -> None:
        import psutil

        if self.proc is None:
            return
        tree = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: ray stops every process it started
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for p in [*tree, psutil.Process(self.proc.pid) if self.proc.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(request):
    head = RayHead()
    request.addfinalizer(head.stop)  # registered before start: stopped whatever happens
    head.start()
    mp = pytest.MonkeyPatch()
    for name, value in head.env.items():  # in-process engines: this process becomes the Ray driver
        mp.setenv(name, value)
    yield head
    mp.undo()
    try:
        import ray

        if ray.is_initialized():  # in-process engines made this process a Ray driver
            ray.shutdown()
    except ImportError:
        pass


# -- greedy parity: TP=2 / PP=2 equal TP=1, token for token ------------------------------------------------
@pytest.fixture(scope="module")
def reference_tokens(tiny_factory):
    """TP=1 greedy tokens (and texts) of PROMPTS per attention type, from one in-process engine each."""
    cache: dict[str, tuple[list[list[int]], list[str]]] = {}

    def get(attention: str):
        if attention not in cache:
            engine = Engine(tiny_factory(attention=attention))
            try:
                outs = engine.greedy(PROMPTS, MAX_TOKENS)
                cache[attention] = ([list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs])
            finally:
                _close(engine)
        return cache[attention]

    return get


def _close(engine: Engine) -> None:
    if engine.llm is not None:
        engine.llm.llm_engine.engine_core.shutdown()  # executor shutdown: mp workers / Ray actors end now
    engine.close()


CASES = {
    "tp2-mp": dict(tensor_parallel_size=2, distributed_executor_backend="mp"),
    "tp2-ray": dict(tensor_parallel_size=2, distributed_executor_backend="ray"),
    "pp2-ray": dict(pipeline_parallel_size=2, distributed_executor_backend="ray"),
}


# TP=2 with mp for vanilla only: the executor is model-agnostic, and MLA under TP=2 runs with Ray.
PARITY = [(attention, case) for attention in ("vanilla", "mla") for case in CASES
          if (attention, case) != ("mla", "tp2-mp")]


@pytest.mark.slow
@pytest.mark.parametrize("attention, case", PARITY, ids=[f"{a}-{c}" for a, c in PARITY])
def test_parallel_greedy_equals_tp1(request, tiny_factory, reference_tokens, monkeypatch, attention, case,
                                    record_figure):
    kwargs = CASES[case]
    if kwargs["distributed_executor_backend"] == "ray":
        if shutil.which("ray") is None:
            pytest.skip("Ray is not installed")
        head = request.getfixturevalue("ray_head")
        before = set(p.pid for p in head.worker_actors())
    else:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", omp_bind_for(2))
    expected, _ = reference_tokens(attention)
    t0 = time.time()
    engine = Engine(tiny_factory(attention=attention), **kwargs)
    try:
        started = time.time() - t0
        got = [list(o.outputs[0].token_ids) for o in engine.greedy(PROMPTS, MAX_TOKENS)]
    finally:
        _close(engine)
    record_figure(f"distributed {attention} {case}: engine start s", round(started, 1))
    assert got == expected
    if kwargs["distributed_executor_backend"] == "ray":
        deadline = time.time() + 30
        while set(p.pid for p in head.worker_actors()) - before and time.time() < deadline:
            time.sleep(1)
        assert not set(p.pid for p in head.worker_actors()) - before, "Ray worker actors outlived the engine"
        import ray  # this process is the Ray driver: its engine's placement group must be gone too

        while ray.available_resources().get(RAY_RESOURCE, 0) < head.slots and time.time() < deadline:
            time.sleep(1)
        assert ray.available_resources().get(RAY_RESOURCE, 0) == head.slots, "worker slots still reserved"


# -- vllm serve with Ray TP=2 --------------------------------------------------------------------------------
def _serve(path: str, head: RayHead):
    from vllm_blockffn.tools.demo import VLLMServer

    return VLLMServer(path, free_port(),
                      extra_args=["--dtype", "float32", "--tensor-parallel-size", "2",
                                  "--distributed-executor-backend", "ray", "--enforce-eager"],
                      env={**head.env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
                      log_path=os.path.join(head.temp_dir, f"serve-{time.time_ns()}.log"), startup_timeout=400)


@pytest.mark.slow
@needs_ray
def test_serve_ray_tp2_concurrent_requests_and_clean_stop(tiny_factory, ray_head, reference_tokens):
    from openai import OpenAI

    path = tiny_factory(attention="vanilla")
    _, expected_texts = reference_tokens("vanilla")
    server = _serve(path, ray_head)
    with server:
        assert len(ray_head.worker_actors()) == 2
        client = OpenAI(base_url=server.base_url, api_key="none", timeout=120, max_retries=0)
        prompts = (PROMPTS + PROMPTS)[:8]

        def complete(prompt):
            out = client.completions.create(model=path, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
            return out.choices[0].text, out.usage.completion_tokens

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(complete, prompts))
        assert [n for _, n in results] == [MAX_TOKENS] * 8
        assert [t for t, _ in results] == (expected_texts + expected_texts)[:8]  # = TP=1 engine's text
        actors = ray_head.worker_actors()
    # left the with-block: SIGINT to the server's process group, then wait
    assert server.proc.returncode == 0, server.log()[-3000:]
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != "zombie" for p in actors) and time.time() < deadline:
        time.sleep(1)
    assert ray_head.worker_actors() == [], "Ray worker actors outlived `vllm serve`"


@pytest.mark.slow
@needs_ray
def test_serve_ray_worker_killed_mid_request_errors_promptly(tiny_factory, ray_head):
    """SIGKILL one Ray worker while a streamed request is generating: the client gets an error
    (an error chunk, a broken stream or an HTTP error) within BOUND seconds, never a hang."""
    import openai
    from openai import OpenAI

    bound = 90
    path = tiny_factory(attention="vanilla")
    server = _serve(path, ray_head)
    with server:
        client = OpenAI(base_url=server.base_url, api_key="none", timeout=bound, max_retries=0)
        stream = client.completions.create(model=path, prompt=PROMPTS[2], max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].text is not None
        (victim, *_) = sorted(ray_head.worker_actors(), key=lambda p: p.pid)
        victim.kill()
        killed_at = time.time()
        outcome, received = None, 1
        try:
            for chunk in chunks:
                received += 1
                if chunk.choices and chunk.choices[0].finish_reason not in (None, "length"):
                    outcome = f"finish_reason={chunk.choices[0].finish_reason}"
            outcome = outcome or "stream ended"
        except Exception as e:  # an openai.APIError, or httpx's error for a broken stream
            outcome = f"{type(e).__name__}: {str(e)[:200]}"
        elapsed = time.time() - killed_at
        print(f"worker killed: client saw {outcome!r} after {elapsed:.1f} s and {received} chunks")
        assert elapsed < bound
        assert received < 400, "the request completed although a worker was killed"
        # A request sent afterwards fails at once too (the engine is dead), it does not hang.
        t0 = time.time()
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            client.completions.create(model=path, prompt="Hello", max_tokens=4, timeout=bound)
        assert time.time() - t0 < bound
        # vLLM's API server watchdog ends a server whose engine died (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=0).
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        exited_by_itself = server.proc.poll() is not None
        log = server.log()
    print(f"server exited by itself: {exited_by_itself} (code {server.proc.returncode}) "
          f"{time.time() - killed_at:.1f} s after the kill; its log says:")
    for line in log.splitlines():
        if "died unexpectedly" in line or "EngineDeadError" in line or "EngineCore encountered" in line:
            print("   ", line[:240])
    assert exited_by_itself
    assert "died unexpectedly" in log or "EngineDeadError" in log
    deadline = time.time() + 30
    while ray_head.worker_actors() and time.time() < deadline:
        time.sleep(1)
    assert ray_head.worker_actors() == [], "the surviving Ray worker outlived the dead server"


# -- the CPU Ray patch's pieces, without engines -------------------------------------------------------------
@needs_ray
def test_ray_cpu_executor_only_replaces_ray_on_cpu(monkeypatch):
    from types import SimpleNamespace

    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    import vllm_blockffn

    vllm_blockffn.register()

    def config(backend):
        return SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend))

    assert Executor.get_class(config("mp")) is MultiprocExecutor
    from vllm_blockffn.patches._ray_cpu_executor import CpuRayExecutorV2, CpuRayWorkerProc

    assert Executor.get_class(config("ray")) is CpuRayExecutorV2
    # by-reference pickling is what carries the fix into the engine-core and Ray worker processes
    assert CpuRayWorkerProc.__module__ == "vllm_blockffn.patches._ray_cpu_executor"
    from vllm.platforms import current_platform

    assert current_platform.ray_device_key == RAY_RESOURCE
    from vllm import envs
    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

    with monkeypatch.context() as m:
        m.setattr(type(current_platform), "is_cpu", lambda self: False)
        assert Executor.get_class(config("ray")) is RayExecutorV2  # not CPU: vLLM's class, untouched
    with monkeypatch.context() as m:  # the legacy compiled-graph Ray executor: refused on CPU, clearly
        m.setattr(envs, "VLLM_USE_RAY_V2_EXECUTOR_BACKEND", False, raising=False)
        with pytest.raises(ValueError, match="RayExecutorV2 only"):
            Executor.get_class(config("ray"))


@needs_ray
def test_ray_cpu_resource_name_and_thread_shares(monkeypatch):
    from vllm_blockffn.patches._ray_cpu_executor import cpu_threads_for, resource_name

    assert resource_name() == RAY_RESOURCE
    monkeypatch.setenv("VLLM_BLOCKFFN_RAY_CPU_RESOURCE", "CPU")
    with pytest.raises(ValueError, match="reserves"):
        resource_name()
    cpus = list(range(8))
    assert cpu_threads_for(0, 2, "auto", cpus) == [0, 1, 2, 3]
    assert cpu_threads_for(1, 2, "auto", cpus) == [4, 5, 6, 7]
    assert cpu_threads_for(2, 3, "auto", cpus) == [4, 5]
    assert cpu_threads_for(0, 4, "auto", [0, 1]) == [0]  # more workers than CPUs: share, never empty
    assert cpu_threads_for(1, 2, "0-2|5,7", cpus) == [5, 7]
    assert cpu_threads_for(0, 2, "nobind", cpus) is None
    with pytest.raises(ValueError, match="local rank 2"):
        cpu_threads_for(2, 3, "0|1", cpus)


@pytest.mark.slow
@needs_ray
def test_ray_cluster_without_enough_worker_slots_fails_at_once(ray_head):
    """vLLM alone would wait 30 minutes for the placement group; we say what to declare."""
    from types import SimpleNamespace

    from vllm_blockffn.patches._ray_cpu_executor import connect_ray

    t0 = time.time()
    with pytest.raises(RuntimeError) as info:
        connect_ray(SimpleNamespace(world_size=8, ray_runtime_env=None, placement_group=None))
    assert time.time() - t0 < 60
    message = str(info.value)
    assert "needs 8 units of the Ray resource 'vllm_cpu'" in message and "the Ray cluster has 4" in message
    assert "ray start --head --resources '{\"vllm_cpu\": 8}'" in message


@pytest.mark.slow
@needs_ray
def test_joining_a_token_cluster_without_the_token_says_so(ray_head):
    """A driver without the head's token: the message says which variables to set."""
    code = ("import types, vllm_blockffn; vllm_blockffn.register(); "
            "from vllm_blockffn.patches._ray_cpu_executor import connect_ray; "
            "connect_ray(types.SimpleNamespace(world_size=2, ray_runtime_env=None, placement_group=None))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**env, "RAY_ADDRESS": ray_head.address, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode != 0
    assert "uses token authentication" in proc.stderr and "RAY_AUTH_TOKEN_PATH" in proc.stderr, proc.stderr[-3000:]
