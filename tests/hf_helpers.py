"""A tiny pretrained-style encoder directory for hf:PATH tests (needs transformers and MiniLM's
tokenizer files; the callers skip without them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tensorslim.models.huggingface import minilm_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def save_tiny_encoder(directory: Path) -> Path:
    """A one-layer BERT (hidden 32) with MiniLM's tokenizer, saved as a local HF directory."""
    import transformers

    source = minilm_path()
    assert source is not None
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory
