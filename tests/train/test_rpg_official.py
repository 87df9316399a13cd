"""RPG as the official code (huawei-noah/Efficient-Computing, Pruning/RPG) runs it.

Each test re-implements the official procedure here, from its description, and compares:
no optimizer step on a mask-update step, the rank loss over every convolution and no Linear,
the exponential density D^(j/U), and the ERK layer densities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorslim.layers.sparse import mask_of, original_weight
from tensorslim.methods import get_method
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import fit
from tensorslim.train.pruning import PruningHook, add_masks
from tensorslim.train.sparsity_distribution import erk_densities


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    add_masks(model)
    return model


def _data(n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class _Snapshots(TrainHook):
    """Every parameter and mask just before the optimizer step and after the hooks' step."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.before, self.after = model, {}, {}

    def _take(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        state.update({n: b.clone() for n, b in self.model.named_buffers() if "mask" in n})
        return state

    def after_backward(self, model, optimizer, step) -> None:
        self.before[step] = self._take()

    def after_step(self, model, optimizer, step) -> None:
        self.after[step] = self._take()


def test_parameters_do_not_move_on_a_mask_update_step_except_through_the_mask() -> None:
    model = _model()
    hook = PruningHook(0.8, end=0.8, interval=3, drop_fraction=0.3, rank_weight=1.0)
    snaps = _Snapshots(model)
    # the snapshot hook runs after the pruning hook's after_step
    fit(model, _data(), epochs=2, lr=0.1, hooks=[hook, snaps], progress=False)
    update_steps = [t for t in snaps.before if hook.skips_optimizer_step(t)]
    assert len(update_steps) >= 3 and 0 in update_steps
    originals = [f"{n}.parametrizations.weight.original" for n, _ in hook.layers]
    masks = [f"{n}.parametrizations.weight.0.mask" for n, _ in hook.layers]
    for t in update_steps:
        before, after = snaps.before[t], snaps.after[t]
        for name, value in before.items():
            if name not in originals and name not in masks:  # biases, BatchNorm, dense layers
                torch.testing.assert_close(after[name], value, rtol=0, atol=0)
        pruned = _official_magnitude_masks(
            [before[o] for o in originals], [before[m] for m in masks], hook.schedule.sparsity_at(t)
        )
        for o, m, kept in zip(originals, masks, pruned, strict=True):
            active = after[m] > 0
            # the magnitude ranking's survivors keep their value; positions grown back into an
            # inactive slot start at zero (RigL.py: new_connections are set to 0)
            expected = torch.where(kept, before[o], torch.zeros_like(before[o]))
            torch.testing.assert_close(after[o][active], expected[active], rtol=0, atol=0)
    # an ordinary step does move the weights (the test would notice a loop that never steps)
    plain = next(t for t in snaps.before if t not in update_steps)
    first = "0.parametrizations.weight.original"
    assert not torch.equal(snaps.before[plain][first], snaps.after[plain][first])


def _official_magnitude_masks(
    weights: list[torch.Tensor], masks: list[torch.Tensor], sparsity: float
) -> list[torch.Tensor]:
    """sorted_init_sparsify of RigL.py: one magnitude threshold over the masked weights."""
    scores = torch.cat([(w * m).abs().reshape(-1) for w, m in zip(weights, masks, strict=True)])
    drop = round(sparsity * scores.numel())
    threshold = scores.kthvalue(drop).values if drop > 0 else -1.0
    return [(w * m).abs() > threshold for w, m in zip(weights, masks, strict=True)]


def _official_rank_loss(weights: list[torch.Tensor], partial_k: float) -> torch.Tensor:
    """get_loss_para / get_sing_loss of rank_kit.py, re-stated: per conv, W̄ = W/‖W‖, SVD,
    k = r − 1 − argmin_j |Σ_{i≤j} σ²_(smallest first) − partial_k|, loss −‖W̄ − W̄_k‖², mean."""
    losses = []
    for w in weights:
        normed = w.reshape(w.shape[0], -1) / torch.norm(w)
        u, s, v = torch.svd(normed.detach())
        acc = (torch.cumsum(torch.flip(s**2, [0]), 0) - partial_k).abs()
        k = len(acc) - int(acc.argmin()) - 1
        approx = u[:, :k] @ torch.diag(s)[:k, :k] @ v.t()[:k, :]
        losses.append(-((normed - approx) ** 2).sum())
    return torch.stack(losses).mean()


def test_rank_loss_covers_every_conv_including_the_first_and_no_linear() -> None:
    model = _model()
    hook = PruningHook(0.8, end=0.8, interval=3, drop_fraction=0.3, rank_weight=2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.on_train_begin(model, opt, total_steps=20)
    assert "0" not in hook.layer_names  # the first conv is kept dense (not ranked) ...
    assert [n for n, _ in hook.rank_layers] == ["0", "3"]  # ... but in the rank loss
    convs = [model[0].weight, model[3].weight]
    expected = 2.0 * _official_rank_loss(convs, hook.partial_k)
    torch.testing.assert_close(hook.extra_loss(model, 0), expected, rtol=1e-5, atol=1e-6)
    pruned = PruningHook(0.8, rank_weight=1.0, rank_loss_layers="pruned")
    pruned.on_train_begin(model, opt, total_steps=20)
    assert [n for n, _ in pruned.rank_layers] == pruned.layer_names == ["3", "6", "8"]


def test_paper_preset_density_is_exponential_per_update_over_every_layer() -> None:
    method = get_method("rpg", preset="paper", sparsity=0.9)
    hook = method._hook(0.9)
    model = _model()
    hook.on_train_begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1001)
    schedule = hook.schedule
    assert (schedule.start, schedule.end, schedule.interval) == (0, 900, 100)
    assert hook.layer_names == ["0", "3", "6", "8"] and hook.scope == "global"
    # math_policies.exponential: remaining = D^(j/U) at the j-th update, U = T_iter // ΔT
    updates = 900 // 100
    for j in range(updates + 1):
        remaining = math.pow(math.pow(0.1, 1.0 / updates), j)
        assert 1.0 - schedule.sparsity_at(100 * j) == pytest.approx(remaining, rel=1e-12)


def _official_erk(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """RigLScheduler.get_erdos_renyi_dist(is_kernel=True) re-stated with numpy (densities)."""
    dense: set[int] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for i, shape in enumerate(shapes):
            n = np.prod(shape)
            if i in dense:
                rhs -= int(n * (1 - density))
            else:
                rhs += int(n * density)
                raw[i] = np.sum(shape) / np.prod(shape)
                divisor += raw[i] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense |= {i for i, p in raw.items() if p == top}
        else:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def test_erk_densities_match_the_official_distribution() -> None:
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (10, 64)]
    for density in (0.5, 0.2, 0.1, 0.02):
        ours = erk_densities(shapes, density)
        np.testing.assert_allclose(ours, _official_erk(shapes, density), rtol=1e-12)
        kept = sum(d * np.prod(s) for d, s in zip(ours, shapes, strict=True))
        # the official counts truncate to whole weights per layer
        assert kept == pytest.approx(density * sum(np.prod(s) for s in shapes), abs=len(shapes))
    assert erk_densities(shapes, 0.5)[0] == 1.0  # the small first conv is made dense


@pytest.mark.parametrize("scope", ["erk", "uniform"])
def test_erk_and_uniform_reach_their_layer_densities(scope: str) -> None:
    model = _model()
    hook = PruningHook(0.8, scope=scope, end=0.6, interval=2, keep_first_dense=False)
    fit(model, _data(), epochs=2, lr=0.05, hooks=[hook], progress=False)
    shapes = [tuple(original_weight(m).shape) for _, m in hook.layers]
    wanted = erk_densities(shapes, 0.2) if scope == "erk" else [0.2] * len(shapes)
    for (name, module), density in zip(hook.layers, wanted, strict=True):
        got = float(mask_of(module).mask.mean())
        assert got == pytest.approx(density, abs=1.0 / module.weight.numel() + 1e-9), name


def _official_find_k(s2: torch.Tensor, loss_value: float) -> int:
    """rank_kit.find_k re-stated: k = r − 1 − argmin_j |Σ_{i≤j} σ²_(ascending) − loss_value|."""
    acc = (torch.cumsum(torch.flip(s2, dims=[0]), dim=0) - loss_value).abs()
    return len(acc) - int(acc.argmin()) - 1


def test_energy_rank_is_the_official_find_k() -> None:
    from tensorslim.analysis.delta_rank import (
        layer_delta_ranks,
        normalized_singular_values,
        partial_energy_rank,
    )

    g = torch.Generator().manual_seed(3)
    for shape in [(8, 20), (16, 4, 3, 3), (5, 5), (1, 9)]:
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        w[w.abs() < 0.8] = 0  # sparse, like a pruned layer
        sv = normalized_singular_values(w)
        for partial in (0.0, 0.05, 0.1, 0.2, 0.3, 0.9, 1.0):
            assert partial_energy_rank(sv, partial) == _official_find_k(sv**2, partial)
    model = _model()
    report = layer_delta_ranks(model, 0.05, ["3"], partial_k=0.2)["3"]
    sv = normalized_singular_values(model[3].weight)
    assert report["energy_rank"] == _official_find_k(sv**2, 0.2)
    assert report["delta_rank"] == int((sv > 0.05).sum())
