"""How far a compressed sentence encoder's embeddings are from the original's.

``sentence_embeddings(model, batches)`` mean-pools the last hidden states over each batch's
``attention_mask`` (sentence-transformers' pooling). ``embedding_agreement(reference,
candidate)`` compares two (n × h) embedding sets of the same sentences:

- ``mean_cos`` / ``min_cos``: cosine between a sentence's two embeddings, mean and minimum;
- ``spearman``: Spearman ρ between the two pairwise cosine-similarity matrices (the n(n−1)/2
  pairs above the diagonal) — what a semantic-search ranking depends on;
- ``top1``: the fraction of sentences whose nearest other sentence is the same under both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.inputs import call_on_batch, model_device, to_device


def sentence_embeddings(model: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
    """Mean-pooled last hidden states of every batch (mappings with ``attention_mask``), (n, h)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = to_device(batch, model_device(model))
                hidden = call_on_batch(model, batch).last_hidden_state
                mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
                out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
    finally:
        model.train(was_training)
    if not out:
        raise TensorslimError("no batch to embed")
    return torch.cat(out).float()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(values.numel(), dtype=torch.float64)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman ρ of two equally long 1-D tensors (Pearson correlation of their ranks)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """``mean_cos``, ``min_cos``, ``spearman`` and ``top1`` of ``candidate`` against
    ``reference`` (both n × h, rows the same sentences, n ≥ 3)."""
    if reference.shape != candidate.shape or reference.shape[0] < 3:
        raise TensorslimError("embedding_agreement needs two (n × h) sets, n ≥ 3, of one shape")
    cos = F.cosine_similarity(reference.double(), candidate.double(), dim=1)
    ref, cand = F.normalize(reference.double(), dim=1), F.normalize(candidate.double(), dim=1)
    sim_ref, sim_cand = ref @ ref.T, cand @ cand.T
    n = ref.shape[0]
    upper = torch.triu_indices(n, n, offset=1)
    rho = spearman(sim_ref[upper[0], upper[1]], sim_cand[upper[0], upper[1]])
    eye = torch.eye(n, dtype=torch.bool)
    nearest_ref = sim_ref.masked_fill(eye, -2.0).argmax(1)
    nearest_cand = sim_cand.masked_fill(eye, -2.0).argmax(1)
    return {
        "mean_cos": float(cos.mean()),
        "min_cos": float(cos.min()),
        "spearman": rho,
        "top1": float((nearest_ref == nearest_cand).double().mean()),
    }
