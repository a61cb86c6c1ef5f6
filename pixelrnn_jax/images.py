"""Reading single digit images for ``pixelrnn-jax predict``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm")


class ImageError(ValueError):
  """An input image cannot be used (names the file and what is wrong)."""


def load_image(path: str | Path) -> np.ndarray:
  """One 28x28 grayscale digit, white on black as MNIST, as <float32>[28, 28] in [0, 1].

  Accepts ``.npy`` (uint8 0..255, or float in [0, 1]; shape [28, 28] or [784])
  and image files (PNG, JPEG, ...: converted to grayscale, must be 28x28).

  Raises:
    ImageError: naming the file: unreadable, wrong size, wrong dtype or range.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if not path.is_file():
    raise ImageError(f"{path}: no such file")
  if suffix == ".npy":
    try:
      array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
      raise ImageError(f"{path}: not a readable .npy array ({error})") from error
  elif suffix in IMAGE_SUFFIXES:
    try:
      from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise ImageError(f"{path}: reading images needs Pillow (pip install pillow)") from error
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
      raise ImageError(f"{path}: not a readable image ({error})") from error
  else:
    raise ImageError(f"{path}: unsupported file type {suffix or '(none)'}; use .png or .npy")
  if array.shape == (784,):
    array = array.reshape(28, 28)
  if array.shape != (28, 28):
    raise ImageError(f"{path}: shape {array.shape}, expected 28x28 (MNIST size; resize it first)")
  if array.dtype == np.uint8:
    return array.astype(np.float32) / np.float32(255.0)
  if not np.issubdtype(array.dtype, np.floating):
    raise ImageError(f"{path}: dtype {array.dtype}, expected uint8 (0..255) or float in [0, 1]")
  if not np.all(np.isfinite(array)):
    raise ImageError(f"{path}: float values must be finite and in [0, 1] (found NaN or inf)")
  if array.min() < 0 or array.max() > 1:
    raise ImageError(f"{path}: float values must be finite and in [0, 1]"
                     f" (found {array.min():.3g}..{array.max():.3g})")
  return array.astype(np.float32)
