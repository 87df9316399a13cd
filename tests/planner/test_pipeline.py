"""plan → apply → fit → evaluate → latency → FLOPs on models that do not take one tensor."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.latency import measure_latency
from tensorslim.errors import TensorslimError
from tensorslim.inputs import Inputs, output_tensor
from tensorslim.layers.lowrank import LowRankLinear


class TwoInputs(nn.Module):
    """forward(image_features, side_features) → logits: a positional-tuple model."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(24, 32), nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(side)))


class KeywordEncoder(nn.Module):
    """forward(input_ids=…, attention_mask=…) → logits: keyword tensors, masked mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 48)
        self.head = nn.Linear(48, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


@dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class DictToDataclass(KeywordEncoder):
    """Takes a tokenizer-style dict (via **batch) and returns a dataclass, as HF models do."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Out:  # type: ignore[override]
        logits = super().forward(input_ids, attention_mask)
        return Out(logits=logits, hidden=logits.detach())


def tuple_batches(n: int = 6, size: int = 8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x, side = torch.randn(size, 24, generator=g), torch.randn(size, 8, generator=g)
        out.append(((x, side), (x[:, :4] + side[:, :4]).argmax(1)))
    return out


def token_batches(n: int = 6, size: int = 8, as_dict_with_labels: bool = False):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (size, 7), generator=g)
        mask = torch.ones(size, 7, dtype=torch.long)
        mask[:, 5:] = 0
        labels = ids[:, 0] % 4
        inputs = {"input_ids": ids, "attention_mask": mask}
        out.append({**inputs, "labels": labels} if as_dict_with_labels else (inputs, labels))
    return out


def dict_loss(output: Out, batch: dict) -> torch.Tensor:
    return F.cross_entropy(output.logits, batch["labels"])


def dict_metric(output: Out, batch: dict) -> dict[str, float]:
    return {"accuracy": float((output.logits.argmax(1) == batch["labels"]).float().mean())}


def labelless(batch: dict) -> Inputs:
    return Inputs((), {k: v for k, v in batch.items() if k != "labels"})


CASES = {
    "tuple": (TwoInputs, tuple_batches, None, {}),
    "keywords": (KeywordEncoder, token_batches, None, {}),
    "dict-dataclass": (
        DictToDataclass,
        lambda: token_batches(as_dict_with_labels=True),
        lambda model, batch: model(**labelless(batch).kwargs),
        {"loss_fn": dict_loss, "metric_fn": dict_metric},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_stage_runs_on_structured_inputs(case: str) -> None:
    make, batches, forward_fn, fns = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    data = batches()
    example = data[0] if forward_fn else data[0][0]
    plan = ts.plan(model, "svd", "params=0.6", example, forward_fn=forward_fn)
    assert plan.compressed_layers, plan.layers
    assert plan.estimated_params <= 0.6 * plan.model_params + 1
    assert plan.input_spec is not None
    if case == "keywords":
        assert plan.layer("embed").reason.startswith("no method compresses Embedding")
    small = ts.apply(model, plan)
    assert any(isinstance(m, LowRankLinear) for m in small.modules())
    with torch.no_grad():
        out = small(**labelless(data[0]).kwargs) if forward_fn else _call(small, example)
    assert torch.isfinite(output_tensor(out)).all()
    history = ts.fit(small, data, epochs=2, lr=0.05, progress=False, forward_fn=forward_fn, **fns)
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"] * 1.5
    scores = ts.evaluate(small, data, forward_fn=forward_fn, **fns)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["loss"] > 0
    assert count_flops(small, example, forward_fn) < count_flops(model, example, forward_fn)
    latency = measure_latency(small, example, min_run_time=0.01, forward_fn=forward_fn)
    assert latency["median_ms"] > 0 and latency["batch"] == 8


def _call(model: nn.Module, example):
    return model(*example) if isinstance(example, tuple) else model(**example)


@pytest.mark.parametrize("case", ["tuple", "keywords"])
def test_calibration_measures_errors_in_output_space(case: str) -> None:
    make, batches, _, _ = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    data = batches()
    plan = ts.plan(model, "svd", "params=0.6", calibration=data, calibration_batches=4)
    assert plan.error_space == "output" and plan.calibration == {
        "batches": 4,
        "requested_batches": 4,
    }
    weight_plan = ts.plan(model, "svd", "params=0.6", data[0][0])
    assert weight_plan.error_space == "weight"
    # the recorded error of a compressed layer is its output error on the calibration inputs
    small = ts.apply(model, plan)
    lp = plan.compressed_layers[0]
    dense, approx = model.get_submodule(lp.fqn), small.get_submodule(lp.fqn)
    seen = []
    handle = dense.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for inputs, _ in data[:4]:
            _call(model, inputs)
    handle.remove()
    with torch.no_grad():
        num = sum(float((dense(x) - approx(x)).pow(2).sum()) for x in seen)
        den = sum(float(F.linear(x, dense.weight).pow(2).sum()) for x in seen)
    assert lp.error == pytest.approx((num / den) ** 0.5, rel=1e-5)


def test_planner_errors_name_the_thing_and_the_fix(tiny_cnn, tiny_input) -> None:
    with pytest.raises(
        TensorslimError, match=r"exclude: no layer named 'fc3'.*did you mean 'fc2', 'fc1'"
    ):
        ts.plan(tiny_cnn, "svd", "flops=0.5", tiny_input, exclude=["fc3"])
    with pytest.raises(TensorslimError, match=r"layers: no layer named 'conv9'"):
        ts.plan(tiny_cnn, "svd", "flops=0.5", tiny_input, layers=["conv9"])
    with pytest.raises(
        TensorslimError, match=r"no setting 'rnak'.*did you mean 'rank'.*scheme, rank"
    ):
        ts.plan(tiny_cnn, "svd", None, tiny_input, rnak=2)
    with torch.no_grad():
        tiny_cnn.fc1.weight[0, 0] = float("inf")
    with pytest.raises(TensorslimError, match=r"layer fc1: its weight holds 1 NaN/Inf"):
        ts.plan(tiny_cnn, "svd", "flops=0.5", tiny_input)
    # an excluded broken layer is not the plan's business
    plan = ts.plan(tiny_cnn, "svd", "flops=0.5", tiny_input, exclude=["fc1"])
    assert plan.layer("fc1").reason == "not selected"


def test_a_model_with_nothing_to_compress_warns_in_the_plan(tiny_input) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, groups=1), nn.Flatten(), nn.Linear(576, 2))
    plan = ts.plan(model, "svd", None, tiny_input, rank=2, exclude=["0", "2"])
    assert not plan.compressed_layers
    assert any("compresses no layer" in note for note in plan.notes)


def test_fit_stops_on_a_nan_loss_with_epoch_and_step() -> None:
    model = TwoInputs()
    data = tuple_batches()
    with pytest.raises(TensorslimError, match=r"loss became nan at epoch 1, step 0"):
        ts.fit(
            model,
            data,
            epochs=1,
            progress=False,
            loss_fn=lambda out, batch: out.sum() * float("nan"),
        )
