"""Dataset registry: :class:`DataBundle`, :func:`load_dataset`, :func:`make_loaders`.

Built-in names are resolved lazily (so importing :mod:`tensorslim.data` does not import
scikit-learn); any ``module:function`` name calls the user's own loader.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from tensorslim.errors import TensorslimError
from tensorslim.models.external import call_with_accepted_kwargs, import_callable, is_external_spec


@dataclass
class DataBundle:
    """A train/test pair of map-style datasets plus what a model needs to know.

    Attributes:
        train: dataset whose items are ``(image, label)`` with image ``(C, H, W)`` float32 and
            label an int64 scalar (tensor or int) in ``[0, num_classes)``.
        test: same layout as ``train``.
        num_classes: number of classes.
        input_shape: ``(C, H, W)`` of one image.
        name: dataset name as passed to :func:`load_dataset`.
    """

    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


# canonical name -> "module:function" of a loader taking (data_dir, seed) keyword arguments
_BUILTIN: dict[str, str] = {
    "digits": "tensorslim.data.digits:load_digits_bundle",
    "fashion-mnist": "tensorslim.data.fashion_mnist:load_fashion_mnist",
    "synthetic": "tensorslim.data.synthetic:load_synthetic",
}
_ALIASES: dict[str, str] = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
# built-in datasets that read files (the others are embedded or generated)
_READS_FILES = {"fashion-mnist"}


def list_datasets() -> list[str]:
    """Canonical built-in dataset names, sorted (aliases and ``module:function`` excluded)."""
    return sorted(_BUILTIN)


def _builtin_loader(name: str) -> Callable[..., DataBundle]:
    """Import and return the loader function of a built-in dataset."""
    module_name, _, fn_name = _BUILTIN[name].partition(":")
    fn: Callable[..., DataBundle] = getattr(importlib.import_module(module_name), fn_name)
    return fn


def seeded_subset(dataset: Dataset[Any], limit: int | None, seed: int, what: str) -> Dataset[Any]:
    """Return a deterministic random subset of ``limit`` items (indices kept in order).

    ``None`` or a limit >= ``len(dataset)`` returns ``dataset`` itself.

    Raises:
        TensorslimError: ``limit`` is not a positive integer.
    """
    if limit is None:
        return dataset
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise TensorslimError(f"{what} must be a positive integer, got {limit!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if limit >= n:
        return dataset
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:limit].sort().values
    return Subset(dataset, idx.tolist())


def apply_limits(
    bundle: DataBundle,
    *,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataBundle:
    """Return ``bundle`` with train/test cut to seeded subsets of at most the given sizes."""
    return DataBundle(
        train=seeded_subset(bundle.train, limit_train, seed, "limit_train"),
        test=seeded_subset(bundle.test, limit_test, seed + 1, "limit_test"),
        num_classes=bundle.num_classes,
        input_shape=bundle.input_shape,
        name=bundle.name,
    )


def _labels_max(dataset: Dataset[Any]) -> int:
    """Largest label in ``dataset`` (fast path for TensorDataset / ``.targets``)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return int(dataset.tensors[1].max().item())
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return int(torch.as_tensor(targets).max().item())
    best = -1
    for i in range(len(dataset)):  # type: ignore[arg-type]
        best = max(best, int(torch.as_tensor(dataset[i][1]).item()))
    return best


def _bundle_from_pair(spec: str, result: tuple[Any, ...]) -> DataBundle:
    """Turn a user loader's ``(train, test)`` tuple into a :class:`DataBundle`."""
    train, test = result
    try:
        first = train[0]
        shape = tuple(torch.as_tensor(first[0]).shape)
    except Exception as exc:
        raise TensorslimError(
            f"dataset loader {spec!r}: cannot read train[0] as (image, label) "
            f"({type(exc).__name__}: {exc}); return datasets of (image, label) pairs"
        ) from exc
    if len(shape) != 3:
        raise TensorslimError(
            f"dataset loader {spec!r}: images have shape {shape}, expected (C, H, W); "
            "add a channel dimension"
        )
    try:
        num_classes = max(_labels_max(train), _labels_max(test)) + 1
    except Exception as exc:
        raise TensorslimError(
            f"dataset loader {spec!r}: cannot read integer labels ({type(exc).__name__}: {exc}); "
            "return (image, int label) pairs"
        ) from exc
    c, h, w = (int(s) for s in shape)
    return DataBundle(train, test, num_classes, (c, h, w), spec)


