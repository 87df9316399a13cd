"""The command line's set-up for ``--model hf:PATH --data fortunes``: a pretrained encoder on text.

The model and its tokenizer come from the local directory (offline). Debian's fortunes are dealt
into disjoint calibration (``CALIBRATION_SENTENCES``), training — the unlabeled distillation
set, ``--limit-train`` sentences (default ``TRAIN_SENTENCES``) — and evaluation sets
(``--limit-test``, default ``TEST_SENTENCES``), tokenized in batches of ``--batch-size``. There
are no labels: the run reports how closely the compressed model's mean-pooled sentence
embeddings agree with the original's on the evaluation sentences
(:mod:`tensorslim.analysis.embeddings`), fwsvd's Fisher comes from
:func:`~tensorslim.train.losses.sampled_gaussian_loss`, and ``--distill`` trains on the original's
token hidden states (MSE + cosine, α = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tensorslim.cli.setup_result import Setup
from tensorslim.errors import TensorslimError

TEXT_DATA = "fortunes"
CALIBRATION_SENTENCES = 256
TRAIN_SENTENCES = 2048
TEST_SENTENCES = 400
MAX_LENGTH = 128  # tokens per sentence (longer quotations are truncated)
# fine-tuning a pretrained transformer: AdamW at a small rate (SGD at 0.01 would wreck it)
TEXT_LR = 1e-4


@dataclass
class TextRun:
    """The text side of a run: calibration and evaluation batches, and the set sizes."""

    calibration: list
    evaluation: list
    sentences: dict[str, int]


def setup_hf(
    model_name: str,
    data: str,
    seed: int,
    batch_size: int,
    limit_train: int | None,
    limit_test: int | None,
    latency_batch: int = 32,
) -> Any:
    """The :class:`~tensorslim.cli.setup_result.Setup` of a pretrained HF model on fortunes."""
    from tensorslim.data.text import fortune_splits, tokenized_batches
    from tensorslim.models.huggingface import hf_path, load_hf_model, load_hf_tokenizer

    if data != TEXT_DATA:
        raise TensorslimError(f"hf: models run on text: use --data {TEXT_DATA} (got {data!r})")
    path = hf_path(model_name)
    assert path is not None
    model, tokenizer = load_hf_model(path), load_hf_tokenizer(path)
    sizes = {
        "calibration": CALIBRATION_SENTENCES,
        "distillation": limit_train or TRAIN_SENTENCES,
        "evaluation": limit_test or TEST_SENTENCES,
    }
    splits = fortune_splits(sizes["calibration"], sizes["distillation"], sizes["evaluation"], seed)
    batches = {
        name: tokenized_batches(getattr(splits, name), tokenizer, batch_size, MAX_LENGTH)
        for name in sizes
    }
    example = tokenizer(
        splits.evaluation[:latency_batch], padding=True, truncation=True, max_length=MAX_LENGTH,
        return_tensors="pt",
    )  # fmt: skip
    text = TextRun(batches["calibration"], batches["evaluation"], sizes)
    return Setup(model, None, batches["distillation"], None, example, text=text)


def text_objectives(text: TextRun | None) -> Any:
    """The pipeline's :class:`~tensorslim.pipeline.Objectives` for a text run (None otherwise)."""
    if text is None:
        return None
    from tensorslim.pipeline import Objectives
    from tensorslim.train.losses import hidden_state_distillation, sampled_gaussian_loss

    return Objectives(
        calibration_loader=text.calibration,
        calibration_loss_fn=sampled_gaussian_loss(),
        distill_fn=hidden_state_distillation(),
        kd_alpha=1.0,
    )


def text_agreement(original: nn.Module, compressed: nn.Module, text: TextRun) -> dict[str, float]:
    """Embedding agreement of ``compressed`` with ``original`` on the evaluation sentences."""
    from tensorslim.analysis.embeddings import embedding_agreement, sentence_embeddings

    reference = sentence_embeddings(original, text.evaluation)
    return embedding_agreement(reference, sentence_embeddings(compressed, text.evaluation))


def text_training(
    text: TextRun | None, epochs: int, lr: float | None, distill: bool
) -> dict[str, Any]:
    """``compress_model``'s training keywords: for a text run, distillation only (there are no
    labels to fine-tune on) with AdamW at ``TEXT_LR`` unless ``--lr`` says otherwise."""
    if text is None:
        return {"finetune_epochs": epochs, "lr": lr}
    return {
        "finetune_epochs": epochs if distill else 0,
        "lr": lr if lr is not None else TEXT_LR,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
