"""One optimiser step: the train state, the learning-rate schedule, the optimiser,
the loss, and the pmapped step that averages gradients over devices.

``make_train_step`` is the one place that knows about ``jax.pmap``: the
host batch is ``[devices, batch_per_device, ...]`` and gradients are
averaged with ``lax.pmean`` (the pattern of Flax's ImageNet example).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING
from typing import NamedTuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training.config import Config

if TYPE_CHECKING:  # the trainer's module; loading a model imports this one without it
  from pixelrnn_jax.training import teachers as teachers_lib

AXIS = "batch"  # the pmap axis the gradients are averaged over


class TrainState(NamedTuple):
  step: jax.Array  # <int32>[]: optimiser steps taken
  params: gru_classifier.Params
  opt_state: optax.OptState
  ema_params: gru_classifier.Params | None = None  # the weights' EMA (Config.ema_decay), else None

  @property
  def model_params(self) -> gru_classifier.Params:
    """The weights that are evaluated and saved as the model: the EMA when kept."""
    return self.params if self.ema_params is None else self.ema_params


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA's decay at ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

  The warm-up keeps the first updates from being swamped by the initial
  weights; the formula is TensorFlow's ``tf.train.ExponentialMovingAverage``
  with ``num_updates``.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, step: jax.Array, decay: float):
  """``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay_at(step, decay)`` (optax)."""
  return optax.incremental_update(params, ema_params, 1.0 - ema_decay_at(step, decay))


def dropout_key(seed: int) -> jax.Array:
  """The base key of recurrent dropout's masks, apart from the init and data keys."""
  return jax.random.fold_in(jax.random.key(seed), 0x44524F50)  # "DROP"


def make_schedule(config: Config) -> optax.Schedule:
  """The learning rate as a function of the step."""
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule == "warmup_step":
    # Linear warm-up, constant, then one divide-by-10 drop late in the run: the
    # schedule of the published psMNIST learning curves.
    drop_step = int(round(config.lr_drop_at * config.steps))
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.piecewise_constant_schedule(
          config.learning_rate, {drop_step - config.warmup_steps: 0.1}
        ),
      ],
      boundaries=[config.warmup_steps],
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=config.steps,
    end_value=0.0,
  )


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """Adam (the notebook's), optionally with a schedule and global-norm clipping.

  With ``config.sam_rho`` > 0 it is wrapped in SAM (Foret et al. 2021,
  ``optax.contrib.sam`` in opaque mode): each update first moves the weights to
  ``w + rho * g / ||g||_2`` (g: the gradient it is given, averaged over devices),
  then passes the gradient there, averaged over the ``AXIS`` devices, to Adam.
  Its ``update`` needs ``grad_fn=`` and runs inside the pmap (``make_train_step``).
  """
  parts = []
  if config.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.weight_decay:
    parts.append(optax.adamw(make_schedule(config), weight_decay=config.weight_decay))
  else:
    parts.append(optax.adam(make_schedule(config)))
  optimizer = optax.chain(*parts)
  if config.sam_rho:
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam_rho))
    optimizer = optax.contrib.sam(
      optimizer, ascent, sync_period=2, opaque_mode=True, batch_axis_name=AXIS
    )
  return optimizer


def init_params(config: Config, key: jax.Array) -> gru_classifier.Params:
  steps, in_dim = preprocessing.sequence_shape(config.order)
  return gru_classifier.init(
    key,
    num_units=config.num_units,
    in_dim=in_dim,
    cell=config.cell,
    activation=config.activation,
    gate_bias_init=config.gate_bias_init,
    recurrent_init=config.recurrent_init,
    max_steps=steps,
  )


def init_train_state(config, key, optimizer) -> TrainState:
  params = init_params(config, key)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema_params=None if config.ema_decay is None else params,
  )


def loss_fn(
  params,
  x,
  labels,
  *,
  per_step_loss: float = 0.0,
  per_step_weighting: str = "uniform",
  impl: str = gru_classifier.DEFAULT_IMPL,
  recurrent_dropout: float = 0.0,
  key: jax.Array | None = None,
  label_smoothing: float = 0.0,
  teacher_logits: jax.Array | None = None,
  distill_weight: float = 0.0,
  distill_temperature: float = 1.0,
):
  """Cross-entropy on the last step (the notebook's), plus an optional per-step term,
  optionally mixed with a distillation term: ``(1 - w) * that + w * distillation``.

  Args:
    x: <float32>[batch, T, in_dim]
    labels: <int32>[batch]
    recurrent_dropout, key: ``gru_classifier.apply``'s, for training.
    label_smoothing: ``gru_classifier.cross_entropy``'s, for both terms.
    teacher_logits: <float32>[batch, classes], the teachers' answer to ``x``
      (``teachers.ensemble_logits``); with ``distill_weight`` w > 0 the loss is
      ``(1 - w) * ce + w * gru_classifier.distillation_loss(..., distill_temperature)``.

  Returns:
    (loss, logits <float32>[batch, T, classes])
  """
  logits = gru_classifier.apply(params, x, impl=impl, recurrent_dropout=recurrent_dropout, key=key)
  loss = gru_classifier.cross_entropy(logits, labels, label_smoothing=label_smoothing)
  if per_step_loss:
    loss = loss + per_step_loss * gru_classifier.cross_entropy_per_step(
      logits, labels, per_step_weighting, label_smoothing=label_smoothing
    )
  if distill_weight:
    soft = gru_classifier.distillation_loss(logits, teacher_logits, temperature=distill_temperature)
    loss = (1.0 - distill_weight) * loss + distill_weight * soft
  return loss, logits


