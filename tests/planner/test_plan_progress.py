"""The per-layer progress bar of planning: shown on a terminal when asked, silent otherwise."""

from __future__ import annotations

import io
import sys

import torch
from torch import nn

import tensorslim as ts


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_progress_bar_on_a_terminal(monkeypatch) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    ts.plan(_net(), "svd", "flops=0.5", torch.randn(1, 16), progress=True)
    assert "plan svd" in err.getvalue() and "layer" in err.getvalue()


def test_quiet_when_not_asked_or_not_a_terminal(monkeypatch) -> None:
    for stream, progress in ((FakeTTY(), False), (io.StringIO(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        ts.plan(_net(), "svd", "flops=0.5", torch.randn(1, 16), progress=progress)
        assert stream.getvalue() == ""
