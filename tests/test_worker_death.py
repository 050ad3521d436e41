"""A tensor-parallel worker that dies mid-stream (issue 20, item 3): `vllm serve` with TP=2 on vLLM's
multiprocessing executor, one worker process SIGKILLed while requests are generating.

What must happen:
- every in-flight request ends with an error within BOUND_S = 10 s of the kill — streams with an
  error event, non-streamed requests with a 5xx, or a closed connection — and a request sent
  afterwards fails at once: no client hangs;
- the server does not linger with a dead engine: vLLM's API-server watchdog ends `vllm serve`,
  which exits by itself (code 0), and the surviving worker and the engine core go with it
  (with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 it would stay up, answering errors and /health 503);
- the log names the dead worker: the plugin's line with its rank, pid and signal (vLLM's own `Worker
  proc VllmWorker-1 died unexpectedly` line usually precedes it, but can be lost to a race: see the test).

What vLLM 0.32 does by itself: its worker monitor sees the death at once, but its executor
shutdown then waits 5 s (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS) and 4 s more after a SIGTERM for
the surviving worker, which is stuck in a gloo collective with the dead one and can do neither;
the clients' errors came 9.5 s after the kill. patches/mp_worker_death.py ends the survivors at
once after a death, which brings that to about a second.

The CPUs are split by hand between the two workers (VLLM_CPU_OMP_THREADS_BIND, see
test_distributed.omp_bind_for). One server, about a minute to start; the test is bounded by its
timeouts (start 150 s, kill-to-exit 60 s) and takes ~1.3 min here.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

BOUND_S = 10.0  # kill -> error at the client (issue 20)
EXIT_BOUND_S = 60.0  # kill -> `vllm serve` gone
MAX_MODEL_LEN = 2048  # the tiny checkpoint's max_position_embeddings: long enough that no request ends first
PROMPT = "def main():"
WORKER_TITLE = "VLLM::Worker_TP"  # vLLM's process title for TP workers: VLLM::Worker_TP{rank}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omp_bind_for(n: int) -> str:
    """The CPUs this process may use, split into n contiguous sets (one per worker)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        return "nobind"
    share = len(cpus) // n
    return "|".join(",".join(map(str, cpus[i * share:(i + 1) * share])) for i in range(n))


def tp_workers(pid: int) -> dict[int, object]:
    """{TP rank: psutil.Process} of the server's live worker processes, found by process title."""
    import psutil

    found = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if title.startswith(WORKER_TITLE) and p.status() != psutil.STATUS_ZOMBIE:
                found[int(title[len(WORKER_TITLE):].split()[0])] = p
        except (psutil.Error, ValueError):
            pass
    return found


class Request(threading.Thread):
    """One completion, streamed or not; records when and how it ended."""

    def __init__(self, base: str, model: str, stream: bool, max_tokens: int):
        super().__init__(daemon=True)
        self.base, self.model, self.stream, self.max_tokens = base, model, stream, max_tokens
        self.started = threading.Event()  # a first chunk arrived (streams) / the request is sent
        self.chunks, self.outcome, self.ended_at = 0, None, None

    def run(self) -> None:
        import httpx

        body = dict(model=self.model, prompt=PROMPT, max_tokens=self.max_tokens, temperature=0,
                    ignore_eos=True, stream=self.stream)
        try:
            with httpx.Client(base_url=self.base, timeout=httpx.Timeout(5, read=120)) as http:
                if not self.stream:
                    self.started.set()
                    r = http.post("/v1/completions", json=body)
                    self.outcome = f"HTTP {r.status_code}: {r.text[:160]}"
                    return
                with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        self.outcome = f"HTTP {r.status_code}"
                        return
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            self.outcome = self.outcome or f"[DONE] after {self.chunks} chunks"
                            return
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.outcome = f"error event: {json.dumps(event['error'])[:160]}"
                            continue  # vLLM sends [DONE] after it
                        self.chunks += 1
                        self.started.set()
                    self.outcome = self.outcome or f"stream closed after {self.chunks} chunks"
        except Exception as e:  # noqa: BLE001 - a broken connection is an acceptable way to fail
            self.outcome = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            self.ended_at = time.time()
            self.started.set()

    @property
    def failed(self) -> bool:
        return self.outcome is not None and not self.outcome.startswith(("[DONE]", "HTTP 200"))


