"""A user's digit image, in any common form, as an MNIST digit.

``read_image(path)`` turns a file into a grey image in [0, 1];
``to_mnist(image)`` normalises it the way MNIST's digits were made (LeCun,
Cortes and Burges, "The MNIST database of handwritten digits",
http://yann.lecun.com/exdb/mnist/): "the images were centered in a 28x28
image by computing the center of mass of the pixels" after each digit was
"size normalized to fit in a 20x20 pixel box while preserving their aspect
ratio" with anti-aliasing. MNIST digits are white (1) on black (0).

    image = images.read_image("my_digit.jpg")       # <float32>[H, W] in [0, 1]
    digit = images.to_mnist(image)                  # <float32>[28, 28] in [0, 1]

The steps of :func:`prepare`, in order:

1. **Size**: an image longer than 512 pixels is reduced to 512 on its long
   side by area averaging (a phone photo's sensor noise averages out), but
   not its short side under 64 pixels (a long strip keeps its digit's height)
   unless it has over 512 squared pixels. **Specks**: on paper whose border
   band is speckled (sensor noise, salt and pepper: over 0.2% of its pixels
   stand out from their row and column neighbours by 0.1), the specks are
   replaced by their 3x3 median (twice; lines of ruled paper are kept), then,
   while it stays speckled, every pixel by its 3x3 and 5x5 median.
2. **Sheet**: in a photo of a sheet lying on a darker surface (a desk), only
   the sheet is kept: the largest bright region, when 15% of the image's
   border is darker than Otsu's threshold and the region is convex,
   four-sided and holds dark ink (see ``_crop_to_sheet``). Not with
   ``invert="no"``.
3. **Polarity**: with ``invert="auto"`` the image is inverted when its ink
   (of its 0.05th and 99.95th percentiles, the one farther from the paper,
   the median of a border ring) is darker than the paper, so that ink is
   light on dark whatever the paper's shade.
4. **Already MNIST**: a 28x28 image whose background is now black (border
   median at most 0.05), with ink reaching 0.9 and a 20-pixel box, is
   returned as it is.
5. **Paper**: uneven lighting is subtracted (the paper level, from a copy
   area-averaged to 16 cells across and minimum-filtered); everything at or
   below the border's median plus 6 noise standard deviations (from its
   median absolute deviation; where noise was clipped at the paper's white,
   leaving 25-80% of the border exactly at it, from the other pixels) becomes 0
   and the ink range is stretched to
   [0, 1], so grey or noisy paper is black and faint noise is not ink; the
   lines of ruled or graph paper (found at their tilt, at most 3% of the image
   thick, across 80% of it), a form's box and dust or captions away from the
   digit are cleared.
6. **Size and place**: the bounding box of the ink (pixels above 0.1) is
   scaled (Pillow Lanczos, anti-aliased) so its longer side is 20 pixels, and
   pasted into the 28x28 field with its centre of mass at (14, 14), the mean
   centre of mass of MNIST's digits (row, column index; measured on the
   valid split).

Not handled: hard-edged shadows. Several digits in one image (a number) are read
as one digit; :func:`prepare` counts them side by side (``Digit.pieces``) and one
above the other (``Digit.stacked``) so that the caller can warn.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import unicodedata
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
INVERT = ("auto", "yes", "no")
SIXTEEN_BIT_DEPTHS = (8, 10, 12, 14, 16)  # bits a 16-bit file's data may use (cameras: 10-14)
BOX = 20  # MNIST: the digit's bounding box fits 20x20
FIELD = 28  # MNIST: the image is 28x28
CENTRE = 14.0  # MNIST digits' mean centre of mass (row and column index) on valid
BACKGROUND_MAX = 0.05  # a 28x28 image whose border median is at most this is MNIST-style
MNIST_BOX_INK = 0.3  # ... if its ink above this spans 19 or 20 px (20 in MNIST; JPEG: 19-20)
CENTRE_SLACK = 0.75  # ... and its centre of mass is within this of (14, 14) (MNIST: 0.5)
MIN_CONTRAST = 0.1  # ink less than this above the paper is no ink
MAX_SIDE = 512  # larger images are first reduced to this (area averaging)
READ_SIDE = 2 * MAX_SIDE  # files longer than this are reduced while read (see read_image)
# ... but no reduction takes the shorter side under this, so that a long strip keeps
# the height of its digit (a 3000x40 strip went to 512x7 and was refused as too small),
# unless the image has more than the side squared in pixels.
SHORT_SIDE_FLOOR = 64
DITHER_WINDOW = 64  # a 1-bit image is averaged over windows 1/64 of its shorter side
DITHER_MIN_SIDE = 40  # ... unless it is smaller than this (an MNIST-sized 1-bit digit)
LIGHTING_GRID = 16  # the paper's lighting is estimated on a grid this many cells wide
LIGHTING_MIN_CELLS = 5  # ... and, where a bold stroke survives 3 cells, over this many
LIGHTING_INK_STEP = 0.25  # a rise of the paper level by more than this is ink, not light
LIGHTING_AS_INK = 0.6  # a "paper level" rising this share of the way to the ink is ink
# A border whose 10th and 90th percentiles lie this far apart is in a shadow: light
# falling off across a phone photo (0.56-0.88 in tests/test_images.py) stays under it,
# a shadow at 0.6 of the light or darker is over it.
SHADOW_BORDER_SPREAD = 0.35
VIGNETTE_GAP = 0.1  # ... or the border's median this far from the image's (a falloff)
SHADOW_BORDER_PERCENTILES = (10, 90)  # (a shadow may cover 80% of the border)
SHADOW_ALONG = 0.3  # a shadow lies along this much of a side at least; a stroke less
SHADOW_KEEPS_CONTRAST = 0.5  # evening out the light keeps the strongest ink this far from paper
SHADOW_SIDE = 128  # its light is estimated on a copy this long ...
SHADOW_WINDOW = 1 / 6  # ... by a median filter this share of that side wide
SHADOW_INK = 0.1  # ink: more of the image's residue beyond this below its light than above
# Paper noise: 6 standard deviations (estimated from the border's median absolute
# deviation, which ink touching the border does not move) is above the
# brightest of ~10^8 Gaussian noise pixels.
NOISE_SIGMAS = 6.0
BOX_THRESHOLD = 0.1  # the ink's bounding box: pixels above this (after stretching)
MNIST_STROKE = 0.114  # stroke width / the box's longer side: median over MNIST's valid digits
STROKE_RANGE = (0.06, 0.22)  # a stroke outside this (relative width) is redrawn at MNIST_STROKE
STROKE_INK_PERCENTILE = 50  # the ink's level where its stroke is measured: this percentile
STROKE_MIN_BOX = 2 * BOX  # pixels: a smaller digit box (an MNIST-sized image) is never redrawn
# A round blob (a dot, a click on the canvas), not strokes: the widest circle inside its
# ink is this much of its box's longer side or more. On 20,000 MNIST training digits
# (boxes under STROKE_MIN_BOX measured at a multiple of their size) the most is 0.60,
# an 8 drawn as a blot (the 99.9th percentile 0.51); a disc measures 0.83-0.98.
BLOB_CIRCLE = 0.8
# A dash: an ink box at least this many times wider than tall (a hyphen read as a
# confident 7). Of MNIST's 55,000 training digits the widest is 2.5 times (99.99%: 2).
DASH_ASPECT = 4.0
RULED_COVERAGE = 0.8  # a ruled line: above the paper across this share of a row ...
RULED_FAINT = 0.02  # ... by this (of the ink's level), with its more inked neighbour ...
RULED_THICK = 0.03  # ... in a band at most this thick (of the image) ...
RULED_MIN_LINES = 2  # ... and at least this many such lines (one more: a margin)
RULED_END = 0.1  # ... with ink within this share of the image of both ends (a page turned
# in the photo leaves corner wedges; a digit's own bar in a tight crop stops short)
RULED_MAX_TILT = 5.0  # degrees: lines tilted up to this are found (a photo of a page)
RULED_TILT_STEP = 0.1  # degrees: ... at this resolution
FRAME_FILL = 0.3  # a frame: a component filling less than this of its box, around the rest
FRAME_CONTENT = 0.25  # ... one of which spans this much of the frame's shorter side
LINE_SPAN = 0.4  # a line: a horizontal component at least this wide (of the image) ...
LINE_ASPECT = 6.0  # ... and this many times wider than thick ...
LINE_OVERHANG = 0.1  # ... running past the rest of the ink on both sides by this (of its
LINE_ACROSS = 0.8  # own width: a digit's own bar does not), unless this wide (of the image)
EDGE_SPAN = 0.3  # the paper's edge: a component along the border for this much of a side
EDGE_MARGIN = 0.04  # ... within this much of the border
FRAME_THICK = 0.06  # a form's box: its sides at most this thick (of the image) ...
FRAME_HOLDS = 0.8  # ... holding this share of the ink that is not the box
SHEET_MIN_PHOTO = 64  # pixels: a photo of a sheet is at least this on its shorter side
SHEET_MIN_SURROUND = 0.15  # a photographed sheet: a darker surface this much of the border ...
SHEET_MIN_STEP = 0.25  # ... darker than the bright part by this (not light falling off) ...
SHEET_MIN_AREA = 0.01  # ... and a bright region this much of the image ...
SHEET_MIN_SOLIDITY = 0.9  # ... this convex (its area over its convex hull's) ...
SHEET_CORNERS = (4, 6)  # ... outlined by 4 straight sides (5-6 where the photo cuts it) ...
SHEET_FIT = 0.1  # ... whose polygon's area is within this share of the region's ...
SHEET_CORNER_TURN = 20.0  # degrees: a vertex where the outline turns less is no corner
SHEET_INK = (0.001, 0.5)  # ... holding dark ink over this share of its area ...
SHEET_MAX_STROKE = 0.25  # ... in strokes: stroke width / the ink's extent at most this
SHEET_MARGIN = 0.04  # the sheet's edge band (of its size) is dropped: shadows, curl
STRAY_SHARE = 0.25  # ink components this share of the largest's pixels are the digit ...
STRAY_NEAR = 0.25  # ... and smaller ones farther than this (of its box's longer side)
SIDE_BY_SIDE_HEIGHT = 0.5  # a digit-sized piece: its ink spans this share of the ink's height ...
SIDE_BY_SIDE_GAP = 0.05  # ... with blank columns this share of that height before the next
# outside the box are stray marks (dust, a caption), cleared
CLIPPED_PAPER = (0.25, 0.8)  # paper pixels exactly at the paper's level: clipped noise
SPECK_LENGTH = 2.0  # a piece of ink no longer than this many stroke widths is a speck ...
PEPPERED_SPECKS = 3  # ... on a page where this many stray marks were cleared
SPECKLE_SHARE = 0.002  # paper with more specks than this share of its border band is denoised
DESPECKLE_SIZES = (3, 3, 3, 5)  # ... by medians this wide while it stays so: of its specks,
DESPECKLE_SPECKS_ONLY = 2  # ... in this many passes (lines kept), then of every pixel
MIN_SIDE = 8  # pixels: a smaller image cannot hold a digit
MIN_SPAN = 0.1  # some ink component must span this much of the image's shorter side ...
SMALL_DIGIT_SPAN = 8  # ... or, a small digit on a big page, this many pixels while
SMALL_DIGIT_SHARE = 0.5  # holding this share of the ink (noise is specks of similar size)


class ImageError(ValueError):
  """An input image cannot be used (names the file and what is wrong)."""


class ImageTooLarge(ImageError):
  """A file that claims more pixels than can be read safely (a decompression bomb, or
  an .npy header with a huge shape): refused before its pixels are allocated."""


# Pillow's own limit (it warns above this and refuses only at twice it): images and .npy
# arrays with more pixels are refused from their headers, before seconds and gigabytes
# of decoding.
MAX_PIXELS = 89_478_485


class Digit(NamedTuple):
  """An image as the model sees it, and what was done to it."""

  pixels: np.ndarray  # <float32>[28, 28] in [0, 1], white digit on black
  inverted: bool  # the image was inverted (light background)
  resized: bool  # the ink's box was scaled to 20x20 and centred (False: passed as it is)
  pieces: int = 1  # digit-sized pieces side by side in the ink: 2+ is a number, read as one
  stacked: int = 1  # digit-sized pieces one above the other: 2+ is two digits, read as one


# ----------------------------------------------------------------------------
# Reading files


def _luminance(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601-2 luma, as Pillow's convert("L"): <float>[H, W, 3] -> [H, W]."""
  return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _composite(rgba: np.ndarray) -> np.ndarray:
  """<float>[H, W, 4] in [0, 1] -> grey [H, W], transparent pixels as background.

  The background is chosen against the visible strokes: dark strokes go on
  white, light strokes on black, so white ink on a transparent canvas is not
  lost on a white background (nor black ink on black).
  """
  grey, alpha = _luminance(rgba[..., :3]), rgba[..., 3]
  if alpha.min() >= 1.0:
    return grey
  if alpha.sum() == 0:
    return np.zeros_like(grey)
  strokes = float((grey * alpha).sum() / alpha.sum())
  background = 1.0 if strokes < 0.5 else 0.0
  return alpha * grey + (1.0 - alpha) * background


