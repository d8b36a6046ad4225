"""Tests for the offline Fashion-MNIST / MNIST-format loaders and sklearn digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lopkit.data import fashion_mnist as fm
from lopkit.data.digits import load_digits_dataset
from lopkit.data.errors import DatasetNotFoundError
from lopkit.data.fashion_mnist import (
    fashion_mnist_dir,
    fashion_mnist_stats,
    load_fashion_mnist,
    load_idx_image_dataset,
    load_mnist,
)

_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_uint8(array: np.ndarray) -> bytes:
    """Hand-written IDX encoding of a uint8 array."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fake_dataset(directory: Path, seed: int = 0, gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write tiny 6x5 'Fashion-MNIST' IDX files (train 12, test 4 images) and return the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in [("train", 12), ("test", 4)]:
        images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, array in zip(_NAMES[split], (images, labels)):
            payload = _idx_uint8(array)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (directory / name).write_bytes(payload)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture(autouse=True)
def _fresh_cache():
    fm.clear_cache()
    yield
    fm.clear_cache()


@pytest.fixture
def no_system_dataset(monkeypatch, tmp_path):
    """Hide every system location: no env vars, no Debian folder, no dpkg listing."""
    monkeypatch.delenv("LOPKIT_FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")
    monkeypatch.setattr(fm, "_dpkg_listing", lambda package: [])


def test_missing_dataset_error_says_how_to_install(no_system_dataset):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "LOPKIT_FASHION_MNIST_DIR" in message


def test_env_var_pointing_to_empty_dir_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPKIT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist_dir()
    assert "LOPKIT_FASHION_MNIST_DIR" in str(info.value)


def test_dir_lookup_order(monkeypatch, tmp_path, no_system_dataset):
    first, second, debian, dpkg_dir = (tmp_path / n for n in ("first", "second", "debian", "dpkg"))
    for d in (first, second, debian, dpkg_dir):
        _write_fake_dataset(d)
    monkeypatch.setattr(fm, "_dpkg_listing", lambda package: [str(dpkg_dir / "train-images-idx3-ubyte.gz")])
    assert fashion_mnist_dir() == dpkg_dir
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", debian)
    assert fashion_mnist_dir() == debian
    monkeypatch.setenv("FASHION_MNIST_DIR", str(second))
    assert fashion_mnist_dir() == second
    monkeypatch.setenv("LOPKIT_FASHION_MNIST_DIR", str(first))
    assert fashion_mnist_dir() == first


@pytest.mark.parametrize("gz", [True, False])
def test_loads_small_dataset_written_by_test(monkeypatch, tmp_path, gz):
    arrays = _write_fake_dataset(tmp_path / "fake", gz=gz)
    monkeypatch.setenv("LOPKIT_FASHION_MNIST_DIR", str(tmp_path / "fake"))
    for split, (images, labels) in arrays.items():
        x, y = load_fashion_mnist(split)
        assert x.shape == (len(images), 30) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_allclose(x.numpy(), images.reshape(len(images), -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy(), labels)
        x4, _ = load_fashion_mnist(split, flatten=False)
        assert x4.shape == (len(images), 1, 6, 5)
        torch.testing.assert_close(x4.reshape(len(images), -1), x)
        raw, _ = load_fashion_mnist(split, dtype=torch.uint8, normalize=False)
        np.testing.assert_array_equal(raw.numpy(), images.reshape(len(images), -1))


def test_standardize_uses_train_mean_and_std(tmp_path):
    arrays = _write_fake_dataset(tmp_path)
    train = arrays["train"][0].astype(np.float64) / 255.0
    mean, std = train.mean(), train.std()
    assert fashion_mnist_stats(tmp_path) == pytest.approx((mean, std), rel=1e-12)
    x, _ = load_fashion_mnist("test", standardize=True, data_dir=tmp_path)
    expected = (arrays["test"][0].reshape(4, -1) / 255.0 - mean) / std
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-6)
    x_raw, _ = load_fashion_mnist("test", normalize=False, standardize=True, data_dir=tmp_path)
    np.testing.assert_allclose(x_raw.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_returned_tensors_do_not_alias_the_cache(tmp_path):
    _write_fake_dataset(tmp_path)
    x, y = load_fashion_mnist(dtype=torch.uint8, normalize=False, data_dir=tmp_path)
    x.zero_()
    y.fill_(-1)
    x2, y2 = load_fashion_mnist(dtype=torch.uint8, normalize=False, data_dir=tmp_path)
    assert x2.sum() > 0 and (y2 >= 0).all()


def test_shared_tensors_are_one_copy_per_process_and_equal_a_private_load(tmp_path):
    _write_fake_dataset(tmp_path)
    x, y = fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path)
    again = fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path)
    assert again[0] is x and again[1] is y  # the same tensors: S runs in one process hold one copy
    private = fm.load_fashion_mnist("train", standardize=True, data_dir=tmp_path)
    assert torch.equal(private[0], x) and torch.equal(private[1], y) and private[0] is not x
    images = fm.shared_fashion_mnist("train", flatten=False, data_dir=tmp_path)[0]
    assert images.shape == (12, 1, 6, 5) and images is not x  # each layout and scaling is its own entry
    assert fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path, device="cpu")[0] is x
    on_meta = fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path, device="meta")
    assert on_meta[0].device.type == "meta" and on_meta[0].shape == x.shape  # one copy per device, from the CPU one
    assert fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path, device="meta")[0] is on_meta[0]
    fm.clear_cache()
    assert fm.shared_fashion_mnist("train", standardize=True, data_dir=tmp_path)[0] is not x


