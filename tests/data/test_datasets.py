"""Tests for tensorslim.data: built-in datasets, IDX parsing, user loaders and loaders."""

from __future__ import annotations

import gzip
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from tensorslim.data import DataBundle, list_datasets, load_dataset, make_loaders
from tensorslim.data import fashion_mnist as fm
from tensorslim.errors import TensorslimError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN = all((DEBIAN_DIR / f"{stem}.gz").is_file() for stem in fm.FASHION_MNIST_FILES.values())


def write_idx(path: Path, arr: np.ndarray, *, magic: bytes | None = None) -> Path:
    """Write ``arr`` (uint8) as an IDX file, gzip-compressed when ``path`` ends in .gz."""
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    payload = header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fake_fashion(directory: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = True):
    """Write the four Fashion-MNIST files with small random content; return the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    suffix = ".gz" if gz else ""
    for key, stem in fm.FASHION_MNIST_FILES.items():
        write_idx(directory / f"{stem}{suffix}", arrays[key])
    return arrays


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide the Debian dataset and TENSORSLIM_DATA so only explicit dirs are searched."""
    missing = tmp_path / "no-system-dataset"
    monkeypatch.setattr(fm, "SYSTEM_DIR", missing)
    monkeypatch.delenv("TENSORSLIM_DATA", raising=False)
    return missing


# --------------------------------------------------------------------------- registry