def _integer_scale(array: np.ndarray, mode: str) -> float:
  """16-bit files by the range of the bits their data uses: the smallest of
  SIXTEEN_BIT_DEPTHS that holds their maximum (a camera's 12-bit data in a 16-bit
  PNG, 0..4095, read as 0..1/16 of 65535, was refused as blank); 32-bit ("I")
  by 255 or their maximum."""
  top = float(array.max()) if array.size else 0.0
  if mode.startswith("I;16"):
    return float(next(2**bits - 1 for bits in SIXTEEN_BIT_DEPTHS if top <= 2**bits - 1))
  return 255.0 if top <= 255 else top


def read_image(path: str | Path) -> np.ndarray:
  """One image file as grey <float32>[H, W] in [0, 1].

  Modes L, 1, RGB, CMYK, RGBA, LA, P (with or without transparency; the
  transparent part becomes background, see :func:`_composite`), I;16 and I
  (scaled by the file's value range: 65535 for 16-bit; 32-bit by 255, or by
  its maximum when that is above 255) and F; PNG, JPEG, BMP, GIF, TIFF, WebP; the EXIF orientation of
  phone photos is applied. ``.npy`` arrays: integers in 0..255 (any integer
  dtype), bool, or float in [0, 1], of shape [H, W], [784] (28x28), [H, W, 1],
  [1, H, W], RGB [H, W, 3], or grey-alpha [H, W, 2] and RGBA [H, W, 4] (transparent
  pixels read as paper, as in a PNG). A file without an extension is read by its bytes
  (.npy's magic, else whatever Pillow identifies).

  An image longer than READ_SIDE (1,024) pixels is reduced while it is read, by
  the smallest integer factor k that brings its longer side to READ_SIDE or less
  (at most the one that keeps the shorter side at SHORT_SIDE_FLOOR, 64, unless the
  image has over READ_SIDE squared pixels): each output pixel is the mean of a k x k
  block (Pillow's ``reduce``; a JPEG is
  first decoded at 1/2, 1/4 or 1/8 scale where that stays at READ_SIDE or more).
  :func:`prepare` keeps MAX_SIDE (512) of it anyway, and a 48-megapixel photo
  read whole would cost gigabytes as floats. The MAX_PIXELS limit applies to
  what is decoded: a JPEG of up to twice that (Pillow's own refusal) is read at
  its reduced scale.

  Raises:
    ImageTooLarge: a header claiming more than MAX_PIXELS pixels (or values, for
      .npy), refused before decoding.
    ImageError: naming the file: missing, unreadable, or unusable values.
  """
  if str(path) in ("", "-"):  # Path("") is ".", a directory; "-" is no stdin here
    raise ImageError(
      f"{str(path)!r}: not a file name; give the path of an image file (standard input is"
      " not read; a file named - is ./-)"
    )
  path = Path(path)
  suffix = path.suffix.lower()
  if path.is_dir():
    raise ImageError(f"{path}: is a directory, expected an image file")
  if path.exists() and not path.is_file():
    raise ImageError(
      f"{path}: not a regular file (a pipe or a device); save the image to a file first"
    )
  if not path.is_file():
    raise ImageError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise ImageError(f"{path}: empty file")
  if not suffix:  # no extension (a download, a pasted file): go by the bytes
    with open(path, "rb") as file:
      suffix = ".npy" if file.read(6) == b"\x93NUMPY" else ""
  if suffix == ".npy":
    return _as_grey(_read_npy(path), str(path))
  if suffix and suffix not in IMAGE_SUFFIXES:
    raise ImageError(
      f"{path}: unsupported file type {suffix or '(none)'}; use an image"
      f" ({', '.join(IMAGE_SUFFIXES)}) or .npy"
    )
  from PIL import Image  # noqa: PLC0415 (Pillow loads on first use)
  from PIL import ImageOps  # noqa: PLC0415 (Pillow loads on first use)
  from PIL import UnidentifiedImageError  # noqa: PLC0415 (Pillow loads on first use)

  try:
    with warnings.catch_warnings():  # over MAX_PIXELS: refused below, not warned of
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(path)
    with image:
      width, height = image.size
      longer, shorter = max(image.size), min(image.size)
      factor = max(
        min(longer // READ_SIDE, shorter // SHORT_SIDE_FLOOR),
        math.isqrt(longer * shorter) // READ_SIDE,
      )
      if image.format == "JPEG" and factor >= 2:  # decode at 1/2..1/8 scale, >= READ_SIDE
        image.draft(image.mode, (image.width // factor, image.height // factor))
      if image.width * image.height > MAX_PIXELS:  # from the header, before decoding
        raise ImageTooLarge(
          f"{path}: {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (a"
          " decompression bomb, or a photo to scale down first)"
        )
      frames = getattr(image, "n_frames", 1)
      if frames > 1:
        raise ImageError(
          f"{path}: has {frames} frames (an animation or a multi-page file); save the frame"
          " with the digit as an image of its own"
        )
      ImageOps.exif_transpose(image, in_place=True)
      mode = image.mode
      if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
      image = _reduce(image)
      if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        grey = _composite(np.asarray(image.convert("RGBA"), np.float32) / 255.0)
      elif mode.startswith("I"):
        array = np.asarray(image).astype(np.float64)
        grey = np.clip(array / _integer_scale(array, mode), 0.0, 1.0)
      elif mode == "F":
        grey = np.asarray(image, np.float64)
        if grey.size and (grey.min() < 0 or grey.max() > 1):
          grey = (grey - grey.min()) / max(grey.max() - grey.min(), 1e-12)
      else:  # L, 1, RGB, CMYK, YCbCr, ...
        grey = np.asarray(image.convert("L"), np.float32) / 255.0
        if mode == "1":
          grey = _dot_density(grey)
  except ImageError:
    raise
  except Image.DecompressionBombError as error:  # Pillow's own refusal, over twice its limit
    claimed = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(claimed[1]):,} pixels" if claimed else "its size"
    pillows = re.search(r"limit of (\d+) pixels", str(error))
    limit = min(MAX_PIXELS, int(pillows[1])) if pillows else MAX_PIXELS
    raise ImageTooLarge(
      f"{path}: {size} is over the {limit:,}-pixel limit (a decompression bomb, or a"
      " photo to scale down first)"
    ) from error
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
    if not suffix:
      raise ImageError(
        f"{path}: no file extension, and its bytes are not an image Pillow reads; use an"
        f" image ({', '.join(IMAGE_SUFFIXES)}) or .npy"
      ) from error
    raise ImageError(f"{path}: not a readable image ({error})") from error
  return _as_grey(np.asarray(grey, np.float32), str(path))


def _reduce(image):
  """A Pillow image longer than READ_SIDE, box-averaged by the smallest integer
  factor that brings its longer side to READ_SIDE or less (an edge block that
  is cut short is averaged over what it holds), but not its shorter side under
  SHORT_SIDE_FLOOR unless it has over READ_SIDE squared pixels; other images as
  they are.
  Palette-with-alpha and 1-bit images are first converted to RGBA and L, 16-bit
  ones to 32-bit I: averaging needs values, not palette indices (read_image has
  already converted plain palette images to RGB or RGBA)."""
  longer, shorter = max(image.size), min(image.size)
  factor = max(
    min(-(-longer // READ_SIDE), shorter // SHORT_SIDE_FLOOR),
    -(-math.isqrt(longer * shorter) // READ_SIDE),
  )
  if factor < 2:
    return image
  if image.mode in ("1", "PA") or image.mode.startswith("I;16"):
    image = image.convert({"1": "L", "PA": "RGBA"}.get(image.mode, "I"))
  return image.reduce(factor)


def _dot_density(bilevel: np.ndarray) -> np.ndarray:
  """A 1-bit image's grey levels. A dithered scan or print draws grey paper as
  scattered dots, which read as ink everywhere: a 3 x 3 median first removes dots
  that stand alone (a solid stroke, 2 px or wider, keeps its body), then the mean
  over a square window DITHER_WINDOW-th of the shorter side (at least 3 px) turns
  what is left of a dithered tone into the grey it stands for. Images under
  DITHER_MIN_SIDE px on their shorter side (a 28x28 digit saved as 1-bit) are left
  as they are.
  """
  if min(bilevel.shape) < DITHER_MIN_SIDE:
    return bilevel
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  cleaned = ndimage.median_filter(bilevel, size=3, mode="nearest")
  size = max(3, round(min(bilevel.shape) / DITHER_WINDOW))
  return ndimage.uniform_filter(cleaned, size=size, mode="nearest")


def _read_npy(path: Path) -> np.ndarray:
  """An .npy file's array, its header checked first: a shape of more than MAX_PIXELS
  values, or more data than the file holds, is refused before anything is allocated.

  Raises:
    ImageTooLarge: the header's shape has more than MAX_PIXELS values.
    ImageError: not an .npy file, a truncated one, or an object (pickled) array.
  """
  from numpy.lib import format as npy  # noqa: PLC0415 (only for .npy inputs)

  readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
  try:
    with open(path, "rb") as file:
      version = npy.read_magic(file)
      if version in readers:
        shape, _, dtype = readers[version](file)
        if dtype.hasobject:
          raise ImageError(f"{path}: holds Python objects (pickled); save a numeric array")
        if any(size < 0 for size in shape):
          raise ImageError(f"{path}: not a readable .npy array (negative shape {shape})")
        count = math.prod(shape)
        if count > MAX_PIXELS:
          raise ImageTooLarge(
            f"{path}: an array of shape {shape} ({count:,} values) is over the"
            f" {MAX_PIXELS:,}-value limit; a digit needs [28, 28]"
          )
        if count * dtype.itemsize > path.stat().st_size - file.tell():
          raise ImageError(
            f"{path}: truncated .npy file (its header says shape {shape} {dtype},"
            f" {count * dtype.itemsize:,} bytes; the file holds fewer)"
          )
    return np.load(path, allow_pickle=False)
  except ImageError:
    raise
  except (ValueError, OSError, EOFError, TypeError, SyntaxError) as error:
    raise ImageError(f"{path}: not a readable .npy array ({error})") from error


def _as_grey(array, name: str) -> np.ndarray:
  """<float32>[H, W] in [0, 1] of an array [H, W], [784] (28x28), [1, ..., H, W],
  [1, 784] or [H, W, 1] (a batch or a channel of one), RGB [H, W, 3] (its :func:`_luminance`), or
  grey-alpha [H, W, 2] and RGBA [H, W, 4] (transparent pixels read as paper, as in a
  PNG: :func:`_composite`)."""
  array = np.asarray(array)
  shape = array.shape
  while array.ndim > 2 and array.shape[0] == 1:
    array = array[0]
  if array.shape in ((784,), (1, 784)):  # a flattened MNIST digit, alone or in a batch of one
    array = array.reshape(FIELD, FIELD)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  channels = array.shape[-1] if array.ndim == 3 else None
  flattened = array.ndim == 2 and array.shape[1] == FIELD * FIELD  # rows of 784: a batch
  if not (array.ndim == 2 or channels in (2, 3, 4)) or min(array.shape) < 1 or flattened:
    several = array.ndim >= 3 or flattened
    raise ImageError(
      f"{name}: shape {shape}, expected a grey image [H, W] (or [784]), or [H, W, C] with C = 2"
      " (grey and alpha), 3 (RGB) or 4 (RGBA)"
      + (f"; a batch of {array.shape[0]} images? give one image each" if several else "")
    )
  values = _unit_values(array, name)
  if channels == 2:  # grey and alpha: the grey as all three colours
    values = np.concatenate([np.repeat(values[..., :1], 3, axis=-1), values[..., 1:]], -1)
  if channels in (2, 4):
    return _composite(values)
  return _luminance(values) if channels == 3 else values


def _unit_values(array: np.ndarray, name: str) -> np.ndarray:
  """``array`` as float32 in [0, 1]: integers 0..255 / 255, bool as 0/1, floats as given."""
  if array.dtype == np.bool_:
    return array.astype(np.float32)
  if np.issubdtype(array.dtype, np.integer):  # NumPy's default int64 included
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
      raise ImageError(
        f"{name}: {array.dtype} values must be in 0..255 (found {low}..{high});"
        " rescale them to 0..255, or to float in [0, 1]"
      )
    return array.astype(np.float32) / np.float32(255.0)
  if not np.issubdtype(array.dtype, np.floating):
    raise ImageError(
      f"{name}: dtype {array.dtype}, expected integers in 0..255, float in [0, 1] or bool"
    )
  if not np.all(np.isfinite(array)):
    raise ImageError(f"{name}: float values must be finite and in [0, 1] (found NaN or inf)")
  if array.min() < 0 or array.max() > 1:
    low, high = float(array.min()), float(array.max())
    hint = "; for 0..255 values divide by 255" if low >= 0 and high <= 255 else ""
    raise ImageError(
      f"{name}: float values must be finite and in [0, 1] (found {low:.3g}..{high:.3g}){hint}"
    )
  return array.astype(np.float32)


# ----------------------------------------------------------------------------
# MNIST normalisation


def _border_width(shape: tuple[int, ...]) -> int:
  """Pixels: how far in from each edge :func:`_border` reads (5% of the shorter side)."""
  return max(1, round(0.05 * min(shape)))


def _border(image: np.ndarray) -> np.ndarray:
  width = _border_width(image.shape)
  return np.concatenate(
    [
      image[:width].ravel(),
      image[-width:].ravel(),
      image[:, :width].ravel(),
      image[:, -width:].ravel(),
    ]
  )


def _paper(image: np.ndarray) -> np.ndarray:
  """Pixels that show the paper: the image's border band, unless that band is mostly
  something else (a form's frame drawn near the edge, the dark surround of a
  photographed sheet), seen as a border median far from the whole image's; then
  the whole image, most of which is paper."""
  border = _border(image)
  if abs(float(np.median(border)) - float(np.median(image))) > 0.5:
    return image.ravel()
  return border


def _resize(patch: np.ndarray, height: int, width: int, *, method: str = "LANCZOS") -> np.ndarray:
  from PIL import Image  # noqa: PLC0415 (Pillow loads on first use)

  resized = Image.fromarray(patch.astype(np.float32), mode="F").resize(
    (width, height), getattr(Image.Resampling, method)
  )
  return np.clip(np.asarray(resized, np.float64), 0.0, 1.0)


def _shrink(grey: np.ndarray) -> np.ndarray:
  """Area-averages an image longer than MAX_SIDE down to MAX_SIDE on its long side,
  but not its short side under SHORT_SIDE_FLOOR unless it has over MAX_SIDE squared
  pixels."""
  longer, shorter = max(grey.shape), min(grey.shape)
  reduction = max(
    min(longer / MAX_SIDE, shorter / SHORT_SIDE_FLOOR), math.sqrt(grey.size) / MAX_SIDE
  )
  scale = 1 / max(reduction, 1.0)
  if scale >= 1:
    return grey
  return _resize(
    grey, max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)), method="BOX"
  )


def _despeckle(grey: np.ndarray) -> np.ndarray:
  """The image with the specks of its paper replaced by their medians; unchanged when
  its paper is not speckled.

  Sensor noise or salt-and-pepper specks on the paper would otherwise pass the
  noise floor and fill the digit's box (a noisy white page read as a square: a
  confident 0). Speckled: over SPECKLE_SHARE of the border band's pixels differ
  by more than MIN_CONTRAST from the median of their row neighbours and from
  that of their column neighbours (a ruled or squared page's lines match their
  neighbours along them; clean paper, JPEG's ringing and a digit's edges have
  none or a few). Images under SHORT_SIDE_FLOOR on a side are left alone: there
  a pixel may be a stroke.
  """
  if min(grey.shape) < SHORT_SIDE_FLOOR:
    return grey
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  for done, size in enumerate(DESPECKLE_SIZES):
    smooth = ndimage.median_filter(grey, size=size, mode="nearest")
    # A speck differs from the median of its row neighbours and from that of its
    # column neighbours; a line's pixels match their neighbours along it.
    specks = np.abs(grey - smooth) > MIN_CONTRAST
    for line in ((1, size), (size, 1)) if done < DESPECKLE_SPECKS_ONLY else ():
      specks &= np.abs(grey - ndimage.median_filter(grey, size=line, mode="nearest")) > MIN_CONTRAST
    if _border(specks).mean() <= SPECKLE_SHARE:
      break
    grey = np.where(specks, smooth, grey) if done < DESPECKLE_SPECKS_ONLY else smooth
  return grey


def _unevenly_lit(grey: np.ndarray) -> bool:
  """The border's SHADOW_BORDER_PERCENTILES lie more than SHADOW_BORDER_SPREAD apart
  (a shadow over part of the page), or the border's median lies more than
  VIGNETTE_GAP from the whole image's (a lens's falloff: dark corners and edges, a
  lit centre; the paper fills most of the image, so on an even page the two
  medians meet).

  A digit that touches the border (tightly cropped) is no shadow: each side of
  the border is first median-filtered along its length over SHADOW_ALONG of it
  (a stroke crosses a side in less; a shadow lies along more). A bold digit that
  fills the image, or a stroke lying along a side, can still pass for uneven
  light: :func:`_flatten_shadow` then finds that evening it out took the ink
  away, and keeps the image."""
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  border = _border(grey)
  width = _border_width(grey.shape)
  along = grey.copy()
  for strip in (np.s_[:width], np.s_[-width:]):
    size = (1, max(1, round(SHADOW_ALONG * grey.shape[1])))
    along[strip] = ndimage.median_filter(grey[strip], size=size, mode="nearest")
    size = (max(1, round(SHADOW_ALONG * grey.shape[0])), 1)
    along[:, strip] = ndimage.median_filter(grey[:, strip], size=size, mode="nearest")
  low, high = np.percentile(_border(along), SHADOW_BORDER_PERCENTILES)
  return (
    high - low > SHADOW_BORDER_SPREAD or abs(np.median(grey) - np.median(border)) > VIGNETTE_GAP
  )


def _flatten_shadow(grey: np.ndarray, invert: str) -> np.ndarray:
  """Evens out strong uneven light (half a page in shadow) before the polarity is judged.

  Only where the border's SHADOW_BORDER_PERCENTILES, in the image and in its
  light, lie more than SHADOW_BORDER_SPREAD apart: an evenly lit page (noisy,
  ruled or specked) is left as it is. On a copy SHADOW_SIDE px long, the light
  is a median filter SHADOW_WINDOW of the image wide (strokes narrower than
  half the window fall out, and a shadow's edge stays sharp, where a mean
  would smear it into ink). The ink is dark when more of the image minus its
  light lies beyond SHADOW_INK below it than above it (or ``invert="yes"``).
  The paper alone is then a closing of the copy (an opening, for light ink),
  which removes strokes narrower than the window whole, scaled back up; dark
  ink is divided by it (a flat field: ink in the shadow keeps the contrast it
  has in the light), and light ink has it subtracted; what lies within
  SHADOW_INK of the paper is paper. The strongest ink in the image's middle half
  (its darkest 0.5% there, or lightest for light ink) must then lie
  SHADOW_KEEPS_CONTRAST from the result's border median (the paper), in the
  median; where it does not, the "light" was bold strokes, evened out with the
  paper, and the image is kept as it is.

  Before this, a digit with the left half of its page in shadow (paper at
  0.45) read 3 times in 10: the border's median was the shadow's, the lit
  paper looked like light ink, and the polarity was wrong.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  if not _unevenly_lit(grey) or min(grey.shape) < MIN_SIDE:
    return grey
  scale = SHADOW_SIDE / max(grey.shape)
  small = _resize(
    grey, max(3, round(grey.shape[0] * scale)), max(3, round(grey.shape[1] * scale)), method="BOX"
  )
  window = max(3, round(SHADOW_WINDOW * max(small.shape))) | 1
  light = ndimage.median_filter(small, size=window, mode="nearest")
  if not _unevenly_lit(light):  # the spread was noise, not light
    return grey
  residue = grey - _resize(light, *grey.shape, method="BILINEAR")
  beyond = np.maximum(np.abs(residue) - SHADOW_INK, 0.0)
  dark = invert == "yes" or beyond[residue < 0].sum() > beyond[residue > 0].sum()
  # The paper alone: a closing (opening, for light ink) removes every stroke narrower
  # than the window whole, where the median hollows a bold stroke's core.
  paper_only = (ndimage.grey_closing if dark else ndimage.grey_opening)(
    small, size=window, mode="nearest"
  )
  paper_only = _resize(paper_only, *grey.shape, method="BILINEAR")
  # Within SHADOW_INK of the paper is paper: the estimate's seams (where the light
  # bends) would otherwise be faint lines that the stretch to [0, 1] makes ink.
  if dark:  # flat-field: ink on paper in shadow keeps the contrast it has in the light
    ratio = grey / np.maximum(paper_only, MIN_CONTRAST)
    flat = np.clip(ratio / (1.0 - SHADOW_INK), 0.0, 1.0)
  else:
    flat = np.clip((grey - paper_only - SHADOW_INK) / (1.0 - SHADOW_INK), 0.0, 1.0)
  # Strokes wider than half the window (a bold digit filling a tight crop) are taken
  # for the paper and flattened away: then it was not light, and the image stays.
  height, width = grey.shape
  centre = np.s_[height // 4 : height - height // 4, width // 4 : width - width // 4]
  middle = grey[centre]  # where the digit is, and no dark corner of a falloff
  strong = middle <= np.percentile(middle, 0.5) if dark else middle >= np.percentile(middle, 99.5)
  contrast = float(np.median(flat[centre][strong]) - np.median(_border(flat)))
  return flat if (-contrast if dark else contrast) >= SHADOW_KEEPS_CONTRAST else grey


def _remove_lighting(grey: np.ndarray) -> np.ndarray:
  """Subtracts the paper's (dark, after inversion) level where it varies across the image.

  The image is area-averaged to a grid LIGHTING_GRID cells on its long side;
  a 3x3 minimum filter there removes the ink (strokes are narrower than 3
  cells), and the result, blurred and scaled back up, is the paper level.
  Where that level still rises by more than LIGHTING_INK_STEP above a wider
  (LIGHTING_MIN_CELLS) minimum, it is a bold marker's stroke, not light, and
  the wider minimum is used there (else the stroke would be hollowed out).
  On an even background it is a constant, which the border step removes anyway.
  Where the level would rise over LIGHTING_AS_INK of the way from the paper to the
  ink away from the grid's edge cells, it is a filled shape wider than
  LIGHTING_MIN_CELLS cells (a disc half the page wide), not light, which comes in
  from an edge: the image is left as it is (the disc was hollowed into a ring and
  read as 0 at p = 1.0).
  """
  from PIL import Image  # noqa: PLC0415 (Pillow loads on first use)
  from PIL import ImageFilter  # noqa: PLC0415 (Pillow loads on first use)

  if min(grey.shape) < 2 * LIGHTING_GRID:
    return grey
  scale = LIGHTING_GRID / max(grey.shape)
  small = _resize(
    grey, max(3, round(grey.shape[0] * scale)), max(3, round(grey.shape[1] * scale)), method="BOX"
  )

  def minimum(cells: int) -> np.ndarray:
    image = Image.fromarray(small.astype(np.float32), mode="F")
    return np.asarray(image.filter(ImageFilter.MinFilter(cells)), np.float64)

  paper, wider = minimum(3), minimum(LIGHTING_MIN_CELLS)
  paper = np.where(paper - wider > LIGHTING_INK_STEP, wider, paper)
  # A "paper level" that rises most of the way to the ink away from the image's edges
  # is a filled shape wider than the cells, not light (a shadow or a falloff comes in
  # from an edge): kept whole, not hollowed.
  inked = paper - paper.min() > LIGHTING_AS_INK * (grey.max() - paper.min())
  edges = np.concatenate([inked[0], inked[-1], inked[:, 0], inked[:, -1]])
  if inked.any() and not edges.any():
    return grey
  padded = np.pad(paper, 1, mode="edge")  # a 3x3 mean smooths the minimum's steps
  paper = (
    sum(padded[i : i + paper.shape[0], j : j + paper.shape[1]] for i in range(3) for j in range(3))
    / 9
  )
  level = _resize(paper, grey.shape[0], grey.shape[1], method="BILINEAR")
  return np.clip(grey - (level - level.min()), 0.0, 1.0)


def _quadrilateral_sides(mask: np.ndarray) -> int | None:
  """The number of sides of the filled region ``mask`` (one 8-connected region)
  when it is a polygon: the Douglas-Peucker outline of its contour (tolerance 2%
  of its perimeter), corners where it turns by over ``SHEET_CORNER_TURN``, and
  the polygon's area within ``SHEET_FIT`` of the region's; None for a round or
  ragged region (a bold 0, a blot)."""
  from skimage import measure  # noqa: PLC0415 (scikit-image loads on first use)

  (region,) = measure.regionprops(mask.astype(np.uint8))
  contour = max(measure.find_contours(np.pad(mask, 1).astype(np.float64), 0.5), key=len)
  outline = measure.approximate_polygon(contour, tolerance=0.02 * region.perimeter)[:-1]
  if len(outline) < 3:
    return None
  edges = np.roll(outline, -1, axis=0) - outline
  headings = np.arctan2(edges[:, 0], edges[:, 1])
  turns = np.angle(np.exp(1j * (np.roll(headings, -1) - headings)))  # in (-pi, pi]
  rows, cols = outline[:, 0], outline[:, 1]
  polygon_area = 0.5 * abs(float(np.dot(rows, np.roll(cols, 1)) - np.dot(cols, np.roll(rows, 1))))
  if abs(polygon_area - region.area) > SHEET_FIT * region.area:
    return None
  return int((np.abs(turns) > np.radians(SHEET_CORNER_TURN)).sum())


def _crop_to_sheet(grey: np.ndarray) -> np.ndarray:
  """A photo of a sheet lying on a darker surface, as the sheet alone; any other
  image as it is.

  The sheet is the largest bright region (above Otsu's threshold, holes filled)
  when ``SHEET_MIN_SURROUND`` of the image's border is darker than that
  threshold (the surface shows along some side), ``SHEET_MIN_STEP`` darker than
  the image's bright part (median against median), and the region looks like
  paper with writing: ``SHEET_MIN_AREA`` of the image, convex
  (``SHEET_MIN_SOLIDITY``), a polygon of 4 sides, or up to 6 where the photo
  cuts it (``_quadrilateral_sides``), holding dark ink over ``SHEET_INK`` of
  its area in strokes (``_stroke_width`` at most ``SHEET_MAX_STROKE`` of the
  ink's extent; digits on sheets: at most 0.18; a blocky white 8's holes: 0.38).
  Images under ``SHEET_MIN_PHOTO`` px are left alone. The result is the sheet's
  bounding box, shrunk by ``SHEET_MARGIN``; what lies outside the
  sheet there (the surface beside a tilted sheet) takes the paper's median
  shade. Without this, the sheet is the brightest thing on a dark border: it
  was read as the ink.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)
  from skimage import filters  # noqa: PLC0415 (scikit-image loads on first use)
  from skimage import measure  # noqa: PLC0415
  from skimage.morphology import skeletonize  # noqa: PLC0415

  if min(grey.shape) < SHEET_MIN_PHOTO or float(grey.max() - grey.min()) < MIN_CONTRAST:
    return grey
  level = float(filters.threshold_otsu(grey))
  border = _border(grey)
  if float(np.mean(border < level)) < SHEET_MIN_SURROUND:  # no surface around a sheet
    return grey
  if float(np.median(grey[grey > level]) - np.median(border[border < level])) < SHEET_MIN_STEP:
    return grey  # one sheet's light falling off, not a sheet on a darker surface
  labels, count = ndimage.label(ndimage.binary_fill_holes(grey > level))
  if count == 0:
    return grey
  sheet = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
  area = int(sheet.sum())
  if area < SHEET_MIN_AREA * grey.size:
    return grey
  (region,) = measure.regionprops(sheet.astype(np.uint8))
  ink = sheet & (grey <= level)
  if region.solidity < SHEET_MIN_SOLIDITY or not SHEET_INK[0] <= ink.sum() / area <= SHEET_INK[1]:
    return grey
  rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
  extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
  skeleton = skeletonize(ink)
  if not skeleton.any() or _stroke_width(ink, skeleton) > SHEET_MAX_STROKE * extent:
    return grey  # blobs, not strokes: the holes of a blocky white 8
  sides = _quadrilateral_sides(sheet)
  cut = sheet[0].any() or sheet[-1].any() or sheet[:, 0].any() or sheet[:, -1].any()
  if sides is None or not SHEET_CORNERS[0] <= sides <= SHEET_CORNERS[1 if cut else 0]:
    return grey  # a sheet inside the photo has 4 sides; one the photo cuts, up to 6
  height, width = region.bbox[2] - region.bbox[0], region.bbox[3] - region.bbox[1]
  inner = ndimage.binary_erosion(sheet, iterations=max(1, round(SHEET_MARGIN * min(height, width))))
  if not inner.any():
    return grey
  rows, cols = np.nonzero(inner.any(1))[0], np.nonzero(inner.any(0))[0]
  box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  crop = grey[box].copy()
  crop[~inner[box]] = float(np.median(grey[inner & (grey > level)]))
  return crop


def _place_by_centre_of_mass(patch: np.ndarray) -> np.ndarray:
  rows, cols = np.arange(patch.shape[0]), np.arange(patch.shape[1])
  mass = patch.sum()
  top = int(round(CENTRE - (patch.sum(1) @ rows) / mass))
  left = int(round(CENTRE - (patch.sum(0) @ cols) / mass))
  field = np.zeros((FIELD, FIELD), np.float32)
  # Paste, clipped to the field (the box is 20 wide, so this loses ink only
  # for extremely lopsided digits).
  r0, c0 = max(top, 0), max(left, 0)
  r1, c1 = min(top + patch.shape[0], FIELD), min(left + patch.shape[1], FIELD)
  field[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]
  return field


def _is_mnist_sized(grey: np.ndarray) -> bool:
  """Already normalised as MNIST's digits are: full-contrast ink whose box's longer
  side is BOX (every valid digit of MNIST's has exactly 20) and whose centre of mass
  is at the field's centre (every valid digit's is within 0.5 px of (14, 14)).

  A digit saved as JPEG keeps both, but its ringing puts faint values all over the
  field, so an any-ink box is 28 wide: the box of the ink above MNIST_BOX_INK
  (19-20 px for 98% of valid digits at JPEG quality 30) counts too, and the centre
  may be CENTRE_SLACK off.
  """
  if grey.max() < 0.9:
    return False

  def box(ink):
    rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
    return max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1

  if box(grey > 0) != BOX and box(grey > MNIST_BOX_INK) not in (BOX - 1, BOX):
    return False
  weights = np.clip(grey, 0.0, None)
  centre = [float((weights.sum(axis) * np.arange(FIELD)).sum() / weights.sum()) for axis in (1, 0)]
  return max(abs(c - CENTRE) for c in centre) <= CENTRE_SLACK


def _ruled_rows(grey: np.ndarray) -> np.ndarray:
  """<bool>[rows]: the rows of ``grey`` (paper 0, as :func:`prepare` has it by then)
  that carry a ruled line across the image, or lie beside one.

  A row is a line's when it, plus the more inked of its two neighbours, is above
  the paper (by RULED_FAINT) across RULED_COVERAGE of its width: a thin line
  reduced to a fractional row width lands half in each of two rows, and a pale
  or noisy line reaches the ink's threshold (BOX_THRESHOLD) only in dashes,
  which would still be ink.
  """
  padded = np.pad(grey, ((1, 1), (0, 0)))
  inked = grey + np.maximum(padded[:-2], padded[2:]) > RULED_FAINT
  return inked.mean(axis=1) >= RULED_COVERAGE


def _shear(grey: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
  """``grey`` with column j moved up by round(j * tan(degrees)) rows (zero-padded), so a
  line along row = row0 + column * tan(degrees) (falling to the right as displayed,
  for positive degrees) lies along one row; and where each pixel went, for
  :func:`_unshear`. Integer moves: no pixel is resampled."""
  offsets = np.round(np.arange(grey.shape[1]) * np.tan(np.radians(degrees))).astype(int)
  offsets -= offsets.min()
  sheared = np.zeros((grey.shape[0] + offsets.max(), grey.shape[1]), grey.dtype)
  rows = np.arange(grey.shape[0])[:, None] + offsets.max() - offsets[None, :]
  sheared[rows, np.arange(grey.shape[1])[None, :]] = grey
  return sheared, rows


def _unshear(sheared: np.ndarray, rows: np.ndarray) -> np.ndarray:
  return sheared[rows, np.arange(sheared.shape[1])[None, :]]


def _ruled_tilt(grey: np.ndarray) -> float:
  """Degrees (as :func:`_shear` takes them) of the page's ruled lines, within
  RULED_MAX_TILT of horizontal in steps of RULED_TILT_STEP: the shear under which
  the image's row profile has the most energy (the sum of its squared row sums;
  lines along rows concentrate it), the smallest angle on ties. A page without
  lines gets some angle, harmless: :func:`_remove_ruled_lines` then finds no line."""
  steps = round(RULED_MAX_TILT / RULED_TILT_STEP)
  angles = sorted(np.arange(-steps, steps + 1) * RULED_TILT_STEP, key=abs)
  rows, columns = np.nonzero(grey)  # the paper (0) adds nothing to any row
  weights = grey[rows, columns]
  energy = []
  for angle in angles:  # the row sums of _shear(grey, angle), without moving pixels
    offsets = np.round(columns * np.tan(np.radians(angle))).astype(int)
    sums = np.bincount(rows - offsets + grey.shape[1], weights=weights)
    energy.append(float(np.square(sums).sum()))
  return float(angles[int(np.argmax(energy))])


def _end_to_end(band: np.ndarray) -> bool:
  """Whether a band of rows is inked (above RULED_FAINT) to within RULED_END of both ends."""
  inked = np.flatnonzero((band > RULED_FAINT).any(axis=0))
  width = band.shape[1]
  return (
    inked.size > 0 and inked[0] < RULED_END * width and width - 1 - inked[-1] < RULED_END * width
  )


def _remove_ruled_lines(grey: np.ndarray) -> np.ndarray:
  """Clears the lines of ruled or graph paper and margins, level or tilted by up to
  RULED_MAX_TILT (a photo of a page is seldom square to it): under the shear of
  :func:`_ruled_tilt`, runs of rows (then, turned, of columns) that
  :func:`_ruled_rows` finds, at most RULED_THICK of the image thick and inked to
  within RULED_END of both ends, when there are RULED_MIN_LINES of them (then
  one line the other way, a margin, is cleared too). A digit's own strokes are
  thicker than that even in a tight crop, stop short of an end, or are one bar
  (a 2's base in a tight crop, which a single-line rule took for a line).

  A cleared band takes the ink of the rows just outside it where the row on the
  other side has ink within twice the band's height (a maximum filter): paper
  where the line ran over paper, and the stroke where a stroke crossed the line,
  upright or slantwise (so a digit written on ruled paper is not cut into pieces
  at every line, and a crossing line is not widened).
  """
  from scipy.ndimage import maximum_filter1d  # noqa: PLC0415 (SciPy loads on first use)

  tilt = _ruled_tilt(grey)
  ruled = False  # the page has RULED_MIN_LINES lines one way (then one line is a margin)
  for transposed, degrees in ((False, tilt), (True, -tilt)):  # rows, then columns
    lines, rows = _shear(grey.T if transposed else grey, degrees)
    found = _ruled_rows(lines)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], found, [0]]).astype(np.int8)))
    thin = RULED_THICK * rows.shape[0]
    bands = [
      (start, end)
      for start, end in zip(edges[::2], edges[1::2])
      if end - start <= thin and _end_to_end(lines[start:end])
    ]
    if len(bands) < (1 if ruled else RULED_MIN_LINES):  # a lone bar is the digit's (a 2's base)
      continue
    ruled = True
    outside = np.zeros(lines.shape[1])
    for start, end in bands:
      above = lines[start - 1] if start > 0 else outside
      below = lines[end] if end < lines.shape[0] else outside
      # A stroke crossing the band slantwise is up to twice its height along on the
      # other side: each side's ink is kept where the other side has ink that near.
      reach = 2 * (2 * (end - start)) + 1
      lines[start:end] = np.maximum(
        np.minimum(maximum_filter1d(above, reach), below),
        np.minimum(above, maximum_filter1d(below, reach)),
      )
    grey = _unshear(lines, rows)
    grey = grey.T if transposed else grey
  return grey


def _components(mask: np.ndarray) -> list[dict]:
  """The 8-connected components of ``mask``: slices, pixel count, bounding box size."""
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
  found = []
  for index, box in enumerate(ndimage.find_objects(labels), start=1):
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    found.append(
      {
        "label": index,
        "box": box,
        "pixels": int((labels[box] == index).sum()),
        "height": height,
        "width": width,
      }
    )
  return found if count else []


def _is_frame(part: dict, others: list[dict], labels: np.ndarray) -> bool:
  """A hollow component whose box holds every other component's box (a form's box),
  four-sided (``_quadrilateral_sides`` of it filled in), one of them a digit
  enclosed by it (FRAME_CONTENT of the box's shorter side across, lying in the
  component's filled-in hole): a 0 with a slash inside it, a stroke with only specks
  inside its box (JPEG ringing around a 7, noise inside a 0), or with a stroke
  beside its loop (a 4 and a speck right of its triangle), is the digit, not a
  frame. ``labels``: the image's 8-connected component labels."""
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  fill = part["pixels"] / (part["height"] * part["width"])
  content = FRAME_CONTENT * min(part["height"], part["width"])
  inner = labels[part["box"]]
  filled = ndimage.binary_fill_holes(inner == part["label"])
  if fill >= FRAME_FILL or _quadrilateral_sides(filled) != 4:  # a box, not a 0 round a slash
    return False
  hole = filled & (inner != part["label"])

  def enclosed(other: dict) -> bool:
    pixels = inner == other["label"]
    return pixels.sum() == other["pixels"] and (pixels & ~hole).sum() <= 0.1 * other["pixels"]

  if not any(max(o["height"], o["width"]) >= content and enclosed(o) for o in others):
    return False
  inside = all(
    part["box"][0].start <= o["box"][0].start
    and o["box"][0].stop <= part["box"][0].stop
    and part["box"][1].start <= o["box"][1].start
    and o["box"][1].stop <= part["box"][1].stop
    for o in others
  )
  return bool(others) and inside


