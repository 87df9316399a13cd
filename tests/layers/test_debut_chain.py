"""DeBut factor and chain specs: rules, patterns, qualification, text form, generation, plans."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslim.errors import TensorslimError
from tensorslim.layers.debut_chain import (
    DeButChain,
    DeButFactor,
    _unreachable,
    chain_from_parts,
    exact_pair,
    generate_chains,
    merge_specs,
    plan_segments,
)

VGG = (
    "2048 2304 8 9 1  2048 2048 2 2 8  2048 2048 2 2 16  2048 2048 2 2 32  "
    "1024 2048 2 4 64  512 1024 2 4 128  512 512 2 2 256"
)


def valid_triples(p: int, q: int, limit: int = 12) -> list[tuple[int, int, int]]:
    """Every (r, s, t) that makes (p, q, r, s, t) a valid factor."""
    out = []
    for t in range(1, math.gcd(p, q) + 1):
        if p % t or q % t:
            continue
        for blocks in range(1, min(p, q) // t + 1):
            if (p // t) % blocks or (q // t) % blocks:
                continue
            r, s = p // (t * blocks), q // (t * blocks)
            if r <= limit and s <= limit:
                out.append((r, s, t))
    return out


@st.composite
def random_chains(draw: st.DrawFn, max_width: int = 24, max_factors: int = 4) -> DeButChain:
    """Random valid (not necessarily qualified) chains over small widths."""
    widths = draw(st.lists(st.integers(1, max_width), min_size=2, max_size=max_factors + 1))
    factors = []
    for q, p in itertools.pairwise(widths):
        triples = valid_triples(p, q, limit=max_width)
        r, s, t = draw(st.sampled_from(triples))
        factors.append(DeButFactor(p, q, r, s, t))
    return DeButChain(tuple(factors))


def direct_pattern(f: DeButFactor) -> torch.Tensor:
    """Block diagonal of B blocks, each an r×s grid of t×t identity matrices."""
    block = torch.kron(torch.ones(f.r, f.s), torch.eye(f.t))
    return torch.block_diag(*[block] * f.blocks).bool()


def reaches(chain: DeButChain, out: int, inp: int) -> bool:
    """Whether output ``out`` reaches input ``inp`` through the patterns (one row at a time)."""
    row = chain[-1].pattern()[out].double()
    for f in reversed(chain.factors[:-1]):
        row = row @ f.pattern().double()
    return bool(row[inp] > 0)


def product_pattern(chain: DeButChain) -> torch.Tensor:
    out = chain[0].pattern().double()
    for f in chain.factors[1:]:
        out = f.pattern().double() @ out
    return out > 0


# ---------------------------------------------------------------------------- factors


@pytest.mark.parametrize(
    ("numbers", "rule"),
    [
        ((10, 8, 3, 2, 1), "p % (r·t)"),
        ((8, 9, 2, 2, 1), "q % (s·t)"),
        ((8, 8, 2, 4, 1), "p/(r·t) == q/(s·t)"),
        ((8, 8, 0, 2, 1), "positive integer"),
        ((8, 8, 2, 2, -1), "positive integer"),
    ],
)
def test_factor_rules_are_checked(numbers: tuple[int, ...], rule: str) -> None:
    with pytest.raises(TensorslimError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        DeButFactor(*numbers)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_pattern_and_nonzeros_match_direct_construction(
    p: int, q: int, data: st.DataObject
) -> None:
    r, s, t = data.draw(st.sampled_from(valid_triples(p, q, limit=30)))
    f = DeButFactor(p, q, r, s, t)
    pattern = f.pattern()
    assert torch.equal(pattern, direct_pattern(f))
    assert int(pattern.sum()) == f.nnz == p * s
    assert torch.equal(pattern.sum(1), torch.full((p,), s))  # s per row
    assert torch.equal(pattern.sum(0), torch.full((q,), r))  # r per column
    # stored values land exactly on the pattern, at the documented positions
    values = torch.arange(1, f.nnz + 1, dtype=torch.float64).reshape(f.weight_shape)
    dense = f.dense(values)
    assert torch.equal(dense != 0, pattern)
    b, i, j, d = (x - 1 for x in f.weight_shape)
    row, col = b * r * t + i * t + d, b * s * t + j * t + d
    assert dense[row, col] == values[b, i, j, d]


def test_dense_rejects_wrong_value_shape() -> None:
    with pytest.raises(TensorslimError, match="shape"):
        DeButFactor(4, 4, 2, 2, 1).dense(torch.zeros(3))


def test_transpose_spec_matches_transposed_matrix() -> None:
    f = DeButFactor(12, 18, 2, 3, 2)
    values = torch.randn(f.weight_shape, dtype=torch.float64)
    assert torch.equal(f.transpose().dense(values.transpose(1, 2)), f.dense(values).T)


# ---------------------------------------------------------------------------- chains


def test_text_round_trip_and_properties() -> None:
    chain = DeButChain.parse(VGG)
    assert chain.text == VGG
    assert DeButChain.parse(chain.text) == chain
    assert DeButChain.parse("[2048, 2304, 8, 9, 1]").factors[0] == chain[0]
    assert (chain.in_features, chain.out_features, len(chain)) == (2304, 512, 7)
    assert chain.nnz == 37888
    assert chain.flops(3) == 2 * 3 * 37888
    assert chain.compression == pytest.approx(2304 * 512 / 37888)  # the paper's 31×
    assert chain.kind == "monotonic"
    assert chain.single_path


def test_chain_errors_name_the_factor_and_rule() -> None:
    with pytest.raises(TensorslimError, match=r"factor 1 .*q_\(k\+1\) = p_k"):
        DeButChain.parse("8 8 2 2 1  6 6 3 3 1")
    with pytest.raises(TensorslimError, match=r"factor 2 \(8 8 3 2 1\).*p % \(r·t\)"):
        DeButChain.parse("8 8 2 2 1  8 8 2 2 2  8 8 3 2 1")
    with pytest.raises(TensorslimError, match="five integers"):
        DeButChain.parse("8 8 2 2")
    with pytest.raises(TensorslimError, match="'x'"):
        DeButChain.parse("8 8 2 2 x")
    with pytest.raises(TensorslimError, match="2304 → 512 but the layer is 400 → 120"):
        DeButChain.parse(VGG).check_shape(120, 400)


def test_qualified_and_unqualified_chains() -> None:
    assert DeButChain.parse(VGG).qualified
    truncated = DeButChain.parse("2048 2304 8 9 1  2048 2048 2 2 8  2048 2048 2 2 16")
    pair = truncated.unreachable()
    assert pair is not None
    assert not reaches(truncated, *pair)
    assert reaches(truncated, pair[0], 0)
    with pytest.raises(TensorslimError, match="not qualified"):
        truncated.check_qualified()
    # a single dense block is qualified, two 2×2 blocks are not
    assert DeButChain.parse("4 4 4 4 1").qualified
    assert not DeButChain.parse("4 4 2 2 1").qualified


@settings(max_examples=60, deadline=None)
@given(random_chains())
def test_qualification_agrees_with_dense_product_of_patterns(chain: DeButChain) -> None:
    full = bool(product_pattern(chain).all())
    assert chain.qualified == full
    if not full:
        assert not bool(product_pattern(chain)[chain.unreachable()])


def test_kind_classification() -> None:
    assert DeButChain.parse("8 4 2 1 1  16 8 2 1 2").kind == "monotonic"
    assert DeButChain.parse("8 4 2 1 1  4 8 1 2 2").kind == "bulging"
    assert DeButChain.parse("2 4 1 2 1  4 2 2 1 1").kind == "other"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.data())
def test_exact_merge_pattern_is_product_pattern(rs: list[int], data: st.DataObject) -> None:
    ss = data.draw(st.lists(st.integers(1, 4), min_size=len(rs), max_size=len(rs)))
    chain = chain_from_parts(rs, ss)
    assert all(exact_pair(a, b) for a, b in zip(chain.factors[:-1], chain.factors[1:], strict=True))
    merged = merge_specs(chain.factors)
    assert torch.equal(merged.pattern(), product_pattern(chain))
    assert chain.qualified  # t_1 = 1 and one final block: every exact generated chain qualifies


def test_merge_of_inexact_neighbours_is_refused() -> None:
    with pytest.raises(TensorslimError, match="do not merge exactly"):
        merge_specs((DeButFactor(8, 8, 2, 2, 1), DeButFactor(8, 8, 2, 2, 1)))


def test_plan_segments_cover_the_chain() -> None:
    chain = DeButChain.parse(VGG)
    for cols in (1, 64, 1024, 8192):
        segments = plan_segments(chain, cols)
        assert segments[0].start == 0 and segments[-1].stop == len(chain)
        for a, b in itertools.pairwise(segments):
            assert a.stop == b.start
        for seg in segments:
            assert seg.spec == merge_specs(chain.factors[seg.start : seg.stop])
            assert seg.kernel in (("bmm",) if seg.spec.t == 1 else ("ew", "pbmm"))


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("out", "inp", "ratio"),
    [(512, 2304, 8), (120, 400, 4), (16, 150, 2), (84, 120, 3), (10, 84, 2), (12, 18, 1.5)],
)
def test_generated_chains_are_qualified_and_report_their_costs(
    out: int, inp: int, ratio: float
) -> None:
    found = generate_chains(out, inp, ratio=ratio, limit=5)
    assert found
    for cand in found:
        chain = cand.chain
        assert (chain.out_features, chain.in_features) == (out, inp)
        assert chain.qualified
        # independent checks: the bitset search, and the dense product on small shapes
        assert _unreachable(chain.factors) is None
        if out * inp <= 50_000:
            assert bool(product_pattern(chain).all())
        assert cand.nnz == chain.nnz == sum(f.p * f.s for f in chain)
        assert cand.flops_per_row == 2 * cand.nnz
        assert cand.compression == pytest.approx(out * inp / cand.nnz)
        assert min(chain.widths) >= min(out, inp)  # no low-rank bottleneck
    # the best is near the asked size (these shapes have chains within 25 %)
    assert abs(math.log(found[0].compression / ratio)) < math.log(1.25) or out * inp < 200


def test_generation_by_factors_kind_and_target() -> None:
    mono = generate_chains(256, 256, num_factors=4, kind="monotonic", limit=4)
    assert mono and all(c.chain.kind == "monotonic" and len(c.chain) == 4 for c in mono)
    bulge = generate_chains(64, 64, num_factors=3, kind="bulging", limit=4)
    assert bulge and all(c.chain.kind == "bulging" for c in bulge)
    target = generate_chains(1024, 1024, target_params=65536, num_factors=(3, 4), limit=3)
    assert all(3 <= len(c.chain) <= 4 for c in target)
    assert abs(target[0].nnz / 65536 - 1) <= 0.25
    with pytest.raises(TensorslimError, match="either target_params or ratio"):
        generate_chains(8, 8, ratio=2, target_params=10)
    with pytest.raises(TensorslimError, match="kind"):
        generate_chains(8, 8, kind="wavy")
    # primes leave no room inside the default width bound; the error says what to relax
    with pytest.raises(TensorslimError, match="max_width"):
        generate_chains(13, 7)
    wide = generate_chains(13, 7, max_width=91)
    assert wide and all(c.chain.qualified for c in wide)


def test_generator_prefers_fast_chains_within_the_target() -> None:
    found = generate_chains(1024, 1024, ratio=8, limit=6)
    costs = [c.est_cost_us for c in found if abs(math.log(c.nnz * 8 / 1024**2)) <= math.log(1.25)]
    assert costs == sorted(costs)
