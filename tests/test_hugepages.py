"""Weights in 2 MiB pages after loading (vllm_blockffn/serving/hugepages.py): real madvise on real
memory, checked in the kernel's own accounting (/proc/self/smaps), and in a real engine."""

from __future__ import annotations

import pytest
import torch

from vllm_blockffn.serving import hugepages

needs_thp = pytest.mark.skipif(hugepages.thp_mode() in (None, "never"), reason="transparent huge pages off")


def _huge_kb(ptr: int, nbytes: int) -> int:
    """AnonHugePages (kB) of the mappings that overlap [ptr, ptr + nbytes)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < ptr + nbytes and ptr < hi
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@needs_thp
def test_large_weights_are_collapsed_into_huge_pages():
    m = torch.nn.Module()
    m.big = torch.nn.Parameter(torch.ones(24 << 20 >> 2), requires_grad=False)  # 24 MiB
    m.small = torch.nn.Parameter(torch.ones(1024), requires_grad=False)
    ptr, n = m.big.data_ptr(), m.big.numel() * 4
    before = _huge_kb(ptr, n)
    advised, collapsed = hugepages.place_weights(m)
    assert (22 << 20) <= advised <= n  # the 2 MiB-aligned interior of the big one; the small one skipped
    assert torch.equal(m.big, torch.ones_like(m.big))  # contents and pointer unchanged
    assert m.big.data_ptr() == ptr
    if collapsed:  # MADV_COLLAPSE (Linux >= 6.1): backed by huge pages now
        assert _huge_kb(ptr, n) >= before + (20 << 10)


def test_off_and_bad_values(monkeypatch):
    m = torch.nn.Module()
    m.big = torch.nn.Parameter(torch.ones(8 << 20 >> 2), requires_grad=False)
    monkeypatch.setenv(hugepages.ENV, "off")
    assert hugepages.place_weights(m) == (0, 0)
    monkeypatch.setenv(hugepages.ENV, "sometimes")
    with pytest.raises(ValueError, match="VLLM_BLOCKFFN_HUGEPAGES='sometimes'"):
        hugepages.place_weights(m)
