"""LowRankRNN: torch's RNN/LSTM/GRU outputs at full rank (every layout and state), its own
dense form at low rank, FLOPs as the counter sees them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import counted_flops
from tensorslim.analysis.flops import dense_layer_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.layers.recurrent import LowRankRNN

DOUBLE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
KINDS = {
    "lstm": lambda **kw: nn.LSTM(5, 6, **kw),
    "gru": lambda **kw: nn.GRU(5, 6, **kw),
    "rnn_tanh": lambda **kw: nn.RNN(5, 6, **kw),
    "rnn_relu": lambda **kw: nn.RNN(5, 6, nonlinearity="relu", **kw),
}


def assert_same(a, b) -> None:
    """Outputs of torch's module and ours: tensors, PackedSequences, (h, c) tuples."""
    if isinstance(a, tuple):
        assert type(a) is type(b) or isinstance(b, tuple)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif a is None:
        assert b is None
    else:
        torch.testing.assert_close(b, a, **TOL)


def make(kind: str, batch_first: bool, bidirectional: bool, layers: int = 2) -> nn.RNNBase:
    torch.manual_seed(0)
    return KINDS[kind](
        num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, dtype=DOUBLE
    )


def initial_state(module: nn.RNNBase, batch: int):
    h0 = torch.randn(module.num_layers * (2 if module.bidirectional else 1), batch, 6, dtype=DOUBLE)
    return (h0, torch.randn_like(h0)) if isinstance(module, nn.LSTM) else h0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_full_rank_reproduces_the_torch_module(
    kind: str, batch_first: bool, bidirectional: bool
) -> None:
    module = make(kind, batch_first, bidirectional)
    low = LowRankRNN.from_dense(module, 10**6)
    x = torch.randn(3, 4, 5, dtype=DOUBLE)  # (T, B) or (B, T)
    hx = initial_state(module, 3 if batch_first else 4)
    assert_same(module(x), low(x))
    assert_same(module(x, hx), low(x, hx))
    assert_same(module(x[0]), low(x[0]))  # unbatched (T, in)
    lengths = torch.tensor([4, 2, 3] if batch_first else [3, 1, 2, 3])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    (out, state), (low_out, low_state) = module(packed, hx), low(packed, hx)
    torch.testing.assert_close(low_out.data, out.data, **TOL)
    assert torch.equal(low_out.batch_sizes, out.batch_sizes)
    assert_same(state, low_state)


@pytest.mark.parametrize("kind", KINDS)
def test_low_rank_layer_is_its_dense_form_and_truncates_each_matrix(kind: str) -> None:
    module = make(kind, batch_first=True, bidirectional=True)
    low = LowRankRNN.from_dense(module, 2)
    assert all(isinstance(c.hh, LowRankLinear) and c.hh.rank == 2 for c in low.cells)
    x = torch.randn(2, 7, 5, dtype=DOUBLE)
    assert_same(low.to_dense()(x), low(x))
    # each gate matrix is its own best rank-2 approximation
    dense = low.to_dense()
    s = torch.linalg.svdvals(module.weight_hh_l1_reverse.detach())
    error = torch.linalg.matrix_norm(dense.weight_hh_l1_reverse - module.weight_hh_l1_reverse)
    torch.testing.assert_close(error, s[2:].pow(2).sum().sqrt())


@pytest.mark.parametrize("kind", KINDS)
def test_analytic_flops_match_the_counter(kind: str) -> None:
    module = KINDS[kind](num_layers=2, bidirectional=True)
    low = LowRankRNN.from_dense(module, 2)
    x = torch.randn(6, 3, 5)
    assert low.analytic_flops(tuple(x.shape)) == counted_flops(low, x)
    # torch's counter does not see the LSTM kernel: the analytic dense count is the reference
    expected = 2 * 6 * 3 * sum(w.numel() for n, w in module.named_parameters() if "weight" in n)
    assert dense_layer_flops(module, tuple(x.shape)) == expected
    if kind != "lstm":
        assert expected == counted_flops(module, x)


def test_training_mode_backpropagates_and_applies_dropout_between_layers() -> None:
    torch.manual_seed(1)
    module = nn.LSTM(5, 6, num_layers=2, dropout=0.5, batch_first=True)
    low = LowRankRNN.from_dense(module, 3).train()
    x = torch.randn(2, 4, 5)
    out, _ = low(x)
    out.sum().backward()
    assert all(p.grad is not None for p in low.parameters())
    low.eval()
    torch.testing.assert_close(low(x)[0], low(x)[0])  # no dropout in eval


def test_code_written_for_the_torch_module_keeps_working() -> None:
    module = nn.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True)
    low = LowRankRNN.from_dense(module, 2)
    low.flatten_parameters()  # LM code calls this before every forward
    for name in ("input_size", "hidden_size", "num_layers", "batch_first", "bidirectional"):
        assert getattr(low, name) == getattr(module, name)
    assert low.proj_size == 0 and low.mode == "LSTM"


def test_bad_input_and_unsupported_modules_are_clear_errors() -> None:
    low = LowRankRNN("GRU", 5, 6, 2)
    with pytest.raises(TensorslimError, match="initial hidden state"):
        low(torch.randn(3, 2, 5), torch.zeros(2, 2, 6))
    with pytest.raises(TensorslimError, match="takes"):
        low(torch.randn(5))
    with pytest.raises(TensorslimError, match="proj_size"):
        LowRankRNN.from_dense(nn.LSTM(5, 6, proj_size=3), 2)
    with pytest.raises(TensorslimError, match="positive integer"):
        LowRankRNN("LSTM", 5, 6, 0)
