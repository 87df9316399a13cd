"""Real English text, offline: the quotations of Debian's ``fortunes`` package.

``read_fortunes()`` parses every fortune file (``/usr/share/games/fortunes``; each file holds
quotations separated by lines that are exactly ``%``), normalises whitespace, keeps prose
(drops ASCII art and very short entries) and removes duplicates, in a fixed order (files by
name, quotations in file order). ``split_texts`` deals the quotations into calibration,
distillation and evaluation sets by a seeded permutation, so the sets never share a sentence
and the same seed gives the same sets. ``tokenized_batches`` turns texts into the model's
tokenizer's ``BatchEncoding`` batches (padded per batch, truncated to ``max_length``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tensorslim.errors import TensorslimError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# files that are pictures, not prose
SKIPPED_FILES = frozenset({"ascii-art"})
MIN_WORDS = 4
MIN_LETTER_FRACTION = 0.6  # of non-space characters: drops tables, code and drawings


@dataclass(frozen=True)
class TextSplits:
    """Disjoint sets of texts for calibration, distillation and evaluation."""

    calibration: list[str]
    distillation: list[str]
    evaluation: list[str]


def fortune_files(directory: Path | None = None) -> list[Path]:
    """The fortune text files of ``directory`` (default the Debian location), by name."""
    root = Path(directory) if directory is not None else FORTUNES_DIR
    if not root.is_dir():
        raise TensorslimError(
            f"no fortunes at {root}: install Debian's fortunes package (apt-get install "
            "fortunes) or pass the directory"
        )
    files = [
        p
        for p in sorted(root.iterdir())
        if p.is_file() and p.suffix not in {".dat", ".u8"} and p.name not in SKIPPED_FILES
    ]
    if not files:
        raise TensorslimError(f"{root} holds no fortune files")
    return files


def parse_fortunes(text: str) -> list[str]:
    """The quotations of one fortune file: blocks between lines that are exactly ``%``."""
    quotes, block = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append(" ".join(" ".join(block).split()))
            block = []
        else:
            block.append(line)
    quotes.append(" ".join(" ".join(block).split()))
    return [q for q in quotes if q]


def is_prose(quote: str) -> bool:
    """At least ``MIN_WORDS`` words and mostly letters (not art, tables or code)."""
    chars = quote.replace(" ", "")
    if len(quote.split()) < MIN_WORDS or not chars:
        return False
    return sum(c.isalpha() for c in chars) / len(chars) >= MIN_LETTER_FRACTION


def read_fortunes(directory: Path | None = None) -> list[str]:
    """Every distinct prose quotation, files in name order, first occurrence kept."""
    seen: set[str] = set()
    quotes = []
    for path in fortune_files(directory):
        text = path.read_text(encoding="utf-8", errors="replace")
        for quote in parse_fortunes(text):
            key = re.sub(r"\W+", " ", quote).strip().lower()  # duplicates differ in punctuation
            if key not in seen and is_prose(quote):
                seen.add(key)
                quotes.append(quote)
    return quotes


def split_texts(
    texts: Sequence[str],
    calibration: int,
    distillation: int,
    evaluation: int,
    seed: int = 0,
    *,
    evaluation_first: bool = False,
) -> TextSplits:
    """Three disjoint sets of the given sizes from one seeded permutation of ``texts``.

    The permutation is dealt calibration, distillation, evaluation in that order, or with
    ``evaluation_first=True`` evaluation, calibration, distillation: then the evaluation set
    depends on the seed and its own size only, so runs with other calibration or distillation
    sizes are scored on the same sentences.
    """
    sizes = {"calibration": calibration, "distillation": distillation, "evaluation": evaluation}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TensorslimError(f"the {name} size must be an integer ≥ 0, got {size!r}")
    need = sum(sizes.values())
    if need > len(texts):
        raise TensorslimError(f"the splits need {need} texts but only {len(texts)} are there")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [texts[i] for i in order[:need]]
    if evaluation_first:
        a, b = evaluation + calibration, need
        return TextSplits(picked[evaluation:a], picked[a:b], picked[:evaluation])
    a, b = calibration, calibration + distillation
    return TextSplits(picked[:a], picked[a:b], picked[b:need])


def fortune_splits(
    calibration: int,
    distillation: int,
    evaluation: int,
    seed: int = 0,
    directory: Path | None = None,
    *,
    evaluation_first: bool = False,
) -> TextSplits:
    """:func:`split_texts` of :func:`read_fortunes`."""
    return split_texts(
        read_fortunes(directory), calibration, distillation, evaluation, seed,
        evaluation_first=evaluation_first,
    )  # fmt: skip


def tokenized_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int = 32, max_length: int = 128
) -> list[Any]:
    """``tokenizer(texts[i:i+batch_size])`` batches (padded per batch, truncated), in order."""
    if batch_size < 1:
        raise TensorslimError(f"batch_size must be ≥ 1, got {batch_size}")
    return [
        tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        for i in range(0, len(texts), batch_size)
    ]
