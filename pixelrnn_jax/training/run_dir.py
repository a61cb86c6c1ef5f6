"""The run directory's one owner: what a run directory holds and the rules for it.

    config.json        the resolved Config (process 0 writes it)
    metrics.jsonl      one JSON line per log interval and per evaluation; a
                       resume appends ``{"event": "resume", "step": N}``
    eval.json          the final evaluation on valid (with accuracy per step)
    checkpoints/       orbax steps <step>/: the newest K and the best on valid
                       (``checkpoints.RunCheckpoints``)

A run directory that already has checkpoints is resumed from the newest
readable one, with the same config (only the fields marked ``resumable`` may
change); the checkpoint holds the params, optimiser state, EMA, data position
and data key, so the resumed run equals the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
from pathlib import Path

import filelock
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from pixelrnn_jax import checkpoints
from pixelrnn_jax import model_io
from pixelrnn_jax import outputs
from pixelrnn_jax import preprocessing
from pixelrnn_jax.checkpoints import CheckpointError
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import step as step_lib

log = logging.getLogger(__name__)

LOCK = ".lock"  # held (flock, through filelock) while a training command uses the directory
LOCK_HOLDER = ".lock.json"  # who holds it: host, PID, start time
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"


# Characters the checkpoint library reads as a glob pattern in a path: a run
# directory named with them saves steps that cannot be found again.
GLOB_CHARACTERS = "[]"


def check_workdir(workdir: str | os.PathLike) -> Path:
  """The run directory, checked and created before any work (the data are read
  after it): no glob brackets, not a file, and a directory this process can make.

  Raises:
    ValueError: naming the path and the fix.
  """
  if not str(workdir).strip():
    raise ValueError("--workdir is empty: name the run directory, e.g. --workdir runs/first")
  path = Path(workdir)
  bad = sorted({c for c in str(path.absolute()) if c in GLOB_CHARACTERS})
  if bad:
    raise ValueError(
      f"--workdir {workdir}: the path contains {' '.join(bad)}, which the checkpoint library"
      " (orbax) reads as a glob pattern, so saved steps could not be found again; choose a"
      " path without square brackets"
    )
  return outputs.make_dir(path, f"--workdir {workdir}", "the run directory")


class RunLock:
  """The run directory's lock: one training command at a time per directory.

  ``filelock`` takes an ``flock`` on ``<workdir>/.lock``, which the kernel
  releases when the holder exits, however it exits (``kill -9``, a crash), so
  a lock never outlives its process. The holder's host, PID and start time
  are written beside it for the refusal's message. In a multi-process run,
  process 0 holds it for the run.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)
    self._lock = filelock.FileLock(self.workdir / LOCK)

  def __enter__(self):
    self.workdir.mkdir(parents=True, exist_ok=True)  # check_workdir proved it can be made
    try:
      self._lock.acquire(blocking=False)
    except filelock.Timeout:
      raise ValueError(
        f"--workdir {self.workdir} is in use by another training command"
        f" ({self._holder()}); wait for it to end or stop it, or choose another --workdir"
      ) from None
    record = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    partial = self.workdir / f"{LOCK_HOLDER}.partial"
    partial.write_text(json.dumps(record))
    partial.replace(self.workdir / LOCK_HOLDER)
    return self

  def _holder(self) -> str:
    try:
      holder = json.loads((self.workdir / LOCK_HOLDER).read_text())
      return f"host {holder['host']}, PID {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError):
      return "holder unknown"

  def __exit__(self, *exc):
    (self.workdir / LOCK_HOLDER).unlink(missing_ok=True)
    self._lock.release()


def checkpoint_contents(
  state: step_lib.TrainState, position, data_key, best: float, config
) -> tuple[dict, dict]:
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


