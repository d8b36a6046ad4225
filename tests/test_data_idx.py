"""Tests for lopkit.data.idx: IDX decoding against files written here with struct/gzip (independent writer)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from lopkit.data.errors import IdxFormatError
from lopkit.data.idx import read_idx, write_idx

_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
          np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}  # fmt: skip


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode an IDX file by hand: magic (0, 0, code, ndim), big-endian uint32 dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, _CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8), rng.integers(0, 10, size=7, dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_round_trips_uint8_images_and_labels(tmp_path, images_and_labels, compressed):
    images, labels = images_and_labels
    for name, array in [("images", images), ("labels", labels)]:
        payload = _idx_bytes(array)
        path = tmp_path / (f"{name}.gz" if compressed else name)
        path.write_bytes(gzip.compress(payload) if compressed else payload)
        decoded = read_idx(path)
        assert decoded.dtype == np.uint8
        assert decoded.shape == array.shape
        np.testing.assert_array_equal(decoded, array)
        decoded[...] = 0  # the result is a writable copy


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "float32", "float64"])
def test_read_idx_decodes_big_endian_dtypes(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    if dtype == "int8":
        array = (np.arange(24).reshape(2, 3, 4) - 12).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(array))
    decoded = read_idx(path)
    assert decoded.dtype == np.dtype(dtype) and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_matches_hand_encoding_and_reads_back(tmp_path, images_and_labels, suffix):
    images, _ = images_and_labels
    path = write_idx(tmp_path / f"w{suffix}", images)
    raw = path.read_bytes()
    assert (gzip.decompress(raw) if suffix else raw) == _idx_bytes(images)
    np.testing.assert_array_equal(read_idx(path), images)


def test_compression_is_detected_from_content_not_name(tmp_path, images_and_labels):
    images, _ = images_and_labels
    raw_named_gz = tmp_path / "raw.gz"
    raw_named_gz.write_bytes(_idx_bytes(images))
    np.testing.assert_array_equal(read_idx(raw_named_gz), images)


def test_bad_magic_number_raises(tmp_path, images_and_labels):
    payload = bytearray(_idx_bytes(images_and_labels[0]))
    payload[0] = 0x50  # e.g. a PNG/ZIP or random file
    path = tmp_path / "bad"
    path.write_bytes(bytes(payload))
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(path)
    assert issubclass(IdxFormatError, ValueError)


def test_unknown_dtype_code_raises(tmp_path, images_and_labels):
    payload = bytearray(_idx_bytes(images_and_labels[0]))
    payload[2] = 0x07
    path = tmp_path / "bad_dtype"
    path.write_bytes(bytes(payload))
    with pytest.raises(IdxFormatError, match="dtype code 0x07"):
        read_idx(path)


def test_truncated_and_padded_data_raise(tmp_path, images_and_labels):
    payload = _idx_bytes(images_and_labels[0])
    (tmp_path / "short").write_bytes(payload[:-1])
    (tmp_path / "long").write_bytes(payload + b"\x00")
    (tmp_path / "header").write_bytes(payload[:6])
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(IdxFormatError, match="trailing"):
        read_idx(tmp_path / "long")
    with pytest.raises(IdxFormatError, match="header"):
        read_idx(tmp_path / "header")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(tmp_path / "tiny")


def test_truncated_gzip_stream_raises(tmp_path, images_and_labels):
    compressed = gzip.compress(_idx_bytes(images_and_labels[0]))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="no IDX code"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
