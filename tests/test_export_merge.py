"""merge_slow_layers: decisions follow the measurements, outputs are unchanged, save/load works."""

from __future__ import annotations

from pathlib import Path

import torch

import tensorslim as ts
from tensorslim.export import merge_slow_layers
from tensorslim.layers.base import StructuredLayer


def test_merge_keeps_outputs_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ts.create_model("lenet5")
    x = torch.randn(8, 1, 28, 28)
    small = ts.apply(model, ts.plan(model, "svd", ts.Budget(flops=0.5), x))
    small.eval()
    with torch.no_grad():
        before = small(x)
    decisions = merge_slow_layers(small, x)
    assert decisions, "the plan compressed at least one layer"
    for row in decisions:
        assert row["merged"] == (row["dense_ms"] < row["structured_ms"])
        is_structured = isinstance(small.get_submodule(row["layer"]), StructuredLayer)
        assert is_structured == (not row["merged"])
    with torch.no_grad():
        assert torch.allclose(small(x), before, atol=1e-5)
    ts.save(small, tmp_path / "m")
    again = ts.load(tmp_path / "m", ts.create_model("lenet5")).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    for row in decisions:
        assert type(again.get_submodule(row["layer"])) is type(small.get_submodule(row["layer"]))
