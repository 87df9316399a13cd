"""nn.TransformerEncoder: attention and feed-forward layers compressed, torch's fused path kept off
the compressed layers (never crashed into), every weight holder in the plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.analysis.flops import count_flops
from tensorslim.planner.fastpath import unfused_path_hook


class Encoder(nn.Module):
    """Two encoder layers (width 32, 4 heads) and a Linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding))


def example(batch_first: bool) -> torch.Tensor:
    return torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["svd", "tt"])
def test_encoder_compresses_and_runs_in_eval_and_train(
    batch_first: bool, method: str, tmp_path
) -> None:
    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    x = example(batch_first)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    plan = ts.plan(model, method, "params=0.6", x)
    names = {lp.fqn for lp in plan.layers}
    for i in range(2):
        assert {f"encoder.layers.{i}.{p}" for p in ("self_attn", "linear1", "linear2")} <= names
    assert not any(n.endswith("out_proj") for n in names)  # part of its attention entry
    if method == "svd":
        assert plan.layer("encoder.layers.0.self_attn").method == "svd"
    else:
        assert "not a Linear" in plan.layer("encoder.layers.0.self_attn").reason
    assert plan.compressed_layers
    small = ts.apply(model, plan)
    with torch.no_grad():
        fused = small(x)  # eval, no grad: where torch would take its fused path
        masked = small(x, padding)
    small.train()  # dropout 0: the unfused training path computes the same
    torch.testing.assert_close(small(x), fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small(x, padding), masked, rtol=1e-5, atol=1e-5)
    small.eval()
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, Encoder(batch_first).eval())
    with torch.no_grad():
        assert torch.equal(again(x, padding), masked)


def test_only_encoder_layers_holding_compressed_layers_leave_the_fused_path() -> None:
    torch.manual_seed(1)
    model = Encoder(batch_first=True).eval()
    x = example(True)
    plan = ts.plan(model, "svd", example_input=x, rank=4, layers=["encoder.layers.1.linear1"])
    small = ts.apply(model, plan)
    first, second = small.encoder.layers
    assert unfused_path_hook not in first._forward_pre_hooks.values()  # dense: stays fused
    assert unfused_path_hook in second._forward_pre_hooks.values()
    assert not small.encoder.use_nested_tensor
    with torch.no_grad():
        reference = small.train()(x)
        torch.testing.assert_close(small.eval()(x), reference, rtol=1e-5, atol=1e-5)


class Decoder(nn.Module):
    """A decoder layer: self-attention on 5 target tokens, cross-attention on 9 memory tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.layer(*pair)


def test_cross_attention_is_priced_with_the_memory_length() -> None:
    torch.manual_seed(2)
    model = Decoder().eval()
    pair = (torch.randn(1, 5, 32), torch.randn(1, 9, 32))
    plan = ts.plan(model, "svd", example_input=pair, rank=4, forward_fn=lambda m, p: m(p))
    cross = plan.layer("layer.multihead_attn")
    # dense: q and out projections on 5 rows, k and v on 9 rows, 2·32·32 FLOPs per row each
    assert cross.flops_before == 2 * 32 * 32 * (5 + 9 + 9 + 5)
    assert cross.flops_after == 2 * 4 * 64 * (5 + 9 + 9 + 5)
    small = ts.apply(model, plan)
    dense_rest = plan.model_flops - sum(lp.flops_before for lp in plan.layers)
    expected = dense_rest + sum(lp.flops_after for lp in plan.layers)
    assert count_flops(small, pair, lambda m, p: m(p)) == expected
    assert torch.isfinite(small(pair)).all()


@pytest.mark.measured_latency
def test_attention_layers_are_timed_as_self_attention() -> None:
    """The default (timed) plan runs each attention layer and its low-rank variants on
    (x, x, x): called on x alone, MultiheadAttention's forward raised a TypeError."""
    torch.manual_seed(0)
    model = Encoder(batch_first=True).eval()
    plan = ts.plan(model, "svd", "params=0.6", example(True), layers=["encoder.layers.0.self_attn"])
    measured = plan.latency["measured_layers"]  # type: ignore[index]
    assert measured >= 1
    assert plan.layer("encoder.layers.0.self_attn").method in ("svd", None)