def _is_line(part: dict, shape: tuple[int, int], rest: list[dict]) -> bool:
  """A long straight stroke that is not the digit's: a horizontal line (a baseline, a
  ruled line) at least LINE_SPAN of the image wide and LINE_ASPECT times longer than
  thick, that runs past the ``rest`` of the ink on both sides (by LINE_OVERHANG of its
  own width) or across LINE_ACROSS of the image. A digit's bar drawn as a stroke of its
  own (a 7's top, a 2's base) ends where the digit does on one side at least: before,
  it was cleared as a baseline, and the 7 read as 1."""
  if part["width"] < LINE_SPAN * shape[1] or part["width"] < LINE_ASPECT * part["height"]:
    return False
  if part["width"] >= LINE_ACROSS * shape[1]:
    return True
  left = min(p["box"][1].start for p in rest)
  right = max(p["box"][1].stop for p in rest)
  overhang = LINE_OVERHANG * part["width"]
  return part["box"][1].start <= left - overhang and part["box"][1].stop >= right + overhang


def _touches_edge_along(part: dict, shape: tuple[int, int]) -> bool:
  """The paper's edge: a component lying along the image border (within EDGE_MARGIN of
  it: the outermost lines may have been cleared as ruled lines) for EDGE_SPAN of a side."""
  (top, bottom), (left, right) = (
    (part["box"][0].start, part["box"][0].stop),
    (part["box"][1].start, part["box"][1].stop),
  )
  near_rows, near_cols = EDGE_MARGIN * shape[0], EDGE_MARGIN * shape[1]
  at_side = left <= near_cols or right >= shape[1] - near_cols
  at_end = top <= near_rows or bottom >= shape[0] - near_rows
  along_rows = (
    at_side and part["height"] >= EDGE_SPAN * shape[0] and part["width"] < 0.25 * shape[1]
  )
  along_cols = at_end and part["width"] >= EDGE_SPAN * shape[1] and part["height"] < 0.25 * shape[0]
  return along_rows or along_cols


