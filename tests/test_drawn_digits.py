"""Digits as people draw them, generated from valid-split digits and read through
the same path as ``pixelrnn-jax predict`` (a PNG file, ``images.read_image``,
``images.prepare``, the shipped pixel model): pen widths from 1 pixel to a bold
marker, form boxes, baselines, a photographed sheet's dark edges; and inputs
that hold no digit at all."""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import images
from pixelrnn_jax import inference
from tests.conftest import MNIST_DIR

CANVAS = 280  # a drawing canvas: 10x MNIST's 28
FIRST, COUNT = 100, 20  # valid digits 100..119


@pytest.fixture(scope="module")
def first_valid():
  """Valid digits 0-7 and their labels (module-scoped, for hypothesis tests)."""
  if not os.path.exists(os.path.join(MNIST_DIR, "train-labels-idx1-ubyte.gz")):
    pytest.skip(f"real MNIST files not found in {MNIST_DIR}")
  pixels, labels = data.load_mnist("valid", data_dir=MNIST_DIR)
  return pixels[:8], labels[:8]


@pytest.fixture
def digits(mnist_dir):
  pixels, labels = data.load_mnist("valid", data_dir=mnist_dir)
  return pixels[FIRST : FIRST + COUNT], labels[FIRST : FIRST + COUNT]


@pytest.fixture(scope="module")
def model():
  return gru_classifier.load_pretrained("pixel")


def _mask(digit):
  """The digit's ink on a CANVAS x CANVAS page (bilinear upscaling, then > 0.5)."""
  big = Image.fromarray((digit * 255).astype(np.uint8)).resize(
    (CANVAS, CANVAS), Image.Resampling.BILINEAR
  )
  return np.asarray(big, np.float32) / 255 > 0.5


def _pen(mask, width):
  """The digit's skeleton drawn with a round pen ``width`` pixels wide."""
  skeleton = skeletonize(mask)
  return ndimage.distance_transform_edt(~skeleton) <= (width - 1) / 2


def _bold(mask, width):
  return ndimage.distance_transform_edt(~mask) <= width / 2


def _page(ink):
  """Black ink on white paper, as a grey image in [0, 1]."""
  return np.where(ink, 0.0, 1.0).astype(np.float32)


def _frame(ink, inset, thickness):
  ink = ink.copy()
  ink[inset : inset + thickness, inset:-inset] = True
  ink[-inset - thickness : -inset, inset:-inset] = True
  ink[inset:-inset, inset : inset + thickness] = True
  ink[inset:-inset, -inset - thickness : -inset] = True
  return ink


def _baseline(ink, thickness=3):
  rows = np.nonzero(ink.any(1))[0]
  cols = np.nonzero(ink.any(0))[0]
  ink = ink.copy()
  top = min(rows[-1] + 25, CANVAS - thickness - 2)
  ink[top : top + thickness, max(cols[0] - 60, 20) : min(cols[-1] + 60, CANVAS - 20)] = True
  return ink


def _photographed(ink, angle=6.0):
  """The sheet photographed slightly rotated on a dark table: dark wedges at the edges."""
  paper = Image.fromarray(np.where(ink, 20, 235).astype(np.uint8))
  rotated = paper.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=35)
  return np.asarray(rotated, np.float32) / 255


