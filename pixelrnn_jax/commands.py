"""The bodies of the ``pixelrnn-jax`` commands and their output.

Each takes the parsed flags and returns the exit code; ``cli`` parses the
flags, turns errors into one line and exit codes, and calls these. Only
:func:`train` imports the training loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import unicodedata
from pathlib import Path

from pixelrnn_jax import outputs
from pixelrnn_jax.training import config as config_lib

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number


def train(args: argparse.Namespace, config: config_lib.Config) -> int:
  """``pixelrnn-jax train``: trains (or resumes) ``config`` in ``--workdir``."""
  use_cpu_devices(config.devices)
  from pixelrnn_jax.training import loop  # noqa: PLC0415 (the only command that trains)

  summary = loop.train_and_evaluate(config, args.workdir, progress=args.progress)
  best = summary["best_valid_accuracy"]
  print(
    f"step {summary['step']}/{config.steps}: {loop.describe_valid(summary['valid'])},"
    f" {summary['seconds']:.0f} s"
    + (f"; best {best:.4f} ({summary['best_checkpoint']})" if best is not None else "")
    + f"; run directory {args.workdir}"
  )
  return SIGNAL_EXIT.get(summary["stopped"], 0)


def use_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` JAX devices; must run before JAX starts."""
  import jax  # noqa: PLC0415 (after the flags are parsed)

  try:
    jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass  # the backend is already up (e.g. called from Python); train checks the count