def _long_runs(lines: np.ndarray, span: float) -> np.ndarray:
  """<bool>[lines, length]: the pixels of runs of ink at least ``span`` long along axis 1."""
  lines = np.asarray(lines, bool)
  padded = np.zeros((lines.shape[0], lines.shape[1] + 1), bool)
  padded[:, :-1] = lines  # a background pixel ends every line: no run crosses to the next
  flat = padded.ravel()
  starts = flat & ~np.concatenate([[False], flat[:-1]])
  run = np.cumsum(starts) * flat  # each pixel's run number, 0 for background
  long = np.bincount(run) >= span
  long[0] = False
  return long[run].reshape(padded.shape)[:, :-1]


def _thin_bands(hits: np.ndarray, thickest: float) -> list[tuple[int, int]]:
  """Runs of consecutive True in ``hits`` (lines with a long run), at most ``thickest`` thick."""
  edges = np.flatnonzero(np.diff(np.concatenate([[False], hits, [False]]).astype(np.int8)))
  return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a <= thickest]


def _remove_frame_runs(grey: np.ndarray) -> np.ndarray:
  """Clears a form's box that touches the digit (so it is no component of its own).

  A box is two thin bands of long horizontal runs (at least LINE_SPAN of the
  image, at most FRAME_THICK thick) at least a third of the image apart, joined
  at one end or both by thin bands of long vertical runs that meet them at
  corners, or the same turned by 90 degrees; only those runs are cleared. A
  digit's own straight strokes (a 7's bar, a 1) make no such box, nor do the
  round ones of a 0 or a 3 that fills the image (tightly cropped): their long
  runs, top, bottom and side, do not meet at corners. A box holds the digit: at
  least FRAME_HOLDS of the ink that is not the box lies inside its rectangle (the
  bold strokes of a tightly cropped 8 met at corners round its loop's hole, and
  most of the 8 lay outside).
  """
  mask = grey > BOX_THRESHOLD
  height, width = mask.shape
  rows = _long_runs(mask, LINE_SPAN * width)
  cols = _long_runs(mask.T, LINE_SPAN * height).T
  row_bands = _thin_bands(rows.any(1), FRAME_THICK * height)
  col_bands = _thin_bands(cols.any(0), FRAME_THICK * width)

  def box(across, along, across_runs, along_runs, size_across, size_along):
    """The bands of a box whose two long sides are ``across`` bands (or None): they
    span the same stretch, and each side it keeps meets both of them at a corner
    (its long runs span from one to the other, and both of theirs cross it), as a
    drawn rectangle's do and a round stroke's do not."""
    if len(across) < 2 or across[-1][0] - across[0][1] < size_across / 3:
      return None
    first, last = across[0], across[-1]
    ends = np.flatnonzero(across_runs[first[0] : last[1]].any(0))
    near = FRAME_THICK * size_along
    # A rectangle's two long sides run between the same corners.
    top, bottom = (np.flatnonzero(across_runs[a:b].any(0)) for a, b in (first, last))
    if abs(top[0] - bottom[0]) > near or abs(top[-1] - bottom[-1]) > near:
      return None
    near_across = FRAME_THICK * size_across

    def corners(band):
      # A straight side: one line of the band is ink all the way between the long
      # sides (but for their corners' rounding), where a curved stroke leaves it.
      between = along_runs[round(first[1] + near_across) : round(last[0] - near_across)]
      if not between[:, band[0] : band[1]].all(0).any():
        return False
      # Each long side's runs cross the side's band: a square corner, not a round one.
      return all(across_runs[start:end, band[0] : band[1]].any() for start, end in (first, last))

    sides = [
      b
      for b in along
      if (abs(b[0] - ends[0]) <= near or abs(b[1] - ends[-1]) <= near) and corners(b)
    ]
    return ([first, last], sides) if sides else None

  found = box(row_bands, col_bands, rows, cols, height, width)
  if found is not None:
    horizontal, vertical = found
  else:
    turned = box(col_bands, row_bands, cols.T, rows.T, width, height)
    if turned is None:
      return grey
    vertical, horizontal = turned
  frame = np.zeros_like(mask)
  for start, end in horizontal:
    frame[start:end] |= rows[start:end]
  for start, end in vertical:
    frame[:, start:end] |= cols[:, start:end]
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  cleared = ndimage.binary_dilation(frame, iterations=2)
  # A box holds what is written in it: the ink left must lie inside the box's
  # rectangle (a round digit's own strokes, taken for one, leave theirs outside).
  left = mask & ~cleared
  box_rows, box_cols = np.nonzero(frame.any(1))[0], np.nonzero(frame.any(0))[0]
  inside = left[box_rows[0] : box_rows[-1] + 1, box_cols[0] : box_cols[-1] + 1].sum()
  if inside < FRAME_HOLDS * left.sum():
    return grey
  grey = grey.copy()
  grey[cleared] = 0.0
  return grey


