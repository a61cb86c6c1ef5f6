"""Shuffled, resumable training batches for the pmapped step, one process's share of each."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from pixelrnn_jax.preprocessing import check_order
from pixelrnn_jax.preprocessing import rotate_and_scale
from pixelrnn_jax.preprocessing import to_sequences

_WARP = 0x57415250  # "WARP": the stream of the rotations and scales, apart from the shifts'
_ELASTIC = 0x454C4153  # "ELAS": the stream of the elastic distortions, apart from both


def elastic_displacements(uniform: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
  """Elastic-distortion fields from their noise (Simard, Steinkraus & Platt 2003,
  "Best practices for convolutional neural networks applied to visual document
  analysis", section 2): ``alpha * G_sigma * uniform``, each field's noise
  smoothed by a Gaussian of standard deviation ``sigma`` pixels (zero outside the
  image) and multiplied by ``alpha``. Each component's RMS is about ``alpha *
  sqrt(1 / (12 pi sigma^2))`` pixels in the middle of the image, and the
  displacement's length sqrt(2) times that (at sigma 4: 0.9 px for alpha 16,
  1.9 px for 34); less near the edges (over the whole image 0.85 and 1.8 px).

  Args:
    uniform: <float>[..., 2, H, W] noise drawn uniformly from [-1, 1], one
      (row, col) pair of fields per image.
    alpha: the scale (Simard used 34 with ``sigma`` 4 on MNIST).
    sigma: the smoothness, in pixels (> 0).

  Returns:
    <float64>[..., 2, H, W] displacements in pixels, for ``rotate_and_scale``.
  """
  from scipy import ndimage  # noqa: PLC0415 (SciPy loads on first use)

  uniform = np.asarray(uniform, np.float64)
  sigmas = (0,) * (uniform.ndim - 2) + (sigma, sigma)
  return alpha * ndimage.gaussian_filter(uniform, sigmas, mode="constant", cval=0.0)


class Batches(Iterator):
  """Shuffled batches for a pmapped step, resumable from (epoch, index).

  Each epoch is a fresh permutation drawn from ``fold_in(key, epoch)``; the
  remainder that does not fill a batch is dropped. ``batch_size`` is the
  global batch, over all devices of all processes: with ``num_processes > 1``
  every process draws the same global batch from the same key and keeps only
  slice ``process_index`` of it, so N processes with D devices each see the
  batches of one process with N x D devices. Each batch is
  ``x <float32>[devices, batch_size // (devices * num_processes), T, in_dim]``,
  ``y <int32>[devices, batch_size // (devices * num_processes)]``.

  ``max_shift > 0`` translates each image by a random ``(dy, dx)`` in
  ``[-max_shift, max_shift]``, filling with the background (the smallest
  pixel value of ``images``); the shifts come from ``(key, epoch, index)``, so
  a resumed run draws the same ones.

  ``max_rotation > 0`` or ``max_scale > 0`` first rotates each image by a
  random angle in ``[-max_rotation, max_rotation]`` degrees (counter-clockwise
  positive) and scales it by a random factor in ``[1 - max_scale, 1 +
  max_scale]``, both about the image centre, with bilinear interpolation and
  the background outside (:func:`rotate_and_scale`); the draws come from their
  own stream of ``(key, epoch, index)``, so adding them leaves the shifts as
  they were.

  ``elastic_alpha > 0`` adds an elastic distortion to that warp (one
  interpolation for both): a random displacement field per image, uniform
  noise smoothed by a Gaussian of ``elastic_sigma`` pixels and multiplied by
  ``elastic_alpha`` (:func:`elastic_displacements`), from a third
  stream of ``(key, epoch, index)``.
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
    num_processes: int = 1,
    process_index: int = 0,
    max_shift: int = 0,
    max_rotation: float = 0.0,
    max_scale: float = 0.0,
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
    epoch: int = 0,
    index: int = 0,
  ):
    check_order(order)
    if not 0 <= max_shift < 14:
      raise ValueError(f"max_shift={max_shift}: expected an integer in [0, 13]")
    if not 0 <= max_rotation <= 180:
      raise ValueError(f"max_rotation={max_rotation}: expected degrees in [0, 180]")
    if not 0 <= max_scale < 1:
      raise ValueError(f"max_scale={max_scale}: expected a fraction in [0, 1)")
    if not 0 <= elastic_alpha <= 100:
      raise ValueError(f"elastic_alpha={elastic_alpha}: expected a scale in [0, 100] (0 = off)")
    if not 0.5 <= elastic_sigma <= 28:
      raise ValueError(f"elastic_sigma={elastic_sigma}: expected pixels in [0.5, 28]")
    if batch_size < 1 or num_devices < 1 or num_processes < 1:
      raise ValueError(
        f"batch_size={batch_size}, num_devices={num_devices},"
        f" num_processes={num_processes}: all must be >= 1"
      )
    if not 0 <= process_index < num_processes:
      raise ValueError(
        f"process_index={process_index}: expected 0 <= process_index <"
        f" num_processes ({num_processes})"
      )
    shards = num_devices * num_processes
    if batch_size % shards:
      raise ValueError(
        f"batch_size={batch_size} does not divide across {num_devices} device(s) x"
        f" {num_processes} process(es); use a multiple of {shards}"
      )
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size > len(images):
      raise ValueError(f"batch_size={batch_size} is larger than the {len(images)} examples")
    self.images, self.labels = images, labels
    self.batch_size, self.num_devices, self.order = batch_size, num_devices, order
    self.local_batch_size = batch_size // num_processes  # this process's share
    self.local_start = process_index * self.local_batch_size
    self.key = key
    self.batches_per_epoch = len(images) // batch_size
    if not 0 <= index < self.batches_per_epoch or epoch < 0:
      raise ValueError(
        f"position (epoch={epoch}, index={index}) is outside an epoch of"
        f" {self.batches_per_epoch} batches"
      )
    self.epoch, self.index = epoch, index
    self.max_shift, self.max_rotation, self.max_scale = max_shift, max_rotation, max_scale
    self.elastic_alpha, self.elastic_sigma = elastic_alpha, elastic_sigma
    self._warps = bool(max_rotation or max_scale or elastic_alpha)
    self._background = images.min() if max_shift or self._warps else None
    self._order_of_epoch = None

  @classmethod
  def from_config(
    cls, images: np.ndarray, labels: np.ndarray, config, *, key: jax.Array, epoch=0, index=0
  ) -> Batches:
    """The batches a run of ``config`` (a ``training.config.Config``) trains on.

    Its batch size, order, devices and processes (None = 1, process 0) and
    augmentations; ``key`` is the run's data key, ``(epoch, index)`` where to
    start. Errors as the constructor's.
    """
    return cls(
      images,
      labels,
      batch_size=config.batch_size,
      key=key,
      order=config.order,
      num_devices=config.devices,
      num_processes=config.num_processes or 1,
      process_index=config.process_id or 0,
      max_shift=config.max_shift,
      max_rotation=config.max_rotation,
      max_scale=config.max_scale,
      elastic_alpha=config.elastic_alpha,
      elastic_sigma=config.elastic_sigma,
      epoch=epoch,
      index=index,
    )

  @property
  def position(self) -> tuple[int, int]:
    """(epoch, index) of the next batch: pass it back to resume exactly."""
    return self.epoch, self.index

  def epoch_order(self, epoch: int) -> np.ndarray:
    return np.asarray(jax.random.permutation(jax.random.fold_in(self.key, epoch), len(self.images)))

  def shifts(self, epoch: int, index: int) -> np.ndarray:
    """The ``<int>[batch_size, 2]`` (dy, dx) of batch ``index`` of ``epoch``."""
    rng = self._rng(epoch, index)
    return rng.integers(-self.max_shift, self.max_shift + 1, size=(self.batch_size, 2))

  def _rng(self, epoch: int, index: int, stream: int | None = None) -> np.random.Generator:
    """NumPy's generator of batch ``index`` of ``epoch`` (and of ``stream``, if given)."""
    key = jax.random.fold_in(jax.random.fold_in(self.key, epoch), index)
    if stream is not None:
      key = jax.random.fold_in(key, stream)
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel())

  def warps(self, epoch: int, index: int) -> np.ndarray:
    """The ``<float64>[batch_size, 2]`` (angle in degrees, scale) of batch ``index`` of ``epoch``."""
    rng = self._rng(epoch, index, _WARP)
    angles = rng.uniform(-self.max_rotation, self.max_rotation, self.batch_size)
    scales = rng.uniform(1 - self.max_scale, 1 + self.max_scale, self.batch_size)
    return np.stack([angles, scales], axis=1)

  def displacements(self, epoch: int, index: int) -> np.ndarray:
    """The ``<float64>[batch_size, 2, H, W]`` elastic displacements of batch ``index`` of ``epoch``."""
    rng = self._rng(epoch, index, _ELASTIC)
    uniform = rng.uniform(-1.0, 1.0, (self.batch_size, 2, *self.images.shape[1:]))
    return elastic_displacements(uniform, self.elastic_alpha, self.elastic_sigma)

  def _shifted(self, images: np.ndarray) -> np.ndarray:
    """``images`` (this process's slice of the batch) shifted by their share of the shifts."""
    m = self.max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m)), constant_values=self._background)
    out = np.empty_like(images)
    height, width = images.shape[1:]
    shifts = self.shifts(self.epoch, self.index)
    shifts = shifts[self.local_start : self.local_start + self.local_batch_size]
    for i, (dy, dx) in enumerate(shifts):
      # out[r, c] = image[r - dy, c - dx]: the digit moves down by dy, right by dx.
      out[i] = padded[i, m - dy : m - dy + height, m - dx : m - dx + width]
    return out

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self._order_of_epoch is None or self._order_of_epoch[0] != self.epoch:
      self._order_of_epoch = (self.epoch, self.epoch_order(self.epoch))
    start = self.index * self.batch_size + self.local_start
    chosen = self._order_of_epoch[1][start : start + self.local_batch_size]
    images = self.images[chosen]
    if self._warps:
      warps = self.warps(self.epoch, self.index)
      local = slice(self.local_start, self.local_start + self.local_batch_size)
      warps = warps[local]
      moved = self.displacements(self.epoch, self.index)[local] if self.elastic_alpha else None
      images = rotate_and_scale(images, warps[:, 0], warps[:, 1], self._background, moved)
    if self.max_shift:
      images = self._shifted(images)
    x = to_sequences(images, self.order)
    y = self.labels[chosen]
    self.index += 1
    if self.index == self.batches_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    per_device = self.local_batch_size // self.num_devices
    return (
      x.reshape(self.num_devices, per_device, *x.shape[1:]),
      y.reshape(self.num_devices, per_device),
    )
