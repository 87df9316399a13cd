"""Sensitivity weights: they predict the output change of white errors, and steer the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.calibration import collect_statistics
from tensorslim.planner.sensitivity import output_sensitivity, weighted_choices
from tensorslim.rank.allocate import LayerChoices
from tensorslim.train.losses import sampled_gaussian_loss


def data(n: int, rows: int = 16, width: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g, dtype=torch.float64) for _ in range(n)]


def test_weights_predict_the_output_change_of_a_white_error() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    layers = {"0": net[0], "2": net[2]}
    stats = collect_statistics(
        net, data(400), layers, ["gram", "sensitivity"], loss_fn=sampled_gaussian_loss(),
        progress=False,
    )  # fmt: skip
    predicted = {name: output_sensitivity(m, stats[name]) for name, m in layers.items()}
    # measured: E‖Δf‖² / e² for ΔY white with ‖ΔY‖² = e²‖WX‖², per row, over fresh data
    g = torch.Generator().manual_seed(1)
    measured = {}
    for name, module in layers.items():
        total = 0.0
        for x in data(200, seed=2):

            def noisy(m: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
                clean = y - m.bias
                scale = clean.pow(2).mean().sqrt() * 1e-3  # e = 1e-3: first order holds
                return y + scale * torch.randn(y.shape, generator=g, dtype=y.dtype)

            with torch.no_grad():
                base = net(x)
                handle = module.register_forward_hook(noisy)
                total += float((net(x) - base).pow(2).sum()) / 1e-6
                handle.remove()
        measured[name] = total / 200
    # the allocator only compares layers: the ratio is what the weights must get right
    ratio_predicted = predicted["0"] / predicted["2"]
    ratio_measured = measured["0"] / measured["2"]
    assert ratio_predicted == pytest.approx(ratio_measured, rel=0.15)


class Mixed(nn.Module):
    """f = a(x) + 0.01·b(x), a and b the same Linear: equal relative errors, unequal effect."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 0.01 * self.b(x)


@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_the_budget_goes_to_the_layer_the_output_sees(method: str) -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    calibration = [x.float() for x in data(4, width=16)]
    ranks = {}
    for preset in ("default", "paper"):
        plan = ts.plan(
            model, method, "params=0.6", calibration=calibration, preset=preset,
            allow_slower=True,
        )  # fmt: skip
        ranks[preset] = {n: plan.layer(n).config.get("rank", 16) for n in ("a", "b")}
    # alike (within the one rank the budget splits): the paper's per-layer errors are equal
    assert abs(ranks["paper"]["a"] - ranks["paper"]["b"]) <= 1
    assert ranks["default"]["b"] < ranks["default"]["a"] - 2  # b barely reaches the output


def test_weights_are_left_alone_when_a_layer_has_no_sensitivity() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).double()
    layers = {"0": net[0], "1": net[1]}
    stats = collect_statistics(net, data(2), layers, ["gram"], progress=False)
    choices = [LayerChoices(n, 1.0, []) for n in layers]
    assert weighted_choices(choices, layers, stats) is choices
    stats["0"].sensitivity, stats["1"].sensitivity = 2.0, 6.0
    weights = [c.weight for c in weighted_choices(choices, layers, stats)]
    assert sum(weights) / 2 == pytest.approx(1.0)  # normalised to mean 1


def test_fwsvd_counts_layers_alike_by_default() -> None:
    assert ts.get_method("fwsvd").allocation == "layer"
    assert not ts.get_method("fwsvd").weighs_layers()
    assert ts.get_method("fwsvd", allocation="sensitivity").weighs_layers()
    assert ts.get_method("svd_llm").weighs_layers()
    assert not ts.get_method("svd_llm", preset="paper").weighs_layers()
