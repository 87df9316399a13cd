"""``preset="paper"`` of SVD training against the official code (yanghr/SVD_Prune_EDLCV,
CNN/cifar10/cifar10_resnet20.py), re-implemented here from its source: Adam without weight decay,
loss = CE + perp_weight·Σ L_o(N) + L_o(C) in the first run (``--reg_type None``), the learning
rate ×0.1 at epochs 81 and 122 of 164."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorslim.errors import TensorslimError
from tensorslim.layers.svd import svd_layers
from tensorslim.train.loop import lr_schedule
from tensorslim.train.svd_pipeline import SVDTrainConfig, svd_train_pipeline, to_svd_model

sys.path.insert(0, str(Path(__file__).parent))
from test_svd_pipeline import Net


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def official_orthogonality(mat: torch.Tensor) -> torch.Tensor:
    """Regularization.orthogonology_loss: ‖AAᵀ − I‖² (or AᵀA, the smaller) / its size²."""
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return (gram - torch.eye(gram.shape[0])).pow(2).sum() / (gram.shape[0] * gram.shape[1])


def official_lr(base: float, epoch: int, schedule=(81, 122), gamma: float = 0.1) -> float:
    """adjust_learning_rate applied at the start of every epoch up to ``epoch``."""
    lr = base
    for e in range(epoch + 1):
        if e in schedule:
            lr *= gamma
    return lr


def test_preset_resolves_to_the_official_training_and_explicit_values_win() -> None:
    paper = SVDTrainConfig(preset="paper", target_flops=0.5)
    assert (paper.optimizer, paper.lr, paper.finetune_lr) == ("adam", 1e-3, 1e-3)
    assert (paper.weight_decay, paper.schedule, paper.lambda_o) == (0.0, "step", 1.0)
    assert paper.bn_recalibration_batches == 0 and paper.budget_gate_energy is None
    assert paper.lambda_s == 0.01 and paper.reg == "hoyer"  # λs varies by network: the caller's
    mine = SVDTrainConfig(preset="paper", target_flops=0.5, lr=0.01, weight_decay=1e-4)
    assert (mine.lr, mine.weight_decay, mine.optimizer) == (0.01, 1e-4, "adam")
    default = SVDTrainConfig(target_flops=0.5)
    assert (default.optimizer, default.lr, default.weight_decay) == ("sgd", 0.05, 5e-4)
    assert (default.schedule, default.preset, default.finetune_lr) == ("cosine", "default", None)
    with pytest.raises(TensorslimError, match=r"unknown preset 'papr'.*valid: default, paper"):
        SVDTrainConfig(preset="papr", target_flops=0.5)


def test_step_schedule_is_the_official_one_over_164_epochs() -> None:
    steps = 3
    factor = lr_schedule("step", 0, 164 * steps)
    for epoch in range(164):
        for k in range(steps):
            ours = 1e-3 * factor(epoch * steps + k)
            assert ours == pytest.approx(official_lr(1e-3, epoch), rel=1e-12), (epoch, k)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 1, 10, 10, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)  # fixed order: 3 steps per epoch


def test_orthogonal_stage_trains_as_the_official_first_run() -> None:
    """One epoch of the preset's first stage equals Adam on CE + Σ L_o(N) + L_o(C), written out
    as the official training loop (no sparsity term, no weight decay, step schedule)."""
    torch.manual_seed(0)
    dense = Net()
    x = torch.zeros(1, 1, 10, 10)
    expected = to_svd_model(copy.deepcopy(dense), x)
    params = [p for p in expected.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    expected.train()
    for k, (inputs, targets) in enumerate(_loader()):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.1 ** sum(k / 3 >= m for m in (81 / 164, 122 / 164))
        loss = nn.functional.cross_entropy(expected(inputs), targets)
        for _, layer in svd_layers(expected):
            n, c = layer.U, layer.V.T  # the official N (out × r) and C (r × in)
            loss = loss + 1.0 * (official_orthogonality(n) + official_orthogonality(c))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # energy 0 keeps every singular value; full rank never pays, so each layer merges to dense
    model, report = svd_train_pipeline(
        copy.deepcopy(dense), _loader(), None, preset="paper", lambda_s=1e3, energy=0.0,
        epochs_orthogonal=1, epochs_train=0, epochs_finetune=0, example_input=x, progress=False,
    )  # fmt: skip
    assert len(report["history"]["orthogonal"]) == 1 and report["history"]["svd_train"] == []
    assert report["preset"] == "paper" and report["training"]["optimizer"] == "adam"
    named = dict(model.named_modules())
    for fqn, layer in svd_layers(expected):
        torch.testing.assert_close(
            named[fqn].weight, layer.dense_weight().detach(), rtol=1e-5, atol=1e-6
        )
    for key, value in expected.state_dict().items():  # BatchNorm statistics and the classifier
        if key in model.state_dict():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_orthogonal_stage_resumes_and_is_seeded(tmp_path: Path) -> None:
    settings = {"preset": "paper", "target_flops": 0.6, "epochs_orthogonal": 1, "epochs_train": 1}
    torch.manual_seed(0)
    base = Net()
    first, report = svd_train_pipeline(
        copy.deepcopy(base), _loader(), None, checkpoint_dir=tmp_path, seed=4, progress=False,
        example_input=torch.zeros(1, 1, 10, 10), **settings,
    )  # fmt: skip
    assert (tmp_path / "orthogonal" / "last.pt").is_file()
    assert list(report["seeds"]) == ["decompose", "orthogonal", "svd_train", "prune", "finetune"]
    (tmp_path / "finetune" / "last.pt").unlink()
    (tmp_path / "svd_train" / "last.pt").unlink()  # killed right after the first stage
    torch.rand(100)
    again, _ = svd_train_pipeline(
        copy.deepcopy(base), _loader(), None, checkpoint_dir=tmp_path, seed=4, progress=False,
        example_input=torch.zeros(1, 1, 10, 10), resume=True, **settings,
    )  # fmt: skip
    for (k1, v1), (k2, v2) in zip(
        first.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2), k1
