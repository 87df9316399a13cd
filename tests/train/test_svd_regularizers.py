"""Orthogonality and sparsity regularizers, the hook, NaN handling and DDP."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorslim.errors import TensorslimError
from tensorslim.layers.svd import SVDConv2d, SVDLinear
from tensorslim.rank.energy_prune import energy_keep_count
from tensorslim.train.checkpoint import load_checkpoint
from tensorslim.train.loop import NonFiniteLossError, fit
from tensorslim.train.svd_regularizers import (
    NonFiniteSingularValuesError,
    SVDRegularizerHook,
    hoyer_sparsity,
    hoyer_square_sparsity,
    l1_sparsity,
    orthogonality_loss,
    sparsity_function,
    svd_regularization,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: several threads only add OpenMP contention (badly so on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinySVDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SVDConv2d(1, 4, 3, "channel", padding=1)
        self.fc = SVDLinear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc(h)


def tiny_loader(seed: int, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def test_orthogonality_loss_values() -> None:
    q, _ = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))
    assert float(orthogonality_loss(q, torch.eye(5, 3, dtype=torch.float64))) < 1e-24
    u = 2 * torch.eye(2, dtype=torch.float64)  # UᵀU − I = 3I → ‖·‖² = 18
    v = torch.eye(3, 2, dtype=torch.float64)  # orthonormal columns → 0
    assert float(orthogonality_loss(u, v)) == pytest.approx(18 / 4)
    with pytest.raises(TensorslimError, match="needs U"):
        orthogonality_loss(torch.zeros(3, 2), torch.zeros(3, 3))


def test_sparsity_values_and_scale_invariance() -> None:
    s = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)
    assert float(l1_sparsity(s)) == pytest.approx(7.0)
    assert float(hoyer_sparsity(s)) == pytest.approx(7 / 5 - 1)  # official: ‖s‖₁/‖s‖₂ − 1
    assert float(hoyer_square_sparsity(s)) == pytest.approx(49 / 25)
    assert float(hoyer_sparsity(10 * s)) == pytest.approx(7 / 5 - 1)
    assert float(hoyer_square_sparsity(10 * s)) == pytest.approx(49 / 25)
    assert float(l1_sparsity(10 * s)) == pytest.approx(70.0)
    zero = torch.zeros(4, requires_grad=True)
    assert torch.isfinite(hoyer_sparsity(zero)) and torch.isfinite(hoyer_square_sparsity(zero))
    assert sparsity_function("Hoyer-Square") is hoyer_square_sparsity
    with pytest.raises(TensorslimError, match="unknown sparsity regularizer"):
        sparsity_function("l0")


def test_hoyer_is_the_official_value_with_the_ratio_gradient() -> None:
    s = torch.tensor([3.0, -1.0, 0.5, 0.0], requires_grad=True)
    hoyer_sparsity(s).backward()
    ratio = s.detach().clone().requires_grad_(True)
    (ratio.abs().sum() / ratio.pow(2).sum().sqrt()).backward()
    torch.testing.assert_close(s.grad, ratio.grad)
    assert float(hoyer_sparsity(torch.tensor([2.0, 0.0, 0.0]))) == pytest.approx(0.0)


def test_hoyer_gradient_shrinks_small_values_relative_to_large() -> None:
    s = torch.tensor([5.0, 1.0, 0.5], requires_grad=True)
    hoyer_sparsity(s).backward()
    # descending the gradient raises the largest value's share of the energy
    new = (s - 0.1 * s.grad).detach()
    assert new[0] ** 2 / new.pow(2).sum() > s[0].detach() ** 2 / s.detach().pow(2).sum()
    assert s.grad[0] < 0 < s.grad[2]


def test_model_regularization_sums_layers_and_looks_through_wrappers() -> None:
    torch.manual_seed(0)
    model = TinySVDNet()
    with torch.no_grad():
        model.fc.U.mul_(1.5)  # make the orthogonality term nonzero
    total, parts = svd_regularization(model, 0.5, 0.25, "l1")
    with torch.no_grad():
        expected_o = sum(orthogonality_loss(m.U, m.V) for m in (model.conv, model.fc))
        expected_s = sum(m.s.abs().sum() for m in (model.conv, model.fc))
    assert float(parts["orthogonality"]) == pytest.approx(float(expected_o))
    assert float(parts["sparsity"]) == pytest.approx(float(expected_s))
    assert float(total.detach()) == pytest.approx(float(0.5 * expected_o + 0.25 * expected_s))
    wrapped = nn.DataParallel(model)  # has .module, like DistributedDataParallel
    assert float(svd_regularization(wrapped, 0.5, 0.25, "l1")[0].detach()) == pytest.approx(
        float(total.detach())
    )
    # pruned singular values are outside both terms
    model.fc.keep_top(1)
    _, parts = svd_regularization(model, 1.0, 1.0, "l1")
    u, _, v = model.fc.active_factors()
    expected = orthogonality_loss(model.conv.U, model.conv.V) + orthogonality_loss(u, v)
    assert float(parts["orthogonality"]) == pytest.approx(float(expected.detach()))


def test_bad_weights_and_models() -> None:
    model = TinySVDNet()
    with pytest.raises(TensorslimError, match="lambda_s must be ≥ 0"):
        SVDRegularizerHook(1.0, -0.1)
    with pytest.raises(TensorslimError, match="lambda_o must be ≥ 0"):
        svd_regularization(model, -1.0, 0.0)
    with pytest.raises(TensorslimError, match="finite"):
        SVDRegularizerHook(float("nan"), 0.0)
    with pytest.raises(TensorslimError, match="no SVD-form layers"):
        SVDRegularizerHook(1.0, 0.1).extra_loss(nn.Linear(2, 2), 0)


def test_hook_logs_both_terms_and_is_quiet_with_zero_weights() -> None:
    model = TinySVDNet()
    hook = SVDRegularizerHook(0.0, 0.0, "hoyer")
    assert hook.extra_loss(model, 0) is None
    record = hook.on_epoch_end(model, 0)
    assert set(record) == {"reg_orthogonality", "reg_hoyer"}
    assert record["reg_hoyer"] >= 0.0


def test_sparsity_training_lowers_the_energy_rank() -> None:
    """Fitting a full-rank target with a strong Hoyer term concentrates the spectrum."""

    def train(lambda_s: float) -> int:
        torch.manual_seed(0)
        layer = SVDLinear(16, 16)
        target = nn.Linear(16, 16)
        x = torch.randn(256, 16)
        y = target(x).detach()
        hook = SVDRegularizerHook(1.0, lambda_s, "hoyer")
        opt = torch.optim.Adam(layer.parameters(), lr=0.01)
        for step in range(300):
            loss = nn.functional.mse_loss(layer(x), y)
            extra = hook.extra_loss(layer, step)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
        return energy_keep_count(layer.s.detach(), 0.05)

    assert train(lambda_s=0.3) < train(lambda_s=0.0) - 3


def test_nan_in_s_stops_naming_the_layer_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinySVDNet()
    loader = tiny_loader(0)
    hooks = [SVDRegularizerHook(1.0, 0.01, "hoyer")]
    fit(model, loader, epochs=1, hooks=hooks, checkpoint_dir=tmp_path, progress=False)
    good = load_checkpoint(tmp_path / "last.pt")
    with torch.no_grad():
        model.fc.s[0] = float("nan")
    hooks[0].where = " (last good checkpoint kept)"
    with pytest.raises(NonFiniteSingularValuesError, match="layer 'fc': s contains NaN") as info:
        fit(model, loader, epochs=3, hooks=hooks, checkpoint_dir=tmp_path, progress=False)
    assert "last good checkpoint kept" in str(info.value)
    assert isinstance(info.value, NonFiniteLossError)
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    torch.testing.assert_close(kept["model"]["fc.s"], good["model"]["fc.s"])
    assert torch.isfinite(kept["model"]["fc.s"]).all()


# ----- DistributedDataParallel ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234 + rank)  # different init per rank: DDP must broadcast rank 0's
        model = TinySVDNet()
        model.fc.keep_top(2)  # the bool buffer travels with the broadcast too
        hook = SVDRegularizerHook(1.0, 0.05, "hoyer")
        # each rank sees different data: only gradient averaging keeps the weights equal
        fit(model, tiny_loader(seed=rank), epochs=2, hooks=[hook], lr=0.05, progress=False)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out % rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_end_identical(tmp_path: Path) -> None:
    out = str(tmp_path / "rank%d.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    states = [torch.load(out % r, weights_only=True) for r in range(2)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=1e-6, msg=key)
    torch.manual_seed(1234)
    initial = TinySVDNet().state_dict()
    assert not torch.allclose(states[0]["fc.s"], initial["fc.s"])  # it did train


def test_gate_leaves_the_sparsity_term_out_while_it_says_enough() -> None:
    torch.manual_seed(0)
    model = TinySVDNet()
    answers = iter([True, True, False, False])
    asked = []

    def gate() -> bool:
        asked.append(True)
        return next(answers)

    hook = SVDRegularizerHook(1.0, 0.5, "hoyer", sparsity_gate=gate, gate_every=2)
    ortho_only, _ = svd_regularization(model, 1.0, 0.0, "hoyer")
    both, _ = svd_regularization(model, 1.0, 0.5, "hoyer")
    assert not torch.isclose(ortho_only, both)
    # asked at steps 0, 2, 4; the answer holds for the steps in between
    expected = [ortho_only, ortho_only, ortho_only, ortho_only, both, both]
    for step, value in enumerate(expected):
        assert torch.allclose(hook.extra_loss(model, step), value)
    assert len(asked) == 3  # steps 0, 2 and 4
    record = hook.on_epoch_end(model, 0)
    assert record["sparsity_on_share"] == pytest.approx(2 / 6)
    # the share is per epoch
    hook.extra_loss(model, 6)
    assert hook.on_epoch_end(model, 1)["sparsity_on_share"] == 1.0
    with pytest.raises(TensorslimError, match="gate_every"):
        SVDRegularizerHook(1.0, 0.5, sparsity_gate=gate, gate_every=0)