def _remove_frames_and_lines(grey: np.ndarray) -> np.ndarray:
  """Clears ink that is not the digit: a frame around it (a form's box), long
  horizontal lines (a baseline under it), and the paper's dark edges along the
  image border (a photo of paper). Never the last component left: a lone
  stroke is the digit (a 1)."""
  mask = grey > BOX_THRESHOLD
  parts = sorted(_components(mask), key=lambda p: -p["pixels"])
  parts = [p for p in parts if p["pixels"] >= 2]
  if len(parts) < 2:
    return grey
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
  removed = []
  for part in parts:
    kept = [p for p in parts if p is not part and p not in removed]
    if not kept:
      break
    if (
      _is_frame(part, kept, labels)
      or _is_line(part, grey.shape, kept)
      or _touches_edge_along(part, grey.shape)
    ):
      removed.append(part)
  if not removed:
    return grey
  grey = grey.copy()
  # Clear the removed components and the faint ink around them (anti-aliasing).
  gone = np.isin(labels, [p["label"] for p in removed])
  gone = ndimage.binary_dilation(gone, iterations=2)
  grey[gone & ~np.isin(labels, [p["label"] for p in parts if p not in removed])] = 0.0
  return grey


def _drop_stray_marks(grey: np.ndarray) -> tuple[np.ndarray, int]:
  """Clears small marks away from the digit: dust, specks, a pen's dots, a caption.
  Returns the image and how many marks were cleared.

  The digit is the box around the largest ink component (pixels above
  BOX_THRESHOLD) and every component of at least STRAY_SHARE of its pixels (a
  5's separate bar, a second digit: large ink is never dropped, so what the
  model reads is not narrowed to a part of it). A smaller component lying more
  than STRAY_NEAR of that box's longer side outside it is cleared; one nearer is
  kept (a broken stroke's pieces). One pass, so a trail of specks cannot lead the
  box away from the digit. Before this, two 3-pixel specks in a page's corners
  stretched the digit's box to the page and shrank the digit in the field.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  parts = _components(grey > BOX_THRESHOLD)
  if len(parts) < 2:
    return grey, 0
  largest = max(p["pixels"] for p in parts)
  big = [p for p in parts if p["pixels"] >= STRAY_SHARE * largest]
  top, bottom = min(p["box"][0].start for p in big), max(p["box"][0].stop for p in big)
  left, right = min(p["box"][1].start for p in big), max(p["box"][1].stop for p in big)
  near = STRAY_NEAR * max(bottom - top, right - left)

  def far(part) -> bool:
    (t, b), (l, r) = (
      (part["box"][0].start, part["box"][0].stop),
      (part["box"][1].start, part["box"][1].stop),
    )
    return max(t - bottom, top - b, l - right, left - r) > near

  stray = [p["label"] for p in parts if p["pixels"] < STRAY_SHARE * largest and far(p)]
  if not stray:
    return grey, 0
  labels, _ = ndimage.label(grey > BOX_THRESHOLD, structure=np.ones((3, 3)))
  # The marks and their faint edges (anti-aliasing), but no other component's pixel.
  gone = ndimage.binary_dilation(np.isin(labels, stray), iterations=1)
  grey = grey.copy()
  grey[gone & ((labels == 0) | np.isin(labels, stray))] = 0.0
  return grey, len(stray)


def _side_by_side(grey: np.ndarray) -> int:
  """How many digit-sized pieces of ink stand side by side: 1 for a digit, 2+ for a number.

  The ink is the components of at least STRAY_SHARE of the largest's pixels
  (pixels above BOX_THRESHOLD; dots and specks do not count). Its columns split
  into runs wherever SIDE_BY_SIDE_GAP of the ink's height or more of them are
  blank; a run counts when its ink spans SIDE_BY_SIDE_HEIGHT of that height.
  Digits that touch or overlap in columns count as one. On MNIST's 5,000 valid
  digits (at 112 px) one is split (``tests/test_images.py``); of 500 random
  pairs of valid digits 0-5 px apart at 28 px, 364 were split (a scratch
  measurement).
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  parts = _components(grey > BOX_THRESHOLD)
  if len(parts) < 2:
    return 1
  largest = max(p["pixels"] for p in parts)
  labels, _ = ndimage.label(grey > BOX_THRESHOLD, structure=np.ones((3, 3)))
  ink = np.isin(labels, [p["label"] for p in parts if p["pixels"] >= STRAY_SHARE * largest])
  rows = np.nonzero(ink.any(1))[0]
  height = rows[-1] - rows[0] + 1
  inked = np.nonzero(ink.any(0))[0]
  breaks = np.nonzero(np.diff(inked) - 1 >= SIDE_BY_SIDE_GAP * height)[0]
  starts = np.concatenate([[inked[0]], inked[breaks + 1]])
  stops = np.concatenate([inked[breaks], [inked[-1]]]) + 1
  count = 0
  for start, stop in zip(starts, stops, strict=True):
    spanned = np.nonzero(ink[:, start:stop].any(1))[0]
    count += spanned[-1] - spanned[0] + 1 >= SIDE_BY_SIDE_HEIGHT * height
  return max(1, int(count))


