"""Every structured layer a method builds exports to ONNX (checked in onnxruntime against
PyTorch) and TorchScript, and survives ts.save / ts.load bit-exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.export import export_onnx, export_torchscript
from tensorslim.layers.base import StructuredLayer
from tensorslim.methods.registry import method_class

# torch marks torch.jit.trace deprecated; the TorchScript format is still what users ask for
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Wrap(nn.Module):
    """One layer under test (named ``layer``), a plain model to plan, apply, save and load."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out  # recurrent layers: the sequence


def dense_cases() -> dict[str, tuple]:
    return {
        "linear": (lambda: nn.Linear(32, 24), (3, 32)),
        "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6)),
        "conv1x1": (lambda: nn.Conv2d(16, 12, 1), (2, 16, 5, 5)),
        "conv1d": (lambda: nn.Conv1d(8, 16, 3, padding=1), (2, 8, 10)),
        "lstm": (lambda: nn.LSTM(12, 16, batch_first=True), (2, 5, 12)),
        "gru": (lambda: nn.GRU(12, 16, batch_first=True), (2, 5, 12)),
    }


# data-aware methods build LowRankLinear from calibration statistics: covered by svd's layers
METHODS = ["svd", "svd_train", "cp", "tucker", "tt", "debut", "rpg"]
SETTINGS = {"svd_train": {"linear": True}, "svd": {"scheme": "best"}}


def compressed_cases() -> list:
    cases = []
    for method in METHODS:
        for kind in dense_cases():
            cases.append(pytest.param(method, kind, id=f"{method}-{kind}"))
    return cases


def compress_one(method: str, kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor] | None:
    """(dense model, model with the layer compressed by ``method``, example), None if the
    method does not take this kind of layer."""
    factory, shape = dense_cases()[kind]
    torch.manual_seed(0)
    model = Wrap(factory()).eval()
    x = torch.randn(shape)
    cls = method_class(method)
    budget = {cls.budget_metric: 0.6}
    plan = ts.plan(model, method, budget, x, **SETTINGS.get(method, {}))
    if not plan.compressed_layers:
        return None
    return model, ts.apply(model, plan).eval(), x


@pytest.mark.parametrize(("method", "kind"), compressed_cases())
def test_structured_layer_exports_and_round_trips(method: str, kind: str, tmp_path) -> None:
    found = compress_one(method, kind)
    if found is None:
        pytest.skip(f"{method} does not compress a {kind} layer (the plan says why)")
    _, small, x = found
    layer = small.layer
    assert isinstance(layer, StructuredLayer) or hasattr(layer, "parametrizations")
    ts.save(small, tmp_path / "saved")
    again = ts.load(tmp_path / "saved", Wrap(dense_cases()[kind][0]())).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    report = export_torchscript(small, x, tmp_path / "model.pt")
    assert report["max_abs_diff"] == 0.0
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    report = export_onnx(small, x, tmp_path / "model.onnx")  # raises if onnxruntime differs
    assert report["max_abs_diff"] < 1e-4


class KeywordModel(nn.Module):
    """A model called with keyword tensors (like a tokenizer's encoding), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.fc(self.embed(input_ids))) * scale[:, None, None]
        return {"logits": self.head(hidden), "hidden": hidden}


def test_keyword_inputs_and_several_outputs_export(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    torch.manual_seed(0)
    model = KeywordModel().eval()
    example = {"input_ids": torch.randint(0, 50, (3, 7)), "scale": torch.rand(3)}
    small = ts.apply(model, ts.plan(model, "svd", None, example, rank=4))
    report = export_onnx(small, example, tmp_path / "model.onnx")
    assert report["max_abs_diff"] < 1e-5
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "scale"]
    other = {"input_ids": torch.randint(0, 50, (5, 7)), "scale": torch.rand(5)}  # dynamic batch
    logits, hidden = session.run(None, {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        want = small(**other)
    torch.testing.assert_close(torch.from_numpy(logits), want["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(hidden), want["hidden"], rtol=1e-4, atol=1e-5)
    assert export_torchscript(small, example, tmp_path / "model.pt")["max_abs_diff"] == 0.0
    traced = torch.jit.load(str(tmp_path / "model.pt"))
    got = traced(other["input_ids"], other["scale"])
    torch.testing.assert_close(got[0], want["logits"])


def test_export_leaves_a_batchnorm_model_in_eval_mode(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    model[1].running_mean.normal_()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    export_onnx(model, {"input": x}, tmp_path / "model.onnx")
    export_torchscript(model, (x,), tmp_path / "model.pt")
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
