"""Tied weights: kept dense by default with the reason, shared exactly with tied='share', and
never silently untied by apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.layers.tied_embedding import FactoredEmbedding
from tensorslim.models.lstm_lm import TiedLSTMLanguageModel
from tensorslim.planner.ties import shared_parameters


def lstm_lm() -> nn.Module:
    torch.manual_seed(0)
    return TiedLSTMLanguageModel(vocab_size=200, dim=16, num_layers=1).eval()


IDS = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))


def test_shared_parameters_finds_the_tie_not_a_module_shared_by_name() -> None:
    model = lstm_lm()
    model.alias = model.decoder  # the same module twice is not a tie
    assert shared_parameters(model) == {"embedding": ["decoder"], "decoder": ["embedding"]}


@pytest.mark.parametrize("method", ["svd", "rpg", "tt"])
def test_tied_layers_stay_dense_by_default_and_the_model_never_grows(method: str) -> None:
    model = lstm_lm()
    plan = ts.plan(model, method, "params=0.5", IDS)
    decoder, embedding = plan.layer("decoder"), plan.layer("embedding")
    assert decoder.method is None and decoder.reason.startswith("weight tied with embedding")
    assert embedding.method is None and embedding.reason.startswith("weight tied with decoder")
    small = ts.apply(model, plan)
    assert count_params(small) <= count_params(model)
    assert small.decoder.weight is small.embedding.weight


def test_share_factors_the_head_and_the_embedding_together_exactly(tmp_path) -> None:
    model = lstm_lm()
    plan = ts.plan(model, "svd", None, IDS, tied="share", rank=4, layers=["decoder"])
    assert plan.layer("embedding").config == {"tied_to": "decoder", "share": "factors", "rank": 4}
    small = ts.apply(model, plan)
    head, table = small.decoder, small.embedding
    assert isinstance(head, LowRankLinear) and isinstance(table, FactoredEmbedding)
    assert table.table is head.up.weight and table.proj is head.down.weight  # one copy
    assert count_params(small) == plan.estimated_params < count_params(model)
    # the tie holds: the looked-up rows are the rows of the head's product
    torch.testing.assert_close(table.to_dense().weight, head.to_dense().weight)
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, lstm_lm()).eval()
    assert again.embedding.table is again.decoder.up.weight
    with torch.no_grad():
        assert torch.equal(again(IDS), small(IDS))


def test_share_at_full_rank_reproduces_the_tied_model() -> None:
    model = lstm_lm()
    plan = ts.plan(model, "svd", None, IDS, tied="share", rank=4, layers=["decoder"])
    plan.layer("decoder").config["rank"] = 16
    plan.layer("embedding").config["rank"] = 16
    with pytest.warns(UserWarning, match="its structured layers decoder hold more parameters"):
        small = ts.apply(model, plan)  # full rank r·(V + d) > V·d: said, not refused
    with torch.no_grad():
        torch.testing.assert_close(small(IDS), model(IDS), rtol=1e-4, atol=1e-5)


class TwinLinears(nn.Module):
    """Two Linear modules holding the same weight and bias (weight sharing across blocks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(24, 24), nn.Linear(24, 24)
        self.second.weight, self.second.bias = self.first.weight, self.first.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_share_gives_a_fully_shared_module_its_leaders_structure() -> None:
    model = TwinLinears()
    plan = ts.plan(model, "tt", "params=0.5", torch.randn(1, 24), tied="share")
    assert plan.layer("second").config == {"tied_to": "first", "share": "module"}
    small = ts.apply(model, plan)
    assert small.second is small.first
    assert count_params(small) == plan.estimated_params < count_params(model)


def test_apply_refuses_a_plan_that_unties_a_weight() -> None:
    model = lstm_lm()
    plan = ts.plan(model, "svd", None, IDS, tied="share", rank=4, layers=["decoder"])
    follower = plan.layer("embedding")
    follower.method, follower.config = None, {}  # an edited plan: the head alone
    with pytest.raises(TensorslimError, match=r"grows the model .*decoder \(tied with embedding"):
        ts.apply(model, plan)


def test_unknown_tied_mode_is_a_clear_error() -> None:
    with pytest.raises(TensorslimError, match="unknown tied='keep'"):
        ts.plan(lstm_lm(), "svd", None, IDS, tied="keep", rank=4)
