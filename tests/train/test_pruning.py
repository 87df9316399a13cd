"""Sparsity schedules, global magnitude ranking, prune-and-regrow and the PruningHook."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorslim.errors import TensorslimError
from tensorslim.layers.sparse import mask_of, original_weight
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import fit
from tensorslim.train.pruning import (
    PruningHook,
    SparsitySchedule,
    add_masks,
    cosine_drop_fraction,
    drop_and_regrow,
    global_magnitude_masks,
    pruning_summary,
    reset_optimizer_state,
)
from tensorslim.train.rank_loss import adversarial_rank_loss

# ----- schedules ---------------------------------------------------------------------------------


def test_cubic_schedule_values() -> None:
    s = SparsitySchedule(0.9, start=10, end=110, interval=10, initial_sparsity=0.1)
    assert s.sparsity_at(0) == 0.1
    assert s.sparsity_at(10) == pytest.approx(0.1)
    assert s.sparsity_at(110) == pytest.approx(0.9)
    assert s.sparsity_at(500) == 0.9
    # s_t = s_f + (s_i − s_f)(1 − p)³ at p = 1/2
    assert s.sparsity_at(60) == pytest.approx(0.9 + (0.1 - 0.9) * 0.125)
    values = [s.sparsity_at(t) for t in range(0, 120)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    # Cubic prunes fast early: more than half of the way after a quarter of the time.
    assert s.sparsity_at(35) - 0.1 > 0.5 * 0.8


def test_exponential_and_constant_schedules() -> None:
    e = SparsitySchedule(0.96, start=0, end=100, interval=5, kind="exponential")
    # remaining density D^(step/N): D = 0.04, half-way √0.04 = 0.2
    assert 1 - e.sparsity_at(50) == pytest.approx(0.2)
    assert 1 - e.sparsity_at(25) == pytest.approx(0.04**0.25)
    assert e.sparsity_at(100) == pytest.approx(0.96)
    c = SparsitySchedule(0.8, start=3, end=50, interval=7, kind="constant")
    assert c.sparsity_at(2) == 0.0 and c.sparsity_at(3) == 0.8 and c.sparsity_at(49) == 0.8


def test_update_steps_include_the_end() -> None:
    s = SparsitySchedule(0.5, start=2, end=13, interval=4)
    assert s.update_steps() == [2, 6, 10, 13]
    assert [t for t in range(20) if s.is_update_step(t)] == [2, 6, 10, 13]
    one = SparsitySchedule(0.5, start=0, end=0, interval=3)
    assert one.update_steps() == [0] and one.sparsity_at(0) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, r"\[0, 1\)"),
        ({"final_sparsity": -0.1}, r"\[0, 1\)"),
        ({"final_sparsity": float("nan")}, r"\[0, 1\)"),
        ({"interval": 0}, "ΔT"),
        ({"interval": -5}, "ΔT"),
        ({"start": 10, "end": 5}, "before it starts"),
        ({"kind": "linear"}, "unknown sparsity schedule"),
        ({"initial_sparsity": 0.95}, "exceeds"),
    ],
)
def test_schedule_bad_input(kwargs: dict, match: str) -> None:
    base = {"final_sparsity": 0.9, "start": 0, "end": 10, "interval": 2}
    with pytest.raises(TensorslimError, match=match):
        SparsitySchedule(**{**base, **kwargs})


def test_schedule_must_end_within_training() -> None:
    s = SparsitySchedule(0.9, start=0, end=100, interval=10)
    s.check_fits(101)
    with pytest.raises(TensorslimError, match="ends at step 100 but training has only 50"):
        s.check_fits(50)


def test_cosine_drop_fraction() -> None:
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    assert cosine_drop_fraction(5, 0.3, 0) == 0.0


# ----- ranking and regrowth ----------------------------------------------------------------------


def test_global_ranking_uses_one_threshold() -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 20), "b": 0.1 * torch.randn(30, 5), "c": 5 * torch.randn(4)}
    masks = {k: torch.ones_like(v) for k, v in weights.items()}
    new = global_magnitude_masks(weights, masks, 0.7)
    total = sum(v.numel() for v in weights.values())
    kept = sum(int(m.sum()) for m in new.values())
    assert kept == total - round(0.7 * total)
    kept_values = torch.cat([weights[k][new[k] > 0].abs() for k in weights])
    pruned_values = torch.cat([weights[k][new[k] == 0].abs() for k in weights])
    assert float(kept_values.min()) >= float(pruned_values.max())
    # Per-layer sparsity is read back, not imposed: the small-scale layer loses the most.
    density = {k: float(new[k].mean()) for k in new}
    assert density["b"] < density["a"] < density["c"]


def test_global_ranking_never_revives_pruned_weights() -> None:
    torch.manual_seed(0)
    w = {"a": torch.randn(50)}
    mask = torch.ones(50)
    mask[w["a"].abs().argsort(descending=True)[:5]] = 0  # the 5 largest are already pruned
    new = global_magnitude_masks(w, {"a": mask}, 0.5)["a"]
    assert int(new.sum()) == 25
    assert torch.all(new[mask == 0] == 0)


def test_drop_and_regrow_swaps_smallest_weights_for_largest_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    mask = (torch.rand(8, 8) < 0.5).float()
    score = torch.randn(8, 8)
    new, grown = drop_and_regrow(weight, mask, score, 0.25)
    active = int(mask.sum())
    n = int(0.25 * active)
    assert int(new.sum()) == active
    assert int(grown.sum()) == n
    dropped = (mask > 0) & (new == 0)
    survivors = (mask > 0) & (new > 0) & ~grown
    if dropped.any():
        assert float(weight[dropped].abs().max()) <= float(weight[survivors].abs().min())
    candidates = ~survivors
    assert float(score[grown].abs().min()) >= float(score[candidates & ~grown].abs().max())
    same, none = drop_and_regrow(weight, mask, score, 0.0)
    assert torch.equal(same, mask) and not none.any()


def test_reset_optimizer_state_clears_momentum_and_adam_moments() -> None:
    for make in (
        lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam([p], lr=0.1),
    ):
        p = nn.Parameter(torch.randn(4, 4))
        opt = make(p)
        p.grad = torch.randn(4, 4)
        opt.step()
        positions = torch.zeros(4, 4, dtype=torch.bool)
        positions[0, :2] = True
        reset_optimizer_state(opt, p, positions)
        tensors = [v for v in opt.state[p].values() if v.shape == p.shape]
        assert tensors
        for value in tensors:
            assert torch.all(value[positions] == 0)
            assert torch.all(value[~positions] != 0)


# ----- the hook ----------------------------------------------------------------------------------


def tiny_data(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def tiny_model(seed: int = 0, masks: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    if masks:
        add_masks(model)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # GMP
        {"schedule": "constant", "drop_fraction": 0.3},  # RigL
        {"drop_fraction": 0.3, "rank_weight": 1.0},  # RPG
        {"schedule": "exponential", "scope": "layer", "keep_first_dense": False},
    ],
)
def test_hook_reaches_the_target_in_fit(kwargs: dict) -> None:
    model = tiny_model()
    hook = PruningHook(0.8, end=0.6, interval=2, **kwargs)
    history = fit(model, tiny_data(), epochs=3, lr=0.05, hooks=[hook], progress=False)
    names = hook.layer_names
    keep_first = kwargs.get("keep_first_dense", True)
    assert ("0" not in names) == keep_first
    for name, module in hook.layers:
        holder = mask_of(module)
        # Effective weights are zero wherever the mask is.
        assert torch.all(module.weight[holder.mask == 0] == 0)
        if kwargs.get("scope") == "layer":
            assert float(1 - holder.mask.mean()) == pytest.approx(0.8, abs=0.01), name
    masks = [mask_of(m).mask for _, m in hook.layers]
    density = sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert density == pytest.approx(0.2, abs=1e-3)
    if keep_first:
        assert torch.all(mask_of(model[0]).mask == 1)
    record = history.last()
    assert record["target_sparsity"] == pytest.approx(0.8)
    assert record["sparsity"] >= 0.8 - 1e-3
    assert "avg_delta_rank" in record and "rank_loss_seconds" in record
    if kwargs.get("rank_weight"):
        assert hook.rank_loss_seconds > 0
    if kwargs.get("drop_fraction"):
        assert hook.regrown_total > 0


def one_update_setup(**hook_kwargs):
    model = nn.Sequential(nn.Linear(6, 5))
    add_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # One momentum step first, so there is optimizer state to clear.
    model[0].weight.sum().backward()
    opt.step()
    opt.zero_grad()
    hook = PruningHook(0.6, keep_first_dense=False, keep_last_dense=False, **hook_kwargs)
    hook.on_train_begin(model, opt, total_steps=10)
    return model, opt, hook


def test_regrowth_follows_the_dense_gradient_and_restarts_at_zero() -> None:
    torch.manual_seed(0)
    model, opt, hook = one_update_setup(schedule="constant", drop_fraction=0.5, end=0.5, interval=1)
    layer = model[0]
    param = original_weight(layer)
    # Step 0 is an update step: the capture is on. A loss with a known gradient C.
    c = torch.randn(5, 6)
    (layer.weight * c).sum().backward()
    holder = mask_of(layer)
    torch.testing.assert_close(holder.dense_grad, c)
    before = holder.mask.clone()
    opt.step()
    hook.after_step(model, opt, 0)
    after = holder.mask
    assert int(after.sum()) == 12  # 60 % of 30 pruned, regrowth keeps the count
    grown = (after > 0) & ~(
        global_magnitude_masks({"w": param}, {"w": before}, 0.6)["w"] > 0
    )  # positions active now that magnitude alone would not keep
    assert grown.any()
    assert torch.all(param[grown] == 0)
    assert torch.all(opt.state[param]["momentum_buffer"][grown] == 0)
    # Regrown positions are those of largest |C| among the ones not kept.
    kept_after_drop = (after > 0) & ~grown
    others = ~kept_after_drop & ~grown
    assert float(c[grown].abs().min()) >= float(c[others].abs().max())
    # Step 1 regrows too: a fresh capture is armed for it.
    assert holder.capture and holder.dense_grad is None


def test_rank_loss_enters_the_regrowth_gradient_at_update_steps_only() -> None:
    torch.manual_seed(0)
    # a Linear-only model: the rank loss (convolutions only, officially) falls back to the pruned
    # layers, with a warning that says so
    with pytest.warns(UserWarning, match="covers convolutions only"):
        model, opt, hook = one_update_setup(drop_fraction=0.3, rank_weight=2.0, end=0.9, interval=4)
    layer = model[0]
    holder = mask_of(layer)
    x = torch.randn(3, 6)
    extra = hook.extra_loss(model, 0)
    assert extra is not None
    loss = model(x).sum() + extra
    loss.backward()
    # Expected dense gradient: task gradient + λ·∂L_rank/∂W (all at W).
    w = layer.weight.detach().clone().requires_grad_(True)
    ref = (x @ w.T).sum() + 2.0 * adversarial_rank_loss([("l", _Holder(w))], 0.1)
    ref.backward()
    torch.testing.assert_close(holder.dense_grad, w.grad)
    assert hook.extra_loss(model, 1) is None  # not an update step
    every = PruningHook(
        0.5,
        rank_weight=1.0,
        rank_loss_every_step=True,
        keep_first_dense=False,
        rank_loss_layers="pruned",
    )
    other = nn.Sequential(nn.Linear(4, 4))
    add_masks(other)
    every.on_train_begin(other, opt, total_steps=10)
    assert every.extra_loss(None, 1) is not None


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight


def test_nan_gradient_is_an_error_naming_the_layer() -> None:
    model, opt, hook = one_update_setup(schedule="constant", drop_fraction=0.5, end=0.5, interval=1)
    layer = model[0]
    (layer.weight * torch.full((5, 6), float("nan"))).sum().backward()
    with pytest.raises(TensorslimError, match="gradient of 0 has NaN"):
        hook.after_step(model, opt, 0)


def test_all_zero_layer_warns_with_its_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.zero_()
    add_masks(model)
    hook = PruningHook(0.5, keep_first_dense=False, interval=1, end=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.on_train_begin(model, opt, total_steps=4)
    with pytest.warns(UserWarning, match="1 has all weights zero"):
        hook.after_step(model, opt, 0)


def test_layer_losing_every_weight_warns() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e-6)
    add_masks(model)
    hook = PruningHook(0.5, schedule="constant", keep_first_dense=False, interval=1, end=0.5)
    hook.on_train_begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=4)
    with pytest.warns(UserWarning, match="1 has no weight left"):
        hook.after_step(model, None, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, r"\[0, 1\)"),
        ({"final_sparsity": -0.5}, r"\[0, 1\)"),
        ({"interval": 0}, "ΔT"),
        ({"interval": -1}, "ΔT"),
        ({"end": 1.5}, "after training ends"),
        ({"start": 0.8, "end": 0.5}, "start"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"rank_weight": -1.0}, "rank_weight"),
        ({"scope": "row"}, "scope"),
    ],
)
def test_hook_bad_input(kwargs: dict, match: str) -> None:
    base = {"final_sparsity": 0.9}
    with pytest.raises(TensorslimError, match=match):
        PruningHook(**{**base, **kwargs})


def test_absolute_schedule_after_training_end_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    add_masks(model)
    hook = PruningHook(0.5, steps=SparsitySchedule(0.5, 0, 30, 5), keep_first_dense=False)
    with pytest.raises(TensorslimError, match="training has only 12 steps"):
        hook.on_train_begin(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=12)


def test_hook_needs_masks_and_keeps_first_conv_and_classifier_dense() -> None:
    bare = tiny_model(masks=False)
    opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    with pytest.raises(TensorslimError, match="add_masks"):
        PruningHook(0.5).on_train_begin(bare, opt, total_steps=10)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = PruningHook(0.5, keep_last_dense=True)
    hook.on_train_begin(model, opt, total_steps=10)
    assert hook.kept_dense == ["0", "7"]
    assert hook.layer_names == ["2", "5"]
    lonely = nn.Sequential(nn.Conv2d(1, 2, 3))
    add_masks(lonely)
    with pytest.raises(TensorslimError, match="no layer left"):
        PruningHook(0.5).on_train_begin(lonely, opt, total_steps=10)


def test_named_layers_must_exist_and_be_masked() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TensorslimError, match="no layer named 'fc'"):
        PruningHook(0.5, layers=["fc"]).on_train_begin(model, opt, 10)
    with pytest.raises(TensorslimError, match="ReLU"):
        PruningHook(0.5, layers=["1"]).on_train_begin(model, opt, 10)
    partly = tiny_model(masks=False)
    add_masks(partly, layers=["5"])
    with pytest.raises(TensorslimError, match="2 has no mask"):
        PruningHook(0.5, layers=["2", "5"]).on_train_begin(partly, opt, 10)
    with pytest.raises(TensorslimError, match="no layer named"):
        add_masks(partly, layers=["nope"])


class _Crash(TrainHook):
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step == 8:
            raise RuntimeError("simulated crash")


def test_resume_after_a_crash_gives_the_uninterrupted_masks(tmp_path) -> None:
    data = tiny_data()  # 6 steps per epoch
    settings = {"end": 0.9, "interval": 2, "drop_fraction": 0.3, "rank_weight": 0.5}
    reference = tiny_model()
    fit(reference, data, epochs=2, lr=0.05, hooks=[PruningHook(0.8, **settings)], progress=False)
    crashed = tiny_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            crashed,
            data,
            epochs=2,
            lr=0.05,
            hooks=[PruningHook(0.8, **settings), _Crash()],
            checkpoint_dir=tmp_path,
            progress=False,
        )
    resumed = tiny_model(seed=1)  # different init: everything must come from the checkpoint
    hook = PruningHook(0.8, **settings)
    history = fit(
        resumed,
        data,
        epochs=2,
        lr=0.05,
        hooks=[hook],
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert hook.state_dict()["next_step"] == 12
    assert len(history.epochs) == 2
    for name in ("2", "5", "7"):
        ref = reference.get_submodule(name)
        again = resumed.get_submodule(name)
        assert torch.equal(mask_of(ref).mask, mask_of(again).mask), name
        torch.testing.assert_close(again.weight, ref.weight)


def test_pruning_summary_reports_sparsity_and_delta_rank() -> None:
    model = tiny_model()
    hook = PruningHook(0.9, end=0.5, interval=1, keep_first_dense=False)
    fit(model, tiny_data(), epochs=1, lr=0.05, hooks=[hook], progress=False)
    summary = pruning_summary(model)
    assert set(summary["layers"]) == {"0", "2", "5", "7"}
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["nonzero_weights"] == sum(v["nonzero"] for v in summary["layers"].values())
    for info in summary["layers"].values():
        assert 0 <= info["delta_rank"] <= info["full_rank"]
    assert 0 < summary["avg_relative_delta_rank"] <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        just_one = pruning_summary(model, layers=["5"])
    assert set(just_one["layers"]) == {"5"}
    with pytest.raises(TensorslimError, match="no layer named"):
        pruning_summary(model, layers=["nope"])
