"""How a DeBut layer lays out its weight matrix: conv unfolding order, and zero-padding.

**Unfolding order of a conv kernel.** A kernel K (C_out, C_in, kh, kw) is a matrix
W (C_out × kh·kw·C_in) whose columns are read in one of two orders:

- ``"position"`` (default, the official ``DeBut_2dConv`` and its ALS initialisation):
  position-major, column ``(y·kw + x)·C_in + c``, i.e. ``W = K.permute(0, 2, 3, 1)`` flattened
  and ``K = W.view(C_out, kh, kw, C_in).permute(0, 3, 1, 2)``. The chain's first factor then
  mixes the channels at one kernel position (a generated first grid of 9 columns at t = 1 reads
  9 channels at one position, or for C_in ≥ 9 a slice of them);
- ``"channel"``: ``F.unfold``'s channel-major order, column ``c·kh·kw + y·kw + x``
  (``W = K.flatten(1)``), tensorslim's order before issue 18, kept to read layers saved with
  it.

The same chain imposes a different sparsity pattern on the kernel in the two orders, so the
order is part of a layer's structure (``config()["order"]``).

**Zero-padding** (the official ``PaddingMatrix`` of AutoChain): a chain may map a larger
``in_pad → out_pad`` than the layer's ``in → out`` when the sizes do not factor well. The
input vector is extended with ``in_pad − in`` zeros *at the end* (after the last column in the
unfolding order) and only the first ``out`` outputs are kept: the layer computes
``W = (F_K ⋯ F_1)[:out, :in]``. Cost and parameters are those of the padded chain.
"""

from __future__ import annotations

import torch

from tensorslim.errors import TensorslimError

ORDERS = ("position", "channel")


def check_order(order: str) -> str:
    """``order`` if it is a known unfolding order, else a one-line error."""
    if order not in ORDERS:
        raise TensorslimError(
            f"unknown DeBut conv order '{order}': use 'position' (kh, kw, C_in; the official "
            "code) or 'channel' (C_in, kh, kw; F.unfold)"
        )
    return order


def kernel_to_matrix(kernel: torch.Tensor, order: str) -> torch.Tensor:
    """(C_out, C_in, kh, kw) → (C_out, kh·kw·C_in) with columns in ``order``."""
    check_order(order)
    if order == "position":
        return kernel.permute(0, 2, 3, 1).reshape(kernel.shape[0], -1)
    return kernel.reshape(kernel.shape[0], -1)


def matrix_to_kernel(
    matrix: torch.Tensor, in_channels: int, kernel_size: tuple[int, int], order: str
) -> torch.Tensor:
    """(C_out, kh·kw·C_in) with columns in ``order`` → (C_out, C_in, kh, kw)."""
    check_order(order)
    kh, kw = kernel_size
    out = matrix.shape[0]
    if order == "position":
        return matrix.reshape(out, kh, kw, in_channels).permute(0, 3, 1, 2)
    return matrix.reshape(out, in_channels, kh, kw)


def unfolded_features(
    cols: torch.Tensor, in_channels: int, positions: int, order: str
) -> torch.Tensor:
    """``F.unfold`` output (N, C_in·kh·kw, L) → feature-major (kh·kw·C_in, N·L) in ``order``.

    One copy either way: the channel order transposes (N, F) → (F, N), the position order
    also swaps the channel and position axes in the same copy.
    """
    n, features, length = cols.shape
    if order == "channel":
        return cols.transpose(0, 1).reshape(features, n * length)
    grouped = cols.reshape(n, in_channels, positions, length)
    return grouped.permute(2, 1, 0, 3).reshape(features, n * length)


def check_padded(
    chain_out: int, chain_in: int, out_features: int, in_features: int, pad: bool, what: str
) -> None:
    """Raise unless a chain ``chain_in → chain_out`` fits ``in → out`` (exactly, or padded)."""
    if (chain_out, chain_in) == (out_features, in_features):
        return
    if pad and chain_out >= out_features and chain_in >= in_features:
        return
    if pad:
        raise TensorslimError(
            f"padded DeBut chain maps {chain_in} → {chain_out}, smaller than {what} "
            f"({in_features} → {out_features}): a padded chain needs q_1 ≥ {in_features} and "
            f"p_K ≥ {out_features}"
        )
    raise TensorslimError(
        f"DeBut chain maps {chain_in} → {chain_out} but {what} is {in_features} → "
        f"{out_features}: the first q must be {in_features} and the last p {out_features} "
        "(or pass pad=True to zero-pad a larger chain, as the official code does)"
    )


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Feature-major X (F × M) extended with zero rows to (rows × M); X itself if F = rows."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros(extra, x.shape[1])], dim=0)


def padded_target(weight: torch.Tensor, out_pad: int, in_pad: int) -> torch.Tensor:
    """The official ``PaddingMatrix``: ``weight`` (out × in) at the top left of zeros."""
    out, inp = weight.shape
    if (out, inp) == (out_pad, in_pad):
        return weight
    big = weight.new_zeros(out_pad, in_pad)
    big[:out, :inp] = weight
    return big


# sizes whose largest prime factor exceeds this are padded by ``padded_shape``: a generated
# chain must put such a prime into a single grid (r or s = the prime), a nearly dense factor
_ROUGH_PRIME = 7


def _largest_prime_factor(n: int) -> int:
    largest, f = 1, 2
    while f * f <= n:
        while n % f == 0:
            largest, n = f, n // f
        f += 1
    return max(largest, n) if n > 1 else largest


def padded_shape(out_features: int, in_features: int, positions: int = 1) -> tuple[int, int]:
    """The zero-padded (out, in) a generated chain is made for, as the official PaddingMatrix.

    A size that factors into primes ≤ 7 is kept; otherwise it grows to the next power of two —
    for a conv's input (``positions`` = kh·kw) the channel count does, giving
    kh·kw·2^⌈log₂ C_in⌉ columns (the official rule for 3×3 kernels).
    """

    def grow(n: int) -> int:
        return n if _largest_prime_factor(n) <= _ROUGH_PRIME else 1 << (n - 1).bit_length()

    if in_features % positions:
        raise TensorslimError(f"{in_features} inputs are not a multiple of {positions} positions")
    return grow(out_features), positions * grow(in_features // positions)