def _on_a_desk(ink, angle=8.0):
  """The sheet photographed whole, tilted, on a dark desk around it on every side
  (the sheet a third of the photo): the desk is most of the border."""
  paper = Image.fromarray(np.where(ink, 20, 235).astype(np.uint8)).rotate(
    angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=40
  )
  photo = Image.new("L", (2 * paper.width, round(1.6 * paper.height)), 40)
  photo.paste(paper, (paper.width // 3, paper.height // 4))
  return np.asarray(photo, np.float32) / 255


VARIANTS = {
  "clean": lambda mask: _page(_pen(mask, 22)),
  "pen 1 px": lambda mask: _page(_pen(mask, 1)),
  "pen 3 px": lambda mask: _page(_pen(mask, 3)),
  "pen 8 px": lambda mask: _page(_pen(mask, 8)),
  "bold marker (dilated 31 px)": lambda mask: _page(_bold(mask, 31)),
  "form box 12 px, 5 px in": lambda mask: _page(_frame(_pen(mask, 3), 5, 12)),
  "form box 4 px, 30 px in": lambda mask: _page(_frame(_pen(mask, 8), 30, 4)),
  "baseline under the digit": lambda mask: _page(_baseline(_pen(mask, 8))),
  "photographed sheet, rotated 6 degrees": lambda mask: _photographed(_pen(mask, 10)),
  "sheet on a dark desk, tilted 8 degrees": lambda mask: _on_a_desk(_pen(mask, 10)),
}
# Correct answers of 20, two below what was measured when the reader learnt these
# variants (20/20 for each but the bold marker's 19/20). The reader of 0.3 scored,
# in this order: 20, 3, 3, 17, 11, 4, 7, 5 and 3 of 20; the sheet on a desk was
# read as a blot (its paper taken for the ink) before the reader looked for the sheet.
FLOORS = {variant: 18 for variant in VARIANTS} | {"bold marker (dilated 31 px)": 17}


def _read_as_the_cli_does(page, path):
  Image.fromarray(np.round(np.clip(page, 0, 1) * 255).astype(np.uint8)).save(path)
  return images.prepare(images.read_image(path)).pixels


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_drawn_digits_are_read_as_their_labels(variant, digits, model, tmp_path):
  pixels, labels = digits
  read = np.stack(
    [
      _read_as_the_cli_does(VARIANTS[variant](_mask(digit)), tmp_path / f"{i}.png")
      for i, digit in enumerate(pixels)
    ]
  )
  answers = np.asarray(inference.predict(model, read)["label"])
  correct = int((answers == labels).sum())
  assert correct >= FLOORS[variant], f"{variant}: {correct}/{len(labels)}"


# Valid digits 100..219 cut to their ink (above 0.1) plus a margin, enlarged (bilinear):
# (scale, margin in MNIST pixels, dark ink on light paper) -> the fewest read right of
# 120. Measured when the reader learnt them: 114, 110 and 117 (before: 89, 73, 117).
TIGHT_CROPS = {(8, 0, True): 110, (4, 0, False): 105, (6, 1, True): 114}


@pytest.mark.parametrize(("scale", "margin", "dark_ink"), list(TIGHT_CROPS))
def test_tightly_cropped_digits_are_read(scale, margin, dark_ink, mnist_dir, model):
  """A digit cropped to its ink touches every side of the image: its strokes on the
  border were taken for a shadow, a lens's falloff, a form's box or the paper's edge,
  and cleared (a second tryout: 77 of 300 such digits wrong or refused)."""
  pixels, labels = data.load_mnist("valid", data_dir=mnist_dir)
  read = []
  for digit in pixels[100:220]:
    rows, cols = np.nonzero((digit > 0.1).any(1))[0], np.nonzero((digit > 0.1).any(0))[0]
    crop = np.pad(digit, margin)[
      rows[0] : rows[-1] + 1 + 2 * margin, cols[0] : cols[-1] + 1 + 2 * margin
    ]
    big = Image.fromarray(np.uint8(np.round(crop * 255))).resize(
      (crop.shape[1] * scale, crop.shape[0] * scale), Image.Resampling.BILINEAR
    )
    page = np.asarray(big, np.float32) / 255
    try:
      read.append(images.prepare(1.0 - page if dark_ink else page).pixels)
    except images.ImageError:
      read.append(np.zeros((28, 28), np.float32))  # refused: counted wrong
  answers = np.asarray(inference.predict(model, np.stack(read))["label"])
  correct = int((answers == labels[100:220]).sum())
  assert correct >= TIGHT_CROPS[(scale, margin, dark_ink)], f"{correct}/120"


@pytest.mark.parametrize("sigma", [10, 20, 40])
def test_noise_alone_is_no_digit(sigma, tmp_path):
  rng = np.random.default_rng(sigma)
  page = np.clip(0.5 + rng.normal(0, sigma / 255, (CANVAS, CANVAS)), 0, 1)
  with pytest.raises(images.ImageError, match="no digit-like ink|no ink"):
    _read_as_the_cli_does(page, tmp_path / "noise.png")


@settings(max_examples=12, derandomize=True)
@given(
  index=st.integers(0, 7),
  size=st.integers(28, 100),
  canvas=st.integers(300, 1200),
  where=st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)),
  light_paper=st.booleans(),
)
def test_a_small_digit_on_a_big_page_is_read(
  index, size, canvas, where, light_paper, model, first_valid
):
  """A clear digit of 28-100 pixels on a page of up to 1,200 (under the 10% of the
  page a digit used to need) was refused as 'scattered specks'."""
  digit, label = first_valid[0][index], first_valid[1][index]
  small = np.asarray(Image.fromarray(np.uint8(digit * 255)).resize((size, size), Image.BILINEAR))
  page = np.zeros((canvas, canvas), np.uint8)
  top, left = (int(f * (canvas - size)) for f in where)
  page[top : top + size, left : left + size] = small
  if light_paper:
    page = 255 - page
  read = images.prepare(page.astype(np.float32) / 255).pixels
  assert int(inference.predict(model, read[None])["label"][0]) == label


