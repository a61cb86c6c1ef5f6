"""Training: the pmapped optax step, the loop, checkpoints and the run directory.

``train_and_evaluate(config, workdir)`` is the entry point. The run
directory holds::

    config.json        the resolved Config
    metrics.jsonl      one JSON line per log interval and per evaluation
    eval.json          the final evaluation on valid (with accuracy per step)
    checkpoints/       ckpt_<step>.msgpack (the newest K) and best.msgpack

A run directory that already has checkpoints is resumed from the newest
readable one: params, optimiser state, data position and data key, so the
resumed run equals the uninterrupted one bit for bit on CPU.
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
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pixelrnn_jax import checkpoint
from pixelrnn_jax import config as config_lib
from pixelrnn_jax import data
from pixelrnn_jax import evaluation
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing

log = logging.getLogger(__name__)

AXIS = "batch"  # the pmap axis the gradients are averaged over


class TrainState(NamedTuple):
  step: jax.Array  # <int32>[]: optimiser steps taken
  params: gru_classifier.Params
  opt_state: optax.OptState


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
                    opt_state=optimizer.init(params))


def loss_fn(params, x, labels, *, per_step_loss: float = 0.0,
            impl: str = gru_classifier.DEFAULT_IMPL):
  """Cross-entropy on the last step (the notebook's), plus an optional per-step term.

  Args:
    x: <float32>[batch, T, in_dim]
    labels: <int32>[batch]

  Returns:
    (loss, logits <float32>[batch, T, classes])
  """
  logits = gru_classifier.apply(params, x, impl=impl)
  loss = gru_classifier.cross_entropy(logits, labels)
  if per_step_loss:
    loss = loss + per_step_loss * gru_classifier.cross_entropy_per_step(logits, labels)
  return loss, logits


def make_train_step(optimizer: optax.GradientTransformation, *, per_step_loss: float = 0.0,
                    impl: str = gru_classifier.DEFAULT_IMPL):
  """Returns the pmapped train step ``(state, x, labels) -> (state, metrics)``.

  ``state`` is replicated over the leading device axis, ``x`` is
  <float32>[devices, batch_per_device, T, in_dim], ``labels``
  <int32>[devices, batch_per_device]. Gradients and metrics are averaged over
  devices with ``lax.pmean`` (outside the scan); the input state's buffers are
  donated. This factory is the one place that knows about pmap.
  """

  def train_step(state: TrainState, x, labels):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(state.params, x, labels, per_step_loss=per_step_loss,
                                    impl=impl)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = jax.lax.pmean(
        {"loss": loss, "accuracy": gru_classifier.accuracy(logits, labels)}, AXIS
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))


def replicate(tree, num_devices: int):
  return flax.jax_utils.replicate(tree, devices=jax.local_devices()[:num_devices])


def unreplicate(tree):
  """The first device's copy, on the host.

  (flax.jax_utils.unreplicate keeps the device axis when 1 of several devices is used.)
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


# ----------------------------------------------------------------------------
# Checkpoint contents


def _checkpoint_tree(state: TrainState, position, data_key, best: float, config) -> dict:
  return {
      "state": state,
      "data_position": np.asarray(position, np.int64),  # (epoch, index) of the next batch
      "data_key": np.asarray(jax.random.key_data(data_key)),
      "best_valid_accuracy": float(best),
      "config": config.to_json(),
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
  """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second SIGINT aborts."""

  def __init__(self):
    self.requested = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
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
  if config_path.exists() and checkpoint.step_checkpoints(workdir / "checkpoints"):
    defaults = dataclasses.asdict(config_lib.Config())  # fields added since that run
    previous = {**defaults, **json.loads(config_path.read_text())}
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
      _warn_if_schedule_changes(config.replace(steps=previous["steps"]), config,
                                checkpoint.step_checkpoints(workdir / "checkpoints")[-1])
  tmp = config_path.with_suffix(".json.partial")
  tmp.write_text(config.to_json() + "\n")
  tmp.replace(config_path)


def _warn_if_schedule_changes(previous, config, latest: Path) -> None:
  """A new --steps on resume reshapes a warmup_cosine or warmup_step schedule: say so, with numbers."""
  if config.lr_schedule == "constant":
    return
  step = checkpoint.step_of(latest)
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


def _init_or_restore(config, optimizer, checkpoint_dir: Path):
  """A fresh (state, data position, data key, best valid accuracy), or the newest checkpoint's."""
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = init_train_state(config, init_key, optimizer)
  position, best = (0, 0), -1.0
  restored = checkpoint.load_latest(checkpoint_dir)
  if restored is None:
    return state, position, data_key, best
  path, saved = restored
  template = _checkpoint_tree(state, position, data_key, best, config)
  tree = checkpoint.restore(template, saved)
  log.info("resuming from %s (step %d)", path, int(tree["state"].step))
  return (tree["state"], tuple(int(v) for v in tree["data_position"]),
          jax.random.wrap_key_data(jnp.asarray(tree["data_key"])),
          tree["best_valid_accuracy"])


def _check_finite(step: int, metrics: dict, checkpoint_dir: Path) -> None:
  """Stops the run, naming the last good checkpoint, when the loss or gradient is NaN/inf."""
  if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
    return
  last = checkpoint.step_checkpoints(checkpoint_dir)
  raise NonFiniteLossError(
      f"step {step}: loss {metrics['loss']}, gradient norm"
      f" {metrics['grad_norm']}; stopped without saving this state. The last"
      f" good checkpoint is {last[-1] if last else 'none (nothing saved yet)'}."
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
    config: the run; a relative ``data_dir`` is recorded as absolute.
    workdir: the run directory (created; resumed when it has checkpoints).
    progress: a tqdm bar on stderr; None (default) shows it only when stderr
      is a terminal, else one log line per ``log_every`` steps.

  Returns:
    A summary dict: ``step``, ``stopped`` (None or the signal name), ``valid``
    (the final evaluation), ``best_valid_accuracy`` (of ``best.msgpack``; None
    when no evaluation has been saved as best), ``seconds``.

  Raises:
    ValueError: a bad config, or a workdir holding a run with another config.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
  """
  config.validate()
  if config.data_dir is not None:
    config = config.replace(data_dir=str(Path(config.data_dir).resolve()))
  _check_devices(config)
  workdir = Path(workdir)
  checkpoint_dir = workdir / "checkpoints"
  _prepare_workdir(workdir, config)
  train_x, train_y = _load_split(config, "train")
  if config.standardize:  # trained on standardised pixels ...
    train_x = preprocessing.standardize(train_x)
  # ... and evaluated as a loaded model is: [0, 1] images, the scaling folded in.
  valid_x, valid_y = _load_split(config, "valid")

  optimizer = make_optimizer(config)
  state, position, data_key, best = _init_or_restore(config, optimizer, checkpoint_dir)
  batches = data.Batches(
      train_x, train_y, batch_size=config.batch_size, key=data_key,
      order=config.order, num_devices=config.devices, max_shift=config.max_shift,
      epoch=position[0], index=position[1],
  )
  train_step = make_train_step(optimizer, per_step_loss=config.per_step_loss,
                               impl=config.impl)
  replicated = replicate(state, config.devices)
  step = start_step = int(state.step)
  metrics_path = workdir / "metrics.jsonl"
  if start_step > 0:
    _mark_resume(metrics_path, start_step)
  if progress is None:
    progress = sys.stderr.isatty()
  summary: dict[str, Any] = {"stopped": None}
  window, window_start = [], time.perf_counter()
  run_start = time.perf_counter()

  def save(kind: str) -> None:
    tree = _checkpoint_tree(unreplicate(replicated), batches.position, data_key, best, config)
    if kind == "best":
      checkpoint.save(checkpoint_dir / checkpoint.BEST, tree)
    else:
      checkpoint.save_step(checkpoint_dir, step, tree, keep=config.keep_checkpoints)

  bar = tqdm(total=config.steps, initial=step, disable=not progress, unit="step",
             dynamic_ncols=True)
  with _StopOnSignal() as stop, bar:
    while step < config.steps:
      x, y = next(batches)
      step_start = time.perf_counter()
      replicated, metrics = train_step(replicated, x, y)
      metrics = {name: float(value[0]) for name, value in metrics.items()}
      step += 1
      if step == start_step + 1:
        log.info("first step (compilation included) took %.1f s",
                 time.perf_counter() - step_start)
        window_start = time.perf_counter()
      else:
        window.append(metrics)
      _check_finite(step, metrics, checkpoint_dir)
      if window and (step % config.log_every == 0 or step == config.steps):
        record = _window_record(step, window, time.perf_counter() - window_start,
                                config.batch_size)
        _append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                        samples_s=f"{record['samples_per_s']:.0f}")
        if not progress:
          log.info("step %d/%d: loss %.4f, accuracy %.3f, %.2f steps/s", step, config.steps,
                   record["loss"], record["accuracy"], record["steps_per_s"])
        window, window_start = [], time.perf_counter()
      bar.update(1)
      if step % config.eval_every == 0 or step == config.steps:
        eval_start = time.perf_counter()
        result = evaluation.evaluate(as_model(unreplicate(replicated).params, config),
                                     valid_x, valid_y, batch_size=config.eval_batch_size,
                                     devices=config.devices)
        _append_jsonl(metrics_path, {"step": step, "split": "valid",
                                     "accuracy": result["accuracy"], "loss": result["loss"]})
        log.info("step %d: valid accuracy %.4f, loss %.4f", step,
                 result["accuracy"], result["loss"])
        if result["accuracy"] > best:
          best = result["accuracy"]
          save("best")
        window_start += time.perf_counter() - eval_start  # steps/s counts training only
      if step % config.checkpoint_every == 0 or step == config.steps or stop.requested:
        save("step")
      if stop.requested:
        summary["stopped"] = stop.requested
        log.warning("stopped by %s at step %d; resume with the same command", stop.requested, step)
        break

  valid = evaluation.evaluate(as_model(unreplicate(replicated).params, config),
                              valid_x, valid_y, batch_size=config.eval_batch_size,
                              devices=config.devices)
  if summary["stopped"] is None:
    (workdir / "eval.json").write_text(json.dumps({"step": step, "split": "valid", **valid}))
  written = (checkpoint_dir / checkpoint.BEST).is_file() and best >= 0
  summary.update(step=step, valid=valid, best_valid_accuracy=best if written else None,
                 seconds=time.perf_counter() - run_start)
  log.info("done: step %d, valid accuracy %.4f, loss %.4f, %.0f s%s", step,
           valid["accuracy"], valid["loss"], summary["seconds"],
           f"; best {best:.4f} in {checkpoint_dir / checkpoint.BEST}" if written else "")
  return summary
