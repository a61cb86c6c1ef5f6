"""Training: the pmapped optax step, the loop, checkpoints and the run directory.

``train_and_evaluate(config, workdir)`` is the entry point. The run
directory holds::

    config.json        the resolved Config
    metrics.jsonl      one JSON line per log interval and per evaluation
    eval.json          the final evaluation on valid (with accuracy per step)
    checkpoints/       orbax steps <step>/: the newest K and the best on valid
                       (``run_checkpoints``)

A run directory that already has checkpoints is resumed from the newest
readable one: params, optimiser state, data position and data key, so the
resumed run equals the uninterrupted one bit for bit on CPU. (A run directory
of pixelrnn_jax 0.2, with ``ckpt_<step>.msgpack`` files, resumes from its
newest msgpack checkpoint and continues in orbax steps.)

A multi-process run (``Config.num_processes``, ``distributed``) runs this
same loop in every process: each drives its local devices and reads its slice
of each global batch; process 0 writes the run's files; all of them take part
in every checkpoint and agree, through the step itself, on when to stop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.jax_utils
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pixelrnn_jax import batches as batches_lib
from pixelrnn_jax import checkpoint
from pixelrnn_jax import config as config_lib
from pixelrnn_jax import data
from pixelrnn_jax import distributed
from pixelrnn_jax import evaluation
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax import run_checkpoints

log = logging.getLogger(__name__)

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


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the run stopped without saving it."""


def make_schedule(config: config_lib.Config) -> optax.Schedule:
  """The learning rate as a function of the step."""
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule == "warmup_step":
    # Linear warm-up, constant, then one divide-by-10 drop late in the run: the
    # schedule of the published psMNIST learning curves.
    drop_step = int(round(config.lr_drop_at * config.steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
         optax.piecewise_constant_schedule(
             config.learning_rate, {drop_step - config.warmup_steps: 0.1})],
        boundaries=[config.warmup_steps],
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.steps, end_value=0.0,
  )


def make_optimizer(config: config_lib.Config) -> optax.GradientTransformation:
  """Adam (the notebook's), optionally with a schedule and global-norm clipping."""
  parts = []
  if config.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.weight_decay:
    parts.append(optax.adamw(make_schedule(config), weight_decay=config.weight_decay))
  else:
    parts.append(optax.adam(make_schedule(config)))
  return optax.chain(*parts)


def init_params(config: config_lib.Config, key: jax.Array) -> gru_classifier.Params:
  steps, in_dim = data.sequence_shape(config.order)
  return gru_classifier.init(
      key, num_units=config.num_units, in_dim=in_dim, cell=config.cell,
      activation=config.activation, gate_bias_init=config.gate_bias_init,
      recurrent_init=config.recurrent_init, max_steps=steps,
  )


def init_train_state(config, key, optimizer) -> TrainState:
  params = init_params(config, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema_params=None if config.ema_decay is None else params)


def loss_fn(params, x, labels, *, per_step_loss: float = 0.0,
            impl: str = gru_classifier.DEFAULT_IMPL, recurrent_dropout: float = 0.0,
            key: jax.Array | None = None):
  """Cross-entropy on the last step (the notebook's), plus an optional per-step term.

  Args:
    x: <float32>[batch, T, in_dim]
    labels: <int32>[batch]
    recurrent_dropout, key: ``gru_classifier.apply``'s, for training.

  Returns:
    (loss, logits <float32>[batch, T, classes])
  """
  logits = gru_classifier.apply(params, x, impl=impl, recurrent_dropout=recurrent_dropout,
                                key=key)
  loss = gru_classifier.cross_entropy(logits, labels)
  if per_step_loss:
    loss = loss + per_step_loss * gru_classifier.cross_entropy_per_step(logits, labels)
  return loss, logits