def init_or_restore(
  config: config_lib.Config,
  optimizer,
  manager: checkpoints.RunCheckpoints,
  workdir: Path | None = None,
):
  """A fresh (state, data position, data key, best valid accuracy), or the newest checkpoint's.

  A fresh run with ``config.init_from`` starts from that model's weights
  (:func:`warm_start`); with ``workdir`` (process 0's), ``metrics.jsonl`` records
  which: ``{"event": "init_from", "source", "source_step", "params_sha256"}``.

  Raises:
    CheckpointError: the run has checkpoints but none is readable.
  """
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = step_lib.init_train_state(config, init_key, optimizer)
  position, best = (0, 0), -1.0
  restored = manager.restore_latest()
  if restored is None:
    log.info(
      "a new run: no checkpoint in %s; %d steps of batch %d, %s order%s",
      manager.directory,
      config.steps,
      config.batch_size,
      config.order,
      f", from {config.init_from}" if config.init_from else "",
    )
    if workdir is not None:
      _forget_unsaved_attempt(workdir)
    if config.init_from is not None:
      # The trainer read it before the data (and warned then) when there is a workdir.
      state, record = warm_start(config, state, optimizer, warn=workdir is None)
      if workdir is not None:
        append_metrics(workdir, record)
    return state, position, data_key, best
  step, state_dict, meta = restored
  where = manager.path(step)
  state_dict = {"ema_params": None, **state_dict}  # saved without an EMA (0.3, or off)
  state = serialization.from_state_dict(state, state_dict)
  log.info("resuming from %s (step %d)", where, int(state.step))
  return (
    state,
    tuple(meta["data_position"]),
    jax.random.wrap_key_data(jnp.asarray(meta["data_key"], jnp.uint32)),
    meta["best_valid_accuracy"],
  )


def _forget_unsaved_attempt(workdir: Path) -> None:
  """A run that starts at step 0 in a directory with ``metrics.jsonl`` but no checkpoint
  (an earlier attempt was killed before its first save) drops those records: the steps
  are trained again, and its fine-tune record is written again."""
  path = Path(workdir) / METRICS
  if path.is_file() and path.read_text().strip():
    lines = len(path.read_text().splitlines())
    log.info("%s: no checkpoint yet; the %d records of an unsaved attempt are dropped", path, lines)
    path.unlink()


# The fields a model's weights depend on, in shape or meaning: a fine-tuned
# run must share them with the model it starts from.
MODEL_FIELDS = ("num_units", "cell", "activation", "standardize")


def _flag(name: str, value) -> str:
  """``--num-units 64``, ``--standardize`` / ``--no-standardize``: a field as its flag."""
  flag = "--" + name.replace("_", "-")
  if isinstance(value, bool):
    return flag if value else f"--no-{flag[2:]}"
  return f"{flag} {value}"


def _model_differences(source: config_lib.Config, other: config_lib.Config) -> list[str]:
  """The model fields where ``other`` differs from ``source``; ``order`` only when the
  input size differs (row against pixel / permuted)."""
  differ = [n for n in MODEL_FIELDS if getattr(source, n) != getattr(other, n)]
  if preprocessing.sequence_shape(source.order) != preprocessing.sequence_shape(other.order):
    differ.append("order")
  return differ


def read_init_model(config: config_lib.Config, *, warn: bool = True) -> model_io.SavedModel:
  """The model ``config.init_from`` names, checked to fit ``config`` (fine-tuning).
  A model of another pixel order (pixel against permuted: the same input size) is
  taken, with a warning when ``warn`` (the trainer checks early, then loads: once).

  Raises:
    FileNotFoundError, CheckpointError: nothing loadable there, naming ``--init-from``.
    ValueError: a model of another width, cell, activation, input scaling or
      input size (``--order`` row against pixel / permuted), naming each
      flag's value there and here, and a recipe of the same model if one is.
  """
  try:
    saved = model_io.read(config.init_from)
    source = saved_config(saved)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"--init-from: {error}") from error
  except CheckpointError as error:
    raise CheckpointError(f"--init-from: {error}") from error
  differ = _model_differences(source, config)
  if not differ:
    if source.order != config.order and warn:
      log.warning(
        "--init-from %s was trained on %s order and fine-tunes on %s: it starts from"
        " another reading of the image",
        config.init_from,
        source.order,
        config.order,
      )
    return saved
  details = ", ".join(
    f"{_flag(n, getattr(source, n))} there, {_flag(n, getattr(config, n))} here" for n in differ
  )
  recipes = [n for n, r in config_lib.RECIPES.items() if not _model_differences(source, r)]
  hint = f" (--recipe {recipes[0]} has its model)" if recipes else ""
  raise ValueError(
    f"--init-from {config.init_from}: another model ({details}); train with the flags it"
    f" was trained with{hint}, or without --init-from"
  )