def number_warning(digit: Digit) -> str | None:
  """The warning for an image whose ink stands in several digit-sized pieces side by
  side (``Digit.pieces``; a number such as "17") or one above the other
  (``Digit.stacked``), read as one digit; None for a digit."""
  if digit.pieces < 2 and digit.stacked < 2:
    return None
  count, where = (
    (digit.pieces, "side by side (a number?)")
    if digit.pieces >= 2
    else (digit.stacked, "one above the other (several digits?)")
  )
  return (
    f"{count} digit-sized pieces {where}: the answer reads them as one digit; crop each"
    " digit into its own image"
  )


def short_warning(digit: Digit) -> str | None:
  """:func:`number_warning` in a few words, for a picture's caption."""
  if digit.pieces >= 2:
    return f"{digit.pieces} digits side by side?"
  return f"{digit.stacked} digits stacked?" if digit.stacked >= 2 else None


def _too_small(given: tuple[int, int]) -> ImageError:
  return ImageError(
    f"the image is {given[1]}x{given[0]} pixels: too small to hold a digit (at least"
    f" {MIN_SIDE} pixels on each side)"
  )


def _check_digit_like(ink_mask: np.ndarray, given: tuple[int, int]) -> None:
  """Refuses ink that cannot be a digit: too small an image (``given``: its (H, W) as
  given, which the message names), or specks (noise).

  Raises:
    ImageError: naming what was found.
  """
  height, width = ink_mask.shape
  if min(height, width) < MIN_SIDE:  # as given, or once reduced (a 3000x40 strip)
    raise _too_small(given)
  parts = _components(ink_mask)
  largest = max(parts, key=lambda p: max(p["height"], p["width"]))
  span = max(largest["height"], largest["width"])
  small_digit = span >= SMALL_DIGIT_SPAN and largest["pixels"] >= SMALL_DIGIT_SHARE * sum(
    p["pixels"] for p in parts
  )
  if span < MIN_SPAN * min(height, width) and not small_digit:
    specks = f"{len(parts)} speck{'s' if len(parts) > 1 else ''}"
    raise ImageError(
      f"no digit-like ink: {specks}, the longest {span} pixels across in {width}x{height}"
      f" as read (a digit spans {MIN_SPAN:.0%} of the image, or {SMALL_DIGIT_SPAN}+ pixels"
      f" in one piece holding {SMALL_DIGIT_SHARE:.0%} of the ink); is it noise or an empty"
      " page? (A tiny digit: crop the image around the digit.)"
    )


def _stroke_width(mask: np.ndarray, skeleton: np.ndarray) -> float:
  """Pixels: twice the median distance transform of ``mask`` on its ``skeleton``, less 1."""
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  return 2.0 * float(np.median(ndimage.distance_transform_edt(mask)[skeleton])) - 1.0