def test_bad_arguments(tmp_path):
    _write_fake_dataset(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="floating dtype"):
        load_fashion_mnist(dtype=torch.uint8, data_dir=tmp_path)


def test_mismatched_image_and_label_counts(tmp_path):
    _write_fake_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_uint8(np.zeros(5, np.uint8))))
    with pytest.raises(ValueError, match="12 images but 5 labels"):
        load_idx_image_dataset(tmp_path, "train")


def test_load_mnist_needs_a_user_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("LOPKIT_MNIST_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="LOPKIT_MNIST_DIR"):
        load_mnist()
    arrays = _write_fake_dataset(tmp_path, seed=3, gz=False)
    monkeypatch.setenv("LOPKIT_MNIST_DIR", str(tmp_path))
    _, y = load_mnist("test")
    np.testing.assert_array_equal(y.numpy(), arrays["test"][1])
    with pytest.raises(DatasetNotFoundError):
        load_mnist(data_dir=tmp_path / "empty")


def _real_fashion_dir() -> Path | None:
    try:
        return fashion_mnist_dir()
    except DatasetNotFoundError:
        return None


_REAL = _real_fashion_dir()
needs_fashion = pytest.mark.skipif(
    _REAL is None,
    reason="Fashion-MNIST not installed: `sudo apt-get install dataset-fashion-mnist` "
    "or set LOPKIT_FASHION_MNIST_DIR",
)


@needs_fashion
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 784) and y.shape == (60000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(torch.bincount(y, minlength=10).numpy(), np.full(10, 6000))
    assert float(x.mean(dtype=torch.float64)) == pytest.approx(72.94 / 255, abs=2e-3)
    # compare one image with an independent decode of the raw gzip bytes (16-byte header)
    raw = gzip.decompress((_REAL / "train-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, dtype=np.uint8, offset=16, count=784)
    np.testing.assert_allclose(x[0].numpy(), first / 255.0, rtol=1e-6)
    xt, yt = load_fashion_mnist("test", flatten=False)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    np.testing.assert_array_equal(torch.bincount(yt, minlength=10).numpy(), np.full(10, 1000))
    mean, std = fashion_mnist_stats()
    assert mean == pytest.approx(0.2860, abs=1e-3) and std == pytest.approx(0.3530, abs=1e-3)


def test_digits_dataset_matches_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = load_digits_dataset()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_allclose(x.numpy(), bunch.data / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), bunch.target)
    x4, _ = load_digits_dataset(flatten=False)
    assert x4.shape == (1797, 1, 8, 8)
