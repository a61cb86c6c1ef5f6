"""Shared test helpers (not tests): toy data and small configs."""

import gzip
import io
import os
import struct
import zlib

import numpy as np
from numpy.lib import format as npy
from PIL import Image

from pixelrnn_jax import gru_classifier
from pixelrnn_jax import idx
from pixelrnn_jax import model_io
from pixelrnn_jax.training import run_dir

# A run small enough for the suite: row order, 8 units, a few steps.
SMALL = dict(
  order="row",
  num_units=8,
  batch_size=16,
  steps=6,
  log_every=2,
  eval_every=3,
  checkpoint_every=2,
  eval_batch_size=64,
)


def mnist_dir_from(environ) -> str:
  """Where the suite looks for the real MNIST IDX files.

  ``$PIXELRNN_JAX_TEST_MNIST``, else the runtime's own ``$PIXELRNN_JAX_MNIST_DIR``
  (a user who set that one for ``train`` gets the same files here), else
  ``../shared/mnist`` beside the checkout. An empty variable counts as unset.
  """
  return (
    environ.get("PIXELRNN_JAX_TEST_MNIST")
    or environ.get("PIXELRNN_JAX_MNIST_DIR")
    or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "mnist")
  )


def synthetic_digits(n, seed):
  """Learnable toy digits: the label is written as a bright row."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.uniform(0, 0.2, (n, 28, 28)).astype(np.float32)
  images[np.arange(n), 2 * labels + 3, :] = 1.0
  return images, labels


def write_fake_idx(directory, n=5200):
  """Toy digits as the two gzipped IDX training files MNIST ships (not MNIST's checksums)."""
  images, labels = synthetic_digits(n, 7)
  (directory / "train-images-idx3-ubyte.gz").write_bytes(
    gzip.compress(idx.to_idx((images * 255).astype(np.uint8)), compresslevel=1)
  )
  (directory / "train-labels-idx1-ubyte.gz").write_bytes(
    gzip.compress(idx.to_idx(labels.astype(np.uint8)))
  )


def corrupt_step(workdir, step):
  """Overwrites every file of a step's ``state`` item with garbage."""
  for path in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"corrupt")


def load_model(source):
  """(model, Config, {"path", "step"}) of a saved model, as the commands read it."""
  saved = model_io.read(source)
  return (
    gru_classifier.from_saved(saved),
    run_dir.saved_config(saved),
    {"path": saved.path, "step": saved.step},
  )


def npy_claiming(shape: tuple, dtype: str = "<f8", data: bytes = b"") -> bytes:
  """An .npy file whose header claims ``shape`` and ``dtype``, followed by ``data``."""
  out = io.BytesIO()
  npy.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
  return out.getvalue() + data


def png_claiming(width: int, height: int) -> bytes:
  """A small PNG whose header claims width x height pixels (a decompression bomb's shape)."""
  out = io.BytesIO()
  Image.new("L", (8, 8), 0).save(out, "PNG")
  data = bytearray(out.getvalue())
  start = data.index(b"IHDR")  # length (4) | "IHDR" | width, height, ... (13) | CRC (4)
  data[start + 4 : start + 12] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[start : start + 17]))
  data[start + 17 : start + 21] = struct.pack(">I", crc)
  return bytes(data)