@pytest.mark.slow
def test_tp2_worker_sigkilled_mid_stream_fails_requests_fast_and_server_exits(tiny_factory, tmp_path,
                                                                               record_figure):
    import httpx
    import psutil

    from vllm_blockffn.tools.demo import VLLMServer

    path = tiny_factory(attention="vanilla")
    port = free_port()
    server = VLLMServer(path, port, extra_args=["--dtype", "float32", "--tensor-parallel-size", "2",
                                                "--distributed-executor-backend", "mp", "--enforce-eager",
                                                "--max-model-len", str(MAX_MODEL_LEN)],
                        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": omp_bind_for(2),
                             "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "0"},
                        log_path=str(tmp_path / "serve.log"), startup_timeout=150)
    base = f"http://127.0.0.1:{port}"
    t_start = time.time()
    with server:
        record_figure("worker death: server start s", round(time.time() - t_start, 1))
        workers = tp_workers(server.proc.pid)
        assert sorted(workers) == [0, 1], f"TP worker processes not found: {workers}\n{server.log()[-3000:]}"
        tree = [server.proc.pid, *(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True))]
        # Three requests in flight, long enough that none can finish before the kill.
        requests = [Request(base, path, stream, MAX_MODEL_LEN - 48) for stream in (True, True, False)]
        for r in requests:
            r.start()
        for r in requests:
            assert r.started.wait(60), "no first chunk within 60 s"
        time.sleep(0.5)
        assert all(r.ended_at is None for r in requests), [r.outcome for r in requests]
        victim = workers[1]
        victim.kill()  # SIGKILL
        killed_at = time.time()
        for r in requests:
            r.join(BOUND_S + 5)
        ended = [(r.outcome, None if r.ended_at is None else round(r.ended_at - killed_at, 2)) for r in requests]
        print(f"after the kill of TP worker 1 (pid {victim.pid}): {ended}")
        assert all(r.ended_at is not None for r in requests), f"a client still waits {BOUND_S + 5} s after: {ended}"
        assert all(r.failed for r in requests), f"a request completed although a worker was killed: {ended}"
        worst = max(r.ended_at - killed_at for r in requests)
        record_figure("worker death: kill -> last client error s", round(worst, 2))
        assert worst <= BOUND_S, ended

        # A request sent now fails at once (an error status, or the server is already gone).
        t0 = time.time()
        try:
            r = httpx.post(f"{base}/v1/completions", json=dict(model=path, prompt="Hello", max_tokens=4),
                           timeout=BOUND_S)
            late = f"HTTP {r.status_code}"
            assert r.status_code >= 500, late
        except httpx.TransportError as e:
            late = type(e).__name__
        assert time.time() - t0 < BOUND_S
        # The server reports unhealthy while it is still up, and then exits by itself.
        health = []
        while server.proc.poll() is None and time.time() - killed_at < EXIT_BOUND_S:
            try:
                health.append(httpx.get(f"{base}/health", timeout=2).status_code)
            except httpx.TransportError:
                health.append("refused")
            time.sleep(0.5)
        exited_after = time.time() - killed_at
        exit_code = server.proc.poll()
        log = server.log()
    print(f"later request: {late}; /health while up: {sorted(set(map(str, health)))}; server exited by itself "
          f"{exit_code is not None} (code {exit_code}) {exited_after:.1f} s after the kill")
    record_figure("worker death: kill -> server exit s", round(exited_after, 1))
    for line in log.splitlines():
        if "died" in line or "EngineDeadError" in line or "Executor failed" in line:
            print("   log:", line[:200])
    assert exit_code is not None, f"vllm serve still running {EXIT_BOUND_S} s after the kill"
    assert 200 not in health, f"/health said 200 with a dead worker: {health}"
    # The death is named in the log by our patch's line (logged from the executor's shutdown, which every
    # path of a worker death runs). vLLM's own "Worker proc VllmWorker-1 died unexpectedly" line is not
    # required: its monitor thread marks the executor failed before it logs, the engine's main thread can
    # see the mark and shut down first, and the API server can end the engine core before the monitor
    # thread logs (seen once in a full suite on the AMD EPYC VM, 2026-12-04).
    assert f"worker VllmWorker-1 (rank 1, pid {victim.pid}) died (killed by SIGKILL)" in log, log[-4000:]
    # Nothing of the server is left: not the engine core, not the surviving worker.
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes of the dead server still running: {left}"