def test_list_datasets() -> None:
    assert list_datasets() == ["digits", "fashion-mnist", "synthetic"]


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(TensorslimError) as err:
        load_dataset("cifar-1000")
    msg = str(err.value)
    assert "cifar-1000" in msg
    for name in list_datasets():
        assert name in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_normalisation() -> None:
    b = load_dataset("digits", seed=0)
    assert isinstance(b, DataBundle)
    assert b.name == "digits" and b.num_classes == 10 and b.input_shape == (1, 28, 28)
    assert isinstance(b.train, TensorDataset) and isinstance(b.test, TensorDataset)
    x, y = b.train.tensors
    xt, yt = b.test.tensors
    assert x.shape[1:] == (1, 28, 28) and xt.shape[1:] == (1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(b.train) + len(b.test) == 1797
    assert 0.18 < len(b.test) / 1797 < 0.22
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-4
    # stratified: every class is ~20% in test
    for k in range(10):
        frac = (yt == k).sum().item() / ((y == k).sum().item() + (yt == k).sum().item())
        assert 0.17 < frac < 0.23
    # the test set is normalised with the train statistics, so it is only roughly standard
    assert abs(xt.mean().item()) < 0.2


def test_digits_split_is_deterministic_per_seed() -> None:
    a, b, c = (load_dataset("digits", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_images_and_labels_stay_paired() -> None:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from tensorslim.data.digits import stratified_split

    raw = load_digits()
    b = load_dataset("digits", seed=0)
    x, y = b.train.tensors
    train_idx, test_idx = stratified_split(raw.target, 0.2, 0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(train_idx) == len(x)
    assert y.tolist() == raw.target[train_idx].tolist()
    assert b.test.tensors[1].tolist() == raw.target[test_idx].tolist()
    for i in (0, 100, len(x) - 1):
        img = torch.tensor(raw.images[train_idx[i]], dtype=torch.float32)[None, None] / 16.0
        up = F.interpolate(img, size=(28, 28), mode="bilinear", align_corners=False).flatten()
        corr = torch.corrcoef(torch.stack([up, x[i].flatten()]))[0, 1].item()
        assert corr > 0.9999


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable() -> None:
    a, b, c = (load_dataset("synthetic", seed=s) for s in (7, 7, 8))
    assert len(a.train) == 512 and len(a.test) == 256
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10
    x, y = a.train.tensors
    assert x.shape == (512, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(x, c.train.tensors[0])
    assert torch.bincount(y, minlength=10).min() >= 50
    # nearest class-centroid on train solves the test set: the problem is learnable
    xt, yt = a.test.tensors
    centroids = torch.stack([x[y == k].mean(0).flatten() for k in range(10)])
    pred = torch.cdist(xt.flatten(1), centroids).argmin(1)
    assert (pred == yt).float().mean().item() > 0.9


def test_limits_take_seeded_subsets() -> None:
    a = load_dataset("synthetic", seed=1, limit_train=100, limit_test=30)
    b = load_dataset("synthetic", seed=1, limit_train=100, limit_test=30)
    assert isinstance(a.train, Subset) and len(a.train) == 100 and len(a.test) == 30
    assert a.train.indices == b.train.indices
    assert len(set(a.train.indices)) == 100
    full = load_dataset("synthetic", seed=1, limit_train=10_000)
    assert len(full.train) == 512
    with pytest.raises(TensorslimError, match="limit_train"):
        load_dataset("synthetic", limit_train=0)


def test_make_loaders_seeded_order() -> None:
    b = load_dataset("synthetic", seed=0)
    tr1, te1 = make_loaders(b, batch_size=100, seed=5)
    tr2, _ = make_loaders(b, batch_size=100, seed=5)
    tr3, _ = make_loaders(b, batch_size=100, seed=6)
    y1 = torch.cat([yb for _, yb in tr1])
    assert torch.equal(y1, torch.cat([yb for _, yb in tr2]))
    assert not torch.equal(y1, torch.cat([yb for _, yb in tr3]))
    xb, yb = next(iter(te1))
    assert xb.shape == (100, 1, 28, 28) and yb.shape == (100,)
    assert torch.equal(torch.cat([yb for _, yb in te1]), b.test.tensors[1])  # test: no shuffle
    sizes = [len(yb) for _, yb in tr1]
    assert sizes == [100] * 5 + [12]
    sampler = torch.utils.data.SequentialSampler(b.train)
    tr4, _ = make_loaders(b, batch_size=64, sampler=sampler)
    assert torch.equal(torch.cat([yb for _, yb in tr4]), b.train.tensors[1])
    with pytest.raises(TensorslimError, match="batch_size"):
        make_loaders(b, batch_size=0)


# --------------------------------------------------------------------------- fashion-mnist


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fm.read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    assert np.array_equal(fm.read_idx(write_idx(tmp_path / "a", arr), expected_ndim=3), arr)
    # big-endian int32 payload
    ints = np.array([1, -2, 70000], dtype=">i4")
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + ints.tobytes()
    (tmp_path / "i").write_bytes(raw)
    assert fm.read_idx(tmp_path / "i").tolist() == [1, -2, 70000]


def test_fake_fashion_mnist_gz(tmp_path: Path, no_system_data: Path) -> None:
    arrays = make_fake_fashion(tmp_path / "fm")
    b = load_dataset("fashion-mnist", tmp_path / "fm")
    assert b.name == "fashion-mnist" and b.num_classes == 10 and b.input_shape == (1, 28, 28)
    x, y = b.train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == arrays["train_labels"].tolist()
    expected = (arrays["train_images"][3, 10, 7] / 255.0 - 0.2860) / 0.3530
    assert x[3, 0, 10, 7].item() == pytest.approx(expected, abs=1e-5)
    assert b.test.tensors[1].tolist() == arrays["test_labels"].tolist()


def test_fake_fashion_mnist_plain_files_alias_and_subdir(
    tmp_path: Path, no_system_data: Path
) -> None:
    make_fake_fashion(tmp_path / "root" / "fashion-mnist", n_train=4, gz=False)
    b = load_dataset("fashion_mnist", str(tmp_path / "root"))
    assert len(b.train) == 4 and len(b.test) == 5


def test_fashion_mnist_env_var(
    tmp_path: Path, no_system_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fake_fashion(tmp_path / "env" / "fashion-mnist", n_train=6)
    monkeypatch.setenv("TENSORSLIM_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist").train) == 6
    # an explicit data_dir wins over the environment variable
    make_fake_fashion(tmp_path / "explicit", n_train=8)
    assert len(load_dataset("fashion-mnist", tmp_path / "explicit").train) == 8


def test_fashion_mnist_missing_lists_places(
    tmp_path: Path, no_system_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORSLIM_DATA", str(tmp_path / "envdir"))
    with pytest.raises(TensorslimError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    for place in (tmp_path / "envdir", no_system_data):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_fashion_mnist_given_dir_is_the_only_place(
    tmp_path: Path, no_system_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --data-dir without the files is an error even when another copy exists elsewhere."""
    make_fake_fashion(tmp_path / "env" / "fashion-mnist", n_train=6)
    monkeypatch.setenv("TENSORSLIM_DATA", str(tmp_path / "env"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(TensorslimError, match="not found") as err:
        load_dataset("fashion-mnist", tmp_path / "mine")
    assert str(tmp_path / "mine") in str(err.value) and str(tmp_path / "env") not in str(err.value)


@pytest.mark.parametrize("name", ["fashion-mnist", "digits", "synthetic"])
def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(TensorslimError, match="does not exist") as err:
        load_dataset(name, tmp_path / "nonexistent")
    assert str(tmp_path / "nonexistent") in str(err.value)


def test_a_data_dir_an_embedded_dataset_ignores_is_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="reads no files"):
        load_dataset("synthetic", tmp_path)


def test_fashion_mnist_incomplete_dir_is_missing(tmp_path: Path, no_system_data: Path) -> None:
    make_fake_fashion(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TensorslimError, match="not found"):
        load_dataset("fashion-mnist", tmp_path / "part")


def test_fashion_mnist_bad_magic(tmp_path: Path, no_system_data: Path) -> None:
    make_fake_fashion(tmp_path / "bad")
    bad = tmp_path / "bad" / "train-images-idx3-ubyte.gz"
    write_idx(bad, np.zeros((12, 28, 28), np.uint8), magic=b"\x12\x34\x08\x03")
    with pytest.raises(TensorslimError) as err:
        load_dataset("fashion-mnist", tmp_path / "bad")
    assert str(bad) in str(err.value) and "magic" in str(err.value)


def test_fashion_mnist_truncated_data(tmp_path: Path, no_system_data: Path) -> None:
    make_fake_fashion(tmp_path / "trunc")
    path = tmp_path / "trunc" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(TensorslimError) as err:
        load_dataset("fashion-mnist", tmp_path / "trunc")
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


def test_fashion_mnist_truncated_gzip_stream(tmp_path: Path, no_system_data: Path) -> None:
    make_fake_fashion(tmp_path / "gz")
    path = tmp_path / "gz" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(TensorslimError) as err:
        load_dataset("fashion-mnist", tmp_path / "gz")
    assert str(path) in str(err.value)


def test_fashion_mnist_count_mismatch(tmp_path: Path, no_system_data: Path) -> None:
    make_fake_fashion(tmp_path / "mm")
    write_idx(tmp_path / "mm" / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(TensorslimError, match="12 images but 11 labels"):
        load_dataset("fashion-mnist", tmp_path / "mm")


@pytest.mark.skipif(not HAVE_DEBIAN, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORSLIM_DATA", raising=False)
    b = load_dataset("fashion-mnist")
    x, y = b.train.tensors
    assert x.shape == (60000, 1, 28, 28) and b.test.tensors[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(b.test.tensors[1], minlength=10).tolist() == [1000] * 10
    with gzip.open(DEBIAN_DIR / "train-labels-idx1-ubyte.gz", "rb") as fh:
        head = fh.read(9)
    assert head[:4] == b"\x00\x00\x08\x01" and int(y[0]) == head[8] == 9
    # the constants really are the train statistics
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-3


# --------------------------------------------------------------------------- module:function


def _write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


def test_user_loader_tuple(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "ts_user_data_tuple",
        """
        import torch
        from torch.utils.data import TensorDataset

        SEEN = {}

        def build(data_dir=None):
            SEEN["data_dir"] = data_dir
            x = torch.zeros(6, 3, 16, 16)
            return TensorDataset(x, torch.tensor([0, 1, 4, 0, 1, 2])), TensorDataset(
                x[:2], torch.tensor([5, 0])
            )
        """,
    )
    monkeypatch.chdir(tmp_path)
    b = load_dataset("ts_user_data_tuple:build", tmp_path / "dd", limit_train=4)
    assert b.input_shape == (3, 16, 16) and b.num_classes == 6
    assert b.name == "ts_user_data_tuple:build" and len(b.train) == 4 and len(b.test) == 2
    import ts_user_data_tuple  # type: ignore[import-not-found]

    assert ts_user_data_tuple.SEEN["data_dir"] == tmp_path / "dd"


def test_user_loader_bundle_from_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    _write_module(
        tmp_path / "sub",
        "ts_user_data_bundle",
        """
        from tensorslim.data import load_dataset

        def get(seed):
            b = load_dataset("synthetic", seed=seed)
            b.name = "mine"
            return b
        """,
    )
    monkeypatch.chdir(tmp_path)
    b = load_dataset("sub/ts_user_data_bundle.py:get", seed=2)
    assert b.name == "mine" and len(b.train) == 512
    assert torch.equal(b.train.tensors[0], load_dataset("synthetic", seed=2).train.tensors[0])


def test_user_loader_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        "ts_user_data_bad",
        """
        def wrong():
            return 42

        def boom():
            raise RuntimeError("disk on fire")
        """,
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TensorslimError) as err:
        load_dataset("ts_no_such_module_xyz:load")
    assert "ts_no_such_module_xyz" in str(err.value) and "load" in str(err.value)
    with pytest.raises(TensorslimError, match="has no function 'missing'"):
        load_dataset("ts_user_data_bad:missing")
    with pytest.raises(TensorslimError, match="DataBundle"):
        load_dataset("ts_user_data_bad:wrong")
    with pytest.raises(TensorslimError, match="disk on fire"):
        load_dataset("ts_user_data_bad:boom")
