"""Planning a 1-D conv model: Conv1d layers compressed channel-wise, a ConvTranspose2d listed."""

from __future__ import annotations

import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops


class AudioNet(nn.Module):
    """Conv1d stack over (B, 8, 32) → Linear head; an unused-by-SVD transposed conv decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3, stride=2, padding="valid")
        self.head = nn.Linear(32, 6)
        self.decoder = nn.ConvTranspose2d(6, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(-1)
        logits = self.head(h)
        return logits + self.decoder(logits[:, :, None, None]).mean((1, 2, 3))[:, None]


def test_conv1d_layers_are_compressed_and_every_weight_holder_is_listed(tmp_path) -> None:
    torch.manual_seed(0)
    model = AudioNet().eval()
    x = torch.randn(3, 8, 32)
    plan = ts.plan(model, "svd", "flops=0.6", x)
    by_name = {lp.fqn: lp for lp in plan.layers}
    assert set(by_name) == {"conv1", "conv2", "head", "decoder"}
    assert by_name["conv1"].method == "svd" and by_name["conv2"].method == "svd"
    assert "transposed convolution" in by_name["decoder"].reason
    small = ts.apply(model, plan)
    # the plan's FLOPs are the ones the counter sees in the compressed model
    dense_rest = plan.model_flops - sum(lp.flops_before for lp in plan.layers)
    assert count_flops(small, x[:1]) == dense_rest + sum(lp.flops_after for lp in plan.layers)
    assert count_flops(small, x[:1]) <= 0.6 * plan.model_flops
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, AudioNet().eval())
    assert torch.equal(again(x), small(x))


def test_calibrated_conv1d_errors_are_in_output_space() -> None:
    torch.manual_seed(1)
    model = AudioNet().eval()
    batches = [(torch.randn(4, 8, 32), torch.zeros(4)) for _ in range(3)]
    plan = ts.plan(model, "svd", "params=0.7", calibration=batches)
    assert plan.error_space == "output"
    assert any(lp.method == "svd" for lp in plan.layers)
