"""An LSTM language model whose decoder is tied to its embedding (Press & Wolf 2017)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TiedLSTMLanguageModel"]


class TiedLSTMLanguageModel(nn.Module):
    """ids (N, T) → embedding (N, T, d) → LSTM (N, T, d) → decoder (N, T, V) logits.

    The decoder's weight *is* the embedding's table (one (V, d) parameter), as in the weight-tied
    LSTM LMs of Press & Wolf (2017) and Inan et al. (2017); the decoder keeps its own bias.
    """

    def __init__(
        self, vocab_size: int = 1000, dim: int = 64, num_layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers, batch_first=True, dropout=dropout)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (N, T, vocab_size) of the next token at every position of ``ids`` (N, T)."""
        hidden, _ = self.lstm(self.embedding(ids))
        return self.decoder(hidden)
