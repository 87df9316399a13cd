"""Per-layer facts from one forward pass; parameter counts; inspect_model rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.inspect import inspect_model
from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info, count_params
from tensorslim.layers.lowrank import LowRankLinear


class Reuse(nn.Module):
    """One Linear applied twice, one never applied, one shared under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 2)
        self.alias = self.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.twice(self.twice(x)))


def test_count_params_counts_shared_parameters_once() -> None:
    model = Reuse()
    assert count_params(model) == 20 + 20 + 10
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 9


def test_layer_info_records_shapes_calls_and_unused_layers() -> None:
    model = Reuse().train()
    infos, never_called = collect_layer_info(model, torch.randn(1, 4))
    assert set(infos) == {"twice", "shared"}
    assert never_called == {"unused"}
    assert infos["twice"].calls == 2
    assert infos["twice"].flops == 2 * (2 * 4 * 4)
    assert infos["twice"].input_shape == (1, 4) and infos["twice"].output_shape == (1, 4)
    assert infos["shared"].params == 10 and infos["shared"].type_name == "Linear"
    assert model.training, "the mode must be restored"
    assert not model.twice._forward_hooks, "hooks must be removed"


def test_layer_info_does_not_look_inside_structured_layers(tiny_cnn, tiny_input) -> None:
    small = ts.apply(tiny_cnn, ts.plan(tiny_cnn, "svd", None, tiny_input, rank=2))
    infos, _ = collect_layer_info(small, tiny_input[:1])
    assert set(infos) == {"conv1", "conv2", "fc1", "fc2"}
    assert infos["fc1"].type_name == "LowRankLinear"
    assert infos["fc1"].flops == small.fc1.analytic_flops((1, 784))
    only_dense, _ = collect_layer_info(small, tiny_input[:1], types=COMPRESSIBLE)
    assert only_dense == {}


def test_inspect_model_rows(tiny_cnn, tiny_input) -> None:
    facts = inspect_model(tiny_cnn, tiny_input, latency=False)
    rows = {row["layer"]: row for row in facts["layers"]}
    assert list(rows) == ["conv1", "conv2", "fc1", "fc2"]
    assert rows["conv1"]["input"] == "1×14×14" and rows["conv1"]["output"] == "8×14×14"
    assert rows["fc1"]["params"] == 784 * 32 + 32
    assert rows["fc1"]["full_rank"] == 32 and rows["conv1"]["full_rank"] == 8
    assert 1 <= rows["fc1"]["rank@0.9"] <= 32
    assert abs(sum(r["flops_share"] for r in rows.values()) - 1.0) < 1e-9
    assert facts["total"]["params"] == count_params(tiny_cnn)
    assert "latency_ms" not in rows["fc1"] and "latency_ms" not in facts["total"]
    assert facts["never_called"] == []


def test_inspect_model_with_latency_and_an_unused_layer() -> None:
    facts = inspect_model(Reuse(), torch.randn(8, 4), latency=True)
    assert facts["never_called"] == ["unused"]
    assert all(row["latency_ms"] > 0 for row in facts["layers"])
    total = facts["total"]
    assert total["latency_ms"] > 0 and total["latency_batch"] == 8
    assert total["threads"] == torch.get_num_threads()


def test_inspect_model_of_a_compressed_model(tiny_cnn, tiny_input) -> None:
    small = ts.apply(tiny_cnn, ts.plan(tiny_cnn, "svd", None, tiny_input, rank=2, layers=["fc1"]))
    assert isinstance(small.fc1, LowRankLinear)
    facts = inspect_model(small, tiny_input, latency=False)
    assert [row["layer"] for row in facts["layers"]] == ["conv1", "conv2", "fc2"]


class Sequence(nn.Module):
    """Conv1d → LSTM → self-attention → Linear: every kind of layer a plan covers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.conv(x).transpose(1, 2))
        return self.head(self.attn(h, h, h)[0].mean(1))


def test_inspect_model_covers_conv1d_recurrent_and_attention_layers() -> None:
    torch.manual_seed(0)
    facts = inspect_model(Sequence().eval(), torch.randn(2, 3, 10), latency=True)
    rows = {row["layer"]: row for row in facts["layers"]}
    assert list(rows) == ["conv", "lstm", "attn", "head"]  # no attn.out_proj row of its own
    assert rows["lstm"]["full_rank"] == 12 and rows["attn"]["full_rank"] == 12
    assert rows["lstm"]["flops"] == 2 * 10 * (48 * 8 + 48 * 12)
    assert rows["attn"]["flops"] == 2 * 10 * 12 * 12 * 4
    assert all(row["latency_ms"] > 0 for row in rows.values())
    # the rest of the model's FLOPs: the attention products Q·Kᵀ and A·V, 2·2·(10·10·12)
    core = 1.0 - sum(r["flops_share"] for r in rows.values())
    assert core * facts["total"]["flops"] == pytest.approx(4 * 10 * 10 * 12)
