"""Start `vllm serve` on a BlockFFN checkpoint and talk to it (the README's first command)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

DEFAULT_DEMO_DIR = os.path.join(os.path.expanduser("~"), ".cache", "vllm-blockffn", "tiny")
"""Where `vllm-blockffn demo` without --model writes its tiny random checkpoint."""

# Settings that fit vLLM's CPU backend on a small machine (see ../shared/ENV.md).
CPU_SERVE_ARGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.15"]


_CAUSE = re.compile(r"Segfault|Fatal Python error|Traceback \(most recent call last\)|\bERROR\b|"
                    r"died unexpectedly|Error:|core dumped|Killed")


def root_cause(log: str, context: int = 12, limit: int = 60) -> str:
    """The first lines of a failed `vllm serve` log that say why (a segfault report, the first
    traceback or ERROR record, a worker that died), each with the lines after it: the tail of
    the log only says that the engine failed to start, not why."""
    lines = log.splitlines()
    picked: list[int] = []
    for i, line in enumerate(lines):
        if _CAUSE.search(line) and (not picked or i > picked[-1]):
            picked.extend(range(i, min(i + context, len(lines))))
        if len(picked) >= limit:
            break
    if not picked:
        return ""
    out, last = [], None
    for i in dict.fromkeys(picked):
        if last is not None and i != last + 1:
            out.append("   ...")
        out.append(lines[i])
        last = i
    return "\n".join(out[:limit])


def _failure(what: str, log: str) -> str:
    cause = root_cause(log)
    cause = f"\n--- root cause (first error lines of the log) ---\n{cause}" if cause else ""
    return f"{what}{cause}\n--- last lines of the log ---\n{log[-2500:]}"


def vllm_executable() -> str:
    """`vllm` from PATH, else the one installed beside this Python (a venv used without activating it)."""
    beside = os.path.join(os.path.dirname(sys.executable), "vllm")
    return shutil.which("vllm") or (beside if os.path.exists(beside) else "vllm")


class VLLMServer:
    """`vllm serve MODEL` in a subprocess of its own process group; stopped on exit, whatever happens."""

    def __init__(self, model: str, port: int, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_path: str | None = None, startup_timeout: float = 300):
        self.model, self.port = model, port
        self.args = [vllm_executable(), "serve", model, "--port", str(port), "--host", "127.0.0.1",
                     *CPU_SERVE_ARGS, *(extra_args or [])]
        # A new server is a new metrics scope: never inherit the launching process's stats folder.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "VLLM_BLOCKFFN_STATS_DIR"}
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"vllm-blockffn-serve-{port}.log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def start(self) -> VLLMServer:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(_failure(f"vllm serve exited with {self.proc.returncode} (log: {self.log_path})",
                                            self.log()))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(_failure(f"vllm serve not healthy after {self.startup_timeout}s (log: {self.log_path})",
                                    self.log()))

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def default_model() -> str:
    """The bundled demo checkpoint: a tiny BlockFFN generated on first use."""
    from vllm_blockffn.tools.tiny import make_tiny

    if not os.path.exists(os.path.join(DEFAULT_DEMO_DIR, "config.json")):
        make_tiny(DEFAULT_DEMO_DIR)
    return DEFAULT_DEMO_DIR


def run_demo(model: str | None, port: int, prompt: str) -> int:
    """Serve `model` (default: a tiny random BlockFFN) in the dtype vLLM picks for it and print one
    completion; on failure, the root cause from the server log and exit code 1."""
    from openai import OpenAI

    model = model or default_model()
    server = VLLMServer(model, port, startup_timeout=900)
    print(f"starting: vllm serve {model} (log: {server.log_path})", flush=True)
    try:
        server.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        dtype = re.search(r"dtype=torch\.(\w+)", server.log())
        client = OpenAI(base_url=server.base_url, api_key="none")
        out = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        print(f"dtype:      {dtype.group(1) if dtype else 'unknown'}\nprompt:     {prompt!r}\n"
              f"completion: {out.choices[0].text!r}\nusage:      {out.usage}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(None, 8765, "The list of items in the dictionary"))