def warm_start(
  config: config_lib.Config, state: step_lib.TrainState, optimizer, *, warn: bool = True
):
  """``state`` with the weights of the model ``config.init_from`` names (fine-tuning),
  and the ``metrics.jsonl`` record of where they came from:
  ``{"event": "init_from", "source", "source_step", "params_sha256"}``.

  The model's params as it was trained (a run with an EMA gives its EMA, as
  ``model_io.read`` does) replace the random init; the optimiser state is a
  fresh ``optimizer.init`` and the EMA, if kept, starts at these weights.

  Raises:
    as :func:`read_init_model`.
  """
  saved = read_init_model(config, warn=warn)
  params = serialization.from_state_dict(state.params, saved.arrays)
  shapes = jax.tree.map(lambda a, b: (np.shape(a), np.shape(b)), state.params, params)
  wrong = [
    v for v in jax.tree.leaves(shapes, is_leaf=lambda v: isinstance(v, tuple)) if v[0] != v[1]
  ]
  if wrong:
    raise CheckpointError(f"--init-from {saved.path}: weights of shapes {wrong} (expected, found)")
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  record = {
    "event": "init_from",
    "source": model_io.recorded_source(config.init_from, saved),
    "source_step": saved.step,
    "params_sha256": checkpoints.state_digest(serialization.to_state_dict(params)),
  }
  log.info(
    "fine-tuning from %s (step %d of its run; params SHA-256 %s)",
    saved.path,
    saved.step,
    record["params_sha256"],
  )
  state = state._replace(
    params=params,
    opt_state=optimizer.init(params),
    ema_params=None if state.ema_params is None else params,
  )
  return state, record


def prepare(workdir: Path, config: config_lib.Config, *, is_primary: bool = True) -> None:
  """Writes config.json; on resume, refuses a config that changes what is computed."""
  workdir.mkdir(parents=True, exist_ok=True)
  check_resumable(workdir, config)
  if is_primary:
    config_path = workdir / "config.json"
    tmp = config_path.with_suffix(".json.partial")
    tmp.write_text(config.to_json() + "\n")
    tmp.replace(config_path)


def run_config(workdir: str | os.PathLike) -> tuple[dict, Path] | None:
  """The config a run directory's run was started with, and the file it was read from:
  its config.json; when that is missing, unreadable or not a valid Config (a
  hand-edited unknown field), the config that the newest checkpoint with a readable
  one saved beside its weights (every step saves it, in its ``meta`` item: orbax's
  JSON file ``<step>/meta/metadata``, read as a file so that JAX's backend does not
  start before ``--devices`` is set). None when neither is there (config.json alone,
  unreadable, is None too: a run with nothing saved)."""
  candidates = [Path(workdir, CONFIG)] + [
    step / "meta" / "metadata" for step in reversed(model_io.step_sources(workdir))
  ]
  for index, path in enumerate(candidates):
    try:
      values = json.loads(path.read_text())
      values = values if index == 0 else values.get("config")
      if index == 0:  # a hand-edited config.json: an unknown field or a bad value
        config_lib.Config.from_dict(values)
    except (OSError, ValueError, TypeError, AttributeError):
      continue
    if isinstance(values, dict):
      return values, path if index == 0 else path.parent.parent
  return None


def check_resumable(workdir: Path, config: config_lib.Config, *, early: bool = False) -> None:
  """Nothing when ``workdir`` holds no run or one that ``config`` continues (read-only).

  The trainer calls it ``early`` (before loading data and joining the other processes:
  the fields a cluster fills in are not compared yet, and nothing is logged), then again
  under the run's lock.

  Raises:
    ValueError: the run is past ``config.steps``, or its config differs in a field
      that changes what is computed (naming each flag, then and now).
  """
  latest = latest_step(workdir)
  if latest is not None and latest > config.steps:
    raise ValueError(
      f"{workdir} holds a run already at step {latest}; --steps {config.steps}"
      f" is below it: pass --steps {latest} or more to go on, or choose a new"
      " --workdir"
    )
  saved = run_config(workdir) if latest is not None else None
  if saved is not None:
    defaults = dataclasses.asdict(config_lib.Config())  # fields added since that run
    previous = {**defaults, **saved[0]}
    previous["num_processes"] = previous["num_processes"] or 1  # None: one process
    current = dataclasses.asdict(config)
    changed = sorted(
      name
      for name in current
      if name not in config_lib.RESUMABLE_CHANGES
      and not (early and name in _FILLED_IN_BY_A_CLUSTER)
      and previous.get(name) != current[name]
    )
    if changed:
      details = ", ".join(
        f"--{n.replace('_', '-')}: {previous.get(n)!r} -> {current[n]!r}" for n in changed
      )
      raise ValueError(
        f"{workdir} holds a run with a different config ({details}); resume"
        " with the same settings or choose a new --workdir"
      )
    if previous.get("steps") != config.steps and not early:
      _warn_if_schedule_changes(config.replace(steps=previous["steps"]), config, latest)


# What ``distributed.initialize`` may set from a cluster's environment (SLURM, Open MPI).
_FILLED_IN_BY_A_CLUSTER = ("num_processes", "process_id", "coordinator_address", "devices")


