"""The training loop: ``train_and_evaluate(config, workdir)``.

Trains (or resumes) a run in its run directory (``run_dir``) with the
pmapped step (``step``), evaluates on valid every ``eval_every`` steps and
keeps the best checkpoint. Ctrl-C or SIGTERM checkpoints and stops after the
current step; a NaN loss stops without saving.

A multi-process run (``Config.num_processes``, ``distributed``) runs this
same loop in every process: each drives its local devices and reads its slice
of each global batch; process 0 writes the run's files; all of them take part
in every checkpoint and agree, through the step itself, on when to stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pixelrnn_jax import checkpoints
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import distributed
from pixelrnn_jax.training import peers
from pixelrnn_jax.training import run_dir
from pixelrnn_jax.training import step as step_lib
from pixelrnn_jax.training import teachers as teachers_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the run stopped without saving it."""


class _StopOnSignal:
  """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second SIGINT aborts (through
  the SIGINT handler that was there before the loop).

  ``signum`` (0 until a signal) goes into the next train step, whose ``pmax``
  tells every process of the run, so they all stop after the same step.

  Two Ctrl-Cs that come while the main thread is inside one call into XLA (the
  first step's compilation takes seconds) run the handler once: CPython only
  marks a signal as pending. Each delivery is also written to a wakeup socket
  (``signal.set_wakeup_fd``), so the handler counts the presses and takes two
  as the second.
  """

  def __init__(self):
    self.requested = None
    self.signum = 0
    self._previous = {}
    self._wakeup = None  # (reader, writer, the wakeup fd that was there before)

  def _presses(self) -> int:
    """SIGINTs delivered since the last call (read from the wakeup socket)."""
    received = b""
    with contextlib.suppress(BlockingIOError, OSError):
      while chunk := self._wakeup[0].recv(4096):
        received += chunk
    return received.count(signal.SIGINT)

  def _handle(self, signum, frame):
    # The second Ctrl-C: the handler that was there before the loop. The command's
    # ends the process at once with one line (telling the other processes); Python's
    # default (a library caller's) raises KeyboardInterrupt, which code running at that
    # moment (a gc callback in JAX) can swallow.
    previous = self._previous.get(signal.SIGINT)
    abort = previous if callable(previous) else signal.default_int_handler
    signal.signal(signal.SIGINT, abort)
    if signum == signal.SIGINT and self._wakeup and self._presses() >= 2:
      abort(signum, frame)  # both came while XLA held the main thread
      return
    self.requested = signal.Signals(signum).name
    self.signum = int(signum)
    log.warning(
      "%s received: finishing the next step (which tells every process), saving a"
      " checkpoint, then stopping%s",
      self.requested,
      " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "",
    )

  def __enter__(self):
    for signum in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        return self
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    self._wakeup = (reader, writer, before)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._wakeup:
      reader, writer, before = self._wakeup
      signal.set_wakeup_fd(before)
      reader.close()
      writer.close()
      self._wakeup = None


def _check_devices(config) -> None:
  """Raises ValueError when JAX has fewer devices than ``config.devices``; warns when
  CPU devices outnumber the cores (they share them: slower, not faster)."""
  available = jax.local_device_count()
  if config.devices > available:
    raise ValueError(
      f"devices={config.devices} but JAX sees {available}"
      f" {jax.default_backend()} device(s); on CPU pass --devices on the"
      " command line (it is set before JAX starts) or call"
      " jax.config.update('jax_num_cpu_devices', N) before any JAX work"
    )
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if jax.default_backend() == "cpu" and cores and config.devices > cores:
    log.warning(
      "devices=%d on %d CPU cores: the devices share the cores, and each step splits its"
      " batch %d ways, which is slower than --devices %d",
      config.devices,
      cores,
      config.devices,
      cores,
    )


def _load_split(config, split):
  """[0, 1] images and checked labels of one split.

  Raises:
    ValueError: a training split smaller than one batch, naming how MNIST's
      training file is split (valid = its first 5,000 images).
  """
  images, labels = data.load_mnist(split, data_dir=config.data_dir, verify=config.verify_data)
  if split == "train" and len(images) < config.batch_size:
    raise ValueError(
      f"the train split has {len(images)} images, fewer than --batch-size"
      f" {config.batch_size}: the training IDX file's first {data.NUM_VALID} images are the"
      f" valid split and the rest the train split, so own data needs more than"
      f" {data.NUM_VALID} + {config.batch_size} images"
    )
  # The labels are checked once here; inside the jitted step they cannot be.
  return images, gru_classifier.check_labels(labels)


def _best_saved(manager: checkpoints.RunCheckpoints, accuracy: float) -> str | None:
  step = manager.best_step()
  return None if step is None else f"{manager.path(step)} ({accuracy:.2%} valid)"


