"""The method registry, and a method defined outside the package going through every stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import tensorslim as ts
import tensorslim.methods.registry as registry
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.methods import Method, Option, get_method, list_methods, method_class
from tensorslim.methods.svd import SVDMethod
from tensorslim.plan import plans_of


@pytest.fixture
def isolated_registry(monkeypatch):
    """Methods defined by a test register into a copy that disappears afterwards."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry._METHODS


def test_builtin_methods_are_listed_and_found_by_any_spelling() -> None:
    names = list_methods()
    assert "svd" in names and names == sorted(names)
    assert method_class("svd") is SVDMethod
    assert method_class(" SVD ") is SVDMethod
    for name in names:
        assert method_class(name).name == name
        assert method_class(name.replace("_", "-")) is method_class(name)
        assert method_class(name.replace("-", "_")) is method_class(name)


def test_unknown_method_suggests_the_closest_name() -> None:
    with pytest.raises(TensorslimError, match=r"unknown method 'svdd' — did you mean 'svd'\?"):
        method_class("svdd")
    with pytest.raises(TensorslimError, match=r"unknown method 'zzz' \(known: .*svd"):
        get_method("zzz")


def test_bad_settings_name_the_method() -> None:
    with pytest.raises(
        TensorslimError, match=r"bad settings for method 'svd': no setting 'rnak'.*'rank'.*ratio"
    ):
        get_method("svd", rnak=3)


@dataclass
class HalfRank(Method):
    """Linear layers only, at half their full rank (a method no file of the package knows)."""

    name: ClassVar[str] = "test-halfrank"
    description: ClassVar[str] = "test"
    factor: float = 0.5

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        return None if isinstance(module, nn.Linear) else "only Linear layers"

    def candidates(self, module: nn.Module, info) -> list[Option]:
        rank = max(1, int(self.factor * min(module.in_features, module.out_features)))
        params = rank * (module.in_features + module.out_features) + module.out_features
        flops = 2 * rank * (module.in_features + module.out_features)
        return [Option(self.name, {"rank": rank}, params, flops, 0.5, f"half: {rank}")]

    def build(self, module: nn.Module, config: dict[str, Any], info, *, init: bool = True):
        if init:
            return LowRankLinear.from_dense(module, config["rank"])
        return LowRankLinear(module.in_features, module.out_features, config["rank"])


def test_a_subclass_registers_itself(isolated_registry) -> None:
    isolated_registry.pop(HalfRank.name, None)

    @dataclass
    class Fresh(HalfRank):
        name: ClassVar[str] = "test-fresh"

    assert method_class("test-fresh") is Fresh
    assert get_method("test-fresh", factor=0.25).settings() == {"factor": 0.25}

    class Abstract(Method):
        """No name and abstract methods missing: not registered."""

    assert "" not in isolated_registry and Abstract not in isolated_registry.values()
    with pytest.raises(RuntimeError, match="registered twice"):

        @dataclass
        class Clash(HalfRank):
            name: ClassVar[str] = "svd"


def test_a_new_method_works_through_plan_apply_save_and_load(isolated_registry, tmp_path) -> None:
    isolated_registry[HalfRank.name] = HalfRank
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    plan = ts.plan(model, "test-halfrank", None, x, factor=0.5)
    assert [(lp.fqn, lp.config) for lp in plan.compressed_layers] == [
        ("0", {"rank": 4}),
        ("2", {"rank": 2}),
    ]
    assert plan.settings == {"factor": 0.5}
    small = ts.apply(model, plan)
    assert isinstance(small[0], LowRankLinear)
    ts.save(small, tmp_path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    again = ts.load(tmp_path, fresh)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
    # the saved plan still says which method made the layers
    assert [lp.method for lp in plans_of(again)[0].compressed_layers] == ["test-halfrank"] * 2
