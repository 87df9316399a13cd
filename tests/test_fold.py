"""BatchNorm folding: the folded model computes the same function, with fewer modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.fold import conv_bn_pairs, fold_batchnorm
from tensorslim.models import create_model


def trained_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_folded_resnet_matches(name: str) -> None:
    torch.manual_seed(0)
    size = 28 if name == "resnet20" else 64
    x = torch.randn(4, 1, size, size)
    model = trained_stats(create_model(name, in_channels=1), x)
    folded, names = fold_batchnorm(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(names) == sorted(bns)  # every BN follows a conv in these ResNets
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_conv_read_twice_is_not_folded() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv(x)
            return self.bn(z) + z

    assert conv_bn_pairs(Branch()) == []


def test_untraceable_model_is_a_clear_error() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(TensorslimError, match="fold"):
        fold_batchnorm(Dynamic())


def test_a_plan_with_fold_bn_applies_and_round_trips(tmp_path) -> None:
    import tensorslim as ts

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    model = trained_stats(create_model("resnet20", in_channels=1), x)
    plan = ts.plan(model, "svd", "flops=0.7", x[:1], fold_bn=True, allow_slower=True)
    assert len(plan.folded_batchnorm) == 21 and plan.compressed_layers
    small = ts.apply(model, plan).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched
    ts.save(small, tmp_path / "m")
    again = ts.load(tmp_path / "m", create_model("resnet20", in_channels=1)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
