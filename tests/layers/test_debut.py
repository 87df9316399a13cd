"""DeBut fast multiply and layers: equal to the dense product, gradients, conv, FLOPs, caching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer, dense_weight_error
from tensorslim.layers.debut import (
    DeButConv2d,
    DeButLinear,
    apply_factor,
    chain_dense,
    chain_dense_reference,
    chain_multiply,
    merge_weights,
    random_factor_weights,
)
from tensorslim.layers.debut_chain import (
    DeButChain,
    DeButFactor,
    Segment,
    chain_from_parts,
    generate_chains,
    merge_specs,
    plan_segments,
)

DT = torch.float64


def valid_triples(p: int, q: int) -> list[tuple[int, int, int]]:
    out = []
    for t in range(1, math.gcd(p, q) + 1):
        if p % t or q % t:
            continue
        for blocks in range(1, min(p, q) // t + 1):
            if (p // t) % blocks == 0 and (q // t) % blocks == 0:
                out.append((p // (t * blocks), q // (t * blocks), t))
    return out


@st.composite
def any_chains(draw: st.DrawFn) -> DeButChain:
    """Random valid chains: arbitrary factors (multi-path) or exact generated ones."""
    if draw(st.booleans()):
        rs = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
        ss = draw(st.lists(st.integers(1, 4), min_size=len(rs), max_size=len(rs)))
        return chain_from_parts(rs, ss)
    widths = draw(st.lists(st.integers(1, 24), min_size=2, max_size=5))
    factors = []
    for q, p in itertools.pairwise(widths):
        r, s, t = draw(st.sampled_from(valid_triples(p, q)))
        factors.append(DeButFactor(p, q, r, s, t))
    return DeButChain(tuple(factors))


def leaves(chain: DeButChain, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [w.requires_grad_(True) for w in random_factor_weights(chain, generator=gen, dtype=DT)]


def all_kernel_segments(chain: DeButChain, kernel: str) -> list[Segment]:
    """Every factor on its own, forced to ``kernel`` where it applies (bmm needs t = 1)."""
    return [
        Segment(k, k + 1, f, "bmm" if f.t == 1 else kernel, 0.0)
        for k, f in enumerate(chain.factors)
    ]


# ---------------------------------------------------------------------------- fast multiply


@settings(max_examples=30, deadline=None)
@given(any_chains(), st.integers(1, 9), st.sampled_from(["ew", "pbmm", "planned"]))
def test_fast_multiply_equals_dense_product_forward_and_gradients(
    chain: DeButChain, cols: int, kernel: str
) -> None:
    weights = leaves(chain, seed=cols)
    x = torch.randn(chain.in_features, cols, dtype=DT, requires_grad=True)
    seed_grad = torch.randn(chain.out_features, cols, dtype=DT)
    segments = (
        plan_segments(chain, cols) if kernel == "planned" else all_kernel_segments(chain, kernel)
    )
    fast = chain_multiply(chain.factors, weights, x, segments)
    grads_fast = torch.autograd.grad((fast * seed_grad).sum(), [x, *weights])

    ref_w = [w.detach().clone().requires_grad_(True) for w in weights]
    ref_x = x.detach().clone().requires_grad_(True)
    ref = chain_dense_reference(chain.factors, ref_w) @ ref_x
    grads_ref = torch.autograd.grad((ref * seed_grad).sum(), [ref_x, *ref_w])

    torch.testing.assert_close(fast, ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.data())
def test_merged_weights_are_the_product_of_exact_neighbours(
    rs: list[int], data: st.DataObject
) -> None:
    ss = data.draw(st.lists(st.integers(1, 4), min_size=len(rs), max_size=len(rs)))
    chain = chain_from_parts(rs, ss)
    weights = leaves(chain, seed=len(rs))
    merged = merge_specs(chain.factors)
    m = merge_weights(chain.factors, weights)
    torch.testing.assert_close(merged.dense(m), chain_dense_reference(chain.factors, weights))


def test_first_factor_reads_a_transposed_input_without_copy() -> None:
    # the Linear path hands the first factor x.t(): a strided view; the result must not change
    chain = DeButChain.parse("8 12 2 3 1  8 8 2 2 2  8 8 2 2 4")
    weights = leaves(chain, seed=1)
    rows = torch.randn(5, 12, dtype=DT)
    out = chain_multiply(chain.factors, weights, rows.t())
    torch.testing.assert_close(out, chain_dense(chain.factors, weights) @ rows.t())


def test_unknown_kernel_is_an_error() -> None:
    f = DeButFactor(4, 4, 2, 2, 2)
    with pytest.raises(TensorslimError, match="kernel"):
        apply_factor(f, torch.zeros(f.weight_shape), torch.zeros(4, 3), kernel="fft")


# ---------------------------------------------------------------------------- layers

CHAIN_12_18 = "12 18 2 3 1  12 12 2 2 2  12 12 3 3 4"


def test_linear_matches_its_dense_equivalent_and_counts() -> None:
    layer = DeButLinear(18, 12, CHAIN_12_18).double()
    assert isinstance(layer, StructuredLayer)
    x = torch.randn(3, 5, 18, dtype=DT)
    dense = layer.to_dense()
    torch.testing.assert_close(layer(x), dense(x))
    chain = DeButChain.parse(CHAIN_12_18)
    assert layer.analytic_params() == chain.nnz + 12 == sum(p.numel() for p in layer.parameters())
    assert layer.analytic_flops((3, 5, 18)) == 2 * 15 * chain.nnz
    assert layer.config()["chain"] == chain.text
    assert [k for k in layer.state_dict() if k.startswith("core.factors")] == [
        f"core.factors.{k}" for k in range(3)
    ]
    no_bias = DeButLinear(18, 12, CHAIN_12_18, bias=False).double()
    torch.testing.assert_close(no_bias(x[0]), no_bias.to_dense()(x[0]))


def test_linear_rejects_bad_chains_and_inputs() -> None:
    with pytest.raises(TensorslimError, match="first q must be 18"):
        DeButLinear(18, 12, "12 16 3 4 1")
    with pytest.raises(TensorslimError, match="not qualified"):
        DeButLinear(18, 12, "12 18 2 3 1")
    layer = DeButLinear(18, 12, CHAIN_12_18)
    with pytest.raises(TensorslimError, match="18 features"):
        layer(torch.zeros(2, 17))


def test_random_init_is_variance_preserving() -> None:
    chain = generate_chains(256, 256, ratio=8, limit=1)[0].chain
    layer = DeButLinear(256, 256, chain, bias=False)
    with torch.no_grad():
        y = layer(torch.randn(2048, 256))
    assert 0.8 < float(y.var()) < 1.25


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((3, 3), 1, 1, 1),
        ((3, 3), 2, 0, 1),
        ((3, 2), (1, 2), (2, 1), (2, 1)),
        ((3, 3), 1, "same", 2),
        ((2, 2), 1, "same", 1),
        ((1, 1), 1, "valid", 1),
    ],
)
def test_conv_equals_conv2d_with_its_dense_kernel(
    kernel: tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
) -> None:
    c_in, c_out = 4, 6
    fan_in = c_in * kernel[0] * kernel[1]
    chain = generate_chains(c_out, fan_in, limit=1, max_width=4 * fan_in)[0].chain
    layer = DeButConv2d(c_in, c_out, kernel, chain, stride, padding, dilation).double()
    x = torch.randn(2, c_in, 9, 8, dtype=DT)
    dense = layer.to_dense()
    expected = F.conv2d(x, dense.weight, dense.bias, dense.stride, dense.padding, dense.dilation)
    torch.testing.assert_close(layer(x), expected)
    assert (
        layer.analytic_flops(tuple(x.shape))
        == 2 * expected.shape[0] * math.prod(expected.shape[2:]) * chain.nnz
    )


def test_conv_rejects_grouped_and_bad_input() -> None:
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(TensorslimError, match="grouped"):
        DeButConv2d.from_dense(grouped, "4 18 1 18 1", init="random")
    layer = DeButConv2d(2, 4, 3, generate_chains(4, 18, limit=1)[0].chain)
    with pytest.raises(TensorslimError, match=r"\(N, 2, H, W\)"):
        layer(torch.zeros(1, 3, 5, 5))


def test_from_dense_reproduces_a_weight_that_is_a_chain_product() -> None:
    chain = DeButChain.parse(CHAIN_12_18)
    source = DeButLinear(18, 12, chain).double()
    dense = source.to_dense()
    fitted = DeButLinear.from_dense(dense, chain, init="als", sweeps=3)
    assert dense_weight_error(dense, fitted) < 1e-8
    assert fitted.config()["init"]["method"] == "als"
    x = torch.randn(4, 18, dtype=DT)
    torch.testing.assert_close(fitted(x), dense(x))
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    conv_chain = generate_chains(4, 18, limit=1)[0].chain
    for init in ("als", "grad", "random"):
        made = DeButConv2d.from_dense(conv, conv_chain, init=init, sweeps=2, steps=20)
        assert made.bias is not None and torch.equal(made.bias, conv.bias)
        assert made.config()["init"]["method"] == init


def test_analytic_flops_match_the_flop_counter_where_it_sees_the_work() -> None:
    # with every factor run as a batched matmul (t = 1 factors, or the regrouped "pbmm" kernel)
    # FlopCounterMode sees all multiply-adds and must agree with 2·cols·Σ p s
    chain = DeButChain.parse("6 6 3 3 1  6 6 2 2 1  6 6 3 3 1")  # all t = 1
    layer = DeButLinear(6, 6, chain).double()
    layer.core.fuse = False
    x = torch.randn(7, 6, dtype=DT)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == layer.analytic_flops(tuple(x.shape))

    butterfly = DeButChain.parse("16 16 2 2 1  16 16 2 2 2  16 16 2 2 4  16 16 2 2 8")
    weights = leaves(butterfly, seed=3)
    cols = torch.randn(16, 11, dtype=DT)
    with FlopCounterMode(display=False) as counter:
        chain_multiply(butterfly.factors, weights, cols, all_kernel_segments(butterfly, "pbmm"))
    assert counter.get_total_flops() == butterfly.flops(11)


def test_inference_cache_follows_parameter_updates() -> None:
    chain = DeButChain.parse("16 16 4 4 1  16 16 4 4 4")  # merges into one 16×16 factor
    layer = DeButLinear(16, 16, chain).double()
    x = torch.randn(64, 16, dtype=DT)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, layer.to_dense()(x))
        layer.core.factors[1].mul_(2.0)  # in-place update bumps the version counter
        second = layer(x)
    torch.testing.assert_close(second - layer.bias, 2.0 * (first - layer.bias))


def test_training_step_reaches_every_factor() -> None:
    chain = generate_chains(32, 48, ratio=3, limit=1)[0].chain
    layer = DeButLinear(48, 32, chain)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.core.factors]
    loss = layer(torch.randn(128, 48)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.core.factors)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, layer.core.factors, strict=True))


@pytest.mark.slow
def test_compiled_multiply_matches_eager_forward_and_backward() -> None:
    chain = DeButChain.parse("16 16 2 2 1  16 16 2 2 2  16 16 2 2 4  16 16 2 2 8")
    eager = DeButLinear(16, 16, chain)
    compiled = DeButLinear(16, 16, chain)
    compiled.load_state_dict(eager.state_dict())
    compiled.core.use_compile = True
    x = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for layer in (eager, compiled):
        layer(x).pow(2).sum().backward()
    assert not compiled.core._compile_failed
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