def _check_finite(step: int, metrics: dict, workdir: Path, config, best=lambda: None) -> None:
  """Stops the run, naming the last checkpoint and the best one (``best()``: its path with
  its valid accuracy, or None before an evaluation), when the loss or gradient is NaN/inf.
  The last is only finite: a run that diverged before it went NaN saved diverged weights
  (``--lr 1e30``: a loss of 2e31 from step 5 on, then NaN at 30)."""
  if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
    return
  raise NonFiniteLossError(
    f"step {step}: loss {metrics['loss']}, gradient norm"
    f" {metrics['grad_norm']}; stopped without saving this state. The last"
    f" checkpoint, with finite weights (its loss in metrics.jsonl says whether it had"
    f" diverged already), is {run_dir.last_checkpoint(workdir)}"
    + (f"; the best by valid accuracy is {best()}" if best() else "")
    + f". Try a lower --lr (now {config.learning_rate:g}){_lower_sam(config)} or --clip-norm"
    " 1.0, and check the input for NaNs."
  )


def _lower_sam(config) -> str:
  return f", a lower --sam-rho (now {config.sam_rho:g})" if config.sam_rho else ""


# A mean training loss above this (nats) is a run that diverged: chance is ln 10 = 2.30,
# and a distillation term adds little to it. Finite, so _check_finite lets it run.
DIVERGING_LOSS = 50.0


def _diverging(record: dict, config) -> str:
  """The warning for a training loss far above chance's (``--lr 1e9`` ended with a loss of
  1.3e10 and 9.8% valid accuracy, with no word of it)."""
  clip = "" if config.clip_norm else ", or set --clip-norm 1.0"
  return (
    f"training loss {record['loss']:.3g} at step {record['step']}, far above chance's 2.30:"
    f" the run is diverging; stop it (Ctrl-C) and lower --lr (now"
    f" {config.learning_rate:g}){_lower_sam(config)}{clip}"
  )


def _draws_a_bar(stream) -> bool:
  """Whether a progress bar shows on ``stream``: a terminal that reports a width. One
  that reports 0 columns (``script`` without a size) shows no bar: log lines instead."""
  if not stream.isatty():
    return False
  try:
    return os.get_terminal_size(stream.fileno()).columns > 0
  except (OSError, ValueError):
    return False


def _window_record(
  step: int, window: list[dict], seconds: float, batch_size: int, timed: int
) -> dict:
  """One metrics.jsonl line: the means over the steps since the last log line, and the
  rate of the ``timed`` steps of them that ``seconds`` measured."""
  return {
    "step": step,
    "loss": float(np.mean([m["loss"] for m in window])),
    "accuracy": float(np.mean([m["accuracy"] for m in window])),
    "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
    "steps_per_s": timed / seconds,
    "samples_per_s": timed * batch_size / seconds,
  }


