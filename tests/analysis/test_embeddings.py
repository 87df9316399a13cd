"""Embedding agreement: identical sets agree perfectly; Spearman ρ matches its definition."""

from __future__ import annotations

import pytest
import torch

from tensorslim.analysis.embeddings import embedding_agreement, spearman


def test_identical_embeddings_agree_perfectly_and_scale_does_not_matter() -> None:
    e = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    scores = embedding_agreement(e, 3.0 * e)
    assert scores == pytest.approx({"mean_cos": 1.0, "min_cos": 1.0, "spearman": 1.0, "top1": 1.0})


def test_spearman_is_the_rank_correlation() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # monotone: ρ = 1
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])  # d² = 1+1+1+1 = 4: ρ = 1 − 6·4/(5·24) = 0.8
    assert spearman(a, b) == pytest.approx(0.8)


def test_noise_lowers_every_score() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(30, 16, generator=g)
    scores = embedding_agreement(e, e + 0.8 * torch.randn(30, 16, generator=g))
    assert scores["min_cos"] < scores["mean_cos"] < 1.0
    assert scores["spearman"] < 0.99 and scores["top1"] < 1.0
