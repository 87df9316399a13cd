"""The rpg / gmp / rigl methods through the plan: options, build, hooks, finalize, save → load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.layers.sparse import mask_of, masked_modules
from tensorslim.methods import get_method, list_methods, method_class
from tensorslim.methods.pruning import magnitude_pruning_errors, target_from_plan
from tensorslim.pipeline import compress_model
from tensorslim.train.pruning import PruningHook

METHODS = ("rpg", "gmp", "rigl")


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def loaders(n: int = 96) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean(dim=(1, 2)) > 0).long() + (x[:, 0, 3:].mean(dim=(1, 2)) > 0).long()
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def test_methods_are_registered_as_training_methods() -> None:
    for name in METHODS:
        assert name in list_methods()
        assert method_class(name).kind == "training"
    rpg, gmp, rigl = (get_method(n) for n in METHODS)
    assert rpg.rank_weight > 0 and rpg.drop_fraction > 0 and rpg.schedule == "cubic"
    assert gmp.rank_weight == 0 and gmp.drop_fraction == 0 and gmp.schedule == "cubic"
    assert rigl.rank_weight == 0 and rigl.drop_fraction > 0 and rigl.schedule == "constant"
    assert "_pruned_layers" not in rpg.settings()
    assert get_method("rpg", **rpg.settings()).settings() == rpg.settings()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.2}, r"\[0, 1\)"),
        ({"interval": 0}, "ΔT"),
        ({"end": 2.0}, "after training ends"),
        ({"schedule": "linear"}, "schedule"),
        ({"partial_k": 3.0}, "partial_k"),
    ],
)
def test_bad_settings_are_clear_errors(settings: dict, match: str) -> None:
    with pytest.raises(TensorslimError, match=match):
        get_method("rpg", **settings)


def test_candidates_count_nonzeros_and_dense_flops() -> None:
    model = small_net()
    x = torch.randn(2, 1, 6, 6)
    plan = ts.plan(model, "gmp", None, x)
    layer = model[5]
    info = plan.layer("5").info()
    method = get_method("gmp")
    options = method.candidates(layer, info)
    sparsities = [o.config["sparsity"] for o in options]
    assert 0.9 in sparsities and sparsities == sorted(sparsities)
    n = layer.weight.numel()
    errors = [o.error for o in options]
    assert errors == sorted(errors)  # more pruning, more error
    for option in options:
        s = option.config["sparsity"]
        keep = n - round(s * n)
        assert option.params == keep + 16
        assert option.flops == info.flops  # masks run dense kernels
        assert option.extra["nonzero_flops"] == round(info.flops * keep / n)
        # The error is that of keeping the largest |w| of this layer.
        w = layer.weight.detach().reshape(-1)
        kept = torch.zeros_like(w)
        top = w.abs().topk(keep).indices
        kept[top] = w[top]
        expected = float(torch.linalg.vector_norm(w - kept) / torch.linalg.vector_norm(w))
        assert option.error == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_magnitude_pruning_errors_on_a_known_vector() -> None:
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    errors = magnitude_pruning_errors(w, [0.0, 0.25, 0.5, 0.75])
    total = 9 + 1 + 4 + 0.25
    assert errors == pytest.approx(
        [0.0, math.sqrt(0.25 / total), math.sqrt(1.25 / total), math.sqrt(5.25 / total)]
    )
    assert magnitude_pruning_errors(torch.zeros(3), [0.5]) == [0.0]


@pytest.mark.parametrize("name", METHODS)
def test_plan_apply_puts_all_ones_masks_on_every_layer(name: str) -> None:
    model = small_net()
    x = torch.randn(2, 1, 6, 6)
    plan = ts.plan(model, name, ts.Budget(params=0.1), x)
    assert {lp.fqn for lp in plan.compressed_layers} == {"0", "2", "5", "7"}
    small = ts.apply(model, plan)
    assert [n for n, _ in masked_modules(small)] == ["0", "2", "5", "7"]
    for _, module in masked_modules(small):
        assert torch.all(mask_of(module).mask == 1)
    torch.testing.assert_close(small(x), model(x))
    assert mask_of(model[0]) is None  # the original is untouched
    keys = set(small.state_dict())
    assert "5.parametrizations.weight.original" in keys
    assert "5.parametrizations.weight.0.mask" in keys


def test_target_sparsity_comes_from_the_budget() -> None:
    model = small_net()
    x = torch.randn(2, 1, 6, 6)
    plan = ts.plan(model, "rpg", ts.Budget(params=0.1), x)
    assert target_from_plan(plan, 0.5) == pytest.approx(0.9)
    small = ts.apply(model, plan)
    (hook,) = get_method("rpg").train_hooks(small, plan)
    assert isinstance(hook, PruningHook) and hook.final_sparsity == pytest.approx(0.9)
    assert hook.layer_names == ["2", "5", "7"]  # the first conv stays dense by default
    no_budget = ts.plan(model, "rpg", None, x, sparsity=0.7)
    assert all(lp.config == {"sparsity": 0.7} for lp in no_budget.compressed_layers)
    assert target_from_plan(no_budget, 0.7) == 0.7
    flops = ts.plan(model, "gmp", ts.Budget(flops=0.25), x)
    with pytest.warns(UserWarning, match="dense kernels"):
        assert target_from_plan(flops, 0.5) == pytest.approx(0.75)
    with pytest.raises(TensorslimError, match="no masked layer"):
        get_method("rpg").train_hooks(model, plan)


@pytest.mark.parametrize("name", METHODS)
def test_train_finalize_and_summary(name: str) -> None:
    model = small_net()
    train, _ = loaders()
    x = next(iter(train))[0]
    plan = ts.plan(model, name, ts.Budget(params=0.2), x)
    small = ts.apply(model, plan)
    method = get_method(name, interval=1)
    hooks = method.train_hooks(small, plan)
    ts.fit(small, train, epochs=2, lr=0.05, hooks=hooks, progress=False)
    before = small(x)
    finalized = method.finalize(small, plan)
    assert list(masked_modules(finalized)) == []
    torch.testing.assert_close(finalized(x), before)
    summary = method.summary(finalized)
    assert set(summary["layers"]) == {"2", "5", "7"}
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert summary["all_layers_sparsity"] < summary["sparsity"]  # first conv kept dense
    assert summary["avg_delta_rank"] > 0


def test_masks_survive_save_and_load_mid_training(tmp_path) -> None:
    model = small_net()
    train, _ = loaders()
    x = next(iter(train))[0]
    plan = ts.plan(model, "rpg", ts.Budget(params=0.3), x)
    small = ts.apply(model, plan)
    method = get_method("rpg", end=0.5, interval=1)
    ts.fit(small, train, epochs=1, lr=0.05, hooks=method.train_hooks(small, plan), progress=False)
    ts.save(small, tmp_path / "mid")
    again = ts.load(tmp_path / "mid", small_net(seed=3))
    for name in ("0", "2", "5", "7"):
        assert torch.equal(mask_of(again.get_submodule(name)).mask, mask_of(small[int(name)]).mask)
    torch.testing.assert_close(again(x), small(x))
    # After finalize the saved plan marks the layers dense; the zeros are in the weights.
    method.finalize(small, plan)
    ts.save(small, tmp_path / "final")
    final = ts.load(tmp_path / "final", small_net(seed=4))
    assert list(masked_modules(final)) == []
    torch.testing.assert_close(final(x), small(x))


def test_compress_pipeline_reports_the_pruning_summary() -> None:
    model = small_net()
    train, test = loaders()
    x = next(iter(train))[0]
    ts.fit(model, train, epochs=1, lr=0.05, progress=False)
    small, results = compress_model(
        model,
        method="rpg",
        budget=ts.Budget(params=0.1),
        settings={"interval": 1},
        train_loader=train,
        test_loader=test,
        example_batch=x,
        finetune_epochs=2,
        progress=False,
        latency=False,
    )
    summary = results["method_summary"]
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "avg_delta_rank" in summary
    assert results["history"][-1]["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert list(masked_modules(small)) == []


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_plan_labels_show_the_budget_target_not_the_default_sparsity(fraction: float) -> None:
    """With ``params=f`` the plan aims every pruned layer at 1 − f, and says why."""
    model = small_net()
    plan = ts.plan(model, "rpg", ts.Budget(params=fraction), torch.randn(1, 1, 6, 6))
    assert math.isclose(plan.settings["sparsity"], 1 - fraction)
    chosen = [lp for lp in plan.layers if lp.method == "rpg"]
    assert chosen
    for lp in chosen:
        assert math.isclose(lp.config["sparsity"], 1 - fraction)
        assert "during training" in lp.reason
