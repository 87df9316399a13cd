"""Planning an LSTM language model: the LSTM is one plan entry, priced and compressed honestly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.errors import TensorslimError
from tensorslim.layers.recurrent import LowRankRNN


class LSTMLanguageModel(nn.Module):
    """Embedding → 2-layer LSTM → GRU → Linear decoder over the vocabulary."""

    def __init__(self, vocab: int = 60, width: int = 32, packed: bool = False) -> None:
        super().__init__()
        self.packed = packed
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, 48, num_layers=2, batch_first=True)
        self.gru = nn.GRU(48, 40, batch_first=True, bidirectional=True)
        self.decoder = nn.Linear(80, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.packed:  # lengths decreasing over the batch: each row one token shorter
            lengths = torch.arange(ids.shape[1], ids.shape[1] - ids.shape[0], -1).clamp_min(1)
            h, _ = self.lstm(pack_padded_sequence(h, lengths, batch_first=True))
            h = pad_packed_sequence(h, batch_first=True, total_length=ids.shape[1])[0]
        else:
            h, _ = self.lstm(h)
        return self.decoder(self.gru(h)[0])


def test_lstm_language_model_plans_applies_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel().eval()
    ids = torch.randint(0, 60, (3, 10))
    plan = ts.plan(model, "svd", "params=0.5", ids)
    by_name = {lp.fqn: lp for lp in plan.layers}
    assert set(by_name) == {"embed", "lstm", "gru", "decoder"}
    assert by_name["lstm"].method == "svd" and by_name["gru"].method == "svd"
    small = ts.apply(model, plan)
    assert isinstance(small.lstm, LowRankRNN) and isinstance(small.gru, LowRankRNN)
    params = sum(p.numel() for p in small.parameters())
    assert params == plan.estimated_params <= 0.5 * plan.model_params + 1
    # the counter does not see torch's LSTM kernel; the plan's FLOPs are still the real ones
    dense_rest = plan.model_flops - sum(lp.flops_before for lp in plan.layers)
    assert count_flops(small, ids[:1]) == dense_rest + sum(lp.flops_after for lp in plan.layers)
    assert count_flops(model, ids[:1]) == plan.model_flops > 0
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, LSTMLanguageModel().eval())
    assert torch.equal(again(ids), small(ids))


def test_packed_sequences_are_seen_and_compressed() -> None:
    torch.manual_seed(1)
    model = LSTMLanguageModel(packed=True).eval()
    ids = torch.randint(0, 60, (3, 8))
    plan = ts.plan(model, "svd", example_input=ids, rank=6)
    lstm = plan.layer("lstm")
    assert lstm.method == "svd" and lstm.input_shape == [8, 32]  # packed rows × features
    small = ts.apply(model, plan)
    # the packed path of the low-rank LSTM is torch's LSTM with the truncated weights
    reference = ts.apply(model, plan)
    reference.lstm = small.lstm.to_dense()
    torch.testing.assert_close(small(ids), reference(ids), rtol=1e-5, atol=1e-6)


def test_calibrated_plan_keeps_weight_errors_for_recurrent_layers() -> None:
    torch.manual_seed(2)
    model = LSTMLanguageModel().eval()
    batches = [(torch.randint(0, 60, (4, 10)), torch.zeros(4)) for _ in range(2)]
    plan = ts.plan(model, "svd", "flops=0.5", calibration=batches)
    assert plan.error_space == "output"  # the decoder's error is measured on the data
    assert plan.layer("lstm").method == "svd" or plan.layer("gru").method == "svd"
    assert any("lstm, gru have no single input Gram" in note for note in plan.notes)
    assert torch.isfinite(ts.apply(model, plan)(batches[0][0])).all()


def test_a_nan_in_a_gate_matrix_is_an_error_naming_the_layer() -> None:
    model = LSTMLanguageModel().eval()
    with torch.no_grad():
        model.lstm.weight_hh_l1[0, 0] = float("nan")
    with pytest.raises(TensorslimError, match="layer lstm: its weight holds 1 NaN"):
        ts.plan(model, "svd", "params=0.5", torch.randint(0, 60, (1, 5)))