@pytest.mark.parametrize(("size", "canvas"), [(29, 1500), (50, 2500), (80, 3000)])
def test_a_small_digit_on_a_page_reduced_for_reading_is_read(size, canvas, model, first_valid):
  """The reader reduces a page to 512 px first: a 50 px digit on a 2,500 px page is 10
  px across as read, and was refused as '1 speck'."""
  index = 0
  digit, label = first_valid[0][index], first_valid[1][index]
  small = np.asarray(Image.fromarray(np.uint8(digit * 255)).resize((size, size), Image.BILINEAR))
  page = np.full((canvas, canvas), 255, np.uint8)
  page[canvas // 3 : canvas // 3 + size, canvas // 2 : canvas // 2 + size] = 255 - small
  read = images.prepare(page.astype(np.float32) / 255).pixels
  assert int(inference.predict(model, read[None])["label"][0]) == label


def test_no_digit_message_states_the_rule_and_a_blank_page_gets_no_crop_hint():
  rng = np.random.default_rng(0)
  specks = (rng.random((600, 600)) > 0.995).astype(np.float32)  # lone dots, no piece
  with pytest.raises(images.ImageError) as refused:
    images.prepare(specks)
  assert "a digit spans 10% of the image, or 8+ pixels in one piece holding 50% of the ink" in (
    str(refused.value)
  )
  with pytest.raises(images.ImageError) as blank:
    images.prepare(np.zeros((2000, 2000), np.float32))
  assert "crop" not in str(blank.value)


@pytest.mark.parametrize("shape", [(3, 3), (5, 40), (40, 5), (1, 1), (1, 200)])
@pytest.mark.parametrize("blank", [False, True])
def test_a_crop_too_small_for_a_digit_is_refused(shape, blank, tmp_path):
  """Blank or not: a 1x1 image was called "no ink", a 1x200 one "too small"."""
  page = np.ones(shape, np.float32)
  if not blank:
    page[shape[0] // 2, :] = 0.0
  with pytest.raises(images.ImageError, match="too small to hold a digit"):
    _read_as_the_cli_does(page, tmp_path / "crop.png")


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_files_of_several_frames_are_named_not_read_from_frame_0(suffix, digits, tmp_path):
  pixels, _ = digits
  frames = [
    Image.fromarray(np.full((CANVAS, CANVAS), 255, np.uint8)),  # an empty canvas first
    Image.fromarray(np.round(_page(_pen(_mask(pixels[0]), 8)) * 255).astype(np.uint8)),
  ]
  path = tmp_path / f"drawing{suffix}"
  frames[0].save(path, save_all=True, append_images=frames[1:])
  with pytest.raises(images.ImageError, match="2 frames"):
    images.read_image(path)
