"""Multi-stage compression: groups in forward order, per-stage targets, one plan per stage,
and a save → load round trip of the staged model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorslim as ts
from conftest import TinyCNN, counted_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.layers.tucker import TuckerConv2d
from tensorslim.multistage import multistage, stage_groups, stage_targets
from tensorslim.plan import plans_of


@pytest.fixture
def loaders() -> tuple[DataLoader, DataLoader, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32), x[:8]


@pytest.fixture
def trained_like_cnn() -> nn.Module:
    """TinyCNN whose weights have geometrically decaying mode spectra, as trained weights do
    (random weights have flat spectra, where the allocator jumps straight to rank 1)."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                w = module.weight.detach()
                for mode in (0, 1):
                    t = w.movedim(mode, 0)
                    u, s, vh = torch.linalg.svd(t.reshape(t.shape[0], -1), full_matrices=False)
                    s = s[0] * 0.7 ** torch.arange(len(s))
                    w = (u @ torch.diag(s) @ vh).reshape(t.shape).movedim(0, mode)
                module.weight.copy_(w)
    return model


def test_stage_groups_follow_forward_order(tiny_cnn, tiny_input) -> None:
    groups = stage_groups(tiny_cnn, "tucker", tiny_input, 2)
    flat = [f for g in groups for f in g]
    assert flat == ["conv1", "conv2", "fc1", "fc2"]
    assert len(groups) == 2 and all(groups)
    only_convs = stage_groups(
        tiny_cnn, "tucker", tiny_input, 5, filter_fn=lambda m, f: isinstance(m, nn.Conv2d)
    )
    assert [f for g in only_convs for f in g] == ["conv1", "conv2"]
    # tt supports Linear layers only
    assert [f for g in stage_groups(tiny_cnn, "tt", tiny_input, 3) for f in g] == ["fc1", "fc2"]


def test_stage_targets_spread_savings_by_cost() -> None:
    assert stage_targets(100.0, 0.5, [30.0, 10.0]) == pytest.approx([62.5, 50.0])
    assert stage_targets(100.0, 1.0, [1.0, 1.0]) == pytest.approx([100.0, 100.0])


def test_multistage_meets_the_budget_and_round_trips(trained_like_cnn, loaders, tmp_path) -> None:
    train, test, example = loaders
    small, results = multistage(
        trained_like_cnn,
        method="tucker",
        train_loader=train,
        test_loader=test,
        example_batch=example,
        stages=2,
        budget="flops=0.5",
        epochs_per_stage=1,
        latency=False,
        max_steps_per_epoch=2,
    )
    assert [r["stage"] for r in results] == [1, 2]
    assert len(plans_of(small)) == 2
    assert results[-1]["flops_fraction"] <= 0.5 * 1.03
    assert results[0]["flops_fraction"] > results[-1]["flops_fraction"]
    assert results[-1]["budget"] == {"flops": 0.5}
    # stage 1 touched only its own layers; stage 2 the rest
    first = {lp.fqn for lp in plans_of(small)[0].compressed_layers}
    assert first <= set(results[0]["layers_in_stage"])
    assert any(isinstance(m, TuckerConv2d) for m in small.modules())
    assert counted_flops(small, example[:1]) == results[-1]["compressed"]["flops"]
    ts.save(small, tmp_path)
    torch.manual_seed(5)
    again = ts.load(tmp_path, base_model=TinyCNN().eval())
    with torch.no_grad():
        torch.testing.assert_close(again(example), small.eval()(example), rtol=0, atol=0)


def test_stage_whose_target_is_met_is_skipped(tiny_cnn, loaders, monkeypatch) -> None:
    import functools
    import sys

    from tensorslim.rank.allocate import allocate_each

    train, _, example = loaders
    # Random weights and the bare greedy walk (no refund of its overshoot): stage 1 jumps to
    # rank 1 and overshoots stage 2's target.
    choose_module = sys.modules["tensorslim.planner.choose"]
    monkeypatch.setattr(
        choose_module, "allocate_each", functools.partial(allocate_each, refund=False)
    )
    small, results = multistage(
        tiny_cnn,
        method="tucker",
        train_loader=train,
        test_loader=None,
        example_batch=example,
        stages=2,
        budget="flops=0.8",
        epochs_per_stage=0,
        latency=False,
    )
    assert [r["stage"] for r in results] == [1]
    assert len(plans_of(small)) == 1
    assert results[0]["flops_fraction"] <= 0.8


def test_multistage_without_budget_uses_the_rank_rule(tiny_cnn, loaders) -> None:
    train, _, example = loaders
    small, results = multistage(
        tiny_cnn,
        method="tucker",
        train_loader=train,
        test_loader=None,
        example_batch=example,
        stages=3,
        settings={"rank_rule": "vbmf", "weaken": 0.5},
        epochs_per_stage=0,
        latency=False,
    )
    assert len(results) == 3
    assert all(r["target_fraction"] is None for r in results)
    assert isinstance(small.fc1, LowRankLinear)


def test_bad_groups(tiny_cnn, loaders) -> None:
    train, test, example = loaders
    with pytest.raises(TensorslimError, match="unknown layer"):
        multistage(
            tiny_cnn,
            train_loader=train,
            test_loader=test,
            example_batch=example,
            groups=[["nope"]],
            latency=False,
        )
    with pytest.raises(TensorslimError, match="at least 1 stage"):
        stage_groups(tiny_cnn, "tucker", example, 0)
