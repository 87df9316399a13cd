"""Model surgery: selection and replacement in nested, container and shared modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.surgery import (
    copy_structure,
    references,
    replace_module,
    replace_modules,
    replace_modules_at,
    select_modules,
)

DOUBLE = torch.float64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Zoo(nn.Module):
    """Every kind of container, and one Linear shared by a ModuleDict and a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        shared = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 6), "tied": shared})
        self.stack = nn.ModuleList([nn.Linear(6, 6), shared])
        self.conv = nn.Conv1d(1, 1, 1)  # not a Linear: type selection must skip it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        x = self.heads["a"](x) + self.heads["tied"](x)
        for layer in self.stack:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture
def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo()


def test_select_by_name_type_and_filter(zoo: Zoo) -> None:
    linears = [f for f, _ in select_modules(zoo, types=nn.Linear)]
    # the shared Linear appears once, under its first name
    assert linears == ["block.inner.0", "block.inner.2", "heads.a", "heads.tied", "stack.0"]
    assert [f for f, _ in select_modules(zoo, fqns=["stack.1", "heads.a"])] == [
        "stack.1",
        "heads.a",
    ]
    picked = select_modules(
        zoo, types=nn.Linear, filter_fn=lambda module, fqn: fqn.startswith("block")
    )
    assert [f for f, _ in picked] == ["block.inner.0", "block.inner.2"]
    with pytest.raises(TensorslimError, match=r"no module named 'block\.nope'"):
        select_modules(zoo, fqns=["block.nope"])


def test_references_finds_every_parent(zoo: Zoo) -> None:
    refs = references(zoo, zoo.heads["tied"])
    assert {(type(p).__name__, n) for p, n in refs} == {("ModuleDict", "tied"), ("ModuleList", "1")}


@pytest.mark.parametrize("fqn", ["block.inner.0", "block.inner.2", "heads.a", "stack.0"])
def test_replace_in_nested_sequential_dict_and_list(zoo: Zoo, fqn: str) -> None:
    x = torch.randn(3, 6)
    want = zoo(x)
    old = zoo.get_submodule(fqn)
    new = LowRankLinear.from_dense(old, 6)
    assert replace_module(zoo, fqn, new) is old
    assert zoo.get_submodule(fqn) is new
    torch.testing.assert_close(zoo(x), want, rtol=1e-5, atol=1e-5)


def test_shared_module_is_replaced_everywhere_by_one_new_module(zoo: Zoo) -> None:
    x = torch.randn(3, 6)
    want = zoo(x)
    new = LowRankLinear.from_dense(zoo.stack[1], 6)
    replace_module(zoo, "stack.1", new)
    assert zoo.heads["tied"] is new and zoo.stack[1] is new
    assert sum(1 for m in zoo.modules() if m is new) == 1, "sharing must survive"
    torch.testing.assert_close(zoo(x), want, rtol=1e-5, atol=1e-5)


def test_replacement_takes_dtype_device_and_mode(zoo: Zoo) -> None:
    zoo = zoo.to(DOUBLE).eval()
    new = nn.Linear(6, 6)  # float32, training mode
    replace_module(zoo, "heads.a", new)
    placed = zoo.heads["a"]
    assert placed.weight.dtype == DOUBLE and placed.weight.device == torch.device("cpu")
    assert not placed.training
    zoo.train()
    replace_module(zoo, "stack.0", nn.Linear(6, 6).eval())
    assert zoo.stack[0].training and zoo.stack[0].weight.dtype == DOUBLE


def test_replace_errors(zoo: Zoo) -> None:
    with pytest.raises(TensorslimError, match="root"):
        replace_module(zoo, "", nn.Identity())
    with pytest.raises(TensorslimError, match=r"no module named 'heads\.b'"):
        replace_module(zoo, "heads.b", nn.Identity())


