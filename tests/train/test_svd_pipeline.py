"""The three-stage SVD training pipeline: budgets, merging, save/load, resume, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.layers.svd import SVDConv2d, svd_layers
from tensorslim.train.checkpoint import load_checkpoint
from tensorslim.train.loop import NonFiniteLossError
from tensorslim.train.svd_pipeline import (
    finalize_svd_model,
    prune_svd_model,
    svd_train_pipeline,
    to_svd_model,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: several threads only add OpenMP contention (badly so on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    """conv 1→8 → conv 8→16 (stride 2) → 1×1 conv 16→16 → pool → linear 16→4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_data(n: int = 96, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = 0.3 * torch.randn(n, 1, 10, 10, generator=g)
    for k in range(4):  # a bright quadrant per class: learnable in a few steps
        rows, cols = divmod(k, 2)
        x[labels == k, :, rows * 5 : rows * 5 + 5, cols * 5 : cols * 5 + 5] += 1.0
    data = TensorDataset(x, labels)
    train = DataLoader(data, batch_size=32, shuffle=True, generator=g)
    test = DataLoader(data, batch_size=48)
    return train, test


def run(model: nn.Module, **kwargs):
    train, test = make_data()
    defaults = {
        "epochs_train": 1,
        "epochs_finetune": 1,
        "lr": 0.05,
        "lambda_s": 0.01,
        "progress": False,
    }
    return svd_train_pipeline(model, train, test, **{**defaults, **kwargs})


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_target_flops_lands_under_budget_and_counts_match(scheme: str) -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(1, 1, 10, 10)
    original_flops = count_flops(model, x)
    model, report = run(model, scheme=scheme, target_flops=0.5)
    assert not svd_layers(model)
    measured = count_flops(model, x)
    assert measured == report["final"]["flops"]
    assert measured <= 0.5 * original_flops
    assert report["flops_fraction"] == pytest.approx(measured / original_flops)
    assert report["flops_reduction"] == pytest.approx(original_flops / measured)
    named = dict(model.named_modules())
    for row in report["layers"]:
        module = named[row["layer"]]
        assert 1 <= row["rank_after"] <= row["rank_before"] == row["full_rank"]
        if row["form"] == "lowrank":
            assert isinstance(module, LowRankConv2d | LowRankLinear)
            assert module.rank == row["rank_after"]
        else:
            assert type(module) in (nn.Conv2d, nn.Linear)
    for key in ("original", "svd_full_rank", "pruned", "final"):
        assert 0.0 <= report[key]["accuracy"] <= 1.0
    assert len(report["history"]["svd_train"]) == 1
    assert "reg_orthogonality" in report["history"]["svd_train"][0]


def test_target_is_the_smallest_energy_that_fits() -> None:
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(1, 1, 10, 10)
    to_svd_model(model, x)
    reference = count_flops(Net(), x)
    trial = copy.deepcopy(model)
    report = prune_svd_model(trial, x, target=("flops", 0.6), reference=(reference, 1))
    assert report["flops_fraction"] <= 0.6
    # a slightly smaller threshold changes some rank and then misses the budget
    lower = copy.deepcopy(model)
    ranks = {r["layer"]: r["rank_after"] for r in report["layers"]}
    for eps in (1e-9, 1e-6, 1e-3):
        if report["energy"] - eps < 0:
            break
        other = prune_svd_model(
            copy.deepcopy(lower), x, energy=report["energy"] - eps, reference=(reference, 1)
        )
        if {r["layer"]: r["rank_after"] for r in other["layers"]} != ranks:
            assert other["flops_fraction"] > 0.6
            break


def test_merge_back_where_the_rank_does_not_pay() -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(1, 1, 10, 10)
    to_svd_model(model, x)
    report = finalize_svd_model(model, x, energy=0.0)  # nothing pruned: full rank never pays
    assert all(row["form"] == "dense" for row in report["layers"])
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    other = Net()
    to_svd_model(other, x, linear=True)
    report = finalize_svd_model(other, x, energy=0.0, merge_dense=False)
    assert all(row["form"] == "lowrank" for row in report["layers"])
    assert isinstance(other.conv1, LowRankConv2d) and isinstance(other.fc, LowRankLinear)
    assert report["flops_fraction"] > 1.0  # honest: full-rank factors cost more than dense


def test_energy_mode_keeps_merged_layers_exact() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 1, 10, 10)
    expected = model(x)
    to_svd_model(model, x[:1])
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    report = finalize_svd_model(model, x[:1], energy=0.0)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert report["energy"] == 0.0


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = run(Net(), target_flops=0.6, scheme="spatial")
    ts.save(model, tmp_path / "m")
    again = ts.load(tmp_path / "m", base_model=Net())
    x = torch.randn(3, 1, 10, 10)
    model.eval()
    again.eval()
    torch.testing.assert_close(again(x), model(x))


