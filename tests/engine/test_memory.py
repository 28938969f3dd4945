"""Resident memory: a KV pool costs what its used blocks cost, not its configured size."""

from __future__ import annotations

import sys

import pytest
import torch

from tokenmill.engine.model_runner import lazy_zeros

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def resident_mib(t: torch.Tensor) -> float:
    """Resident size of the memory mapping that holds ``t`` (from /proc/self/smaps), so
    the measure does not move with the rest of the process."""
    addr = t.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) / 1024
    raise AssertionError("no mapping holds the tensor")


def test_lazy_zeros_take_memory_only_where_written():
    t = lazy_zeros((512, 1024, 128), torch.float32, "cpu")  # 256 MiB
    assert resident_mib(t) < 1
    assert t.shape == (512, 1024, 128) and t.is_contiguous()
    assert t[::37, ::101].abs().max().item() == 0.0  # zeros wherever it is read
    t[:16].fill_(1.0)  # 8 MiB written
    assert 7 < resident_mib(t) < 16
    assert t[:16].sum().item() == 16 * 1024 * 128
