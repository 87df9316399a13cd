"""An embedding that shares the factors of a low-rank output head it was tied to.

Language models often tie the token embedding E (V × d) to the output head W (V × d): the same
parameter is looked up row by row on the way in and multiplied on the way out. When the head is
factorized as W ≈ A B (:class:`~tensorslim.layers.lowrank.LowRankLinear`: A = ``up.weight``
(V × r), B = ``down.weight`` (r × d)), the embedding can keep the tie exactly by looking rows up
in the same product: E_i ≈ A_i B, i.e. ``embedding(ids) = A[ids] · B``.

``table`` and ``proj`` are the head's own parameters (one copy in memory and on disk), so the pair
holds r·(V + d) weights instead of V·d, and gradients from both uses reach the same factors, as
they did before. FLOPs: 2·tokens·r·d for the projection (the lookup is free).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.lowrank import LowRankLinear


def tie_problem(embedding: nn.Module, head: nn.Module) -> str | None:
    """Why ``embedding`` cannot share ``head``'s factors exactly, or ``None`` if it can."""
    if not isinstance(embedding, nn.Embedding):
        return f"{type(embedding).__name__} is not an nn.Embedding"
    if embedding.max_norm is not None:
        return "its max_norm renormalises looked-up rows in place"
    weight = getattr(head, "weight", None)
    if weight is not embedding.weight:
        return "the head's weight is not the embedding's table in the same (V, d) orientation"
    return None


class FactoredEmbedding(StructuredLayer):
    """ids (…) → A[ids] · B (…, d), with A (V × r) and B (r × d) shared with a low-rank head."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        # padding_idx only masks gradients in nn.Embedding; kept for F.embedding's semantics
        self.padding_idx = padding_idx
        factory = {"device": device, "dtype": dtype}
        self.table = nn.Parameter(torch.zeros(num_embeddings, rank, **factory))
        self.proj = nn.Parameter(torch.zeros(rank, embedding_dim, **factory))

    @classmethod
    def tied_to(cls, embedding: nn.Embedding, head: LowRankLinear) -> FactoredEmbedding:
        """The embedding as rows of ``head``'s product, sharing (not copying) its factors."""
        if not isinstance(head, LowRankLinear):
            raise TensorslimError(
                f"a tied embedding shares the factors of a LowRankLinear head, not of a "
                f"{type(head).__name__}: plan the head with svd"
            )
        if (head.out_features, head.in_features) != tuple(embedding.weight.shape):
            raise TensorslimError(
                f"head {head.out_features}×{head.in_features} does not match the embedding "
                f"{tuple(embedding.weight.shape)}"
            )
        new = cls(embedding.num_embeddings, embedding.embedding_dim, head.rank, device="meta")
        new.padding_idx = embedding.padding_idx
        new.table = head.up.weight
        new.proj = head.down.weight
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table, self.padding_idx) @ self.proj

    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            device=self.table.device,
            dtype=self.table.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.table @ self.proj)
        return dense

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        return 2 * math.prod(input_shape) * self.rank * self.embedding_dim

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} → {self.rank} → {self.embedding_dim} (tied)"