def make_train_step(optimizer: optax.GradientTransformation, *, per_step_loss: float = 0.0,
                    impl: str = gru_classifier.DEFAULT_IMPL, devices=None,
                    recurrent_dropout: float = 0.0, ema_decay: float | None = None,
                    seed: int = 0):
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
  """

  def train_step(state: TrainState, x, labels, stop=None):
    key = None
    if recurrent_dropout:
      key = jax.random.fold_in(jax.random.fold_in(dropout_key(seed), state.step),
                               jax.lax.axis_index(AXIS))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(state.params, x, labels, per_step_loss=per_step_loss,
                                    impl=impl, recurrent_dropout=recurrent_dropout, key=key)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
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


# ----------------------------------------------------------------------------
# Checkpoint contents


def _checkpoint_contents(state: TrainState, position, data_key, best: float,
                         config) -> tuple[dict, dict]:
  """(state dict of arrays, JSON meta) of one checkpoint."""
  meta = {
      "data_position": [int(v) for v in position],  # (epoch, index) of the next batch
      "data_key": np.asarray(jax.random.key_data(data_key)).tolist(),
      "best_valid_accuracy": float(best),
      "config": json.loads(config.to_json()),
  }
  state_dict = serialization.to_state_dict(state)
  if state_dict["ema_params"] is None:  # runs without an EMA keep the layout of 0.3
    del state_dict["ema_params"]
  return state_dict, meta


def _legacy_contents(saved: dict) -> tuple[dict, dict]:
  """A msgpack checkpoint of pixelrnn_jax 0.2 as (state dict, meta)."""
  return saved["state"], {
      "data_position": [int(v) for v in saved["data_position"]],
      "data_key": np.asarray(saved["data_key"]).tolist(),
      "best_valid_accuracy": float(saved["best_valid_accuracy"]),
      "config": json.loads(saved["config"]),
  }


def load_model(path: str | Path) -> tuple[gru_classifier.Params, config_lib.Config, dict]:
  """A saved model (``gru_classifier.load``) with the Config it was trained with.

  Args:
    path: a checkpoint file, a run directory (its best checkpoint, else its
      newest) or shipped weights (``"pretrained:pixel"``).

  Returns:
    (params, config, info): params that read [0, 1] images in the
    config's order (standardisation folded in); info has ``path`` and ``step``.

  Raises:
    CheckpointError / FileNotFoundError: naming the path and what is wrong.
  """
  params, saved = gru_classifier.load_with_info(path)
  try:
    config = config_lib.Config.from_dict(saved.config)
  except (TypeError, ValueError) as error:
    raise checkpoint.CheckpointError(f"{saved.path}: no readable config ({error})") from error
  return params, config, {"path": saved.path, "step": saved.step}


def as_model(params: gru_classifier.Params, config: config_lib.Config) -> gru_classifier.Params:
  """Training params as the model a checkpoint loads as: [0, 1] images in config.order."""
  return gru_classifier.for_images(params, order=config.order, standardize=config.standardize)


# ----------------------------------------------------------------------------
# The loop


class _StopOnSignal:
  """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second SIGINT aborts.

  ``signum`` (0 until a signal) goes into the next train step, whose ``pmax``
  tells every process of the run, so they all stop after the same step.
  """

  def __init__(self):
    self.requested = None
    self.signum = 0
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    self.signum = int(signum)
    log.warning("%s received: saving a checkpoint after this step, then stopping%s",
                self.requested, " (press Ctrl-C again to abort without saving)"
                if signum == signal.SIGINT else "")
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def __enter__(self):
    for signum in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _check_devices(config) -> None:
  available = jax.local_device_count()
  if config.devices > available:
    raise ValueError(
        f"devices={config.devices} but JAX sees {available}"
        f" {jax.default_backend()} device(s); on CPU pass --devices on the"
        " command line (it is set before JAX starts) or call"
        " jax.config.update('jax_num_cpu_devices', N) before any JAX work"
    )


def _prepare_workdir(workdir: Path, config) -> None:
  """Writes config.json; on resume, refuses a config that changes what is computed."""
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / "config.json"
  latest = _latest_step(workdir)
  if latest is not None and latest > config.steps:
    raise ValueError(f"{workdir} holds a run already at step {latest}; --steps {config.steps}"
                     f" is below it: pass --steps {latest} or more to go on, or choose a new"
                     " --workdir")
  if config_path.exists() and latest is not None:
    defaults = dataclasses.asdict(config_lib.Config())  # fields added since that run
    previous = {**defaults, **json.loads(config_path.read_text())}
    previous["num_processes"] = previous["num_processes"] or 1  # None: one process
    current = dataclasses.asdict(config)
    changed = sorted(
        name for name in current
        if name not in config_lib.RESUMABLE_CHANGES and previous.get(name) != current[name]
    )
    if changed:
      details = ", ".join(f"{n}: {previous.get(n)!r} -> {current[n]!r}" for n in changed)
      raise ValueError(
          f"{workdir} holds a run with a different config ({details}); resume"
          " with the same settings or choose a new --workdir"
      )
    if previous.get("steps") != config.steps:
      _warn_if_schedule_changes(config.replace(steps=previous["steps"]), config, latest)
  if distributed.is_primary():
    tmp = config_path.with_suffix(".json.partial")
    tmp.write_text(config.to_json() + "\n")
    tmp.replace(config_path)


def _latest_step(workdir: Path) -> int | None:
  """The newest checkpointed step of a run directory (orbax or 0.2's msgpack), None if none."""
  return max(map(model_io.step_of, model_io.step_sources(workdir)), default=None)


def _warn_if_schedule_changes(previous, config, step: int) -> None:
  """A new --steps on resume reshapes a warmup_cosine or warmup_step schedule: say so, with numbers."""
  if config.lr_schedule == "constant":
    return
  before = float(make_schedule(previous)(step))
  after = float(make_schedule(config)(step))
  shape = (f"decays to 0 at step {config.steps}" if config.lr_schedule == "warmup_cosine"
           else f"drops tenfold at step {round(config.lr_drop_at * config.steps)}")
  log.warning(
      "resuming at step %d with steps %d -> %d reshapes the %s schedule: the learning"
      " rate there goes from %.3g to %.3g and %s; this run is no longer the same as a"
      " fresh run with --steps %d",
      step, previous.steps, config.steps, config.lr_schedule, before, after, shape,
      config.steps,
  )


def _append_jsonl(path: Path, record: dict) -> None:
  with open(path, "a") as handle:
    handle.write(json.dumps(record) + "\n")


def _load_split(config, split):
  """[0, 1] images and checked labels of one split."""
  images, labels = data.load_mnist(split, data_dir=config.data_dir, verify=config.verify_data)
  # The labels are checked once here; inside the jitted step they cannot be.
  return images, gru_classifier.check_labels(labels)


def _init_or_restore(config, optimizer, checkpoints: run_checkpoints.RunCheckpoints):
  """A fresh (state, data position, data key, best valid accuracy), or the newest checkpoint's.

  Raises:
    CheckpointError: the run has checkpoints but none is readable.
  """
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = init_train_state(config, init_key, optimizer)
  position, best = (0, 0), -1.0
  restored = checkpoints.restore_latest()
  if restored is not None:
    step, state_dict, meta = restored
    where = checkpoints.path(step)
  elif checkpoint.step_checkpoints(checkpoints.directory):  # a run of pixelrnn_jax 0.2
    found = checkpoint.load_latest(checkpoints.directory)
    if found is None:
      raise checkpoint.CheckpointError(
          f"{checkpoints.directory}: none of its msgpack checkpoints can be read (see the"
          " warnings above); move the directory away to start afresh")
    where, saved = found
    state_dict, meta = _legacy_contents(saved)
  else:
    return state, position, data_key, best
  state_dict = {"ema_params": None, **state_dict}  # saved without an EMA (0.3, or off)
  state = serialization.from_state_dict(state, state_dict)
  log.info("resuming from %s (step %d)", where, int(state.step))
  return (state, tuple(meta["data_position"]),
          jax.random.wrap_key_data(jnp.asarray(meta["data_key"], jnp.uint32)),
          meta["best_valid_accuracy"])


def _check_finite(step: int, metrics: dict, workdir: Path) -> None:
  """Stops the run, naming the last good checkpoint, when the loss or gradient is NaN/inf."""
  if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
    return
  raise NonFiniteLossError(
      f"step {step}: loss {metrics['loss']}, gradient norm"
      f" {metrics['grad_norm']}; stopped without saving this state. The last"
      f" good checkpoint is {_last_checkpoint_in(workdir)}."
      " Try a lower --lr or --clip-norm 1.0, and check the input for NaNs."
  )


def _window_record(step: int, window: list[dict], seconds: float, batch_size: int) -> dict:
  """One metrics.jsonl line: the means over the steps since the last log line."""
  return {
      "step": step,
      "loss": float(np.mean([m["loss"] for m in window])),
      "accuracy": float(np.mean([m["accuracy"] for m in window])),
      "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
      "steps_per_s": len(window) / seconds,
      "samples_per_s": len(window) * batch_size / seconds,
  }


def _mark_resume(metrics_path: Path, step: int) -> None:
  """Drops records past ``step`` (a fallback to an older checkpoint recomputes
  them) and appends ``{"event": "resume", "step": step}``, so no step repeats."""
  if metrics_path.exists():
    kept = [line for line in metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    partial = metrics_path.with_suffix(".jsonl.partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(metrics_path)
  _append_jsonl(metrics_path, {"event": "resume", "step": step})


def train_and_evaluate(
    config: config_lib.Config, workdir: str | Path, *, progress: bool | None = None
) -> dict:
  """Trains (or resumes) in ``workdir`` and evaluates on valid.

  Args:
    config: the run; a relative ``data_dir`` is recorded as absolute. With
      ``num_processes`` > 1 (or in a multi-task cluster job) this process joins
      the others first (``distributed.initialize``), before JAX starts.
    workdir: the run directory (created; resumed when it has checkpoints); in
      a multi-process run, the same directory for every process.
    progress: a tqdm bar on stderr; None (default) shows it only when stderr
      is a terminal, else one log line per ``log_every`` steps.

  Returns:
    A summary dict: ``step``, ``stopped`` (None or the signal name), ``valid``
    (the final evaluation), ``best_valid_accuracy`` (of the best checkpoint;
    None when no evaluation has been checkpointed), ``best_checkpoint`` (its
    directory or None), ``seconds``.

  Raises:
    ValueError: a bad config, or a workdir holding a run with another config.
    CheckpointError: the run has checkpoints and none of them can be read.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    distributed.PeerError: another process of the run died or lost its connection.
  """
  config.validate()
  if config.data_dir is not None:
    config = config.replace(data_dir=str(Path(config.data_dir).resolve()))
  config = distributed.initialize(config)
  config.validate()  # the batch must also divide over the processes a cluster job brought
  _check_devices(config)
  workdir = Path(workdir)
  # A process of a multi-process run that waits on a dead or stuck peer (at a
  # checkpoint barrier or a collective) ends with one line, not a hang or an abort.
  with distributed.Watchdog(config.distributed_timeout, lambda: _last_checkpoint_in(workdir),
                            enabled=config.num_processes > 1) as watchdog:
    try:
      distributed.check_same_run(config, workdir)
      return _train(config, workdir, progress, watchdog)
    except (NonFiniteLossError, distributed.PeerError):
      raise
    except Exception as error:  # a step's all-reduce, or a checkpoint's barrier in orbax
      if distributed.is_peer_failure(error):
        raise distributed.peer_error(error, _last_checkpoint_in(workdir)) from error
      raise


def _last_checkpoint_in(workdir: Path) -> str:
  steps = model_io.step_sources(workdir)
  return str(steps[-1]) if steps else "none (nothing saved yet)"


def _train(config: config_lib.Config, workdir: Path, progress: bool | None,
           watchdog: distributed.Watchdog) -> dict:
  """The body of ``train_and_evaluate``, once this process has joined its run."""
  primary = distributed.is_primary()
  _prepare_workdir(workdir, config)
  train_x, train_y = _load_split(config, "train")
  if config.standardize:  # trained on standardised pixels ...
    train_x = preprocessing.standardize(train_x)
  # ... and evaluated as a loaded model is: [0, 1] images, the scaling folded in.
  valid_x, valid_y = _load_split(config, "valid")

  optimizer = make_optimizer(config)
  checkpoints = run_checkpoints.RunCheckpoints(workdir / "checkpoints",
                                               keep=config.keep_checkpoints)
  state, position, data_key, best = _init_or_restore(config, optimizer, checkpoints)
  batches = batches_lib.Batches(
      train_x, train_y, batch_size=config.batch_size, key=data_key,
      order=config.order, num_devices=config.devices, max_shift=config.max_shift,
      num_processes=config.num_processes, process_index=config.process_id,
      epoch=position[0], index=position[1],
  )
  multi_process = config.num_processes > 1
  train_step = make_train_step(
      optimizer, per_step_loss=config.per_step_loss, impl=config.impl,
      recurrent_dropout=config.recurrent_dropout, ema_decay=config.ema_decay, seed=config.seed,
      devices=distributed.training_devices(config.devices) if multi_process else None)
  replicated = replicate(state, config.devices)
  step = start_step = int(state.step)
  metrics_path = workdir / "metrics.jsonl"
  if start_step > 0 and primary:
    _mark_resume(metrics_path, start_step)
  if progress is None:
    progress = sys.stderr.isatty()
  summary: dict[str, Any] = {"stopped": None}
  window, window_start = [], time.perf_counter()
  run_start = time.perf_counter()
  saved_step = start_step if start_step in checkpoints.steps() else None

  def save(valid_accuracy: float | None = None) -> None:
    nonlocal saved_step
    state_dict, meta = _checkpoint_contents(unreplicate(replicated), batches.position,
                                            data_key, best, config)
    checkpoints.save(step, state_dict, meta, valid_accuracy=valid_accuracy)
    saved_step = step

  def evaluate() -> dict:
    # Every process scores the whole split on its own devices (same params, same result).
    return evaluation.evaluate(as_model(unreplicate(replicated).model_params, config),
                               valid_x, valid_y, batch_size=config.eval_batch_size,
                               devices=config.devices)

  bar = tqdm(total=config.steps, initial=step, disable=not (progress and primary),
             unit="step", dynamic_ncols=True)
  watchdog.progress()  # loading, restoring and the first barrier are behind us
  with _StopOnSignal() as stop, bar:
    while step < config.steps:
      x, y = next(batches)
      step_start = time.perf_counter()
      signals = np.full((config.devices,), stop.signum, np.int32)
      replicated, metrics = train_step(replicated, x, y, signals)
      metrics = {name: float(value) for name, value in unreplicate(metrics).items()}
      agreed_signal = int(metrics.pop("stop"))  # the same on every process
      watchdog.progress()
      step += 1
      if step == start_step + 1:
        log.info("first step (compilation included) took %.1f s",
                 time.perf_counter() - step_start)
        window_start = time.perf_counter()
      else:
        window.append(metrics)
      _check_finite(step, metrics, workdir)
      if window and (step % config.log_every == 0 or step == config.steps):
        record = _window_record(step, window, time.perf_counter() - window_start,
                                config.batch_size)
        if primary:
          _append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                        samples_s=f"{record['samples_per_s']:.0f}")
        if not progress and primary:
          log.info("step %d/%d: loss %.4f, accuracy %.3f, %.2f steps/s", step, config.steps,
                   record["loss"], record["accuracy"], record["steps_per_s"])
        window, window_start = [], time.perf_counter()
      bar.update(1)
      if step % config.eval_every == 0 or step == config.steps:
        eval_start = time.perf_counter()
        result = evaluate()
        if primary:
          _append_jsonl(metrics_path, {"step": step, "split": "valid",
                                       "accuracy": result["accuracy"], "loss": result["loss"]})
        log.info("step %d: valid accuracy %.4f, loss %.4f", step,
                 result["accuracy"], result["loss"])
        best = max(best, result["accuracy"])
        save(valid_accuracy=result["accuracy"])  # preserved while it is the best
        watchdog.progress()
        window_start += time.perf_counter() - eval_start  # steps/s counts training only
      if saved_step != step and (step % config.checkpoint_every == 0 or step == config.steps
                                 or agreed_signal):
        save()
        watchdog.progress()
      if agreed_signal:
        summary["stopped"] = signal.Signals(agreed_signal).name
        log.warning("stopped by %s at step %d; resume with the same command",
                    summary["stopped"], step)
        break

  valid = evaluate()
  if summary["stopped"] is None and primary:
    (workdir / "eval.json").write_text(json.dumps({"step": step, "split": "valid", **valid}))
  best_step = checkpoints.best_step()
  checkpoints.close()
  summary.update(
      step=step, valid=valid,
      best_valid_accuracy=None if best_step is None else best,
      best_checkpoint=None if best_step is None else str(checkpoints.path(best_step)),
      seconds=time.perf_counter() - run_start)
  log.info("done: step %d, valid accuracy %.4f, loss %.4f, %.0f s%s", step,
           valid["accuracy"], valid["loss"], summary["seconds"],
           f"; best {best:.4f} in {summary['best_checkpoint']}" if best_step is not None else "")
  return summary
