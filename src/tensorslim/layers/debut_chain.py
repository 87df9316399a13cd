"""Deformable butterfly (DeBut) factors and chains: specs, patterns, qualification, generation.

Lin et al., "Deformable Butterfly: A Highly Structured and Sparse Linear Transform" (NeurIPS
2021).

**Factor.** ``DeButFactor(p, q, r, s, t)`` is a p×q matrix that is block diagonal with
B = p/(r·t) = q/(s·t) blocks; each block is an r×s grid of t×t diagonal matrices. Entry (o, c)
can be nonzero iff

    o // (r·t) == c // (s·t)   (same block)   and   o % t == c % t   (same diagonal position),

so a factor has p·s nonzeros (s per row, r per column). The nonzeros are stored as a tensor of
shape (B, r, s, t): value ``[b, i, j, d]`` sits at row ``b·r·t + i·t + d`` and column
``b·s·t + j·t + d``. For a fixed (b, d) the r·s values form one dense r×s "channel" that maps
the inputs {b·s·t + j·t + d} to the outputs {b·r·t + i·t + d}.

**Chain.** Factors F_1, …, F_K, *input side first*: the weight is W = F_K ⋯ F_1 (out × in),
with q_1 = in, p_K = out and q_{k+1} = p_k. Text form: five integers per factor, input side
first, e.g. ``"2048 2304 8 9 1  2048 2048 2 2 8 ..."``. A chain is *qualified* when the product
of its 0/1 patterns has no zero entry (every output can reach every input). Multiply-adds per
input row: Σ_k p_k·s_k (= nonzeros), so FLOPs are 2·rows·Σ p_k s_k.

**Exact pairs and merging.** When t_{k+1} = r_k·t_k, the product F_{k+1}F_k is again a DeBut
factor (p_{k+1}, q_k, r_{k+1}r_k, s_{k+1}s_k, t_k) whose every nonzero is one product of a
nonzero of each (a single path), so merging exact neighbours is free of approximation and only
grows the nonzeros from p_k s_k + p_{k+1}s_{k+1} to p_{k+1}s_{k+1}s_k. A chain whose neighbours
are all exact has a single path per weight entry; with t_1 = 1 and p_K = Πr it is qualified.

**Generated chains** are exactly such chains: an ordered factorisation out = r_1⋯r_K and
in = s_1⋯s_K gives t_k = r_1⋯r_{k−1}, width p_k = (r_1⋯r_k)(s_{k+1}⋯s_K) and nonzeros
Σ_k (r_1⋯r_k)(s_k⋯s_K). Every (out, in) has them (parts may be 1), not only powers of two.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from tensorslim.errors import TensorslimError

# --------------------------------------------------------------------------------------------
# factors


def _factor_rule_violation(p: int, q: int, r: int, s: int, t: int) -> str | None:
    """The first DeBut rule that (p, q, r, s, t) breaks, or None."""
    for name, value in (("p", p), ("q", q), ("r", r), ("s", s), ("t", t)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            return f"{name}={value!r} must be a positive integer"
    if p % (r * t):
        return f"p={p} is not divisible by r·t={r * t} (rule p % (r·t) == 0)"
    if q % (s * t):
        return f"q={q} is not divisible by s·t={s * t} (rule q % (s·t) == 0)"
    if p // (r * t) != q // (s * t):
        return (
            f"p/(r·t)={p // (r * t)} blocks differ from q/(s·t)={q // (s * t)} blocks "
            "(rule p/(r·t) == q/(s·t))"
        )
    return None


@dataclass(frozen=True)
class DeButFactor:
    """One DeBut factor (p, q, r, s, t): p×q, B = p/(r·t) blocks of r×s grids of t×t diagonals."""

    p: int
    q: int
    r: int
    s: int
    t: int

    def __post_init__(self) -> None:
        problem = _factor_rule_violation(self.p, self.q, self.r, self.s, self.t)
        if problem is not None:
            raise TensorslimError(f"DeBut factor ({self.text}): {problem}")
        for name in ("p", "q", "r", "s", "t"):  # numpy ints → int, so JSON and hashing agree
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def text(self) -> str:
        return f"{self.p} {self.q} {self.r} {self.s} {self.t}"

    @property
    def blocks(self) -> int:
        """B = p/(r·t) = q/(s·t)."""
        return self.p // (self.r * self.t)

    @property
    def nnz(self) -> int:
        """Nonzeros p·s (= multiply-adds per input row)."""
        return self.p * self.s

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """Storage shape of the nonzeros: (block, row-in-grid, col-in-grid, diagonal index)."""
        return (self.blocks, self.r, self.s, self.t)

    def transpose(self) -> DeButFactor:
        """The spec of Fᵀ: (q, p, s, r, t); its nonzeros are ``w.transpose(1, 2)``."""
        return DeButFactor(self.q, self.p, self.s, self.r, self.t)

    def indices(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of every stored nonzero, each of shape (B, r, s, t)."""
        b = torch.arange(self.blocks, device=device).view(-1, 1, 1, 1)
        i = torch.arange(self.r, device=device).view(1, -1, 1, 1)
        j = torch.arange(self.s, device=device).view(1, 1, -1, 1)
        d = torch.arange(self.t, device=device).view(1, 1, 1, -1)
        rows = b * (self.r * self.t) + i * self.t + d
        cols = b * (self.s * self.t) + j * self.t + d
        shape = self.weight_shape
        return rows.expand(shape), cols.expand(shape)

    def pattern(self) -> torch.Tensor:
        """The 0/1 pattern (p × q, bool) from the rule o//(rt) == c//(st) and o%t == c%t."""
        o = torch.arange(self.p).view(-1, 1)
        c = torch.arange(self.q).view(1, -1)
        same_block = (o // (self.r * self.t)) == (c // (self.s * self.t))
        return same_block & ((o % self.t) == (c % self.t))

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """The p×q matrix whose nonzeros are ``values`` (shape (B, r, s, t)); differentiable."""
        if tuple(values.shape) != self.weight_shape:
            raise TensorslimError(
                f"DeBut factor ({self.text}) needs values of shape {self.weight_shape}, "
                f"got {tuple(values.shape)}"
            )
        rows, cols = self.indices(values.device)
        out = values.new_zeros(self.p, self.q)
        return out.index_put((rows.reshape(-1), cols.reshape(-1)), values.reshape(-1))

    def neighbours(self) -> np.ndarray:
        """For every row o, the s columns it reaches: int array (p, s)."""
        o = np.arange(self.p)
        b, rest = np.divmod(o, self.r * self.t)
        d = rest % self.t
        j = np.arange(self.s)
        return (b * (self.s * self.t) + d)[:, None] + j[None, :] * self.t


def exact_pair(first: DeButFactor, second: DeButFactor) -> bool:
    """True when ``second`` (applied after ``first``) merges with it exactly: t₂ = r₁·t₁."""
    return second.q == first.p and second.t == first.r * first.t


def merge_specs(factors: Sequence[DeButFactor]) -> DeButFactor:
    """The single factor equal to the product of exact neighbours (input side first)."""
    return _merge_specs(tuple(factors))


@lru_cache(maxsize=4096)
def _merge_specs(factors: tuple[DeButFactor, ...]) -> DeButFactor:
    merged = factors[0]
    for nxt in factors[1:]:
        if not exact_pair(merged, nxt):
            raise TensorslimError(
                f"factors ({merged.text}) and ({nxt.text}) do not merge exactly: "
                f"need t={merged.r * merged.t} in the second, it has t={nxt.t}"
            )
        merged = DeButFactor(nxt.p, merged.q, nxt.r * merged.r, nxt.s * merged.s, merged.t)
    return merged


# --------------------------------------------------------------------------------------------
# chains


@dataclass(frozen=True)
class DeButChain:
    """Factors F_1 … F_K, input side first; the weight is F_K ⋯ F_1 (out × in)."""

    factors: tuple[DeButFactor, ...]

    def __post_init__(self) -> None:
        factors = tuple(self.factors)
        if not factors:
            raise TensorslimError("a DeBut chain needs at least one factor")
        for k, f in enumerate(factors):
            if not isinstance(f, DeButFactor):
                raise TensorslimError(f"DeBut chain factor {k} is {type(f).__name__}, not a factor")
        for k in range(1, len(factors)):
            prev, cur = factors[k - 1], factors[k]
            if cur.q != prev.p:
                raise TensorslimError(
                    f"DeBut chain factor {k} ({cur.text}) has q={cur.q} but factor {k - 1} "
                    f"({prev.text}) outputs p={prev.p}: a chain needs q_(k+1) = p_k"
                )
        object.__setattr__(self, "factors", factors)

    # ---- construction and text form
    @classmethod
    def from_numbers(cls, numbers: Sequence[int] | Sequence[Sequence[int]]) -> DeButChain:
        """From five integers per factor (flat or grouped), input side first."""
        flat: list[int] = []
        for item in numbers:
            if isinstance(item, Iterable) and not isinstance(item, str | bytes):
                flat.extend(int(v) for v in item)
            else:
                flat.append(int(item))  # type: ignore[arg-type]
        if not flat or len(flat) % 5:
            raise TensorslimError(
                f"a DeBut chain is five integers (p q r s t) per factor; got {len(flat)} numbers"
            )
        factors = []
        for k in range(len(flat) // 5):
            p, q, r, s, t = flat[5 * k : 5 * k + 5]
            problem = _factor_rule_violation(p, q, r, s, t)
            if problem is not None:
                raise TensorslimError(f"DeBut chain factor {k} ({p} {q} {r} {s} {t}): {problem}")
            factors.append(DeButFactor(p, q, r, s, t))
        return cls(tuple(factors))

    @classmethod
    def parse(cls, text: str | Sequence[int] | DeButChain) -> DeButChain:
        """From the flat text form ``"p q r s t  p q r s t ..."`` (commas/brackets allowed)."""
        if isinstance(text, DeButChain):
            return text
        if not isinstance(text, str):
            return cls.from_numbers(text)
        tokens = [tok for tok in re.split(r"[\s,;()\[\]]+", text.strip()) if tok]
        try:
            numbers = [int(tok) for tok in tokens]
        except ValueError:
            bad = next(tok for tok in tokens if not tok.lstrip("-").isdigit())
            raise TensorslimError(
                f"DeBut chain text has {bad!r}: write five integers p q r s t per factor"
            ) from None
        return cls.from_numbers(numbers)

    @property
    def text(self) -> str:
        """Flat text form, factors separated by two spaces, input side first."""
        return "  ".join(f.text for f in self.factors)

    def __str__(self) -> str:
        return self.text

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.factors)

    def __getitem__(self, index: int) -> DeButFactor:
        return self.factors[index]

    # ---- sizes and costs
    @property
    def in_features(self) -> int:
        return self.factors[0].q

    @property
    def out_features(self) -> int:
        return self.factors[-1].p

    @property
    def widths(self) -> tuple[int, ...]:
        """in, p_1, …, p_K: the width of the activation before and after each factor."""
        return (self.in_features, *(f.p for f in self.factors))

    @property
    def nnz(self) -> int:
        """Total nonzeros Σ p_k s_k (= parameters, = multiply-adds per input row)."""
        return sum(f.nnz for f in self.factors)

    def flops(self, rows: int = 1) -> int:
        """FLOPs of multiplying ``rows`` input vectors: 2·rows·Σ p_k s_k."""
        return 2 * rows * self.nnz

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def compression(self) -> float:
        """Dense parameters (= dense multiply-adds) over the chain's nonzeros."""
        return self.dense_params / self.nnz

    @property
    def kind(self) -> str:
        """ "monotonic" (widths never turn), "bulging" (wider inside than both ends) or "other"."""
        w = self.widths
        steps = [b - a for a, b in itertools.pairwise(w)]
        if all(x >= 0 for x in steps) or all(x <= 0 for x in steps):
            return "monotonic"
        if max(w) > max(w[0], w[-1]):
            return "bulging"
        return "other"

    @property
    def single_path(self) -> bool:
        """All neighbours merge exactly (t_(k+1) = r_k t_k): one path per weight entry."""
        return all(exact_pair(a, b) for a, b in itertools.pairwise(self.factors))

    def check_shape(self, out_features: int, in_features: int, what: str = "the layer") -> None:
        """Raise unless the chain maps ``in_features`` → ``out_features``."""
        if (self.out_features, self.in_features) != (out_features, in_features):
            raise TensorslimError(
                f"DeBut chain maps {self.in_features} → {self.out_features} but {what} is "
                f"{in_features} → {out_features}: the first q must be {in_features} and the "
                f"last p {out_features}"
            )

    # ---- qualification
    def unreachable(self) -> tuple[int, int] | None:
        """An (output, input) pair with a zero in the product of the patterns, or None.

        Reachability is tracked as bitsets: row o of the running product holds the set of inputs
        that output o reaches; a factor ORs together the sets of the s rows each output reads.
        Cost Σ_k p_k s_k · in/64 word operations.
        """
        if self.single_path:
            merged = merge_specs(self.factors)
            # exact neighbours: the merged pattern *is* the product pattern, and a factor with a
            # single block and t = 1 is dense
            if merged.blocks == 1 and merged.t == 1:
                return None
        return _unreachable(self.factors)

    @property
    def qualified(self) -> bool:
        return self.unreachable() is None

    def check_qualified(self) -> None:
        """Raise a clear error when the product of the patterns has a zero entry."""
        pair = self.unreachable()
        if pair is not None:
            o, c = pair
            raise TensorslimError(
                f"DeBut chain '{self.text}' is not qualified: output {o} never reaches input {c} "
                "(the product of the patterns has zeros); add factors or raise r, s so the "
                "blocks cover the whole width (generated chains always qualify)"
            )

    def describe(self) -> dict[str, object]:
        return {
            "chain": self.text,
            "factors": len(self.factors),
            "nnz": self.nnz,
            "flops_per_row": self.flops(1),
            "compression": self.compression,
            "kind": self.kind,
        }


@lru_cache(maxsize=512)
def _unreachable(factors: tuple[DeButFactor, ...]) -> tuple[int, int] | None:
    q = factors[0].q
    words = (q + 63) // 64
    first = factors[0]
    # bitset of the first factor's pattern rows, built from its neighbour lists
    nbr = first.neighbours()
    bits = np.zeros((first.p, words), dtype=np.uint64)
    word, bit = np.divmod(nbr, 64)
    rows = np.repeat(np.arange(first.p), first.s)
    np.bitwise_or.at(
        bits,
        (rows, word.reshape(-1)),
        np.left_shift(np.uint64(1), bit.reshape(-1).astype(np.uint64)),
    )
    for f in factors[1:]:
        gathered = bits[f.neighbours()]  # (p, s, words)
        bits = np.bitwise_or.reduce(gathered, axis=1)
    full = np.full(words, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    if q % 64:
        full[-1] = np.uint64((1 << (q % 64)) - 1)
    missing = bits != full[None, :]
    if not missing.any():
        return None
    o, w = (int(v) for v in np.argwhere(missing)[0])
    lacking = int(full[w] & ~bits[o, w])
    return o, 64 * w + (lacking & -lacking).bit_length() - 1


# --------------------------------------------------------------------------------------------
# execution planning: which neighbours to merge, and which kernel runs each merged factor


@dataclass(frozen=True)
class Segment:
    """Factors ``start`` … ``stop − 1`` of a chain run as one merged factor ``spec``.

    ``kernel``: "bmm" (t = 1: one batched matmul over blocks), "ew" (elementwise multiply-adds
    over the s grid columns, for small grids) or "pbmm" (regroup to (block, diagonal) batches,
    batched matmul, regroup back: for large grids with t > 1). ``cost`` is the model's estimate
    in microseconds for the column count the plan was made for.
    """

    start: int
    stop: int
    spec: DeButFactor
    kernel: str
    cost: float


# Cost model (microseconds), fitted to min-of-N timings of the three kernels and of a dense
# GEMM on the reference machine (2-core AVX-512 CPU, fp32, 1024 columns). It only has to rank
# alternatives; the benchmark reports measured latency. Facts it encodes: a batched matmul of
# mid-size grids (≈24–64) runs at the best rate per multiply-add (blocks stay in cache), big
# grids (≥128) and dense GEMMs at ~60 % of it, tiny grids are bound by streaming memory; the
# elementwise kernel costs one pass per grid column but the passes after the first are cheap.
_CALL_US = 10.0  # fixed cost of one torch op
_MAC_NS = 0.02  # one multiply-add in a cache-friendly batched matmul
_BMM_STREAM_NS = 0.12  # streaming one input or output element through a batched matmul
_EW_BASE_NS = 0.30  # elementwise kernel, per output element
_EW_PER_COL_NS = 0.06  # … plus this per grid column s
_COPY_NS = 0.3  # one regroup copy (read + write) per element


def _bmm_efficiency(r: int, s: int) -> float:
    """Rate of a batched r×s matmul relative to the best (mid-size) grids."""
    if max(r, s) >= 128:
        return 0.6
    return min(1.0, max(0.1, math.sqrt(r * s) / 24.0))


def kernel_costs(spec: DeButFactor, cols: int) -> dict[str, float]:
    """Modelled time (µs) of each kernel able to run ``spec`` on ``cols`` columns."""
    p, q, r, s, t = spec.p, spec.q, spec.r, spec.s, spec.t
    macs = p * s * cols
    bmm = (
        _CALL_US
        + 1e-3 * macs * _MAC_NS / _bmm_efficiency(r, s)
        + 1e-3 * (p + q) * cols * _BMM_STREAM_NS
    )
    if t == 1:
        return {"bmm": bmm}
    per_elem = _EW_BASE_NS + _EW_PER_COL_NS * s
    if s > 16:  # wide grids thrash the cache in the elementwise kernel
        per_elem *= 2.5
    ew = s * _CALL_US + 1e-3 * p * cols * per_elem
    pbmm = bmm + 2 * _CALL_US + 1e-3 * (p + q) * cols * _COPY_NS
    return {"ew": ew, "pbmm": pbmm}


# a merged factor is never allowed to be much denser than its parts (the DP would reject it on
# cost anyway; this bounds the search)
_MAX_MERGE_GROWTH = 8.0


def plan_segments(chain: DeButChain, cols: int = 1024) -> tuple[Segment, ...]:
    """The cheapest split of ``chain`` into merged runs of exact neighbours (dynamic program).

    Merging fewer passes over the activations against more multiply-adds is what makes the
    multiply fast: e.g. four 2×2 butterfly factors run as one 16×16 grid in one pass.
    """
    return _plan_segments(chain.factors, max(1, int(cols)))


@lru_cache(maxsize=1024)
def _plan_segments(factors: tuple[DeButFactor, ...], cols: int) -> tuple[Segment, ...]:
    k = len(factors)
    best: list[tuple[float, tuple[Segment, ...]]] = [(0.0, ())]
    for stop in range(1, k + 1):
        options: list[tuple[float, tuple[Segment, ...]]] = []
        for start in range(stop - 1, -1, -1):
            group = factors[start:stop]
            if start < stop - 1 and not exact_pair(factors[start], factors[start + 1]):
                break
            spec = merge_specs(group) if len(group) > 1 else group[0]
            if len(group) > 1 and spec.nnz > _MAX_MERGE_GROWTH * sum(f.nnz for f in group):
                break
            costs = kernel_costs(spec, cols)
            kernel = min(costs, key=costs.__getitem__)
            seg = Segment(start, stop, spec, kernel, costs[kernel])
            options.append((best[start][0] + seg.cost, (*best[start][1], seg)))
        best.append(min(options, key=lambda item: item[0]))
    return best[k][1]


def estimated_cost(chain: DeButChain, cols: int = 1024) -> float:
    """Modelled forward time (µs) of the fastest merged plan on ``cols`` columns."""
    return sum(seg.cost for seg in plan_segments(chain, cols))


def dense_cost(out_features: int, in_features: int, cols: int = 1024) -> float:
    """The same model's estimate for a dense matmul (one big GEMM at the big-grid rate)."""
    return _CALL_US + 1e-3 * out_features * in_features * cols * _MAC_NS / 0.6


# --------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class ChainCandidate:
    """A generated qualified chain with its costs (per input row) and modelled speed."""

    chain: DeButChain
    nnz: int
    flops_per_row: int
    compression: float
    kind: str
    est_cost_us: float

    @property
    def text(self) -> str:
        return self.chain.text


def chain_from_parts(rs: Sequence[int], ss: Sequence[int]) -> DeButChain:
    """The exact chain with grid sizes r_k (out = Πr) and s_k (in = Πs), input side first."""
    return _chain_from_parts(tuple(int(r) for r in rs), tuple(int(s) for s in ss))


@lru_cache(maxsize=8192)
def _chain_from_parts(rs: tuple[int, ...], ss: tuple[int, ...]) -> DeButChain:
    if len(rs) != len(ss) or not rs:
        raise TensorslimError("give as many r parts as s parts (one pair per factor)")
    out, inp = math.prod(rs), math.prod(ss)
    factors = []
    prefix = 1
    for k, (r, s) in enumerate(zip(rs, ss, strict=True)):
        suffix_after = math.prod(ss[k + 1 :])
        t = prefix
        p = prefix * r * suffix_after
        q = prefix * s * suffix_after
        factors.append(DeButFactor(p, q, r, s, t))
        prefix *= r
    chain = DeButChain(tuple(factors))
    assert chain.out_features == out and chain.in_features == inp
    return chain


def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    if n > 1:
        out.append(n)
    return out


@lru_cache(maxsize=256)
def _ordered_factorizations(n: int, k: int, cap: int) -> tuple[tuple[int, ...], ...]:
    """Ordered k-tuples of positive integers with product n (at most ``cap``, balanced first)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]

    def rec(m: int, parts: int) -> Iterable[tuple[int, ...]]:
        if parts == 1:
            yield (m,)
            return
        for d in divisors:
            if d > m:
                break
            if m % d == 0:
                for rest in rec(m // d, parts - 1):
                    yield (d, *rest)

    found: list[tuple[int, ...]] = []
    for item in rec(n, k):
        found.append(item)
        if len(found) > 20 * cap:
            break
    if len(found) > cap:
        # keep the most balanced ones (small spread of log sizes), which give the cheapest chains,
        # plus an even sample of the rest for variety
        logs = np.log(np.array(found, dtype=np.float64))
        spread = ((logs - math.log(n) / k) ** 2).sum(axis=1)
        found = [found[i] for i in np.argsort(spread, kind="stable")]
        head = found[: cap // 2]
        tail = found[cap // 2 :]
        step = max(1, len(tail) // (cap - len(head)))
        found = head + tail[::step][: cap - len(head)]
    return tuple(found)


def generate_chains(
    out_features: int,
    in_features: int,
    *,
    num_factors: int | Sequence[int] | None = None,
    target_params: int | None = None,
    ratio: float | None = None,
    kind: str = "any",
    max_width: int | None = None,
    cols: int = 1024,
    limit: int = 8,
    tolerance: float = 0.25,
) -> list[ChainCandidate]:
    """Qualified DeBut chains for an ``out × in`` weight, best first.

    ``target_params`` (nonzeros) or ``ratio`` (dense/nonzeros) sets the size; chains within
    ``tolerance`` (relative) of it are ranked by the modelled speed of their merged execution on
    ``cols`` columns, then by fewer factors; if none is that close the closest are returned.
    Without a target, chains are ranked by speed across all sizes. ``num_factors``: one count or
    several (default 2–6). ``kind``: "monotonic", "bulging" or "any". ``max_width`` bounds the
    widest activation (default 2·max(in, out)).
    """
    if out_features < 1 or in_features < 1:
        raise TensorslimError(f"cannot generate a DeBut chain for {out_features}×{in_features}")
    if kind not in ("any", "monotonic", "bulging"):
        raise TensorslimError(f"unknown chain kind '{kind}': use any, monotonic or bulging")
    if ratio is not None and target_params is not None:
        raise TensorslimError("give either target_params or ratio, not both")
    if ratio is not None:
        if ratio <= 0:
            raise TensorslimError(f"compression ratio must be positive, got {ratio}")
        target_params = max(1, round(out_features * in_features / ratio))
    if num_factors is None:
        counts: tuple[int, ...] = (2, 3, 4, 5, 6)
    elif isinstance(num_factors, int):
        counts = (num_factors,)
    else:
        counts = tuple(int(k) for k in num_factors)
    if any(k < 1 for k in counts):
        raise TensorslimError(f"number of factors must be ≥ 1, got {counts}")
    widest = max_width if max_width is not None else 2 * max(in_features, out_features)

    pool: list[tuple[int, float, int, tuple[int, ...], tuple[int, ...]]] = []
    for k in counts:
        pool.extend(_candidates_for(out_features, in_features, k, kind, widest, target_params))
    if not pool:
        raise TensorslimError(
            f"no DeBut chain of {list(counts)} factors fits {out_features}×{in_features} "
            f"(kind={kind}, max width {widest}); allow more factors or a wider max_width"
        )
    # rank: closeness to the target first (within tolerance all count as equal), then speed
    scored = []
    for nnz, _, k, rs, ss in pool:
        chain = chain_from_parts(rs, ss)
        cost = estimated_cost(chain, cols)
        if target_params is None:
            miss = 0.0
        else:
            rel = abs(math.log(nnz / target_params))
            miss = 0.0 if rel <= math.log1p(tolerance) else rel
        scored.append((miss, cost, k, nnz, chain))
    scored.sort(key=lambda item: (item[0], item[1], item[2], item[3]))
    result: list[ChainCandidate] = []
    seen: set[str] = set()
    for _, cost, _, nnz, chain in scored:
        if chain.text in seen:
            continue
        seen.add(chain.text)
        if not chain.qualified:  # by construction they are; checked anyway (cheap)
            continue
        result.append(
            ChainCandidate(chain, nnz, chain.flops(1), chain.compression, chain.kind, cost)
        )
        if len(result) >= limit:
            break
    return result


_SIDE_CAP = 256  # factorisations kept per side; pairs are scored with one matrix product


@lru_cache(maxsize=256)
def _pair_table(
    out: int, inp: int, k: int, kind: str, widest: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All admissible (r-parts, s-parts) pairs of k factors: (nonzeros, r parts, s parts).

    Every pair is scored at once: nonzeros Σ_k R_k S_k is one matrix product of prefix and
    suffix products, widths p_k = R_k S_(k+1) an outer product.
    """
    r_parts = np.array(_ordered_factorizations(out, k, _SIDE_CAP), dtype=np.float64)
    s_parts = np.array(_ordered_factorizations(inp, k, _SIDE_CAP), dtype=np.float64)
    empty = (np.zeros(0), np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.int64))
    if r_parts.size == 0 or s_parts.size == 0:
        return empty
    prefix = np.cumprod(r_parts, axis=1)  # R_k = r_1⋯r_k
    suffix = np.cumprod(s_parts[:, ::-1], axis=1)[:, ::-1]  # S_k = s_k⋯s_K
    nnz = prefix @ suffix.T  # Σ_k R_k S_k for every pair
    suffix_next = np.concatenate([suffix[:, 1:], np.ones((len(suffix), 1))], axis=1)
    widths = prefix[:, None, :] * suffix_next[None, :, :]  # p_k for every pair
    # no bottleneck: a width below min(in, out) would cap the rank of the product (a low-rank
    # factorisation in disguise, not a butterfly)
    ok = (widths.max(axis=2) <= widest) & (widths.min(axis=2) >= min(inp, out))
    # a factor with r = s = 1 is a bare diagonal (parameters, no mixing), and a 2×1 or 1×2 grid
    # only duplicates or sums pairs: neither is worth a pass over the activations
    grid = r_parts[:, None, :] * s_parts[None, :, :]
    ok &= (grid >= 3).all(axis=2)
    if kind != "any":
        full = np.concatenate([np.full((*widths.shape[:2], 1), float(inp)), widths], axis=2)
        steps = np.diff(full, axis=2)
        mono = (steps >= 0).all(axis=2) | (steps <= 0).all(axis=2)
        if kind == "monotonic":
            ok &= mono
        else:
            ok &= ~mono & (full.max(axis=2) > max(inp, out))
    idx = np.argwhere(ok)
    if len(idx) == 0:
        return empty
    return (
        nnz[ok],
        r_parts[idx[:, 0]].astype(np.int64),
        s_parts[idx[:, 1]].astype(np.int64),
    )


_SHORTLIST = 24  # pairs per factor count whose merged execution is costed


def _candidates_for(
    out: int, inp: int, k: int, kind: str, widest: int, target: int | None
) -> list[tuple[int, float, int, tuple[int, ...], tuple[int, ...]]]:
    """A shortlist of k-factor pairs: nearest to the target, or spread over all sizes."""
    values, r_parts, s_parts = _pair_table(out, inp, k, kind, widest)
    if len(values) == 0:
        return []
    if target is not None:
        order = np.argsort(np.abs(np.log(values / target)), kind="stable")[:_SHORTLIST]
    else:
        # per quarter-octave of size, the smallest few
        buckets = np.floor(np.log2(values) * 4).astype(int)
        order_list = []
        for bucket in np.unique(buckets):
            members = np.flatnonzero(buckets == bucket)
            order_list.extend(members[np.argsort(values[members], kind="stable")][:2].tolist())
        order = np.array(order_list, dtype=int)
    return [
        (
            int(values[pos]),
            0.0,
            k,
            tuple(int(x) for x in r_parts[pos]),
            tuple(int(x) for x in s_parts[pos]),
        )
        for pos in order
    ]