def latest_step(workdir: Path) -> int | None:
  """The newest checkpointed step of a run directory, None if none."""
  return max((int(p.name) for p in model_io.step_sources(workdir)), default=None)


def _warn_if_schedule_changes(previous, config, step: int) -> None:
  """A new --steps on resume reshapes a warmup_cosine or warmup_step schedule: say so, with
  numbers, and whether the steps already taken had the new schedule's rates."""
  if config.lr_schedule == "constant":
    return
  steps_taken = np.arange(step + 1)
  old_rates = np.asarray(step_lib.make_schedule(previous)(steps_taken))
  new_rates = np.asarray(step_lib.make_schedule(config)(steps_taken))
  shape = (
    f"decays to 0 at step {config.steps}"
    if config.lr_schedule == "warmup_cosine"
    else f"drops tenfold at step {round(config.lr_drop_at * config.steps)}"
  )
  same = (
    "the steps taken so far had the same rates, so this run equals a fresh run with"
    if np.array_equal(old_rates, new_rates)
    else "this run is no longer the same as a fresh run with"
  )
  log.warning(
    "resuming at step %d with steps %d -> %d reshapes the %s schedule: the learning"
    " rate there goes from %.3g to %.3g and %s; %s --steps %d",
    step,
    previous.steps,
    config.steps,
    config.lr_schedule,
    float(old_rates[-1]),
    float(new_rates[-1]),
    shape,
    same,
    config.steps,
  )


def append_metrics(workdir: Path, record: dict) -> None:
  """Appends one line to ``metrics.jsonl``."""
  with open(Path(workdir) / METRICS, "a") as handle:
    handle.write(json.dumps(record) + "\n")


def metrics_records(workdir: str | os.PathLike) -> list[dict]:
  """Every record of ``metrics.jsonl``, in order; [] without the file.

  A last line cut short (no newline, not whole JSON: what a kill or a full disk
  leaves in the middle of an append) is dropped with a warning; the next resume
  rewrites the file without it.

  Raises:
    ValueError: any other line that is not JSON, naming the file, the line and the fix.
  """
  path = Path(workdir) / METRICS
  if not path.is_file():
    return []
  text = path.read_text()
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError as error:
      if number == len(lines) and not text.endswith("\n"):
        log.warning("%s: its last line was cut short (a killed write?); dropped", path)
        continue
      raise ValueError(
        f"{path}: line {number} is not a JSON record ({error}); delete that line (the"
        " checkpoints do not depend on it) and run the command again"
      ) from error
  return records


def read_metrics(workdir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
  """(training log lines, valid evaluations) of ``metrics.jsonl``; resume markers dropped.

  A run stopped before its first log line has no ``metrics.jsonl``: both lists are empty.
  """
  lines = [line for line in metrics_records(workdir) if "event" not in line]
  return (
    [line for line in lines if "split" not in line],
    [line for line in lines if line.get("split") == "valid"],
  )


def init_from_record(workdir: str | os.PathLike) -> dict | None:
  """What a fine-tuned run started from (``warm_start``'s record, without its
  ``event`` key); None for a run from a random init or no run directory."""
  found = None
  for record in metrics_records(workdir):
    if record.get("event") == "init_from":
      found = {k: v for k, v in record.items() if k != "event"}
  return found


def write_eval(workdir: Path, record: dict) -> None:
  """``eval.json``: the final evaluation, written atomically."""
  partial = Path(workdir) / f".{EVAL}.partial"
  partial.write_text(json.dumps(record))
  partial.replace(Path(workdir) / EVAL)


def mark_resume(workdir: Path, step: int) -> None:
  """Drops records past ``step`` (a fallback to an older checkpoint recomputes
  them) and appends ``{"event": "resume", "step": step}``, so no step repeats."""
  metrics_path = workdir / METRICS
  if metrics_path.exists():
    kept = [record for record in metrics_records(workdir) if record.get("step", 0) <= step]
    partial = metrics_path.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
    partial.replace(metrics_path)
  append_metrics(workdir, {"event": "resume", "step": step})


def last_checkpoint(workdir: Path) -> str:
  steps = model_io.step_sources(workdir)
  return str(steps[-1]) if steps else "none (nothing saved yet)"


def saved_config(saved: model_io.SavedModel) -> config_lib.Config:
  """The Config a saved model was trained with (fields added since then take their defaults).

  Raises:
    CheckpointError: naming the file, when its config is not a valid Config.
  """
  try:
    return config_lib.Config.from_dict(saved.config)
  except (TypeError, ValueError) as error:
    raise CheckpointError(f"{saved.path}: no readable config ({error})") from error
