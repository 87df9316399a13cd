"""The svd method on recurrent layers: every option states what build makes; rules; skeletons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import counted_flops
from tensorslim.facts import LayerInfo
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.layers.recurrent import LowRankRNN
from tensorslim.methods.svd import SVDMethod

RECURRENT = {
    "lstm": lambda: nn.LSTM(12, 16, num_layers=2, batch_first=True),
    "gru": lambda: nn.GRU(12, 16, bidirectional=True),
    "rnn": lambda: nn.RNN(12, 16),
}


def info_for(module: nn.Module, shape: tuple[int, ...]) -> LayerInfo:
    params = sum(p.numel() for p in module.parameters())
    return LayerInfo("rnn", type(module).__name__, shape, shape, params, 0)


@pytest.mark.parametrize("kind", RECURRENT)
def test_every_option_states_the_cost_and_error_of_what_build_makes(kind: str) -> None:
    torch.manual_seed(0)
    module = RECURRENT[kind]()
    x = torch.randn(2, 5, 12)
    info = info_for(module, tuple(x.shape))
    options = SVDMethod().candidates(module, info)
    assert options and all(o.params < info.params for o in options[:-1])
    weights = [w.detach() for n, w in module.named_parameters() if n.startswith("weight")]
    for option in options[:: max(1, len(options) // 4)]:
        built = SVDMethod().build(module, option.config, info)
        assert isinstance(built, LowRankRNN)
        assert option.params == sum(p.numel() for p in built.parameters())
        assert option.flops == built.analytic_flops(tuple(x.shape)) == counted_flops(built, x)
        dense = built.to_dense()
        approx = [w.detach() for n, w in dense.named_parameters() if n.startswith("weight")]
        error = torch.sqrt(
            sum((a - w).pow(2).sum() for a, w in zip(approx, weights, strict=True))
            / sum(w.pow(2).sum() for w in weights)
        )
        assert option.error == pytest.approx(float(error), rel=1e-4, abs=1e-6)


def test_ranks_stop_where_no_matrix_factorization_pays() -> None:
    module = nn.LSTM(12, 16)  # W_ih 64×12 pays up to rank 10, W_hh 64×16 up to rank 12
    options = SVDMethod().candidates(module, info_for(module, (3, 1, 12)))
    assert max(o.config["rank"] for o in options) == 12
    built = SVDMethod().build(module, {"rank": 11}, None)
    assert not isinstance(built.cells[0].ih, LowRankLinear)  # rank 11 does not pay for W_ih
    assert isinstance(built.cells[0].hh, LowRankLinear)


def test_per_layer_rules_choose_one_rank() -> None:
    module = nn.GRU(12, 16)
    info = info_for(module, (3, 1, 12))
    assert [o.config["rank"] for o in SVDMethod(rank=4).candidates(module, info)] == [4]
    assert [o.config["rank"] for o in SVDMethod(ratio=0.5).candidates(module, info)] == [8]
    (energy,) = SVDMethod(energy=0.5).candidates(module, info)
    assert 1 <= energy.config["rank"] <= 12


@pytest.mark.parametrize("kind", RECURRENT)
def test_build_without_init_makes_the_same_structure(kind: str) -> None:
    module = RECURRENT[kind]()
    full = SVDMethod().build(module, {"rank": 3}, None, init=True)
    skeleton = SVDMethod().build(module, {"rank": 3}, None, init=False)
    assert {k: v.shape for k, v in full.state_dict().items()} == {
        k: v.shape for k, v in skeleton.state_dict().items()
    }
    skeleton.load_state_dict(full.state_dict())
    x = torch.randn(4, 2, 12)
    assert torch.equal(skeleton(x)[0], full(x)[0])


def test_unsupported_recurrent_layers_say_why() -> None:
    assert "proj_size" in SVDMethod().supports(nn.LSTM(4, 8, proj_size=2), "rnn")
    assert SVDMethod().supports(nn.GRU(4, 8), "rnn") is None


def test_attention_options_state_the_cost_and_error_of_what_build_makes() -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, add_bias_kv=True)
    q, k, v = torch.randn(5, 1, 16), torch.randn(7, 1, 6), torch.randn(7, 1, 10)
    keys = (tuple(k.shape), tuple(v.shape))
    params = sum(p.numel() for p in mha.parameters())
    shape = tuple(q.shape)
    info = LayerInfo("attn", "MultiheadAttention", shape, shape, params, 0, 1, keys)
    options = SVDMethod().candidates(mha, info)
    assert max(o.config["rank"] for o in options) == 7  # W_q, W_o (16×16) pay up to rank 7
    names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    weights = [*(getattr(mha, n) for n in names), mha.out_proj.weight]
    for option in options:
        built = SVDMethod().build(mha, option.config, info)
        assert isinstance(built, LowRankMultiheadAttention)
        assert option.params == sum(p.numel() for p in built.parameters())
        assert option.flops == built.analytic_flops(tuple(q.shape), keys)
        dense = built.to_dense()
        approx = [*(getattr(dense, n) for n in names), dense.out_proj.weight]
        with torch.no_grad():
            lost = sum((a - w).pow(2).sum() for a, w in zip(approx, weights, strict=True))
            error = torch.sqrt(lost / sum(w.pow(2).sum() for w in weights))
        assert option.error == pytest.approx(float(error), rel=1e-4, abs=1e-6)
    skeleton = SVDMethod().build(mha, {"rank": 3}, info, init=False)
    skeleton.load_state_dict(SVDMethod().build(mha, {"rank": 3}, info).state_dict())