def test_replace_modules_at_replaces_several_in_one_walk_keeping_sharing(zoo: Zoo) -> None:
    x = torch.randn(3, 6)
    want = zoo(x)
    tied = LowRankLinear.from_dense(zoo.heads["tied"], 6)
    inner = LowRankLinear.from_dense(zoo.block.inner[0], 6)
    head = nn.Linear(6, 6).to(DOUBLE)  # takes the replaced layer's dtype and mode
    head.load_state_dict(zoo.heads["a"].state_dict())
    replace_modules_at(zoo.eval(), {"stack.1": tied, "block.inner.0": inner, "heads.a": head})
    assert zoo.heads["tied"] is tied and zoo.stack[1] is tied and zoo.block.inner[0] is inner
    assert zoo.heads["a"].weight.dtype == torch.float32 and not zoo.heads["a"].training
    torch.testing.assert_close(zoo(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TensorslimError, match="root"):
        replace_modules_at(zoo, {"": nn.Identity()})
    with pytest.raises(TensorslimError, match=r"no module named 'heads\.b'"):
        replace_modules_at(zoo, {"heads.b": nn.Identity()})


def test_replace_modules_with_a_factory(zoo: Zoo) -> None:
    def factory(module: nn.Module, fqn: str) -> nn.Module | None:
        return None if fqn == "heads.a" else nn.Identity()

    replaced = replace_modules(zoo, factory, types=nn.Linear)
    assert set(replaced) == {"block.inner.0", "block.inner.2", "heads.tied", "stack.0"}
    assert isinstance(zoo.heads["a"], nn.Linear)
    assert isinstance(zoo.stack[1], nn.Identity), "the shared module's second name too"
    assert isinstance(zoo.conv, nn.Conv1d)


def test_plan_and_apply_through_containers_keep_sharing_and_outputs(zoo: Zoo) -> None:
    zoo = zoo.to(DOUBLE).eval()
    x = torch.randn(3, 6, dtype=DOUBLE)
    plan = ts.plan(zoo, "svd", None, x, rank=6)
    # at rank 6 a 6×6 layer is not cheaper: the plan keeps every one dense and says why
    assert plan.compressed_layers == []
    assert all("not cheaper" in lp.reason for lp in plan.layers if lp.type_name == "Linear")
    # the Conv1d holds a weight matrix too (and never runs): in the plan, with the reason
    assert plan.layer("conv").reason.startswith("its forward never runs")
    plan = ts.plan(zoo, "svd", None, x, rank=2)
    assert [lp.fqn for lp in plan.compressed_layers] == [
        "block.inner.0",
        "block.inner.2",
        "heads.a",
        "heads.tied",
        "stack.0",
    ]
    small = ts.apply(zoo, plan)
    assert small.heads["tied"] is small.stack[1]
    assert isinstance(small.stack[1], LowRankLinear)
    assert small.stack[1].down.weight.dtype == DOUBLE and not small.training
    assert small(x).shape == (3, 6)


class WithAttention(nn.Module):
    """Linear → MultiheadAttention → Linear; both outer Linears have exactly low rank."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Linear(8, 16, dtype=DOUBLE)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, dtype=DOUBLE)
        self.head = nn.Linear(16, 4, dtype=DOUBLE)
        with torch.no_grad():
            # made in float64: a float32 product would carry rank-filling rounding noise
            for layer, rank in ((self.embed, 3), (self.head, 2)):
                out_f, in_f = layer.weight.shape
                a = torch.randn(out_f, rank, generator=g, dtype=DOUBLE)
                layer.weight.copy_(a @ torch.randn(rank, in_f, generator=g, dtype=DOUBLE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out)


def test_multihead_attention_is_one_plan_entry_and_the_rest_matches() -> None:
    torch.manual_seed(0)
    model = WithAttention().eval()
    x = torch.randn(2, 5, 8, dtype=DOUBLE)
    plan = ts.plan(model, "svd", None, x, energy=1.0)
    names = [lp.fqn for lp in plan.layers]
    assert "attn" in names and "attn.out_proj" not in names  # out_proj is part of the attention
    # keeping all the energy of random projections leaves nothing to factorize: kept dense
    assert plan.layer("attn").method is None
    assert plan.layer("embed").method == "svd" and plan.layer("embed").config["rank"] == 3
    assert plan.layer("head").method == "svd" and plan.layer("head").config["rank"] == 2
    small = ts.apply(model, plan)
    assert isinstance(small.embed, LowRankLinear) and isinstance(small.head, LowRankLinear)
    assert type(small.attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-9, atol=1e-9)
    # under a budget the whole attention (out_proj included) may be factorized
    budgeted = ts.plan(model, "svd", "flops=0.5", x)
    assert budgeted.layer("attn").method == "svd"
    assert isinstance(ts.apply(model, budgeted).attn, LowRankMultiheadAttention)


def test_plan_selects_a_shared_module_by_either_name(zoo: Zoo) -> None:
    x = torch.randn(3, 6)
    by_second = ts.plan(zoo, "svd", None, x, rank=2, layers=["stack.1"])
    assert [lp.fqn for lp in by_second.compressed_layers] == ["heads.tied"]
    excluded = ts.plan(zoo, "svd", None, x, rank=2, exclude=["stack.1"])
    assert "heads.tied" not in [lp.fqn for lp in excluded.compressed_layers]
    small = ts.apply(zoo, by_second)
    assert isinstance(small.stack[1], LowRankLinear) and small.stack[1] is small.heads["tied"]


def test_copy_structure_shares_tensors_and_never_changes_the_original() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).train()
    model[1].running_mean.fill_(0.5)
    copied = copy_structure(model).eval()
    assert model.training and model[0].training and not copied[0].training
    assert copied[0].weight is model[0].weight and copied[1].running_mean is model[1].running_mean
    replace_module(copied, "2", nn.Identity())
    assert isinstance(model[2], nn.ReLU) and isinstance(copied[2], nn.Identity)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        got = copied(x)  # conv → BatchNorm with the running statistics → identity
        want = (model[0](x) - 0.5) / torch.sqrt(torch.tensor(1.0 + model[1].eps))
        torch.testing.assert_close(
            got, want * model[1].weight[:, None, None] + model[1].bias[:, None, None]
        )
    model.eval()

    def last(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    converted = copy_structure(model, last)
    assert converted[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous() and converted[0].bias is model[0].bias
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))
    shared = nn.Linear(3, 3)
    tied = copy_structure(nn.Sequential(shared, shared))
    assert tied[0] is tied[1] and tied[0] is not shared


def test_copy_structure_converts_a_recurrent_layers_flat_weights() -> None:
    lstm = nn.LSTM(4, 5, batch_first=True)
    doubled = copy_structure(lstm, lambda t: t.double() if t.is_floating_point() else t)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(doubled(x.double())[0].float(), lstm(x)[0])
    assert lstm.weight_ih_l0.dtype == torch.float32