def check_positive(flag: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{flag} {value}: expected a positive integer")


def check_show_dir(path: str, image_suffixes) -> Path:
  """``--show DIR``: a directory (created if missing), never a file or an image name.

  Raises:
    ValueError: naming the flag and what it expects.
  """
  show = Path(path)
  if show.exists() and not show.is_dir():
    raise ValueError(f"--show {path} is a file; --show takes a directory for the *_seen.png")
  if not show.exists() and show.suffix.lower() in image_suffixes:
    raise ValueError(
      f"--show {path} looks like an image file name; --show takes a directory, where each"
      " input's <name>_seen.png is written"
    )
  return outputs.make_dir(path, f"--show {path}", "for the *_seen.png")


def _load(source: str):
  """(model, Config, {"path", "step"}) of a saved model."""
  from pixelrnn_jax import gru_classifier  # noqa: PLC0415
  from pixelrnn_jax import model_io  # noqa: PLC0415
  from pixelrnn_jax.training import run_dir  # noqa: PLC0415

  saved = model_io.read(source)
  model = gru_classifier.from_saved(saved)
  info = {"path": saved.path, "step": saved.step, "card": saved.card}
  return model, run_dir.saved_config(saved), info


def _recorded_rule(info: dict, source: str):
  """The card's early-exit rule (``calibration.EarlyExit``), or None without one."""
  from pixelrnn_jax import calibration  # noqa: PLC0415

  try:
    return calibration.EarlyExit.from_card(info["card"])
  except ValueError as error:
    raise ValueError(f"{source}: {error}") from error


def _tta_rotations(args: argparse.Namespace) -> tuple[float, ...] | None:
  """``--tta-rotations``' views (``config.rotation_views``), or None without it."""
  if args.tta_rotations is None:
    return None
  from pixelrnn_jax.training import config as config_lib  # noqa: PLC0415

  return config_lib.rotation_views(args.tta_rotations)


def _tta_answers(params, pixels, rotations, config, source: str) -> dict:
  """``inference.predict``'s dict for ``--tta-rotations``: every pixel of every view read."""
  import numpy as np  # noqa: PLC0415

  from pixelrnn_jax import preprocessing  # noqa: PLC0415
  from pixelrnn_jax import tta  # noqa: PLC0415

  if not config.max_rotation:
    logging.getLogger(__name__).warning(tta.UNTRAINED_WARNING, source)
  probabilities = np.exp(np.asarray(tta.log_probs(params, pixels, rotations, config.order)))
  return {
    "label": probabilities.argmax(axis=1),
    "probability": probabilities.max(axis=1),
    "probabilities": probabilities,
    "steps": np.full(len(pixels), preprocessing.sequence_shape(config.order)[0]),
  }


def evaluate(args: argparse.Namespace) -> int:
  """``pixelrnn-jax evaluate``: a saved model's loss and accuracy on a split."""
  check_positive("--devices", args.devices)
  check_positive("--batch-size", args.batch_size)
  thresholds = parse_thresholds(args.early_exit) if args.early_exit is not None else ()
  rotations = _tta_rotations(args)
  use_cpu_devices(args.devices)
  from pixelrnn_jax import data  # noqa: PLC0415
  from pixelrnn_jax import inference  # noqa: PLC0415
  from pixelrnn_jax import preprocessing  # noqa: PLC0415

  params, config, info = _load(args.checkpoint)
  rule = None if args.raw_confidence else _recorded_rule(info, args.checkpoint)
  order = preprocessing.check_order(args.order or config.order)
  if preprocessing.sequence_shape(order)[1] != params.in_dim:
    raise ValueError(
      f"--order {order} feeds {preprocessing.sequence_shape(order)[1]} values per"
      f" step but the checkpoint was trained on {config.order}"
      f" ({params.in_dim} per step)"
    )
  if order != config.order:
    logging.getLogger(__name__).warning(
      "evaluating a model trained on %s order in %s order (--order): expect a much lower accuracy",
      config.order,
      order,
    )
  images, labels = data.load_mnist(
    args.split,
    data_dir=args.data_dir or config.data_dir,
    verify=config.verify_data if args.verify_data is None else args.verify_data,
  )
  result = inference.evaluate(
    params,
    images,
    labels,
    order=order,
    batch_size=args.batch_size,
    early_exit_thresholds=thresholds,
    calibration=None if rule is None else rule.calibration,
    devices=args.devices,
  )
  result.update(
    split=args.split,
    order=order,
    checkpoint=info["path"],
    step=info["step"],
    calibrated=rule is not None,
  )
  if rotations is not None:
    from pixelrnn_jax import tta  # noqa: PLC0415

    if not config.max_rotation:
      logging.getLogger(__name__).warning(tta.UNTRAINED_WARNING, args.checkpoint)

    # --order may read the model in another order than its own (it warned above).
    result["tta"] = tta.evaluate(
      params.replace(order=order),
      images,
      labels,
      rotations,
      order=order,
      batch_size=args.batch_size,
    )
  if args.json:
    print(json.dumps(result))
    return 0
  curve = result["accuracy_per_step"]
  stride = max(1, len(curve) // 28)
  print(
    f"{info['path']} (step {info['step']}), {args.split}, {order} order,"
    f" {result['num_examples']} examples"
  )
  print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}")
  if rotations is not None:
    views = ", ".join(f"{d:+g}" if d else "0" for d in rotations)
    print(
      f"with test-time rotations ({views} degrees; {len(rotations)} reads): accuracy"
      f" {result['tta']['accuracy']:.4f}  loss {result['tta']['loss']:.4f}"
    )
  print(
    "accuracy after t steps: "
    + "  ".join(f"{t}:{curve[t - 1]:.3f}" for t in range(stride, len(curve) + 1, stride))
  )
  if rule is not None:
    confidence = "calibrated confidence: the card's per-step temperature"
  elif args.raw_confidence:
    confidence = "confidence as trained: --raw-confidence"
  else:
    confidence = "confidence as trained: the model records no per-step temperature"
  print(
    f"expected calibration error of the answer after t steps ({confidence}): "
    + "  ".join(f"{t}:{e:.4f}" for t, e in result["calibration_error"].items())
  )
  if rule is not None:
    print(f"the card's recommended early-exit threshold: {rule.threshold:g}")
  in_dim = preprocessing.sequence_shape(order)[1]
  unit = "pixels" if in_dim == 1 else "rows"
  for row in result.get("early_exit", []):
    print(
      f"early exit at confidence {row['threshold']:g}: accuracy {row['accuracy']:.4f},"
      f" mean {unit} read {row['mean_steps']:.1f} of {len(curve)}, ECE {row['ece']:.4f}"
    )
  return 0


def parse_thresholds(text: str) -> tuple[float, ...]:
  """``--early-exit 0.9,0.99``: the thresholds, in order.

  Raises:
    ValueError: naming the flag's text and the first element that is empty, not a
      number, or not a probability in (0, 1].
  """
  from pixelrnn_jax.training import config as config_lib  # noqa: PLC0415

  values = []
  for position, part, value in config_lib.number_list(
    text, "--early-exit", "numbers like 0.9,0.99"
  ):
    if not 0 < value <= 1:
      raise ValueError(
        f"--early-exit {text!r}: element {position} ({part.strip()}) must be a probability"
        " in (0, 1]"
      )
    values.append(value)
  return tuple(values)


def predict(args: argparse.Namespace) -> int:
  """``pixelrnn-jax predict``: answers every usable input, in input order; an unusable one gets its own error
  line (and exit code 1), and the others are still answered."""
  import numpy as np  # noqa: PLC0415

  from pixelrnn_jax import data  # noqa: PLC0415
  from pixelrnn_jax import images  # noqa: PLC0415
  from pixelrnn_jax import inference  # noqa: PLC0415
  from pixelrnn_jax import preprocessing  # noqa: PLC0415

  if args.confidence is not None and not 0 < args.confidence <= 1:
    raise ValueError(f"--confidence {args.confidence}: expected a probability in (0, 1]")
  if args.early and args.confidence is not None:
    raise ValueError("--early uses the card's recorded threshold: give --early or --confidence")
  rotations = _tta_rotations(args)
  if rotations is not None and (args.early or args.confidence is not None):
    raise ValueError(
      "--tta-rotations reads every pixel of every view: drop --early / --confidence, or"
      " drop --tta-rotations to stop early"
    )
  params, config, info = _load(args.checkpoint)
  rule = _recorded_rule(info, args.checkpoint)
  calibrated = rule is not None and not args.raw_confidence
  if args.early and args.raw_confidence:
    raise ValueError("--early stops at a calibrated threshold: drop --raw-confidence")
  threshold = 1.0 if args.confidence is None else args.confidence
  if args.early:
    if rule is None:
      raise ValueError(
        f"--early: {args.checkpoint} records no early-exit threshold (a run directory has"
        " none, nor an export made with --no-early-exit): pixelrnn-jax export RUN --out"
        " FILE.msgpack records one; or give --confidence P"
      )
    threshold = rule.threshold
  show = None
  if args.show is not None:
    show = check_show_dir(args.show, images.IMAGE_SUFFIXES)
  if args.data_dir and not args.split:
    raise ValueError(
      f"--data-dir {args.data_dir} is only read with --split: pass --split valid (or"
      " test) to read examples from it by index, or drop --data-dir for image files"
    )
  split_images = split_labels = None
  if args.split:
    split_images, split_labels = data.load_mnist(
      args.split, data_dir=args.data_dir or config.data_dir, verify=config.verify_data
    )
  prepared = []  # per input: (name, original, digit, label) or (name, error message)
  for name in args.inputs:
    try:
      if args.split:
        if not name.isdigit() or int(name) >= len(split_images):
          raise images.ImageError(f"expected an index 0..{len(split_images) - 1} into {args.split}")
        original, label = split_images[int(name)], int(split_labels[int(name)])
      elif name.isdigit() and not Path(name).exists():  # meant as an example's index
        raise images.ImageError(
          "no such file; to read example N of an MNIST split, pass --split valid (or"
          " test), e.g. pixelrnn-jax predict --checkpoint pretrained:pixel --split valid " + name
        )
      else:
        original, label = images.read_image(name), None
      prepared.append((name, original, images.prepare(original, invert=args.invert), label))
    except images.ImageError as error:
      message = str(error)
      prepared.append((name, message.removeprefix(f"{name}: ")))
  usable = [item for item in prepared if len(item) == 4]
  out = {}
  if usable:
    pixels = np.stack([digit.pixels for _, _, digit, _ in usable])  # (N, 28, 28) in [0, 1]
    if rotations is None:
      out = {
        key: np.asarray(value)
        for key, value in inference.predict(
          params,
          pixels,
          threshold=threshold,
          calibration=rule.calibration if calibrated else None,
        ).items()
      }
    else:
      out = _tta_answers(params, pixels, rotations, config, args.checkpoint)
      calibrated = False
  total, in_dim = preprocessing.sequence_shape(config.order)
  unit = "pixels" if in_dim == 1 else "rows"
  shown_names: set[str] = set()
  unshown = 0  # --show pictures that could not be written
  i = 0
  for item in prepared:
    if len(item) == 2:
      name, message = item
      print(
        json.dumps({"input": name, "error": message}) if args.json else f"{name}: error: {message}",
        file=sys.stdout if args.json else sys.stderr,
      )
      continue
    name, original, digit, label = item
    top3 = np.argsort(-out["probabilities"][i])[:3]
    row = {
      "input": name,
      "label": int(out["label"][i]),
      "probability": float(out["probability"][i]),
      "top3": [{"label": int(c), "probability": float(out["probabilities"][i][c])} for c in top3],
      "inverted": digit.inverted,
      "resized": digit.resized,
      "pixels_read": int(out["steps"][i]) * in_dim,
      "pixels_total": total * in_dim,
      "calibrated": calibrated,
    }
    if rotations is not None:
      row["tta_rotations"] = list(rotations)
    if warning := images.number_warning(digit):
      row["warning"] = warning
    i += 1
    if label is not None:
      row["true_label"] = label
    if show is not None:
      stem = _safe_stem(name)
      unique = stem
      for n in range(2, len(prepared) + 2):  # same-named inputs from other folders
        if unique not in shown_names:
          break
        unique = f"{stem}_{n}"
      shown_names.add(unique)
      try:
        row["shown"] = str(
          images.save_side_by_side(
            original,
            digit.pixels,
            show / f"{unique}_seen.png",
            caption=f"left: {name}\nright: the 28x28 digit read\n"
            f"answer {row['label']} ({row['probability']:.1%})"
            + ("" if label is None else f", true {label}")
            + (
              f"\nafter {row['pixels_read']} of {row['pixels_total']} {unit}"
              if row["pixels_read"] < row["pixels_total"]
              else ""
            )
            + (f"\nwarning: {images.short_warning(digit)}" if "warning" in row else ""),
          )
        )
      except OSError as error:  # e.g. a directory of that name: this file's, not the run's
        row["shown_error"] = f"cannot write {error.filename or show}: {error.strerror or error}"
        print(f"{name}: --show {row['shown_error']}", file=sys.stderr)
        unshown += 1
    if args.json:
      print(json.dumps(row))
    else:
      truth = "" if label is None else f" (true {label})"
      done = [
        what
        for what, flag in (("inverted", digit.inverted), ("resized and centred", digit.resized))
        if flag
      ]
      others = ", ".join(f"{t['label']}: {t['probability']:.3f}" for t in row["top3"][1:])
      print(
        f"{name}: {row['label']}{truth} p={row['probability']:.4f}"
        + (" calibrated" if calibrated else "")
        + f" ({others}) after"
        f" {out['steps'][i - 1]}/{total} {unit}"
        + (f" in each of {len(rotations)} views" if rotations is not None else "")
        + (f"; {', '.join(done)}" if done else "")
        + (f"; shown in {row['shown']}" if "shown" in row else "")
      )
      if "warning" in row:
        print(f"{name}: warning: {row['warning']}", file=sys.stderr)
  return 1 if len(usable) < len(prepared) or unshown else 0


# Bytes of a --show picture's stem: the file name also gets "_<n>_seen.png" and
# most file systems allow 255 bytes per name.
MAX_STEM_BYTES = 200


def _safe_stem(name: str) -> str:
  """The stem of an input's ``--show`` picture: its file name without the extension.

  Letters and digits of any script are kept (NFC-composed, with their combining
  marks), so "ナナ.png" gives "ナナ", not "_"; runs of anything else a file
  name should not hold (separators, spaces, punctuation, control characters) become
  one "_"; leading dots go (no hidden files); the result is cut to
  ``MAX_STEM_BYTES`` of UTF-8 at a character boundary; "input" if nothing is left.
  """
  stem = unicodedata.normalize("NFC", Path(name).name.rsplit(".", 1)[0])
  kept = "".join(c if c in "_.-" or unicodedata.category(c)[0] in "LNM" else " " for c in stem)
  stem = re.sub(" +", "_", kept).lstrip(".")
  while len(stem.encode()) > MAX_STEM_BYTES:
    stem = stem[:-1]
  return stem or "input"


def plot(args: argparse.Namespace) -> int:
  """``pixelrnn-jax plot``: PNG pictures of a run."""
  check_positive("--examples", args.examples)
  if args.out is not None:
    outputs.check_dir(args.out, f"--out {args.out}", "for the PNGs")
  if args.early_exit:
    if args.run_dir:
      raise ValueError(
        "--early-exit draws models, not a run: give --early-exit SOURCE ... --out DIR"
        " without RUN_DIR"
      )
    if args.out is None:
      raise ValueError("--early-exit needs --out DIR: where early_exit_comparison.png goes")
    outputs.make_dir(args.out, f"--out {args.out}", "for the PNGs")
    from pixelrnn_jax import plots  # noqa: PLC0415

    print(
      plots.early_exit_comparison(
        args.early_exit, data_dir=args.data_dir, examples=args.examples, out_dir=args.out
      )
    )
    return 0
  if not args.run_dir:
    raise ValueError("plot needs RUN_DIR (a training run directory) or --early-exit SOURCE")
  if args.out is not None:
    outputs.make_dir(args.out, f"--out {args.out}", "for the PNGs")
  from pixelrnn_jax import plots  # noqa: PLC0415

  for path in plots.plot_run(
    args.run_dir, data_dir=args.data_dir, examples=args.examples, out_dir=args.out
  ):
    print(path)
  return 0


EXPORT_MAX_DROP = 0.25  # export --max-drop's default, in accuracy points


def export(args: argparse.Namespace) -> int:
  """``pixelrnn-jax export``: a run's best weights and their card to ``--out``."""
  from pixelrnn_jax.training import export as export_lib  # noqa: PLC0415

  export_lib.check_out(args.out)  # before the run and the data are read
  if args.wall_time_s is not None and not 0 <= args.wall_time_s < float("inf"):
    raise ValueError(f"--wall-time-s {args.wall_time_s}: expected seconds >= 0")
  if args.max_drop is not None and not args.early_exit:
    raise ValueError(
      f"--max-drop {args.max_drop} chooses the early-exit threshold, which --no-early-exit"
      " does not record: drop one of the two"
    )
  max_drop = EXPORT_MAX_DROP if args.max_drop is None else args.max_drop
  if not 0 <= max_drop < 100:
    raise ValueError(f"--max-drop {max_drop}: expected accuracy points in [0, 100), e.g. 0.25")
  card = export_lib.export(
    args.run,
    args.out,
    data_dir=args.data_dir,
    notes=args.notes,
    wall_time_s=args.wall_time_s,
    early_exit=args.early_exit,
    max_drop=max_drop / 100,
  )
  print(
    f"{args.out}: step {card['source']['step']}, valid accuracy"
    f" {card['valid_accuracy']:.4f}, SHA-256 {card['sha256'][:16]}...; card"
    f" {Path(args.out).with_suffix('.json')}"
  )
  if "early_exit" in card:
    early = card["early_exit"]["valid"]
    unit = "pixels" if card["config"]["order"] != "row" else "rows"
    print(
      f"early exit at calibrated confidence {early['threshold']:.6g}: valid accuracy"
      f" {early['accuracy']:.4f} (reading all: {early['read_all_accuracy']:.4f}), mean {unit}"
      f" read {early['mean_steps']:.1f}"
    )
  return 0


DEFAULT_SERVED = ("pretrained:pixel", "pretrained:anytime", "pretrained:permuted")


class _Stop(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _start_workers(pool) -> int | None:
  """Starts the server's worker processes (seconds). A SIGINT / SIGTERM meanwhile
  kills them, so none outlives the command, and returns the exit code (130 / 143)
  after the command's one line; None once they are up."""

  def stop(signum, frame):
    del frame
    raise _Stop(signum)

  previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    pool.start()
    return None
  except _Stop as stopped:
    pool.kill()
    name = signal.Signals(stopped.signum).name
    what = "interrupted" if stopped.signum == signal.SIGINT else "terminated"
    print(f"pixelrnn-jax serve: {what} ({name})", file=sys.stderr, flush=True)
    return 128 + stopped.signum
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


WORKER_MB = 300  # a serve worker process's memory: JAX and its own copy of the models


def check_worker_memory(workers: int, free_mb: float | None) -> None:
  """``serve --workers N`` (processes): N x WORKER_MB must fit in the free memory
  (None: unknown, not checked), or the machine swaps or kills workers while they start.

  Raises:
    ValueError: naming N, what it would take, what is free, and the fix.
  """
  if free_mb is not None and workers * WORKER_MB > free_mb:
    fits = max(1, int(free_mb // WORKER_MB))
    raise ValueError(
      f"--workers {workers}: each worker process holds its own models (about {WORKER_MB} MB),"
      f" {workers * WORKER_MB:,} MB in all, more than the {free_mb:,.0f} MB free here; use at"
      f" most {fits} workers, or --threads"
    )


def _free_mb() -> float | None:
  """The memory free for new processes (Linux's MemAvailable), in MB; None if unknown."""
  try:
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def serve(args: argparse.Namespace) -> int:
  """``pixelrnn-jax serve``: the page and JSON API over the ``--checkpoint`` models until
  Ctrl-C / SIGTERM (then the CLI's signal handler exits 130 / 143)."""
  if not 0 <= args.port <= 65535:
    raise ValueError(f"--port {args.port}: expected 0..65535 (0: a free port)")
  if not (args.max_upload_mb > 0 and args.max_upload_mb < float("inf")):
    raise ValueError(
      f"--max-upload-mb {args.max_upload_mb}: expected a positive, finite size in MB"
    )
  try:
    from pixelrnn_jax.serve import app as app_lib  # noqa: PLC0415 (the optional extra)
    from pixelrnn_jax.serve import server  # noqa: PLC0415 (the optional extra)
  except ImportError as error:
    if error.name is None or error.name.split(".")[0] == "pixelrnn_jax":
      raise  # a bug of this package, not a missing extra
    print(
      f"pixelrnn-jax serve needs its extra: pip install -e '.[serve]' (no module {error.name!r})",
      file=sys.stderr,
    )
    return 2
  from pixelrnn_jax.serve import models as models_lib  # noqa: PLC0415

  sock = server.bind(args.host, args.port)  # a taken port fails before the models load
  check_positive("--workers", args.workers)
  check_positive("--max-batch", args.max_batch)
  if not args.threads:
    check_worker_memory(args.workers, _free_mb())
  sources = args.checkpoint or list(DEFAULT_SERVED)
  # With worker processes, this process only names and describes the models.
  served = models_lib.load_all(sources, warm_up=args.threads)
  pool = None
  if not args.threads:  # each worker loads the models again, in parallel
    pool = app_lib.WorkerProcesses(sources, args.workers)
    stopped = _start_workers(pool)
    if stopped is not None:
      return stopped
  app = app_lib.make_app(
    served,
    max_upload_mb=args.max_upload_mb,
    workers=args.workers,
    max_batch=args.max_batch,
    pool=pool,
  )
  count = f"{len(served)} model{'s' if len(served) > 1 else ''}"
  print(f"serving {count} on {server.address(sock)} (Ctrl-C to stop)", flush=True)
  server.run(app, sock)
  return 0