class CountingLoader:
    """Counts the epochs it is iterated for."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.epochs = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        return iter(self.loader)


def test_resume_continues_after_the_last_finished_stage(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Net()
    train, test = make_data()
    settings = {"target_flops": 0.6, "epochs_train": 2, "epochs_finetune": 1, "progress": False}
    first, report1 = svd_train_pipeline(
        copy.deepcopy(base), train, test, checkpoint_dir=tmp_path, **settings
    )
    assert (tmp_path / "svd_train" / "last.pt").is_file()
    assert (tmp_path / "finetune" / "last.pt").is_file()
    # a finished run resumes without a single training step and gives the same model
    counting = CountingLoader(train)
    second, report2 = svd_train_pipeline(
        copy.deepcopy(base), counting, test, checkpoint_dir=tmp_path, resume=True, **settings
    )
    assert counting.epochs == 0
    assert [r["rank_after"] for r in report2["layers"]] == [
        r["rank_after"] for r in report1["layers"]
    ]
    for (k1, v1), (k2, v2) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)
    assert report2["history"] == report1["history"]
    # killed during fine-tuning: stage 1 is restored, only the fine-tune epoch runs again
    (tmp_path / "finetune" / "last.pt").unlink()
    counting = CountingLoader(train)
    _, report3 = svd_train_pipeline(
        copy.deepcopy(base), counting, test, checkpoint_dir=tmp_path, resume=True, **settings
    )
    assert counting.epochs == 1
    assert report3["history"]["svd_train"] == report1["history"]["svd_train"]
    assert report3["layers"] == report1["layers"]


def test_from_scratch() -> None:
    torch.manual_seed(0)
    model = Net()
    dense_weight = model.conv2.weight.detach().clone()
    x = torch.randn(1, 1, 10, 10)
    to_svd_model(model, x, from_scratch=True)
    assert isinstance(model.conv2, SVDConv2d)
    assert not torch.allclose(model.conv2.dense_weight().detach(), dense_weight)
    _, report = run(Net(), from_scratch=True, energy=0.2)
    assert "accuracy" not in report["original"]
    assert report["from_scratch"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"energy": 1.0}, "outside \\[0, 1\\)"),
        ({"energy": -0.1}, "outside \\[0, 1\\)"),
        ({"energy": 0.1, "lambda_s": -1.0}, "lambda_s must be ≥ 0"),
        ({"energy": 0.1, "lambda_o": -0.5}, "lambda_o must be ≥ 0"),
        ({"energy": 0.1, "target_flops": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"target_flops": 0.0}, "target_flops"),
        ({"energy": 0.1, "reg": "l0"}, "unknown sparsity"),
        ({"energy": 0.1, "scheme": "tucker"}, "unknown SVD scheme"),
        ({"energy": 0.1, "epochs_train": -1}, "epochs_train"),
        ({"energy": 0.1, "budget_gate_energy": 0.01}, "needs target_flops"),
        ({"target_flops": 0.5, "budget_gate_energy": 1.0}, "outside \\[0, 1\\)"),
    ],
)
def test_bad_input_fails_before_any_work(kwargs: dict, message: str) -> None:
    model = Net()
    train, test = make_data()
    with pytest.raises(TensorslimError, match=message):
        svd_train_pipeline(model, train, test, progress=False, **kwargs)
    assert not svd_layers(model)  # untouched


class PoisonedLoader:
    """Finite batches in the first epoch, NaN inputs from the second on."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.epoch = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for inputs, targets in self.loader:
            yield (inputs if self.epoch == 1 else inputs * float("nan")), targets


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, _ = make_data()
    with pytest.raises(NonFiniteLossError, match="last good checkpoint kept") as info:
        svd_train_pipeline(
            Net(),
            PoisonedLoader(train),
            None,
            energy=0.1,
            epochs_train=3,
            epochs_finetune=1,
            checkpoint_dir=tmp_path,
            progress=False,
            example_input=torch.zeros(1, 1, 10, 10),
        )
    assert "epoch 2" in str(info.value)
    state = load_checkpoint(tmp_path / "svd_train" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_pipeline_with_bn_recalibration() -> None:
    torch.manual_seed(0)
    _, report = run(Net(), target_flops=0.5, bn_recalibration_batches=2, epochs_finetune=0)
    assert report["history"]["finetune"] == []
    assert report["pruned"]["flops"] == report["final"]["flops"]
    assert 0.0 <= report["final"]["accuracy"] <= 1.0


def test_exclude_keeps_layers_dense() -> None:
    torch.manual_seed(0)
    model, report = run(Net(), target_flops=0.6, exclude=["fc", "conv1"], linear=True)
    assert type(model.fc) is nn.Linear and type(model.conv1) is nn.Conv2d
    assert {row["layer"] for row in report["layers"]} == {"conv2", "conv3"}
    _, report = run(Net(), target_flops=0.6)  # convolutions only by default
    assert {row["layer"] for row in report["layers"]} == {"conv1", "conv2", "conv3"}
    with pytest.raises(TensorslimError, match="cannot exclude 'head'"):
        run(Net(), energy=0.1, exclude=["head"])


def test_budget_gate_matches_pruning_at_its_energy() -> None:
    """The gate's FLOPs fraction is the one prune_svd_model reaches at the same energy."""
    from tensorslim.train.svd_pipeline import BudgetGate

    torch.manual_seed(2)
    model = Net()
    x = torch.randn(1, 1, 10, 10)
    reference = count_flops(model, x)
    to_svd_model(model, x)
    with torch.no_grad():  # a concentrated spectrum in one layer, so the energy matters
        layer = dict(svd_layers(model))["conv2"]
        layer.s.mul_(torch.logspace(0, -4, layer.s.numel()))
    for energy in (0.0, 0.01, 0.3):
        gate = BudgetGate(model, x, "flops", 0.5, reference, energy=energy)
        pruned = prune_svd_model(copy.deepcopy(model), x, energy=energy, reference=(reference, 1))
        assert gate.fraction() == pytest.approx(pruned["flops_fraction"])
        assert gate() == (pruned["flops_fraction"] <= 0.5)
    assert BudgetGate(model, x, "flops", 1.0, reference, energy=0.0)()
    assert not BudgetGate(model, x, "flops", 0.01, reference, energy=0.0)()


def test_pipeline_with_budget_gate_logs_the_sparsity_share() -> None:
    torch.manual_seed(0)
    _, report = run(Net(), target_flops=0.5, lambda_s=0.5, budget_gate_energy=0.01)
    share = report["history"]["svd_train"][0]["sparsity_on_share"]
    assert 0.0 <= share <= 1.0
    assert report["budget_gate_energy"] == 0.01
    assert report["flops_fraction"] <= 0.5


def test_finetune_orthogonality_switch() -> None:
    """Without λo in stage 3, U and V drift further from orthonormal than with it."""
    drift = {}
    for keep in (True, False):
        torch.manual_seed(0)
        _, report = run(
            Net(), target_flops=0.5, lambda_o=5.0, epochs_finetune=3, finetune_orthogonality=keep
        )
        drift[keep] = report["history"]["finetune"][-1]["reg_orthogonality"]
    assert drift[True] < drift[False]
