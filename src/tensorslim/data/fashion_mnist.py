"""Fashion-MNIST from local IDX files (as installed by Debian's ``dataset-fashion-mnist``).

Debian installs the four original gzip files flat in ``/usr/share/datasets/fashion-mnist/``:
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
and ``t10k-labels-idx1-ubyte.gz``. Uncompressed copies (same names without ``.gz``) work too.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tensorslim.data.registry import DataBundle
from tensorslim.errors import TensorslimError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SYSTEM_DIR",
    "candidate_dirs",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

#: Mean and std of the 60k training pixels scaled to [0, 1] (computed: 0.28604, 0.35302).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TENSORSLIM_DATA"

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in ``.gz``) into a numpy array.

    Layout: two zero bytes, a type byte (0x08 = uint8, ...), a byte with the number of dims
    ``d``, ``d`` big-endian uint32 sizes, then the row-major data.

    Returns:
        An array of shape ``(dim_0, ..., dim_{d-1})`` in native byte order.

    Raises:
        TensorslimError: unreadable gzip, bad magic number, unexpected number of dims, or
            a data section that is shorter or longer than the header says.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise TensorslimError(
            f"corrupt data file {path} ({type(exc).__name__}: {exc}); delete it and reinstall "
            "the dataset"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise TensorslimError(
            f"corrupt data file {path}: bad IDX magic number {raw[:4].hex() or '(empty)'}; "
            "delete it and reinstall the dataset"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise TensorslimError(
            f"corrupt data file {path}: IDX has {ndim} dims, expected {expected_ndim}; "
            "check that the file is the right one"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TensorslimError(
            f"corrupt data file {path}: truncated IDX header; delete it and reinstall the dataset"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise TensorslimError(
            f"corrupt data file {path}: {len(raw) - header} data bytes, header says {expected} "
            f"for shape {dims}; delete it and reinstall the dataset"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Directories searched for the IDX files, in order (duplicates removed).

    A given ``data_dir`` is searched alone (with its ``fashion-mnist`` subdir): the files the
    user pointed at, or an error — never another copy. Without it: ``$TENSORSLIM_DATA`` and its
    ``fashion-mnist`` subdir, then ``/usr/share/datasets/fashion-mnist``.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, root / "fashion-mnist"]
    dirs: list[Path] = []
    env = os.environ.get(ENV_VAR) or None
    if env is not None:
        root = Path(env).expanduser()
        dirs += [root, root / "fashion-mnist"]
    dirs.append(SYSTEM_DIR)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _file_in(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz`` or ``directory/stem`` if either is a file."""
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Locate the four files in the first directory of :func:`candidate_dirs` holding all four.

    Returns:
        ``{"train_images": path, "train_labels": ..., "test_images": ..., "test_labels": ...}``.

    Raises:
        TensorslimError: no directory holds all four; lists every place looked.
    """
    looked = candidate_dirs(data_dir)
    for directory in looked:
        found = {key: _file_in(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(p is not None for p in found.values()):
            return {key: p for key, p in found.items() if p is not None}
    raise TensorslimError(
        "Fashion-MNIST files (train-images-idx3-ubyte[.gz] etc.) not found; looked in "
        f"{', '.join(str(d) for d in looked)}; install with `apt-get install "
        "dataset-fashion-mnist` or pass --data-dir (or set TENSORSLIM_DATA)"
    )


def _load_split(images_path: Path, labels_path: Path) -> TensorDataset:
    """Read one split: float32 ``(N, 1, 28, 28)`` normalised images, int64 ``(N,)`` labels."""
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise TensorslimError(
            f"corrupt data file {images_path if images.dtype != np.uint8 else labels_path}: "
            "expected uint8 IDX data; check that the file is the right one"
        )
    if images.shape[1:] != (28, 28):
        raise TensorslimError(
            f"corrupt data file {images_path}: images are {images.shape[1:]}, expected 28x28"
        )
    if images.shape[0] != labels.shape[0]:
        raise TensorslimError(
            f"corrupt data files {images_path} / {labels_path}: {images.shape[0]} images but "
            f"{labels.shape[0]} labels; reinstall the dataset"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise TensorslimError(
            f"corrupt data file {labels_path}: label {int(labels.max())} is not in 0..9"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x.mul_(1.0 / 255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_fashion_mnist(data_dir: str | Path | None = None, seed: int = 0) -> DataBundle:
    """Load Fashion-MNIST (60000 train / 10000 test, 10 classes) from local IDX files.

    Images become float32 ``(N, 1, 28, 28)``: ``(pixel / 255 - 0.2860) / 0.3530``; labels are
    int64 ``(N,)``. ``seed`` is unused (the split is fixed). See :func:`candidate_dirs` for
    where files are looked for.

    Raises:
        TensorslimError: files missing (lists the places looked) or corrupt (names the file).
    """
    del seed
    paths = find_fashion_mnist(data_dir)
    return DataBundle(
        train=_load_split(paths["train_images"], paths["train_labels"]),
        test=_load_split(paths["test_images"], paths["test_labels"]),
        num_classes=10,
        input_shape=(1, 28, 28),
        name="fashion-mnist",
    )
