"""patches/cpu_shm_stale.py: a CPU TP/PP group starts where a killed run left its /dev/shm segment.

The segment's name carries the port of the run's distributed init method (Ray: a random free port), so
a later run can meet a stale one; vLLM then fails with "create shm in SHMManager failed. errno: 17"
(seen on this project's test machine: 6 Ray TP/PP tests). The Ray TP/PP engines of test_distributed.py
run through the patched method on whatever /dev/shm holds; here the removal itself, without an engine."""

from __future__ import annotations

import types

import pytest
from vllm_blockffn.patches import PATCH_MODULES, cpu_shm_stale


def test_a_stale_segment_of_this_rank_is_removed_and_nothing_else(tmp_path, caplog):
    name = "41234-tp:0-[0-1]-cpushm"
    mine, other, unrelated = (tmp_path / f"{name}_1", tmp_path / f"{name}_0", tmp_path / "41235-tp:0-[0-1]-cpushm_1")
    for p in (mine, other, unrelated):
        p.write_bytes(b"stale")
    with caplog.at_level("WARNING"):
        assert cpu_shm_stale.remove_stale_segment(name, 1, str(tmp_path)) == str(mine)
    assert not mine.exists() and other.exists() and unrelated.exists()
    assert str(mine) in caplog.text and "stale" in caplog.text
    assert cpu_shm_stale.remove_stale_segment(name, 1, str(tmp_path)) is None  # nothing left: no-op


def test_the_patched_init_removes_the_file_before_vllm_creates_it(tmp_path, monkeypatch):
    pytest.importorskip("vllm.distributed.device_communicators.cpu_communicator")
    from vllm.distributed.device_communicators import cpu_communicator

    assert "cpu_shm_stale" in PATCH_MODULES
    seen = []

    def original(self):  # stands for vLLM's init_shm_manager call: the file must be gone by then
        seen.append((tmp_path / f"{self.group_name}_{self.communicator.rank}").exists())
        return 7

    monkeypatch.setattr(cpu_communicator._CPUSHMDistributed, "_init_cpu_shm", original)
    monkeypatch.setattr(cpu_shm_stale, "SHM_DIR", str(tmp_path))
    cpu_shm_stale.apply()
    cpu_shm_stale.apply()  # idempotent: wrapped once
    patched = cpu_communicator._CPUSHMDistributed._init_cpu_shm
    assert getattr(patched, "__wrapped__", None) is original
    (tmp_path / "5555-pp:0-[0-1]-cpushm_0").write_bytes(b"stale")
    fake = types.SimpleNamespace(group_name="5555-pp:0-[0-1]-cpushm", communicator=types.SimpleNamespace(rank=0))
    assert patched(fake) == 7 and seen == [False]
