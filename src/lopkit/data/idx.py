"""Reader and writer for the IDX format used by MNIST, Fashion-MNIST, KMNIST and EMNIST.

An IDX file is: two zero bytes, one dtype code byte, one byte with the number of dimensions ``d``,
then ``d`` big-endian uint32 sizes, then the data in row-major, big-endian order. Files may be
gzip-compressed; compression is detected from the content (gzip magic ``1f 8b``), not the file name.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from lopkit.data.errors import IdxFormatError

__all__ = ["IDX_DTYPES", "read_idx", "decode_idx", "encode_idx", "write_idx"]

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Read a file's bytes, transparently gunzipping it when it starts with the gzip magic."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IdxFormatError(
            f"{path}: gzip stream is corrupt or truncated ({exc}); re-download or reinstall the file"
        ) from exc


def decode_idx(buffer: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed IDX byte string into a native-endian numpy array (validates everything)."""
    if len(buffer) < 4:
        raise IdxFormatError(f"{source}: only {len(buffer)} bytes, too short for an IDX header (needs 4)")
    if buffer[0] != 0 or buffer[1] != 0:
        raise IdxFormatError(
            f"{source}: bad IDX magic number 0x{buffer[:4].hex()} (the first two bytes must be zero); "
            "this is not an IDX file"
        )
    code, ndim = buffer[2], buffer[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IdxFormatError(f"{source}: unknown IDX dtype code 0x{code:02X} (known codes: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(buffer) < header_len:
        raise IdxFormatError(f"{source}: truncated IDX header ({len(buffer)} bytes, needs {header_len})")
    shape = tuple(int.from_bytes(buffer[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(buffer) - header_len
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: IDX data {problem}: header shape {shape} of {dtype.name} needs {expected} bytes, "
            f"found {actual}"
        )
    data = np.frombuffer(buffer, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a writable native-endian numpy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    return decode_idx(_read_bytes(path), source=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a numpy array as IDX bytes (uint8, int8, int16, int32, float32 or float64)."""
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got an array with ndim={array.ndim}")
    for code, dtype in IDX_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            header = bytes([0, 0, code, array.ndim]) + b"".join(
                int(n).to_bytes(4, "big") for n in array.shape
            )
            return header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    raise ValueError(
        f"dtype {array.dtype} has no IDX code; cast to uint8, int8, int16, int32, float32 or float64"
    )


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an array as an IDX file; gzip it when ``compress`` is true (default: path ends in .gz)."""
    path = Path(path)
    payload = encode_idx(array)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path