def _load_user(spec: str, data_dir: Path | None, seed: int) -> DataBundle:
    """Call the user's ``module:function`` loader and validate its result."""
    fn = import_callable(spec, "dataset loader")
    try:
        result = call_with_accepted_kwargs(fn, data_dir=data_dir, seed=seed)
    except TensorslimError:
        raise
    except Exception as exc:
        raise TensorslimError(
            f"dataset loader {spec!r} failed ({type(exc).__name__}: {exc}); fix the loader"
        ) from exc
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return _bundle_from_pair(spec, tuple(result))
    raise TensorslimError(
        f"dataset loader {spec!r} returned {type(result).__name__}; "
        "return a tensorslim.data.DataBundle or a (train, test) tuple of datasets"
    )


def _as_path(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir).expanduser() if data_dir is not None else None


def _checked_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir`` as a Path; a directory that does not exist is an error, not a fallback."""
    path = _as_path(data_dir)
    if path is None:
        return None
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise TensorslimError(
            f"data directory {path} {what}: fix --data-dir (or data.data_dir), or leave it out "
            "to use the default locations"
        )
    return path


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataBundle:
    """Load a dataset by name.

    Args:
        name: ``digits``, ``fashion-mnist`` (alias ``fashion_mnist``), ``synthetic``, or
            ``module:function`` for the user's own loader (called with ``data_dir=`` and
            ``seed=`` if it accepts them; returns a :class:`DataBundle` or ``(train, test)``).
        data_dir: where the dataset's files are (only datasets that read files use it; for a
            built-in dataset it must exist, and one that reads no files warns that it is
            unused). A user's loader receives it as given.
        seed: seed for splits, synthetic data and the ``limit_*`` subsets.
        limit_train: keep a seeded random subset of at most this many training items.
        limit_test: same for the test set.

    Returns:
        A :class:`DataBundle`; images are ``(C, H, W)`` float32, labels int64.

    Raises:
        TensorslimError: unknown name, a ``data_dir`` that does not exist, missing/corrupt
            files, or a failing user loader.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    # a user's loader decides what its data_dir means (it may create it); ours read it
    path = _checked_data_dir(data_dir) if key in _BUILTIN else _as_path(data_dir)
    if key in _BUILTIN and path is not None and key not in _READS_FILES:
        warnings.warn(
            f"dataset '{key}' reads no files: the data directory {path} is not used",
            stacklevel=2,
        )
    if key in _BUILTIN:
        bundle = _builtin_loader(key)(data_dir=path, seed=seed)
    elif is_external_spec(name.strip()):
        bundle = _load_user(name.strip(), path, seed)
    else:
        raise TensorslimError(
            f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())} "
            "(or 'module:function' for your own loader)"
        )
    return apply_limits(bundle, seed=seed, limit_train=limit_train, limit_test=limit_test)


def make_loaders(
    bundle: DataBundle,
    batch_size: int = 128,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler[Any] | None = None,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Build ``(train_loader, test_loader)``; batches are ``(N, C, H, W)`` images, ``(N,)`` labels.

    The train loader shuffles with a generator seeded by ``seed`` (so epochs are reproducible)
    unless ``shuffle=False`` or a ``sampler`` is given (the sampler then decides the order).
    The test loader never shuffles. Neither drops the last partial batch.

    Raises:
        TensorslimError: ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TensorslimError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers < 0:
        raise TensorslimError(f"num_workers must be >= 0, got {num_workers}")
    gen = torch.Generator().manual_seed(seed)
    train_loader: DataLoader[Any] = DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=gen,
    )
    test_loader: DataLoader[Any] = DataLoader(
        bundle.test,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return train_loader, test_loader
