"""MNIST's own digits saved as 28x28 JPEGs, read as a user's file is: accuracy of a
shipped model, and how many the reader passes unchanged (not re-boxed).

    python benchmarks/jpeg_digits.py --data-dir ../shared/mnist --count 1000

For valid digits 0..count-1 and each JPEG quality: each digit is written as an
8-bit 28x28 JPEG (Pillow), read back with ``images.read_image`` and normalised
with ``images.prepare`` (the path of ``pixelrnn-jax predict``), and classified
by ``--checkpoint`` (default ``pretrained:pixel``). One line per quality; the
first line ("none") is the digits themselves, for comparison.
"""

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pixelrnn_jax import cli
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import images


def as_jpeg(digit: np.ndarray, quality: int | None, directory: Path) -> np.ndarray:
  """<float32>[28, 28] in [0, 1] saved as a JPEG of ``quality`` and read back by
  ``images.read_image`` (None: the digit as it is)."""
  if quality is None:
    return digit
  path = directory / "digit.jpg"
  Image.fromarray(np.round(digit * 255).astype(np.uint8)).save(path, quality=quality)
  return images.read_image(path)


def main(argv: list[str] | None = None) -> None:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--count", type=cli.number(1), default=1000)
  parser.add_argument(
    "--qualities", type=cli.number(1, 95), nargs="+", default=[95, 75, 50, 30, 20]
  )
  parser.add_argument("--checkpoint", default="pretrained:pixel", help="what --checkpoint takes")
  args = parser.parse_args(argv)
  with parser.refusing_bad_inputs():
    digits, labels = data.load_mnist("valid", data_dir=args.data_dir)
    model = gru_classifier.load(args.checkpoint)
  digits, labels = digits[: args.count], labels[: args.count]
  directory = Path(tempfile.mkdtemp())
  for quality in [None, *args.qualities]:
    read = [images.prepare(as_jpeg(digit, quality, directory)) for digit in digits]
    logits = gru_classifier.apply(model, np.stack([r.pixels for r in read]))
    accuracy = float(gru_classifier.accuracy(logits, labels))
    unchanged = sum(not r.resized for r in read)
    print(
      f"quality {quality or 'none'}: accuracy {accuracy:.2%},"
      f" passed unchanged {unchanged}/{len(read)}",
      flush=True,
    )


if __name__ == "__main__":
  main()
