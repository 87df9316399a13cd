"""Tests for tensorslim.models: the zoo, the registry and external builders."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models import LeNet5, create_model, list_models, register_model
from tensorslim.models import registry as registry_mod

ZOO = list_models()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_contents() -> None:
    expected = {"lenet5", "small_cnn", "resnet20", "resnet32", "resnet44", "resnet56"}
    assert expected <= set(ZOO)
    assert sorted(ZOO) == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_forward_default_28x28(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_forward_rgb_32x32_custom_classes(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ZOO)
def test_deterministic_given_seed(name: str) -> None:
    torch.manual_seed(123)
    a = create_model(name).state_dict()
    torch.manual_seed(123)
    b = create_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = create_model(name).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_resnet_param_counts() -> None:
    counts = {d: n_params(create_model(f"resnet{d}")) for d in (20, 32, 44, 56)}
    assert 0.26e6 < counts[20] < 0.28e6
    assert 0.84e6 < counts[56] < 0.87e6
    assert counts[20] < counts[32] < counts[44] < counts[56]


def test_resnet_structure() -> None:
    model = create_model("resnet20")
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    short = model.layer2[0].shortcut
    assert isinstance(short, nn.Sequential)
    assert isinstance(short[0], nn.Conv2d) and short[0].kernel_size == (1, 1)
    assert short[0].stride == (2, 2) and isinstance(short[1], nn.BatchNorm2d)
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    # odd sizes and the minimum size still work
    model.eval()
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    assert model(torch.randn(1, 1, 29, 31)).shape == (1, 10)


def test_lenet5_layout_and_replaceable_layers() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5")
    assert isinstance(model, LeNet5)
    for attr in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert hasattr(model, attr)
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 6)
    assert model.conv1.kernel_size == (5, 5) and model.conv1.padding == (2, 2)
    assert (model.conv2.in_channels, model.conv2.out_channels) == (6, 16)
    assert (model.fc1.in_features, model.fc1.out_features) == (400, 120)
    assert (model.fc2.in_features, model.fc2.out_features) == (120, 84)
    assert (model.fc3.in_features, model.fc3.out_features) == (84, 10)
    assert n_params(model) == 61706
    x = torch.randn(3, 1, 28, 28)
    # replacing a layer by name is what compression does: the forward must use the attribute
    ref = model(x)
    model.fc2 = nn.Sequential(nn.Linear(120, 5), nn.Linear(5, 84))
    assert model(x).shape == (3, 10) and not torch.allclose(model(x), ref)


def test_small_cnn_layout_and_width() -> None:
    model = create_model("small_cnn")
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Sequential)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 5
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(1152, 256), (256, 10)]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    half = create_model("small_cnn", width=0.5)
    assert [c.out_channels for c in half.features if isinstance(c, nn.Conv2d)][-1] == 64
    assert n_params(half) < n_params(model) / 3
    assert half(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(TensorslimError, match="width"):
        create_model("small_cnn", width=0)


def test_unknown_model_suggests_closest() -> None:
    with pytest.raises(TensorslimError) as err:
        create_model("resnet-20")
    msg = str(err.value)
    assert "'resnet-20'" in msg and "did you mean 'resnet20'" in msg
    for name in ZOO:
        assert name in msg
    assert "\n" not in msg
    with pytest.raises(TensorslimError, match="did you mean 'small_cnn'"):
        create_model("smallcnn")


def test_bad_kwarg_is_user_error() -> None:
    with pytest.raises(TensorslimError, match="does not accept widht"):
        create_model("lenet5", widht=2)


def test_register_model_both_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))

    @register_model
    def tiny_test_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    @register_model("tiny-named")
    def _builder(in_channels: int = 1, num_classes: int = 10, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, hidden))

    assert {"tiny_test_net", "tiny-named"} <= set(list_models())
    assert create_model("tiny-named", in_channels=2, hidden=3)(torch.randn(1, 2, 2, 2)).shape == (
        1,
        3,
    )
    with pytest.raises(TensorslimError, match="already registered"):

        @register_model("tiny-named")
        def _other(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
            return nn.Identity()

    with pytest.raises(TensorslimError, match="invalid"):
        register_model("a:b")(tiny_test_net)


def _write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


def test_user_builder_gets_accepted_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "ts_user_models_ok",
        """
        from torch import nn

        def build(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))

        def build_any(**kwargs):
            return nn.Linear(kwargs["in_channels"], kwargs["num_classes"])

        def not_a_model(num_classes=10):
            return "oops"

        def boom():
            raise RuntimeError("builder exploded")
        """,
    )
    monkeypatch.chdir(tmp_path)
    model = create_model("ts_user_models_ok:build", in_channels=1, num_classes=4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    lin = create_model("ts_user_models_ok:build_any", in_channels=5, num_classes=2)
    assert (lin.in_features, lin.out_features) == (5, 2)
    via_path = create_model("./ts_user_models_ok.py:build", num_classes=3)
    assert via_path(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(TensorslimError, match=r"not a torch\.nn\.Module"):
        create_model("ts_user_models_ok:not_a_model")
    with pytest.raises(TensorslimError, match="builder exploded"):
        create_model("ts_user_models_ok:boom")
    with pytest.raises(TensorslimError, match="has no function 'nope'"):
        create_model("ts_user_models_ok:nope")
    with pytest.raises(TensorslimError) as err:
        create_model("ts_no_such_models_mod:build")
    assert "ts_no_such_models_mod" in str(err.value) and "build" in str(err.value)


def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(TensorslimError) as err:
        create_model("torchvision:resnet18")
    assert "pip install tensorslim[vision]" in str(err.value)


def test_torchvision_builder_with_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    class FakeNet(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False))
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.stem(x))

    def get_model(name: str, **kwargs: object) -> nn.Module:
        calls.append((name, kwargs))
        if name != "fakenet":
            raise ValueError(f"Unknown model {name}")
        return FakeNet(int(kwargs["num_classes"]))  # type: ignore[call-overload]

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model = create_model("torchvision:fakenet", in_channels=1, num_classes=5)
    assert calls[-1] == ("fakenet", {"weights": None, "num_classes": 5})
    conv = model.stem[0]
    assert conv.in_channels == 1 and conv.stride == (2, 2) and conv.bias is None
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    rgb = create_model("torchvision:fakenet", in_channels=3, num_classes=5)
    assert rgb.stem[0].in_channels == 3
    with pytest.raises(TensorslimError, match="Unknown model"):
        create_model("torchvision:nosuchnet")


def test_torchvision_layouts_have_torchvisions_parameter_counts() -> None:
    # torchvision.models.resnet18 / resnet50 / mobilenet_v2 (weights=None), 3 channels, 1000 classes
    counts = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}
    for name, count in counts.items():
        assert n_params(create_model(name, in_channels=3, num_classes=1000)) == count, name
    convs = [m for m in create_model("mobilenet_v2").modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
