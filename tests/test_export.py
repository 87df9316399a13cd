"""Export: ONNX checked in onnxruntime, TorchScript, with a compressed model."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.export import check_onnx, export_onnx, export_torchscript
from tensorslim.layers.lowrank import LowRankConv2d
from tensorslim.models import create_model

# torch marks torch.jit.trace/load deprecated; the TorchScript format is still what users ask for
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def compressed() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    plan = ts.plan(model, "svd", "flops=0.5", x, scheme="spatial")
    small = ts.apply(model, plan)
    assert any(isinstance(m, LowRankConv2d) for m in small.modules())
    return small


def test_onnx_round_trip_in_onnxruntime(compressed: nn.Module, tmp_path) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra (pip install '.[onnx]')")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    import onnx

    example = torch.randn(4, 1, 28, 28)
    report = export_onnx(compressed, example, tmp_path / "model.onnx")
    assert report["bytes"] > 0 and report["max_abs_diff"] < 1e-4
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    # the batch axis is dynamic: another batch size runs and matches
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(7, 1, 28, 28)
    (got,) = session.run(None, {"input": other.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), compressed(other), rtol=1e-4, atol=1e-4)


def test_onnx_check_catches_a_different_model(compressed: nn.Module, tmp_path) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx extra (pip install '.[onnx]')")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    example = torch.randn(2, 1, 28, 28)
    export_onnx(compressed, example, tmp_path / "model.onnx", check=False)
    torch.manual_seed(1)
    stranger = create_model("lenet5", in_channels=1, num_classes=10).eval()
    with pytest.raises(TensorslimError, match="differs from PyTorch"):
        check_onnx(stranger, example, tmp_path / "model.onnx")


def test_onnx_without_the_extra_is_a_clear_error(compressed, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(TensorslimError, match=r"pip install 'tensorslim\[onnx\]'"):
        export_onnx(compressed, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")


def test_torchscript_round_trip(compressed: nn.Module, tmp_path) -> None:
    example = torch.randn(3, 1, 28, 28)
    report = export_torchscript(compressed, example, tmp_path / "ts" / "model.pt")
    assert report["max_abs_diff"] == 0.0
    loaded = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    other = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), compressed(other), rtol=1e-6, atol=1e-6)
