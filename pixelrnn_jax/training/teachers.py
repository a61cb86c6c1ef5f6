"""Knowledge distillation's teachers: the models ``Config.distill_from`` names.

Hinton, Vinyals and Dean 2015 ("Distilling the knowledge in a neural
network"): a model also learns the soft answers of other models, here an
ensemble's, which carry how alike the classes look to them. The teachers read
each training batch as the run reads it (after the augmentations, the shifts
and the order's permutation), so their answer is to the same digit. Their
ensemble's answer is the mean of their log-probabilities, as in
``benchmarks/ensembles.py``; with ``Config.distill_rotations`` the mean is also
over the batch turned by those angles (test-time augmentation, ``tta.py``), a
stronger teacher at one more read per view.

The teachers are read at every start of a run, a resume included: a resume
checks that their weights are the ones the run started with
(:func:`check_same`), so it stays bit-exact or is refused.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from pixelrnn_jax import checkpoints
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax import tta
from pixelrnn_jax.checkpoints import CheckpointError
from pixelrnn_jax.training import config as config_lib

EVENT = "distill_from"  # the metrics.jsonl record of the teachers a run learns from


@dataclasses.dataclass(frozen=True)
class Teachers:
  """The teachers of a run, ready for its training batches.

  ``models`` read [0, 1] sequences in the run's order (``gru_classifier.from_saved``);
  ``standardize``: the run's batches are standardised, so the teachers first undo it.
  ``records``: per teacher ``{"source", "step", "params_sha256"}``.
  ``rotations``: the angles of the views each teacher reads, in degrees (0 = the
  batch as it is; ``config.rotation_views``); ``view_matrices``: <float32>[views,
  784, 784], one per nonzero angle (``tta.view_matrices``).
  """

  models: tuple[gru_classifier.Params, ...]
  standardize: bool
  records: tuple[dict, ...]
  rotations: tuple[float, ...] = (0.0,)
  view_matrices: np.ndarray | None = None

  def ensemble_logits(self, x: jax.Array) -> jax.Array:
    """The teachers' answer to a training batch, <float32>[batch, classes].

    Args:
      x: <float32>[batch, T, in_dim], the sequences the run trains on
        (standardised when the run's config says so).

    Returns:
      The mean over teachers and views of their last-step log-probabilities (a
      log of the geometric mean of their probabilities, up to a constant per
      row), without gradient.
    """
    if self.standardize:
      x = x * np.float32(preprocessing.TRAIN_STD) + np.float32(preprocessing.TRAIN_MEAN)
    matrices = () if self.view_matrices is None else jnp.asarray(self.view_matrices)
    inputs = tta.views(x, matrices, with_identity=0.0 in self.rotations)
    answers = [
      jax.nn.log_softmax(gru_classifier.apply(m, v)[:, -1]) for m in self.models for v in inputs
    ]
    return jax.lax.stop_gradient(jnp.mean(jnp.stack(answers), axis=0))

  def record(self) -> dict:
    """The ``metrics.jsonl`` record: ``{"event": "distill_from", "teachers": [...]}``,
    with ``"rotations"`` when the teachers read turned views."""
    record = {"event": EVENT, "teachers": list(self.records)}
    if self.rotations != (0.0,):
      record["rotations"] = list(self.rotations)
    return record


def read(config: config_lib.Config) -> Teachers | None:
  """The teachers ``config.distill_from`` names; None when distillation is off.

  Raises:
    FileNotFoundError, CheckpointError: nothing loadable at an entry, naming it
      and ``--distill-from``.
    ValueError: a teacher of another input (``--order``) than the run's,
      naming both.
  """
  sources = config_lib.teacher_sources(config.distill_from)
  if not sources:
    return None
  models, records, unturned = [], [], []
  for source in sources:
    try:
      saved = model_io.read(source)
      model = gru_classifier.from_saved(saved)
    except FileNotFoundError as error:
      raise FileNotFoundError(f"--distill-from {source}: {error}") from error
    except CheckpointError as error:
      raise CheckpointError(f"--distill-from {source}: {error}") from error
    if model.order != config.order:
      raise ValueError(
        f"--distill-from {source}: a model of --order {model.order}, and this run reads"
        f" --order {config.order}; a teacher must read the image as the run does"
      )
    models.append(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), model))
    if not (saved.config or {}).get("max_rotation"):
      unturned.append(source)
    records.append(
      {
        "source": model_io.recorded_source(source, saved),
        "step": saved.step,
        "params_sha256": checkpoints.state_digest(saved.arrays),
      }
    )
  if config.distill_rotations is None:
    return Teachers(tuple(models), config.standardize, tuple(records))
  rotations = config_lib.rotation_views(config.distill_rotations, flag="--distill-rotations")
  for source in unturned:
    logging.getLogger(__name__).warning(tta.UNTRAINED_WARNING, source)
  return Teachers(
    tuple(models),
    config.standardize,
    tuple(records),
    rotations,
    tta.view_matrices(rotations, config.order),
  )


def recorded(records: list[dict]) -> list[dict] | None:
  """The teachers a run recorded (its last ``distill_from`` record), else None."""
  found = None
  for record in records:
    if record.get("event") == EVENT:
      found = record["teachers"]
  return found


def check_same(teachers: Teachers, records: list[dict], where: str) -> None:
  """Refuses a resume whose teachers' weights differ from those the run started with.

  Args:
    records: the run's ``metrics.jsonl`` records.
    where: the run directory, for the message.

  Raises:
    ValueError: naming the teacher, both SHA-256 prefixes and the fix.
  """
  before = recorded(records)
  if before is None:  # a run from before this record: nothing to compare
    return
  for old, new in zip(before, teachers.records, strict=True):
    if old["params_sha256"] != new["params_sha256"]:
      raise ValueError(
        f"--distill-from {new['source']}: its weights changed since {where} started"
        f" (SHA-256 {old['params_sha256'][:12]}... then, {new['params_sha256'][:12]}..."
        " now); the run would not resume the same. Restore those weights, or start a"
        " new --workdir"
      )
