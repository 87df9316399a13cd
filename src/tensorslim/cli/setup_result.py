"""What a CLI command gets from its set-up: the model and its data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Setup:
    """Everything a command needs about its data and model."""

    model: nn.Module
    bundle: Any
    train_loader: Any
    test_loader: Any
    example_batch: torch.Tensor
    # a pretrained model on unlabeled text (hf:PATH --data fortunes): cli/hf_setup.TextRun
    text: Any = None

    def data(self) -> dict[str, Any]:
        """``train_loader``, ``test_loader`` and ``example_batch``: the keyword arguments the
        pipeline functions (``compress_model``, ``multistage``, ...) take the data by."""
        return {
            "train_loader": self.train_loader,
            "test_loader": self.test_loader,
            "example_batch": self.example_batch,
        }
