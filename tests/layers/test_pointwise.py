"""PointwiseConv2d: the matmul path computes exactly what the 1×1 convolution computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tensorslim.layers.pointwise import PointwiseConv2d, pointwise_conv


@pytest.mark.parametrize("channels", [(3, 17), (17, 3), (8, 8)])  # expanding, reducing, equal
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_matches_conv2d_forward_and_backward(channels, bias, layout) -> None:
    torch.manual_seed(0)
    c, n = channels
    layer = PointwiseConv2d(c, n, bias=bias).double()
    x = torch.randn(4, c, 5, 7, dtype=torch.double).contiguous(memory_format=layout)
    x.requires_grad_(True)
    y = layer(x)
    reference = F.conv2d(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, reference)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad(reference.square().sum(), [x, *layer.parameters()])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_is_a_conv2d_with_the_same_state_dict_keys() -> None:
    layer = PointwiseConv2d(4, 6)
    assert isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1)
    assert set(layer.state_dict()) == set(torch.nn.Conv2d(4, 6, 1).state_dict())


def test_unbatched_input_falls_back_to_the_convolution() -> None:
    weight = torch.randn(6, 2, 1, 1)
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(pointwise_conv(x, weight, None), F.conv2d(x, weight))
