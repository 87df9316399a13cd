"""scikit-learn's 8x8 handwritten digits, upsampled to 1x28x28 (no download needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tensorslim.data.registry import DataBundle
from tensorslim.errors import TensorslimError

__all__ = ["load_digits_bundle", "stratified_split"]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``labels`` (shape ``(N,)``) into sorted train/test indices.

    Each class sends ``round(test_fraction * count)`` of its items (chosen at random with
    ``numpy.random.default_rng(seed)``) to the test side.
    """
    rng = np.random.default_rng(seed)
    test_idx: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = round(test_fraction * len(members))
        test_idx.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits_bundle(data_dir: Path | None = None, seed: int = 0) -> DataBundle:
    """Load sklearn's digits (1797 images, 10 classes) as 1x28x28 tensors.

    Images are scaled from ``0..16`` to ``[0, 1]``, upsampled 8x8 -> 28x28 (bilinear), and
    normalised with the train set's mean and std. The split is a seeded, stratified 80/20.

    Returns:
        A :class:`DataBundle` of ``TensorDataset``\\ s: float32 ``(N, 1, 28, 28)`` images and
        int64 ``(N,)`` labels; about 1437 train and 360 test items.
    """
    del data_dir  # embedded in scikit-learn
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise TensorslimError(
            "dataset 'digits' needs scikit-learn; install it with `pip install scikit-learn`"
        ) from exc
    raw = load_digits()
    images = np.asarray(raw.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = np.asarray(raw.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, 0.2, seed)
    x = F.interpolate(torch.from_numpy(images), size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels)
    x_train, x_test = x[torch.from_numpy(train_idx)], x[torch.from_numpy(test_idx)]
    mean, std = x_train.mean(), x_train.std()
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return DataBundle(
        train=TensorDataset(x_train.contiguous(), y[torch.from_numpy(train_idx)]),
        test=TensorDataset(x_test.contiguous(), y[torch.from_numpy(test_idx)]),
        num_classes=10,
        input_shape=(1, 28, 28),
        name="digits",
    )
