"""LowRankMultiheadAttention: nn.MultiheadAttention's outputs at full rank for every option and
mask, its own dense form at low rank, projection FLOPs as the counter sees them."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from conftest import counted_flops
from tensorslim.analysis.flops import dense_layer_flops, fused_paths_disabled
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.lowrank import LowRankLinear

DOUBLE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
B, L, S, E, HEADS = 3, 4, 6, 8, 2
OPTIONS = list(itertools.product([False, True], repeat=4))  # batch_first, kdim/vdim, bias_kv, zero


def make(batch_first: bool, other_dims: bool, bias_kv: bool, zero: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    dims = {"kdim": 5, "vdim": 7} if other_dims else {}
    mha = nn.MultiheadAttention(
        E,
        HEADS,
        add_bias_kv=bias_kv,
        add_zero_attn=zero,
        batch_first=batch_first,
        dtype=DOUBLE,
        **dims,
    )
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    if bias_kv:
        nn.init.normal_(mha.bias_k)
        nn.init.normal_(mha.bias_v)
    return mha.eval()


def inputs(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    def seq(n: int, width: int) -> torch.Tensor:
        return torch.randn((B, n, width) if mha.batch_first else (n, B, width), dtype=DOUBLE)

    return seq(L, E), seq(S, mha.kdim), seq(S, mha.vdim)


def masks() -> list[dict]:
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    additive = torch.randn(L, S, dtype=DOUBLE)
    per_head = torch.randn(B * HEADS, L, S, dtype=DOUBLE)
    return [
        {},
        {"need_weights": False},
        {"average_attn_weights": False},
        {"key_padding_mask": padding},
        {"key_padding_mask": padding, "need_weights": False},
        {"attn_mask": additive},
        {"attn_mask": additive, "need_weights": False},
        {"attn_mask": additive > 0.5},
        {"attn_mask": per_head, "key_padding_mask": padding.to(DOUBLE) * -1e9},
        {"attn_mask": per_head, "need_weights": False},
    ]


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(b[0], a[0], **TOL)
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        torch.testing.assert_close(b[1], a[1], **TOL)


@pytest.mark.parametrize(("batch_first", "other_dims", "bias_kv", "zero"), OPTIONS)
def test_full_rank_reproduces_multihead_attention(
    batch_first: bool, other_dims: bool, bias_kv: bool, zero: bool
) -> None:
    mha = make(batch_first, other_dims, bias_kv, zero)
    low = LowRankMultiheadAttention.from_dense(mha, 10**6).eval()
    q, k, v = inputs(mha)
    for kwargs in masks():
        assert_same(mha(q, k, v, **kwargs), low(q, k, v, **kwargs))
    unbatched = (q[0], k[0], v[0]) if batch_first else (q[:, 0], k[:, 0], v[:, 0])
    assert_same(mha(*unbatched), low(*unbatched))
    low.train()
    mha.train()  # dropout 0: training mode computes the same
    assert_same(mha(q, k, v), low(q, k, v))


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_hint_is_handled_as_torch_does(need_weights: bool) -> None:
    mha = make(True, False, False, False)
    low = LowRankMultiheadAttention.from_dense(mha, 10**6).eval()
    x = torch.randn(B, L, E, dtype=DOUBLE)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=DOUBLE)
    kwargs = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    assert_same(mha(x, x, x, **kwargs), low(x, x, x, **kwargs))
    with pytest.raises(RuntimeError, match="is_causal"):
        low(x, x, x, is_causal=True)


def test_low_rank_attention_is_its_dense_form() -> None:
    mha = make(False, True, True, True)
    low = LowRankMultiheadAttention.from_dense(mha, 2)
    assert all(isinstance(getattr(low, p), LowRankLinear) for p in ("q_proj", "k_proj", "v_proj"))
    q, k, v = inputs(mha)
    dense = low.to_dense().eval()
    for kwargs in masks()[:4]:
        assert_same(dense(q, k, v, **kwargs), low.eval()(q, k, v, **kwargs))
    s = torch.linalg.svdvals(mha.k_proj_weight.detach())
    error = torch.linalg.matrix_norm(dense.k_proj_weight - mha.k_proj_weight)
    torch.testing.assert_close(error, s[2:].pow(2).sum().sqrt())


@pytest.mark.parametrize("need_weights", [False, True])
def test_projection_flops_match_the_counter(need_weights: bool) -> None:
    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=10).eval()
    low = LowRankMultiheadAttention.from_dense(mha, 3).eval()
    q, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 6), torch.randn(7, 2, 10)
    keys = (tuple(k.shape), tuple(v.shape))
    core = 2 * 2 * (2 * 4 * 5 * 7 * 4) if need_weights else 0  # Q Kᵀ and A V, seen via bmm only

    def counted(module: nn.Module) -> int:
        with fused_paths_disabled():
            return counted_flops(lambda *a: module(*a, need_weights=need_weights), q, k, v)

    assert counted(low) == low.analytic_flops(tuple(q.shape), keys) + core
    assert counted(mha) == dense_layer_flops(mha, tuple(q.shape), keys) + core
    expected = 2 * (10 * 16 * 16 * 2 + 14 * 16 * (6 + 10))
    assert dense_layer_flops(mha, tuple(q.shape), keys) == expected


def test_gradients_reach_every_factor() -> None:
    low = LowRankMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2, dropout=0.1), 2)
    x = torch.randn(4, 3, 8)
    low.train()(x, x, x)[0].sum().backward()
    assert all(p.grad is not None for p in low.parameters())