def _check_strokes(patch: np.ndarray, pieces: int = 1) -> None:
  """Refuses a round blob (BLOB_CIRCLE): a dot was read as a confident 0; and a dash
  (DASH_ASPECT): a hyphen was read as a confident 7.

  ``patch``: the ink's box, ink bright; a box under STROKE_MIN_BOX is measured at the
  smallest whole multiple of its size that reaches it (bilinear), as MNIST's were.
  ``pieces``: :func:`_side_by_side`'s count; a number written in a row ("1111") is
  as wide as a dash, so the dash rule takes one piece only.

  Raises:
    ImageError: naming the blob's size and its widest inscribed circle, or the dash's.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  height, width = patch.shape
  if pieces < 2 and width >= DASH_ASPECT * height:
    raise ImageError(
      f"no digit-like ink: a dash {width}x{height} pixels as read ({width / height:.1f} times"
      f" wider than tall; MNIST's digits are at most 2.5); is it a hyphen or a line?"
      " Write a digit."
    )
  factor = -(-STROKE_MIN_BOX // max(height, width))  # ceil
  if factor > 1:
    patch = _resize(patch, height * factor, width * factor, method="BILINEAR")
  inked = patch[patch > BOX_THRESHOLD]
  if inked.size < 2:
    return
  mask = patch > 0.5 * np.percentile(inked, STROKE_INK_PERCENTILE)
  # Padded: the ink touches its box's edges, beyond which is paper.
  circle = 2.0 * float(ndimage.distance_transform_edt(np.pad(mask, 1)).max()) / max(patch.shape)
  if circle >= BLOB_CIRCLE:
    raise ImageError(
      f"no digit-like ink: a filled round blob {width}x{height} pixels as read (the widest"
      f" circle inside its ink spans {min(circle, 1.0):.0%} of it; inside a digit's strokes, under"
      f" {BLOB_CIRCLE:.0%}); is it a dot or a smudge? Write the digit in lines."
    )


def _normalise_stroke(patch: np.ndarray, *, peppered: bool = False) -> np.ndarray:
  """Redraws a digit whose stroke is far thinner or bolder than MNIST's.

  The stroke width is measured as twice the distance transform on the ink's
  skeleton (scikit-image); relative to the box's longer side it is
  MNIST_STROKE on MNIST's valid digits (median; 5-95%: 0.078-0.171). A digit
  outside STROKE_RANGE (a 1-pixel mouse pen, a bold marker) is redrawn along
  its skeleton with MNIST's width, anti-aliased; any other is left as drawn. Before
  it is redrawn on ``peppered`` paper (PEPPERED_SPECKS or more specks were cleared
  away from the digit), pieces of ink no longer than SPECK_LENGTH stroke widths or
  than a pixel of the BOX-pixel box (specks; the largest piece is always kept) are
  dropped. On clean paper they stay: a thin pen reduced from a big scan breaks into
  such pieces.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)
  from skimage.morphology import skeletonize  # noqa: PLC0415 (scikit-image loads on first use)

  # Half the ink's level: its median, about 1 for a stroke drawn solid; a thin pen
  # reduced from a big scan is faint where it runs along the pixel grid (0.25) and
  # full only where strokes cross (at half the maximum, a 4 kept only its slant).
  inked = patch[patch > BOX_THRESHOLD]
  mask = patch > 0.5 * (np.percentile(inked, STROKE_INK_PERCENTILE) if inked.size else 1.0)
  longer = max(patch.shape)
  if mask.sum() < 2 or longer < STROKE_MIN_BOX:  # too small to measure a stroke in
    return patch
  skeleton = skeletonize(mask)
  if not skeleton.any():
    return patch
  width = _stroke_width(mask, skeleton)
  low, high = STROKE_RANGE
  if low * longer <= width <= high * longer:
    return patch
  if peppered:
    # Ink no longer than SPECK_LENGTH strokes are wide, or than a pixel of the 20x20
    # box, is a speck, not a piece of a stroke: redrawn at MNIST's width it would be
    # a blob (0.2% pepper: a 0 read as 8).
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    speck = max(SPECK_LENGTH * width, longer / BOX)
    strokes = [
      index + 1
      for index, box in enumerate(ndimage.find_objects(labels))
      if max(b.stop - b.start for b in box) > speck or sizes[index] == sizes.max()
    ]
    skeleton &= np.isin(labels, strokes)
  radius = 0.5 * MNIST_STROKE * longer
  pad = int(np.ceil(radius)) + 1  # the redrawn stroke may reach past the old box
  distance = ndimage.distance_transform_edt(~np.pad(skeleton, pad))
  redrawn = np.clip(radius + 0.5 - distance, 0.0, 1.0)  # anti-aliased edge, 1 pixel wide
  rows, cols = np.nonzero(redrawn.any(1))[0], np.nonzero(redrawn.any(0))[0]
  return redrawn[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def prepare(image, *, invert: str = "auto") -> Digit:
  """Normalises one digit image as MNIST did (see the module docstring).

  Args:
    image: grey <float>[H, W] in [0, 1] (or integers in 0..255; or [H, W, 3] RGB
      and [H, W, 4] RGBA, see :func:`read_image`'s arrays), any size and aspect ratio,
      either polarity, e.g. from :func:`read_image`.
    invert: ``"auto"`` (invert when the border is light), ``"yes"`` or ``"no"``.

  Returns:
    A :class:`Digit`: <float32>[28, 28] in [0, 1], white on black; its
    ``pieces`` is 2 or more when the ink stands in that many digit-sized pieces
    side by side (a number), which are read as one digit all the same.

  Raises:
    ImageError: a bad array, or no ink (a blank or contrast-less image).
    ValueError: an unknown ``invert``.
  """
  if invert not in INVERT:
    raise ValueError(f"invert={invert!r}: expected one of {INVERT}")
  grey = _as_grey(image, "image")
  given = grey.shape
  if min(given) < MIN_SIDE:  # before "no ink": a 1x1 image is too small, blank or not
    raise _too_small(given)
  grey = _despeckle(np.asarray(_shrink(grey), np.float64))
  reduced = grey.shape != given
  if invert != "no":  # dark ink on a sheet photographed on a darker surface
    grey = _flatten_shadow(_crop_to_sheet(grey), invert)
  if invert == "auto":
    # The ink is the extreme farther from the paper: dark ink on paper of any
    # shade (dim photos, coloured paper) is inverted, light ink on dark is not.
    paper = float(np.median(_paper(grey)))
    darkest, brightest = np.percentile(grey, [0.05, 99.95])
    if abs((paper - darkest) - (brightest - paper)) < MIN_CONTRAST:
      # A digit under 0.05% of the image (small on a big page) leaves both
      # percentiles on the paper: the paper's shade decides.
      inverted = paper > 0.5
    else:
      inverted = bool(paper - darkest > brightest - paper)
  else:
    inverted = invert == "yes"
  if inverted:
    grey = 1.0 - grey
  paper = float(np.median(_border(grey)))
  if invert != "auto" and paper > 0.5:  # the model reads light ink on dark paper
    ink, other = ("light", "no") if invert == "yes" else ("dark", "yes")
    raise ImageError(
      f"--invert {invert} leaves light paper (median {paper:.2f} at the border):"
      f" {ink} ink on {'dark' if ink == 'light' else 'light'} paper needs --invert auto"
      f" or {other}"
      + (
        "; if the ink is dark, much of the border is in shadow or off the paper: crop"
        " the image to the lit paper around the digit"
        if invert == "yes"
        else ""
      )
    )
  if grey.shape == (FIELD, FIELD) and paper <= BACKGROUND_MAX and _is_mnist_sized(grey):
    return Digit(grey.astype(np.float32), inverted, False)
  grey = _remove_lighting(grey)
  border = _paper(grey)
  paper = float(np.median(border))
  deviation = np.abs(border - paper)
  if CLIPPED_PAPER[0] < np.mean(deviation == 0) < CLIPPED_PAPER[1]:
    # Noise on white paper clipped at 255 leaves about half the paper exactly white,
    # and the MAD at 0: measure the noise on the other half (half-normal: the same MAD).
    deviation = deviation[deviation > 0]
  noise = 1.4826 * float(np.median(deviation))  # robust std (MAD)
  ink = float(grey.max())
  # Above the paper's noise, but never above half-way to the ink.
  floor = min(paper + NOISE_SIGMAS * noise, paper + 0.5 * (ink - paper))
  if ink - floor < MIN_CONTRAST:
    hint = (
      "; dark ink on light paper needs --invert auto or yes"
      if invert == "no" and paper > 0.5
      else "; is the image blank?"
      + (
        f" (it was reduced to {MAX_SIDE} px on its longer side: if the digit is small in"
        " it, crop the image around the digit)"
        if reduced and ink > paper + 1e-6  # some ink, lost in the reduction; not a blank page
        else ""
      )
    )
    raise ImageError(
      f"no ink: the brightest ink ({ink:.2f}) is within {MIN_CONTRAST} of the"
      f" background ({floor:.2f}){hint}"
    )
  grey = _remove_ruled_lines(np.clip((grey - floor) / (ink - floor), 0.0, 1.0))
  grey = _remove_frames_and_lines(_remove_frame_runs(grey))
  ink_mask = grey > BOX_THRESHOLD
  if not ink_mask.any():
    raise ImageError(
      "no digit-like ink: only ruled lines, a frame or long straight lines, which are"
      " taken for the paper's; write a digit"
    )
  _check_digit_like(ink_mask, given)
  grey, cleared = _drop_stray_marks(grey)
  peppered = cleared >= PEPPERED_SPECKS
  pieces = _side_by_side(grey)
  stacked = _side_by_side(grey.T)  # the same count along the columns
  ink_mask = grey > BOX_THRESHOLD
  rows, cols = np.nonzero(ink_mask.any(1))[0], np.nonzero(ink_mask.any(0))[0]
  patch = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  _check_strokes(patch, pieces)
  patch = _normalise_stroke(patch, peppered=peppered)
  scale = BOX / max(patch.shape)
  height = max(1, round(patch.shape[0] * scale))
  width = max(1, round(patch.shape[1] * scale))
  patch = _resize(patch, height, width)
  if patch.sum() <= 0:
    raise ImageError("no ink left after scaling the digit to 20x20")
  return Digit(_place_by_centre_of_mass(patch), inverted, True, pieces, stacked)


def to_mnist(image, *, invert: str = "auto") -> np.ndarray:
  """One digit image as an MNIST digit: <float32>[28, 28] in [0, 1] (see :func:`prepare`)."""
  return prepare(image, invert=invert).pixels


def load_image(path: str | Path, *, invert: str = "auto") -> np.ndarray:
  """A digit file as an MNIST digit <float32>[28, 28]: :func:`read_image` then :func:`to_mnist`.

  Raises:
    ImageError: naming the file (unreadable, unusable values, no ink).
  """
  try:
    return to_mnist(read_image(path), invert=invert)
  except ImageError as error:
    message = str(error)
    raise ImageError(message if message.startswith(str(path)) else f"{path}: {message}") from error


CAPTION_FONT = "DejaVuSans.ttf"  # wide Unicode coverage (accented names, dashes, Greek, Cyrillic)
MISSING_GLYPH = "?"  # drawn for a character the caption's font has no glyph for


@functools.cache
def caption_font(size: int = 12):
  """The font of ``--show`` captions: DejaVu Sans at ``size`` px.

  Searched by Pillow in the system's font directories, then as the copy that
  matplotlib ships (``mpl-data/fonts/ttf``); without either, Pillow's default
  font, which covers little beyond ASCII (``caption_text`` replaces the rest).
  """
  from PIL import ImageFont  # noqa: PLC0415 (Pillow loads on first use)

  candidates = [CAPTION_FONT]
  spec = importlib.util.find_spec("matplotlib")  # found, not imported
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      candidates.append(str(Path(root) / "mpl-data" / "fonts" / "ttf" / CAPTION_FONT))
  for candidate in candidates:
    try:
      return ImageFont.truetype(candidate, size)
    except OSError:
      continue
  return ImageFont.load_default(size=size)


def _mask(font, character: str) -> tuple:
  mask = font.getmask(character)
  return mask.size, bytes(mask)


def has_glyph(font, character: str) -> bool:
  """Whether ``font`` draws ``character`` as itself, not as its missing-glyph box.

  Pillow has no glyph lookup, so the drawing is compared with that of a
  private-use code point that no font assigns (U+10FFFD).
  """
  return _mask(font, character) != _mask(font, "\U0010fffd")


def caption_text(line: str, font) -> str:
  """``line`` as ``font`` can draw it, never with a missing-glyph box.

  The line is composed first (NFC: e + U+0301 -> é). Spaces become spaces;
  other control, format and unassigned characters, and the combining marks
  left (Devanagari vowel signs, a keycap's U+20E3: drawn alone they pass the
  glyph test, after a letter they draw as a box), are dropped; a character
  without a glyph becomes its base letter (é -> e) when the font has that,
  else ``MISSING_GLYPH``.
  """
  out = []
  for character in unicodedata.normalize("NFC", line):
    if character.isspace():
      out.append(" ")
    elif unicodedata.category(character) in ("Cc", "Cf", "Cs", "Co", "Cn", "Mn", "Mc", "Me"):
      continue
    elif has_glyph(font, character):
      out.append(character)
    else:
      base = unicodedata.normalize("NFKD", character)[:1]
      out.append(base if base != character and has_glyph(font, base) else MISSING_GLYPH)
  return "".join(out)


def _fit(line: str, font, width: int) -> str:
  """``line``, shortened in the middle with an ellipsis until it is at most ``width`` px."""
  if font.getlength(line) <= width:
    return line
  keep = len(line)
  while keep > 2:
    keep -= 1
    head, tail = line[: (keep + 1) // 2], line[len(line) - keep // 2 :]
    if font.getlength(f"{head}\u2026{tail}") <= width:
      return f"{head}\u2026{tail}"
  return "\u2026"


SHOW_MAX_WIDTH = 480  # pixels: a --show picture widens to this for its caption, no further


def save_side_by_side(
  original, digit: np.ndarray, path: str | Path, *, height: int = 112, caption: str | None = None
) -> Path:
  """Writes ``original`` (any size) beside ``digit`` (28x28), both ``height`` pixels tall, as PNG.

  The digit is enlarged without smoothing, so each of its 784 pixels shows.
  ``caption``: text (lines split on newlines) in a white band below both.
  """
  from PIL import Image  # noqa: PLC0415 (Pillow loads on first use)
  from PIL import ImageDraw  # noqa: PLC0415

  path = Path(path)

  def grey(array):
    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), mode="L")

  left = grey(_as_grey(original, "image"))
  left = left.resize(
    (max(1, round(left.width * height / left.height)), height), Image.Resampling.LANCZOS
  )
  right = grey(digit).resize((height, height), Image.Resampling.NEAREST)
  gap = 8
  font = caption_font(12)
  texts = [caption_text(line, font) for line in (caption.splitlines() if caption else [])]
  # Wide enough for the caption (a tall, narrow input left too little room for its
  # lines), up to SHOW_MAX_WIDTH; a longer line (a long file name) is shortened.
  wanted = max((round(font.getlength(text)) + 8 for text in texts), default=0)
  width = max(left.width + gap + right.width, min(wanted, SHOW_MAX_WIDTH))
  lines = [_fit(text, font, width - 8) for text in texts]
  line_height = 16
  band = line_height * len(lines) + (6 if lines else 0)
  canvas = Image.new("L", (width, height + band), 128)
  canvas.paste(left, (0, 0))
  canvas.paste(right, (width - right.width, 0))  # at the right edge, however wide
  if lines:
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, height, width, height + band), fill=255)
    for n, line in enumerate(lines):
      draw.text((4, height + 3 + n * line_height), line, fill=0, font=font)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path
