"""DeBut conv unfolding order (the official position-major one) and zero-padding.

The expected values are computed here from the paper's definitions and the official code's
behaviour (rlin27/DeBut, ``DeBut_2dConv`` and ``deform_butterfly_mult_torch``), re-implemented
in the test, not with the library's helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.debut import DeButConv2d, DeButLinear

DT = torch.float64


def numbers(text: str) -> list[tuple[int, int, int, int, int]]:
    vals = [int(v) for v in text.split()]
    return [tuple(vals[k : k + 5]) for k in range(0, len(vals), 5)]  # type: ignore[misc]


def factor_matrix(spec: tuple[int, int, int, int, int], w: torch.Tensor) -> torch.Tensor:
    """The p×q factor from nonzeros w[b, i, j, d] at (b·r·t + i·t + d, b·s·t + j·t + d)."""
    p, q, r, s, t = spec
    out = torch.zeros(p, q, dtype=w.dtype)
    for b in range(p // (r * t)):
        for i in range(r):
            for j in range(s):
                for d in range(t):
                    out[b * r * t + i * t + d, b * s * t + j * t + d] = w[b, i, j, d]
    return out


def chain_product(text: str, weights: list[torch.Tensor]) -> torch.Tensor:
    """W = F_K ⋯ F_1, input side first."""
    specs = numbers(text)
    w = factor_matrix(specs[0], weights[0])
    for spec, f in zip(specs[1:], weights[1:], strict=True):
        w = factor_matrix(spec, f) @ w
    return w


def official_forward(x: torch.Tensor, text: str, twiddle: torch.Tensor) -> torch.Tensor:
    """``deform_butterfly_mult_torch`` on rows x (N, in): per factor the twiddle slice of
    s·p values viewed (B, t, r, s).permute(0, 2, 3, 1), multiplied against x viewed
    (N, B, 1, s, t) and summed over s."""
    out, used = x, 0
    for p, q, r, s, t in numbers(text):
        blocks = q // (s * t)
        tw = twiddle[used : used + s * p].view(blocks, t, r, s).permute(0, 2, 3, 1)
        out = (tw * out.reshape(x.shape[0], blocks, 1, s, t)).sum(dim=3).reshape(-1, p)
        used += s * p
    return out


def official_conv(x: torch.Tensor, layer: DeButConv2d, twiddle: torch.Tensor) -> torch.Tensor:
    """``DeBut_2dConv``: unfold, view (N, C, kh·kw, L), permute to (N, L, kh·kw, C)."""
    n, c = x.shape[:2]
    kh, kw = layer.kernel_size
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    length = patches.shape[-1]
    rows = patches.view(n, c, kh * kw, length).permute(0, 3, 2, 1).reshape(n * length, -1)
    y = official_forward(rows, layer.chain.text, twiddle) + layer.bias
    ho = x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1
    ho = ho // layer.stride[0] + 1
    return y.view(n, length, -1).transpose(1, 2).reshape(n, -1, ho, length // ho)


CONV_CHAIN = "8 18 4 9 1  8 8 2 2 4"  # 88 nonzeros for 8 × 18: a structured kernel


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_position_major_conv_is_conv2d_with_the_permuted_product(
    stride: int, padding: int, dilation: int
) -> None:
    torch.manual_seed(0)
    layer = DeButConv2d(2, 8, 3, CONV_CHAIN, stride, padding, dilation).double()
    x = torch.randn(3, 2, 9, 8, dtype=DT)
    w = chain_product(CONV_CHAIN, [f.detach() for f in layer.factors])
    kernel = w.view(8, 3, 3, 2).permute(0, 3, 1, 2)
    expected = F.conv2d(x, kernel, layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.to_dense().weight, kernel)
    assert layer.config()["order"] == "position"


def test_channel_major_order_is_kept_as_an_option() -> None:
    torch.manual_seed(1)
    layer = DeButConv2d(2, 8, 3, CONV_CHAIN, padding=1, order="channel").double()
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    w = chain_product(CONV_CHAIN, [f.detach() for f in layer.factors])
    expected = F.conv2d(x, w.view(8, 2, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(TensorslimError, match="order"):
        DeButConv2d(2, 8, 3, CONV_CHAIN, order="spatial")


def test_conv_equals_the_official_debut_2dconv_on_the_same_factors() -> None:
    torch.manual_seed(2)
    layer = DeButConv2d(2, 8, 3, CONV_CHAIN, stride=2, padding=1).double()
    # the official storage of one factor: its s·p values in (B, t, r, s) order, concatenated
    twiddle = torch.cat([f.detach().permute(0, 3, 1, 2).reshape(-1) for f in layer.factors])
    x = torch.randn(2, 2, 7, 7, dtype=DT)
    torch.testing.assert_close(layer(x), official_conv(x, layer, twiddle))


def test_from_dense_fits_the_kernel_in_position_order() -> None:
    # a kernel that is exactly a chain product in position order is recovered by ALS
    torch.manual_seed(3)
    source = DeButConv2d(2, 8, 3, CONV_CHAIN, padding=1).double()
    conv = source.to_dense()
    fitted = DeButConv2d.from_dense(conv, CONV_CHAIN, init="als", sweeps=4)
    assert fitted.init_info["error"] < 1e-8
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    torch.testing.assert_close(fitted(x), conv(x))
    # the same kernel in channel order is a different matrix: the chain no longer fits it
    other = DeButConv2d.from_dense(conv, CONV_CHAIN, init="als", sweeps=4, order="channel")
    assert other.init_info["error"] > 1e-3


# ------------------------------------------------------------------------------- padding


def test_padded_linear_is_the_cropped_product_on_zero_padded_input() -> None:
    torch.manual_seed(4)
    chain = "16 16 4 4 1  16 16 4 4 4"  # 16 → 16 padding a 13 → 11 layer
    layer = DeButLinear(13, 11, chain, pad=True).double()
    w = chain_product(chain, [f.detach() for f in layer.factors])
    x = torch.randn(5, 13, dtype=DT)
    padded = torch.cat([x, torch.zeros(5, 3, dtype=DT)], dim=1)
    expected = (padded @ w.T)[:, :11] + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.to_dense().weight, w[:11, :13])
    assert layer.config()["pad"] is True
    assert layer.analytic_params() == 16 * 4 + 16 * 4 + 11
    with pytest.raises(TensorslimError, match="pad=True"):
        DeButLinear(13, 11, chain)
    with pytest.raises(TensorslimError, match="smaller"):
        DeButLinear(17, 11, chain, pad=True)


def test_padded_conv_appends_zeros_after_the_last_position_major_column() -> None:
    torch.manual_seed(5)
    chain = "32 32 8 8 1  16 32 2 4 8"  # 3·3·3 = 27 inputs padded to 32, 12 outputs to 16
    layer = DeButConv2d(3, 12, 3, chain, padding=1, pad=True).double()
    w = chain_product(chain, [f.detach() for f in layer.factors])
    kernel = w[:12, :27].reshape(12, 3, 3, 3).permute(0, 3, 1, 2)
    x = torch.randn(2, 3, 6, 5, dtype=DT)
    torch.testing.assert_close(layer(x), F.conv2d(x, kernel, layer.bias, padding=1))


def test_padded_fit_is_the_official_padding_matrix_fit() -> None:
    # ALS on the weight placed at the top left of zeros: a weight that is the crop of a chain
    # product whose padded part is zero is fitted exactly
    torch.manual_seed(6)
    dense = nn.Linear(13, 11).double()
    fitted = DeButLinear.from_dense(dense, "16 16 16 16 1", init="als", sweeps=2, pad=True)
    torch.testing.assert_close(fitted.to_dense().weight, dense.weight)
    x = torch.randn(3, 13, dtype=DT)
    torch.testing.assert_close(fitted(x), dense(x))


# ---------------------------------------------------------------------------- ONNX export


def test_onnx_export_runs_with_a_dynamic_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from tensorslim.export import export_onnx

    torch.manual_seed(7)
    model = nn.Sequential(
        DeButConv2d(2, 8, 3, CONV_CHAIN, padding=1),
        nn.Flatten(),
        DeButLinear(8 * 25, 11, "16 200 4 50 1  16 16 4 4 4", pad=True),
    ).eval()
    path = tmp_path / "debut.onnx"
    export_onnx(model, torch.randn(2, 2, 5, 5), path)
    x = torch.randn(5, 2, 5, 5)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-4)
