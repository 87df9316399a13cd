"""FLOPs: the whole-model counter and the analytic per-layer formulas agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import counted_flops
from tensorslim.analysis.flops import count_flops, dense_layer_flops
from tensorslim.analysis.profile import collect_layer_info
from tensorslim.layers.lowrank import LowRankConv2d
from tensorslim.models import create_model


@pytest.mark.parametrize("name", ["lenet5", "small_cnn", "resnet20"])
def test_model_flops_are_the_sum_of_its_layers(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10)
    x = torch.randn(1, 1, 28, 28)
    infos, never_called = collect_layer_info(model, x)
    assert not never_called
    # conv and linear are the only work the counter sees in these models (adds, pools, BN: 0)
    assert count_flops(model, x) == sum(info.flops for info in infos.values())
    assert count_flops(model, torch.randn(4, 1, 28, 28)) == 4 * count_flops(model, x)


def test_count_flops_restores_the_mode_and_leaves_no_graph() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    x = torch.randn(2, 4, requires_grad=True)
    assert count_flops(model, x) == 2 * 2 * 4 * 3
    assert model.training and model[1].training


@settings(max_examples=30, deadline=None)
@given(
    c=st.integers(1, 4),
    n=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(
        st.tuples(st.integers(0, 2), st.integers(0, 2)), st.sampled_from(["same", "valid"])
    ),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    batch=st.integers(1, 3),
    hw=st.tuples(st.integers(5, 9), st.integers(5, 9)),
)
def test_conv_formula_matches_the_counter(
    c, n, groups, kernel, stride, padding, dilation, batch, hw
) -> None:
    if padding == "same":
        stride = (1, 1)
    conv = nn.Conv2d(c * groups, n * groups, kernel, stride, padding, dilation, groups=groups)
    x = torch.randn(batch, c * groups, *hw)
    assert dense_layer_flops(conv, tuple(x.shape)) == counted_flops(conv, x)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (1, 7)])
def test_linear_formula_counts_every_token(shape: tuple[int, ...]) -> None:
    linear = nn.Linear(7, 4)
    x = torch.randn(*shape)
    assert dense_layer_flops(linear, shape) == counted_flops(linear, x)


def test_structured_layers_use_their_own_formula_and_others_count_zero() -> None:
    layer = LowRankConv2d(3, 8, 3, rank=2, scheme="spatial", padding=1)
    assert dense_layer_flops(layer, (2, 3, 9, 9)) == layer.analytic_flops((2, 3, 9, 9))
    assert dense_layer_flops(layer, (2, 3, 9, 9)) == counted_flops(layer, torch.randn(2, 3, 9, 9))
    assert dense_layer_flops(nn.ReLU(), (2, 3)) == 0
    assert dense_layer_flops(nn.BatchNorm2d(3), (2, 3, 4, 4)) == 0


def test_counting_does_not_import_dynamo() -> None:
    """The counter skips torch's dynamo-disable wrapper: importing torch._dynamo costs a fresh
    process ~2 CPU-seconds, more than planning a resnet56."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from torch import nn; from tensorslim.analysis.flops import "
        "count_flops; m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5)); "
        "n = count_flops(m, torch.randn(1, 2, 4, 4)); assert n == 2 * 12 * 18 + 2 * 12 * 5, n; "
        "assert 'torch._dynamo' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