def make_train_step(
  optimizer: optax.GradientTransformation,
  *,
  per_step_loss: float = 0.0,
  per_step_weighting: str = "uniform",
  impl: str = gru_classifier.DEFAULT_IMPL,
  devices=None,
  recurrent_dropout: float = 0.0,
  ema_decay: float | None = None,
  seed: int = 0,
  label_smoothing: float = 0.0,
  teachers: teachers_lib.Teachers | None = None,
  distill_weight: float = 0.0,
  distill_temperature: float = 1.0,
  sam: bool = False,
):
  """Returns the pmapped train step ``(state, x, labels[, stop]) -> (state, metrics)``.

  ``state`` is replicated over the leading device axis, ``x`` is
  <float32>[devices, batch_per_device, T, in_dim], ``labels``
  <int32>[devices, batch_per_device]. Gradients and metrics are averaged over
  devices with ``lax.pmean`` (outside the scan); the input state's buffers are
  donated. This factory is the one place that knows about pmap.

  Args:
    devices: the pmap's devices, in a multi-process run those of every process
      (``distributed.training_devices``); None = this process's first ones.
    stop (of the step): optional <int32>[devices], a signal number asking the run
      to stop, else 0; ``metrics["stop"]`` is its maximum over all devices of
      all processes, so every process learns of a signal at the same step.
    recurrent_dropout: the drop probability; each device's masks come from
      ``(dropout_key(seed), step, device index)``, so a resumed run draws the same.
    ema_decay: keep ``state.ema_params`` (``update_ema``) after every update; None = off.
    label_smoothing: of the training loss (``loss_fn``); the metrics' loss is
      the same smoothed loss.
    teachers, distill_weight, distill_temperature: knowledge distillation
      (``loss_fn``): the teachers' ensemble answers each device's batch as the
      model reads it; the metrics' loss is the mixed loss.
    sam: ``optimizer`` is ``make_optimizer``'s SAM (``Config.sam_rho`` > 0); its
      second gradient is of the same loss on the same batch. The metrics are of
      the weights before the step, as without it.
  """
  if distill_weight and teachers is None:
    raise ValueError(f"distill_weight={distill_weight!r} needs teachers (teachers.read)")

  def train_step(state: TrainState, x, labels, stop=None):
    key = None
    if recurrent_dropout:
      key = jax.random.fold_in(
        jax.random.fold_in(dropout_key(seed), state.step), jax.lax.axis_index(AXIS)
      )
    teacher_logits = teachers.ensemble_logits(x) if distill_weight else None
    batch_loss = functools.partial(
      loss_fn,
      x=x,
      labels=labels,
      per_step_loss=per_step_loss,
      per_step_weighting=per_step_weighting,
      impl=impl,
      recurrent_dropout=recurrent_dropout,
      key=key,
      label_smoothing=label_smoothing,
      teacher_logits=teacher_logits,
      distill_weight=distill_weight,
      distill_temperature=distill_temperature,
    )
    (loss, logits), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    extra = {}
    if sam:  # the same batch, masks and teachers' answer at the moved weights
      extra["grad_fn"] = lambda params, _: jax.grad(batch_loss, has_aux=True)(params)[0]
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    ema_params = None
    if ema_decay is not None:
      ema_params = update_ema(state.ema_params, params, state.step, ema_decay)
    metrics = jax.lax.pmean(
      {"loss": loss, "accuracy": gru_classifier.accuracy(logits, labels)}, AXIS
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    if stop is not None:
      metrics["stop"] = jax.lax.pmax(stop, AXIS)
    return TrainState(state.step + 1, params, opt_state, ema_params), metrics

  return jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def replicate(tree, num_devices: int):
  return flax.jax_utils.replicate(tree, devices=jax.local_devices()[:num_devices])


def unreplicate(tree):
  """The first device's copy, on the host.

  (flax.jax_utils.unreplicate keeps the device axis when 1 of several devices is used.)
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def as_model(params: gru_classifier.Params, config: Config) -> gru_classifier.Params:
  """Training params as the model a checkpoint loads as: [0, 1] images in config.order."""
  return gru_classifier.for_images(params, order=config.order, standardize=config.standardize)
