"""Under a params budget, TT and DeBut never raise a transformer's FLOPs (the default cap of 1.0
drops every option costlier than its dense layer), and both fractions are reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops


class TinyTransformer(nn.Module):
    """Token embedding → 2 pre-norm blocks (single-head attention from Linear q/k/v/o, GELU MLP
    4×) → vocabulary head: the shapes where TT's cores cost more FLOPs than dense layers."""

    def __init__(self, vocab: int = 64, dim: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "q": nn.Linear(dim, dim),
                    "k": nn.Linear(dim, dim),
                    "v": nn.Linear(dim, dim),
                    "o": nn.Linear(dim, dim),
                    "norm2": nn.LayerNorm(dim),
                    "up": nn.Linear(dim, 4 * dim),
                    "down": nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            h = b["norm1"](x)
            att = torch.softmax(b["q"](h) @ b["k"](h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
            x = x + b["o"](att @ b["v"](h))
            x = x + b["down"](nn.functional.gelu(b["up"](b["norm2"](x))))
        return self.head(x)


@pytest.mark.parametrize("method", ["tt", "debut"])
def test_params_budget_keeps_flops_at_most_dense_on_a_transformer(method: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    ids = torch.randint(0, 64, (2, 16))
    plan = ts.plan(model, method, "params=0.5", ids)
    assert plan.compressed_layers
    for lp in plan.compressed_layers:
        assert lp.flops_after <= lp.flops_before, (lp.fqn, lp.label)
    fractions = plan.fractions
    assert fractions["flops"] <= 1.0 and fractions["params"] < 1.0
    assert f"FLOPs {fractions['flops']:.3f}" in plan.summary()
    assert f"params {fractions['params']:.3f}" in plan.summary()
    small = ts.apply(model, plan)
    assert count_flops(small, ids[:1]) <= count_flops(model, ids[:1])


def test_lifting_the_cap_lets_tt_raise_the_flops() -> None:
    # the guard above is the cap, not luck: with flops<=10, TT takes cores costlier than dense
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    ids = torch.randint(0, 64, (2, 16))
    lifted = ts.plan(model, "tt", "params=0.5,flops<=10", ids)
    assert lifted.fractions["flops"] > 1.0
    assert any(lp.flops_after > lp.flops_before for lp in lifted.compressed_layers)


def test_plan_json_and_report_rows_carry_both_fractions() -> None:
    from tensorslim.planner.records import CompressionPlan
    from tensorslim.report.run import SUMMARY_COLUMNS, summary_row

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    plan = ts.plan(model, "svd", "params=0.5", torch.randint(0, 64, (1, 8)))
    data = plan.to_dict()
    assert data["estimate"] == {
        "params_fraction": plan.fractions["params"],
        "flops_fraction": plan.fractions["flops"],
    }
    assert CompressionPlan.from_dict(data).to_dict() == data
    assert {"params_fraction", "flops_fraction"} <= set(SUMMARY_COLUMNS)
    result = {
        "method": "svd",
        "budget": {"params": 0.5},
        "compressed": {"params": 10, "flops": 20},
        "params_fraction": 0.25,
        "flops_fraction": 0.5,
    }
    row = summary_row(result)
    assert (row["params_fraction"], row["flops_fraction"]) == (0.25, 0.5)
