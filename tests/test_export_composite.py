"""Export of compressed attention and recurrent layers: ONNX (onnxruntime), TorchScript, merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.export import export_onnx, export_torchscript, merge_slow_layers
from tensorslim.layers.base import StructuredLayer


class Tagger(nn.Module):
    """Embedding → bidirectional LSTM → self-attention (batch first) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(48, 4, batch_first=True)
        self.head = nn.Linear(48, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return self.head(self.attn(h, h, h, need_weights=False)[0])


@pytest.fixture
def small() -> nn.Module:
    torch.manual_seed(0)
    model = Tagger().eval()
    plan = ts.plan(model, "svd", example_input=torch.randint(0, 40, (1, 7)), rank=4)
    assert {lp.fqn for lp in plan.compressed_layers} >= {"lstm", "attn"}
    return ts.apply(model, plan)


def test_onnx_and_torchscript_reproduce_the_compressed_model(small: nn.Module, tmp_path) -> None:
    ids = torch.randint(0, 40, (2, 7))
    assert export_onnx(small, ids, tmp_path / "m.onnx")["max_abs_diff"] < 1e-4
    assert export_torchscript(small, ids, tmp_path / "m.pt")["max_abs_diff"] < 1e-5


def test_merging_treats_a_composite_layer_as_one(small: nn.Module) -> None:
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        before = small(ids)
    decisions = merge_slow_layers(small, ids)
    layers = {d["layer"] for d in decisions}
    assert {"attn", "lstm"} <= layers and not any(".cells" in n or "_proj" in n for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(small(ids), before, rtol=1e-4, atol=1e-5)
    for d in decisions:
        assert isinstance(small.get_submodule(d["layer"]), StructuredLayer) != d["merged"]
