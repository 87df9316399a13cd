"""The registered ``svd_train`` method: plan, apply, hooks, finalize, save/load, compress."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankConv2d
from tensorslim.layers.svd import SVDConv2d, SVDLinear, svd_layers
from tensorslim.methods import get_method, list_methods, method_class
from tensorslim.train.loop import fit
from tensorslim.train.svd_regularizers import SVDRegularizerHook


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.grouped(torch.relu(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def loaders(n: int = 64) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 10, 10, generator=g)
    y = (x[:, 0, :5].mean(dim=(1, 2)) > 0).long() * 2 + (x[:, 0, :, :5].mean(dim=(1, 2)) > 0).long()
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=32, shuffle=True, generator=g), DataLoader(data, 64)


X = torch.randn(1, 1, 10, 10)


def test_registered_as_a_training_method() -> None:
    assert "svd_train" in list_methods()
    cls = method_class("svd-train")
    assert cls.kind == "training"
    assert cls.demo_settings is not None
    method = get_method("svd_train", scheme="spatial", reg="l1", lambda_s=0.1, energy=0.05)
    assert method.settings()["scheme"] == "spatial"
    for bad, message in [
        ({"scheme": "cp"}, "unknown SVD scheme"),
        ({"reg": "l2"}, "unknown sparsity"),
        ({"lambda_s": -1.0}, "lambda_s"),
        ({"lambda_o": -1.0}, "lambda_o"),
        ({"energy": 1.0}, "outside \\[0, 1\\)"),
    ]:
        with pytest.raises(TensorslimError, match=message):
            get_method("svd_train", **bad)


def test_plan_offers_the_full_rank_form_and_apply_is_exact() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    the_plan = ts.plan(model, "svd_train", example_input=X, scheme="spatial", linear=True)
    by_fqn = {lp.fqn: lp for lp in the_plan.layers}
    assert by_fqn["grouped"].method is None and "grouped" in by_fqn["grouped"].reason
    assert by_fqn["conv2"].config == {"rank": 24, "scheme": "spatial"}  # min(16·3, 8·3)
    assert by_fqn["conv1"].config == {"rank": 3, "scheme": "spatial"}  # min(8·3, 1·3)
    assert by_fqn["fc"].config == {"rank": 4, "scheme": "channel"}
    small = ts.apply(model, the_plan)
    assert isinstance(small.conv2, SVDConv2d) and isinstance(small.fc, SVDLinear)
    # by default, as in the paper, only convolutions are trained in SVD form
    default = ts.plan(model, "svd_train", example_input=X)
    fc = next(lp for lp in default.layers if lp.fqn == "fc")
    assert fc.method is None and "linear=True" in fc.reason
    x = torch.randn(4, 1, 10, 10)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    # the option's stated cost is the measured cost of the built layer
    for lp in the_plan.compressed_layers:
        layer = small.get_submodule(lp.fqn)
        assert lp.flops_after == layer.analytic_flops(tuple(lp.input_shape))
        assert lp.params_after == layer.analytic_params()
    assert count_flops(small, X) == the_plan.estimated_flops


def test_hooks_need_a_budget_or_an_energy() -> None:
    model = Net()
    the_plan = ts.plan(model, "svd_train", example_input=X)
    with pytest.raises(TensorslimError, match="needs a budget"):
        get_method("svd_train").train_hooks(model, the_plan)
    hooks = get_method("svd_train", energy=0.1, lambda_s=0.2).train_hooks(model, the_plan)
    assert len(hooks) == 1 and isinstance(hooks[0], SVDRegularizerHook)
    assert hooks[0].lambda_s == 0.2


def test_finalize_meets_the_budget_and_saves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    budget = ts.Budget(flops=0.5)
    the_plan = ts.plan(model, "svd_train", budget, example_input=X, lambda_s=0.05)
    small = ts.apply(model, the_plan)
    method = the_plan.method_for(the_plan.compressed_layers[0])
    train, _ = loaders()
    fit(small, train, epochs=1, hooks=method.train_hooks(small, the_plan), progress=False)
    small = method.finalize(small, the_plan)
    assert not svd_layers(small)
    assert count_flops(small, X) <= 0.5 * the_plan.model_flops
    summary = method.summary(small)
    assert {row["layer"] for row in summary["layers"]} == {"conv1", "conv2"}
    assert type(small.fc) is nn.Linear
    ts.save(small, tmp_path / "m")
    again = ts.load(tmp_path / "m", base_model=Net())
    x = torch.randn(2, 1, 10, 10)
    small.eval()
    again.eval()
    torch.testing.assert_close(again(x), small(x))


def test_from_scratch_build_ignores_the_trained_weights() -> None:
    torch.manual_seed(0)
    model = Net()
    the_plan = ts.plan(model, "svd_train", example_input=X, from_scratch=True, energy=0.1)
    small = ts.apply(model, the_plan)
    w = small.conv2.dense_weight().detach()
    assert not torch.allclose(w, model.conv2.weight.detach(), atol=1e-3)
    eye = torch.eye(small.conv2.rank)
    torch.testing.assert_close(small.conv2.U.T @ small.conv2.U, eye, atol=1e-4, rtol=0)


def test_through_the_compress_pipeline() -> None:
    from tensorslim.pipeline import compress_model

    torch.manual_seed(0)
    model = Net()
    train, test = loaders()
    small, results = compress_model(
        model,
        method="svd_train",
        budget=ts.Budget(flops=0.6),
        settings={"lambda_s": 0.05},
        train_loader=train,
        test_loader=test,
        example_batch=torch.randn(8, 1, 10, 10),
        finetune_epochs=1,
        progress=False,
        latency=False,
    )
    assert results["compressed"]["flops"] <= 0.6 * results["original"]["flops"]
    assert results["method_summary"]["layers"]
    assert any(isinstance(m, LowRankConv2d) for m in small.modules())
    methods = {row["method"] for row in results["layers"]}
    assert "svd_train" not in methods  # the plan was refreshed to the final structure


def test_budget_gate_reads_the_plans_budget() -> None:
    """With budget_gate_energy the hook asks whether pruning that energy meets the budget."""
    torch.manual_seed(0)
    model = Net()
    for metric in ("flops", "params"):
        for fraction, expected in ((1.0, True), (0.05, False)):
            the_plan = ts.plan(
                model,
                "svd_train",
                ts.Budget(**{metric: fraction}),
                example_input=X,
                budget_gate_energy=0.0,
            )
            small = ts.apply(model, the_plan)
            method = the_plan.method_for(the_plan.compressed_layers[0])
            (hook,) = method.train_hooks(small, the_plan)
            assert hook.sparsity_gate is not None
            # full rank, nothing pruned: the dense model itself (merged back) meets fraction 1
            assert hook.sparsity_gate() is expected, (metric, fraction)
    plain = ts.plan(model, "svd_train", ts.Budget(flops=0.5), example_input=X)
    method = plain.method_for(plain.compressed_layers[0])
    assert method.train_hooks(ts.apply(model, plain), plain)[0].sparsity_gate is None
    with pytest.raises(TensorslimError, match="outside \\[0, 1\\)"):
        get_method("svd_train", budget_gate_energy=1.5)
