"""Resident memory: a KV pool costs what its used blocks cost, not its configured size."""

from __future__ import annotations

import sys

import pytest
import torch

from tokenmill.model_runner import lazy_zeros

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_lazy_zeros_take_memory_only_where_written():
    before = rss_mib()
    t = lazy_zeros((512, 1024, 128), torch.float32, "cpu")  # 256 MiB
    assert rss_mib() - before < 16
    assert t.shape == (512, 1024, 128) and t.is_contiguous()
    assert t[::37, ::101].abs().max().item() == 0.0  # zeros wherever it is read
    t[:16].fill_(1.0)  # 8 MiB written
    grown = rss_mib() - before
    assert 6 < grown < 40
    assert t[:16].sum().item() == 16 * 1024 * 128
