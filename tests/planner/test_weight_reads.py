"""A layer whose weight other code reads directly stays dense, and the plan names the reader."""

from __future__ import annotations

import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers.lowrank import LowRankLinear


class ReadsWeight(nn.Module):
    """Casts its input to ``proj.weight.dtype`` as Hugging Face's ViT embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.fc = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj(x.to(self.proj.weight.dtype)))


def test_outside_weight_reader_keeps_the_layer_dense() -> None:
    torch.manual_seed(0)
    model = ReadsWeight().eval()
    x = torch.randn(2, 16)
    plan = ts.plan(model, "svd", None, x, rank=4)
    proj = plan.layer("proj")
    assert proj.method is None and proj.reason.startswith("ReadsWeight reads its .weight directly")
    assert plan.layer("fc").method == "svd"  # its own forward's reads do not count
    small = ts.apply(model, plan)
    assert isinstance(small.fc, LowRankLinear) and type(small.proj) is nn.Linear
    assert torch.isfinite(small(x)).all()
    assert type(model.proj) is nn.Linear  # the survey restored the classes
