"""Measured latency: median and IQR in ms, threads and batch recorded, model state kept."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.analysis.latency import measure_latency


def test_latency_reports_median_threads_and_batch() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8), nn.Dropout()).train()
    result = measure_latency(model, torch.randn(16, 32), min_run_time=0.05)
    assert set(result) == {"median_ms", "iqr_ms", "runs", "threads", "batch"}
    assert 0 < result["median_ms"] < 1000
    assert result["iqr_ms"] >= 0 and result["runs"] >= 1
    assert result["threads"] == torch.get_num_threads()
    assert result["batch"] == 16
    assert model.training and model[3].training, "the mode must be restored"


def test_latency_with_explicit_threads_leaves_the_global_setting() -> None:
    before = torch.get_num_threads()
    result = measure_latency(nn.Linear(8, 8), torch.randn(4, 8), threads=2, min_run_time=0.02)
    assert result["threads"] == 2
    assert torch.get_num_threads() == before


def test_bigger_work_measures_slower() -> None:
    """A sanity check that the number is a time: 64× the work must not measure faster."""
    small = measure_latency(nn.Linear(64, 64), torch.randn(8, 64), min_run_time=0.05)
    big = measure_latency(nn.Linear(512, 512), torch.randn(8, 512), min_run_time=0.05)
    assert big["median_ms"] > small["median_ms"]
