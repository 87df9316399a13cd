"""Datasets: ``load_dataset(name)`` returns a :class:`DataBundle` of train/test datasets.

Built-in names: ``digits`` (scikit-learn, embedded), ``fashion-mnist`` (local IDX files),
``synthetic`` (seeded toy data); any ``module:function`` calls the user's own loader.
"""

from tensorslim.data.registry import (
    DataBundle,
    apply_limits,
    list_datasets,
    load_dataset,
    make_loaders,
    seeded_subset,
)

__all__ = [
    "DataBundle",
    "apply_limits",
    "list_datasets",
    "load_dataset",
    "make_loaders",
    "seeded_subset",
]
