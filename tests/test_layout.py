"""Memory layouts: whole-model and per-chain, applied by ``apply``, saved, loaded, exported."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorslim as ts
from conftest import conv_outputs, tiny_resnet
from tensorslim.errors import TensorslimError
from tensorslim.layout import (
    applied_deployment,
    find_chains,
    layout_of,
    planned_layout,
    to_layout,
)

CL = torch.channels_last

MIXED = {"stem": "channels_last", "layer1": "nchw", "layer2": "channels_last"}


def test_chains_are_the_stem_and_stages_and_a_wrapper_is_descended() -> None:
    model = tiny_resnet()
    assert find_chains(model) == ["stem", "layer1", "layer2"]
    wrapped = nn.Sequential(nn.Sequential(model.stem, model.relu, model.layer1), nn.Flatten())
    assert find_chains(wrapped) == ["0.0", "0.2"]
    assert find_chains(nn.Conv2d(3, 3, 1)) == []


@pytest.mark.parametrize("layout", [{"": "channels_last"}, MIXED], ids=["whole", "per_chain"])
def test_a_layout_changes_strides_not_values(layout: dict[str, str]) -> None:
    model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    copied = to_layout(model, layout, inplace=False)
    assert all(p.is_contiguous() for p in model.parameters())  # the original untouched
    assert layout_of(model) is None and layout_of(model.layer1) is None
    placed = to_layout(copy.deepcopy(model), layout)
    for m in (copied, placed):
        with torch.no_grad():
            assert torch.allclose(m(x), want, atol=1e-5)
    outputs = conv_outputs(placed, x)
    for fqn, module in placed.named_modules():
        if isinstance(module, nn.Conv2d):
            fmt = layout.get("", layout.get(fqn.split(".")[0]))
            assert module.weight.is_contiguous(memory_format=CL) == (fmt == "channels_last")
            assert outputs[fqn] == (fmt == "channels_last"), fqn
    assert set(placed.state_dict()) == set(model.state_dict())


def test_a_bad_layout_is_one_clear_error() -> None:
    with pytest.raises(TensorslimError, match="use nchw, channels_last"):
        to_layout(tiny_resnet(), {"layer1": "nhwc"})
    with pytest.raises(TensorslimError, match="'layer9'"):
        to_layout(tiny_resnet(), {"layer9": "nchw"})


def latency_record(fmt: str, chains: dict[str, str] | None = None) -> dict:
    record: dict = {
        "deployment": {"batch": 2, "threads": 1, "memory_format": fmt, "backend": "eager"},
        "predicted_fraction": 0.8,
    }
    if chains is not None:
        record["memory_format"] = {"chosen": fmt, "chains": {"assignment": chains, "kept": True}}
    return record


def test_the_planned_layout_is_the_kept_chains_else_the_chosen_format() -> None:
    assert planned_layout(None) is None
    assert planned_layout(latency_record("channels_last")) == {"": "channels_last"}
    assert planned_layout(latency_record("nchw", MIXED)) == MIXED
    not_kept = latency_record("nchw", MIXED)
    not_kept["memory_format"]["chains"]["kept"] = False
    assert planned_layout(not_kept) == {"": "nchw"}
    ort = latency_record("nchw")
    ort["deployment"]["backend"] = "onnxruntime"
    assert planned_layout(ort) is None
    assert applied_deployment(latency_record("nchw", MIXED)).memory_format == "auto"
    assert applied_deployment(latency_record("channels_last")).memory_format == "channels_last"


def planned(fmt: str, chains: dict[str, str] | None = None) -> ts.CompressionPlan:
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    the_plan = ts.plan(model, "svd", "flops=0.6", x, allow_slower=True)
    the_plan.latency = latency_record(fmt, chains)
    # through JSON: the layout is part of the saved plan
    return ts.CompressionPlan.from_text(the_plan.to_json())


@pytest.mark.parametrize("chains", [None, MIXED], ids=["channels_last", "per_chain"])
def test_apply_save_load_and_onnx_keep_the_planned_layout(
    chains: dict[str, str] | None, tmp_path: Path
) -> None:
    from tensorslim.export import export_onnx

    model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    the_plan = planned("channels_last", chains)
    small = ts.apply(model, the_plan)
    reference = ts.apply(model, planned("nchw"))  # the same plan, NCHW
    layout = chains or {"": "channels_last"}
    with torch.no_grad():
        want = reference(x)
        assert torch.allclose(small(x), want, atol=1e-5)
    assert all(p.is_contiguous() for p in reference.parameters() if p.dim() == 4)
    in_cl = {f: v for f, v in conv_outputs(small, x).items()}
    for fqn, is_cl in in_cl.items():
        assert is_cl == (layout.get("", layout.get(fqn.split(".")[0])) == "channels_last")
    ts.save(small, tmp_path / "saved")  # safetensors: contiguous copies of the weights
    loaded = ts.load(tmp_path / "saved", tiny_resnet())
    with torch.no_grad():
        assert torch.allclose(loaded(x), want, atol=1e-5)
    assert conv_outputs(loaded, x) == in_cl
    report = export_onnx(small, x, tmp_path / "m.onnx")  # checked against PyTorch's outputs
    assert report["max_abs_diff"] < 1e-4


def test_export_merge_back_keeps_merged_weights_in_the_planned_layout(monkeypatch) -> None:
    import tensorslim.export as export

    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    small = ts.apply(model, planned("channels_last"))
    monkeypatch.setattr(export, "_time_pair", lambda *a: (2.0, 1.0))  # every dense form faster
    decisions = export.merge_slow_layers(small, x)
    assert decisions and all(d["merged"] for d in decisions)
    assert all(p.is_contiguous(memory_format=CL) for p in small.parameters() if p.dim() == 4)


def test_a_later_layout_replaces_an_earlier_one() -> None:
    model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    placed = to_layout(copy.deepcopy(model), MIXED)
    assert [layout_of(placed.get_submodule(c)) for c in MIXED] == list(MIXED.values())
    to_layout(placed, {"": "nchw"})  # e.g. a second stage planned in NCHW
    assert all(layout_of(m) is None for m in placed.modules())
    assert not any(conv_outputs(placed, x).values())
    assert all(p.is_contiguous() for p in placed.parameters())


def test_the_latency_check_times_a_per_chain_model_as_applied(monkeypatch) -> None:
    import tensorslim.planner.memory_format as memory_format
    from tensorslim.pipeline import latency_check

    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    the_plan = planned("channels_last", MIXED)
    the_plan.latency["memory_format"]["dense"] = "nchw"
    small = ts.apply(model, the_plan)
    seen = {}
    real = memory_format.time_in_deployments

    def spy(models, *args, **kwargs):
        seen.update({name: d.memory_format for name, (_, d) in models.items()})
        return real(models, *args, **kwargs)

    monkeypatch.setattr(memory_format, "time_in_deployments", spy)
    check = latency_check(model, small, the_plan, x)
    assert seen == {"original": "nchw", "compressed": "auto"}  # "auto": tensors as they are
    assert check["compressed_memory_format"] == "per_chain"