def describe_valid(valid: dict | None) -> str:
  """The summary's ``valid`` in words: accuracy and loss, or that it was not measured."""
  if valid is None:
    return "no valid evaluation at this step (stopped between evaluations)"
  return f"valid accuracy {valid['accuracy']:.4f}, loss {valid['loss']:.4f}"


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
    (the final evaluation; None when a signal stopped the run between
    evaluations, which skips it), ``best_valid_accuracy`` (of the best checkpoint;
    None when no evaluation has been checkpointed), ``best_checkpoint`` (its
    directory or None), ``seconds``.

  Raises:
    ValueError: a bad config, or a workdir holding a run with another config, or
      (distillation) a teacher of another order, or whose weights changed since the run began.
    CheckpointError: the run has checkpoints and none of them can be read.
    NonFiniteLossError: the loss became NaN/inf (the checkpoints saved are kept).
    peers.PeerError: another process of the run died or lost its connection.
  """
  config.validate()
  if config.data_dir is not None:
    config = config.replace(data_dir=str(Path(config.data_dir).resolve()))
  if config.init_from is not None:
    config = config.replace(init_from=model_io.absolute(config.init_from))
    if run_dir.latest_step(Path(workdir)) is None:  # a fresh start reads it; a resume does not
      run_dir.read_init_model(config)  # a missing or unfit model: one line, before the data
  if config.distill_from is not None:  # paths as absolute, like --init-from's
    config = config.replace(
      distill_from=",".join(
        model_io.absolute(s) for s in config_lib.teacher_sources(config.distill_from)
      )
    )
  # What this process can check alone comes before joining the others: a bad
  # path or missing data is one line at once, not a wait for the peers.
  absolute = Path(workdir).absolute()
  made = [path for path in (absolute, *absolute.parents) if not path.exists()]  # deepest first
  workdir = run_dir.check_workdir(workdir)
  # A resume with other settings is named as such before they are used: e.g. a
  # relative teacher path given from another directory is a changed --distill-from,
  # not a missing file.
  run_dir.check_resumable(workdir, config, early=True)  # before minutes of data loading
  try:
    teachers = teachers_lib.read(config)  # read at every start; a resume needs the same ones
    if teachers is not None and run_dir.latest_step(workdir) is not None:
      teachers_lib.check_same(teachers, run_dir.metrics_records(workdir), str(workdir))
    splits = {split: _load_split(config, split) for split in ("train", "valid")}
  except BaseException:  # bad teachers or data: no empty directories of ours left behind
    for path in made:
      if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    raise
  config = distributed.initialize(config)
  config.validate()  # the batch must also divide over the processes a cluster job brought
  _check_devices(config)
  # A process of a multi-process run that waits on a dead or stuck peer (at a
  # checkpoint barrier or a collective) ends with one line, not a hang or an abort.
  with peers.Watchdog(
    config.distributed_timeout,
    lambda: run_dir.last_checkpoint(workdir),
    enabled=config.num_processes > 1,
  ) as watchdog:
    try:
      distributed.check_same_run(config, workdir)
      # Process 0 holds the run directory's lock for every process of the run.
      with run_dir.RunLock(workdir) if distributed.is_primary() else contextlib.nullcontext():
        return _train(config, workdir, splits, teachers, progress, watchdog)
    except (NonFiniteLossError, peers.PeerError):
      raise
    except Exception as error:  # a step's all-reduce, or a checkpoint's barrier in orbax
      if peers.is_peer_failure(error):
        raise peers.peer_error(error, run_dir.last_checkpoint(workdir)) from error
      raise


def _train(
  config: config_lib.Config,
  workdir: Path,
  splits: dict,
  teachers: teachers_lib.Teachers | None,
  progress: bool | None,
  watchdog: peers.Watchdog,
) -> dict:
  """The body of ``train_and_evaluate``, once this process has joined its run."""
  primary = distributed.is_primary()
  run_dir.prepare(workdir, config, is_primary=primary)
  (train_x, train_y), (valid_x, valid_y) = splits["train"], splits["valid"]
  if config.standardize:  # trained on standardised pixels ...
    train_x = preprocessing.standardize(train_x)
  # ... and evaluated as a loaded model is: [0, 1] images, the scaling folded in.

  optimizer = step_lib.make_optimizer(config)
  manager = checkpoints.RunCheckpoints(workdir / run_dir.CHECKPOINTS, keep=config.keep_checkpoints)
  state, position, data_key, best = run_dir.init_or_restore(
    config, optimizer, manager, workdir if primary else None
  )
  batches = batches_lib.Batches.from_config(
    train_x, train_y, config, key=data_key, epoch=position[0], index=position[1]
  )
  multi_process = config.num_processes > 1
  train_step = step_lib.make_train_step(
    optimizer,
    per_step_loss=config.per_step_loss,
    per_step_weighting=config.per_step_weighting,
    impl=config.impl,
    recurrent_dropout=config.recurrent_dropout,
    ema_decay=config.ema_decay,
    seed=config.seed,
    label_smoothing=config.label_smoothing,
    teachers=teachers,
    distill_weight=config.distill_weight,
    distill_temperature=config.distill_temperature,
    sam=bool(config.sam_rho),
    devices=distributed.training_devices(config.devices) if multi_process else None,
  )
  replicated = step_lib.replicate(state, config.devices)
  step = start_step = int(state.step)
  if teachers is not None and primary:
    if start_step == 0:
      run_dir.append_metrics(workdir, teachers.record())
    views = ""
    if teachers.rotations != (0.0,):
      views = ", each over views turned by " + ", ".join(f"{d:g}" for d in teachers.rotations)
      views += " degrees"
    log.info(
      "distilling from %s%s (weight %g, temperature %g)",
      ", ".join(f"{r['source']} (step {r['step']})" for r in teachers.records),
      views,
      config.distill_weight,
      config.distill_temperature,
    )
  if start_step >= config.steps:  # nothing to train: no resume event, a final evaluation
    log.info(
      "the run is already at step %d of %d: nothing to train (give --steps N above %d to"
      " train further); its final evaluation follows",
      start_step,
      config.steps,
      start_step,
    )
  elif start_step > 0 and primary:
    run_dir.mark_resume(workdir, start_step)
  if progress is None:
    progress = _draws_a_bar(sys.stderr)
  summary: dict[str, Any] = {"stopped": None}
  window, window_start = [], time.perf_counter()
  run_start = time.perf_counter()
  saved_step = start_step if start_step in manager.steps() else None
  last_eval: dict[int, dict] = {}  # {step: result} of the newest evaluation

  def save(valid_accuracy: float | None = None) -> None:
    nonlocal saved_step
    state_dict, meta = run_dir.checkpoint_contents(
      step_lib.unreplicate(replicated), batches.position, data_key, best, config
    )
    manager.save(step, state_dict, meta, valid_accuracy=valid_accuracy)
    saved_step = step

  def evaluate() -> dict:
    # Every process scores the whole split on its own devices (same params, same result).
    return inference.evaluate(
      step_lib.as_model(step_lib.unreplicate(replicated).model_params, config),
      valid_x,
      valid_y,
      batch_size=config.eval_batch_size,
      devices=config.devices,
    )

  bar = tqdm(
    total=config.steps,
    initial=step,
    disable=not (progress and primary),
    unit="step",
    dynamic_ncols=True,
  )
  watchdog.progress()  # loading, restoring and the first barrier are behind us
  with _StopOnSignal() as stop, bar, logging_redirect_tqdm():  # log lines above the bar
    warned_diverging = False
    if step < config.steps:
      log.info("compiling the train step (the first step takes longer)")
    while step < config.steps:
      x, y = next(batches)
      step_start = time.perf_counter()
      signals = np.full((config.devices,), stop.signum, np.int32)
      replicated, metrics = train_step(replicated, x, y, signals)
      metrics = {name: float(value) for name, value in step_lib.unreplicate(metrics).items()}
      agreed_signal = int(metrics.pop("stop"))  # the same on every process
      watchdog.progress()
      step += 1
      if step == start_step + 1:
        first_seconds = time.perf_counter() - step_start
        log.info("first step (compilation included) took %.1f s", first_seconds)
        window_start = time.perf_counter()
      window.append(metrics)
      _check_finite(step, metrics, workdir, config, lambda b=best: _best_saved(manager, b))
      if step % config.log_every == 0 or step == config.steps:
        # The first step of each start compiles: the rate is of the steps after it, or
        # of that step alone (compilation included) when its line has no other.
        timed = len(window) - (step - len(window) == start_step)
        seconds = time.perf_counter() - window_start if timed else first_seconds
        record = _window_record(step, window, seconds, config.batch_size, timed or 1)
        if primary:
          run_dir.append_metrics(workdir, record)
        bar.set_postfix(
          loss=f"{record['loss']:.3f}",
          acc=f"{record['accuracy']:.3f}",
          samples_s=f"{record['samples_per_s']:.0f}",
        )
        if not progress and primary:
          log.info(
            "step %d/%d: loss %.4f, accuracy %.3f, %.2f steps/s",
            step,
            config.steps,
            record["loss"],
            record["accuracy"],
            record["steps_per_s"],
          )
        if record["loss"] > DIVERGING_LOSS and not warned_diverging:
          warned_diverging = True
          log.warning(_diverging(record, config))
        window, window_start = [], time.perf_counter()
      bar.update(1)
      if step % config.eval_every == 0 or step == config.steps:
        eval_start = time.perf_counter()
        result = evaluate()
        last_eval = {step: result}
        if primary:
          run_dir.append_metrics(
            workdir,
            {
              "step": step,
              "split": "valid",
              "accuracy": result["accuracy"],
              "loss": result["loss"],
            },
          )
        log.info(
          "step %d: valid accuracy %.4f, loss %.4f", step, result["accuracy"], result["loss"]
        )
        best = max(best, result["accuracy"])
        save(valid_accuracy=result["accuracy"])  # preserved while it is the best
        watchdog.progress()
        window_start += time.perf_counter() - eval_start  # steps/s counts training only
      if saved_step != step and (
        step % config.checkpoint_every == 0 or step == config.steps or agreed_signal
      ):
        save()
        watchdog.progress()
      if agreed_signal:
        summary["stopped"] = signal.Signals(agreed_signal).name
        log.warning(
          "stopped by %s at step %d; resume with the same command", summary["stopped"], step
        )
        break

  if stop.requested and summary["stopped"] is None:  # it came during the last evaluation
    log.warning(
      "%s arrived after the last step: the run is complete and ends normally", stop.requested
    )
  if step in last_eval:  # the same weights: not twice
    valid = last_eval[step]
  elif summary["stopped"] is None:
    valid = evaluate()
  else:  # stopped between evaluations: a signal asks to stop now, not after a valid pass
    valid = None
  if summary["stopped"] is None and primary:
    run_dir.write_eval(workdir, {"step": step, "split": "valid", **valid})
  best_step = manager.best_step()
  manager.close()
  summary.update(
    step=step,
    valid=valid,
    best_valid_accuracy=None if best_step is None else best,
    best_checkpoint=None if best_step is None else str(manager.path(best_step)),
    seconds=time.perf_counter() - run_start,
  )
  log.info(
    "done: step %d, %s, %.0f s%s",
    step,
    describe_valid(valid),
    summary["seconds"],
    f"; best {best:.4f} in {summary['best_checkpoint']}" if best_step is not None else "",
  )
  return summary
