"""The ``pixelrnn-jax`` command: flags mapped onto Config, nothing else.

    pixelrnn-jax train --workdir runs/notebook [--order row --steps 300 ...]
    pixelrnn-jax evaluate --checkpoint runs/notebook --split valid [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import signal
import sys
import typing

# Only the standard library at import time: main() must be running (and
# catching Ctrl-C) before JAX is imported, which takes seconds.

# Exit codes: 1 = the run failed, 2 = bad flags or input, 128 + n = stopped by signal n.
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _field_help() -> dict[str, str]:
  """The why-comment of each Config field, as its --help text."""
  from pixelrnn_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(config_lib.Config)
  return dict(re.findall(r"^\s+(\w+): [^=]+=[^#]*#\s*(.+)$", source, re.MULTILINE))


def _parse_optional_float(text: str) -> float | None:
  return None if text.lower() in ("none", "off") else float(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """``--recipe`` plus one flag per Config field (``--batch-size`` for ``batch_size``).

  A flag that is given overrides the recipe's value; the others keep it.
  """
  from pixelrnn_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  helps = _field_help()
  hints = typing.get_type_hints(config_lib.Config)
  parser.add_argument("--recipe", choices=sorted(config_lib.RECIPES), default="notebook",
                      help="named starting config (default: notebook); flags override it")
  for field in dataclasses.fields(config_lib.Config):
    flag = "--" + field.name.replace("_", "-")
    kind = hints[field.name]
    text = f"{helps.get(field.name, '')} (notebook: {field.default})"
    common = dict(default=argparse.SUPPRESS, help=text, dest=field.name)
    if kind is bool:
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind in (int, float, str):
      parser.add_argument(flag, type=kind, **common)
    elif kind == (float | None):
      parser.add_argument(flag, type=_parse_optional_float, metavar="FLOAT|none", **common)
    elif kind == (int | None):
      parser.add_argument(flag, type=int, **common)
    else:  # str | None
      parser.add_argument(flag, type=str, **common)
  parser.add_argument("--lr", type=float, dest="learning_rate", default=argparse.SUPPRESS,
                      help="alias of --learning-rate")
  parser.add_argument("--units", type=int, dest="num_units", default=argparse.SUPPRESS,
                      help="alias of --num-units")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
  """The ``train`` command's flags: --workdir, progress, and the Config flags."""
  parser.add_argument("--workdir", required=True,
                      help="run directory: config, metrics, checkpoints; resumed if it has"
                           " checkpoints")
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="a progress bar (default: only when stderr is a terminal;"
                           " otherwise one log line per --log-every steps)")
  add_config_flags(parser)


def run_training(args: argparse.Namespace) -> int:
  """Runs ``train`` from parsed flags (the CLI's and the example script's); the exit code."""
  config = config_from_flags(args)  # bad values fail here, before any work
  _use_cpu_devices(config.devices)
  from pixelrnn_jax import train  # pylint: disable=import-outside-toplevel
  summary = train.train_and_evaluate(config, args.workdir, progress=args.progress)
  valid = summary["valid"]
  best = summary["best_valid_accuracy"]
  print(f"step {summary['step']}/{config.steps}: valid accuracy {valid['accuracy']:.4f},"
        f" loss {valid['loss']:.4f}, {summary['seconds']:.0f} s"
        + (f"; best {best:.4f} ({summary['best_checkpoint']})" if best is not None else "")
        + f"; run directory {args.workdir}")
  return _SIGNAL_EXIT.get(summary["stopped"], 0)


def config_from_flags(args: argparse.Namespace) -> config_lib.Config:
  """The recipe's Config with every given flag applied (validated)."""
  from pixelrnn_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  given = {field.name: getattr(args, field.name)
           for field in dataclasses.fields(config_lib.Config) if hasattr(args, field.name)}
  return config_lib.RECIPES[args.recipe].replace(**given)


def _use_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` JAX devices; must run before JAX starts."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass  # the backend is already up (e.g. called from Python); train checks the count


def build_parser() -> argparse.ArgumentParser:
  from pixelrnn_jax import __version__  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="pixelrnn-jax",
      description="Sequential MNIST with a GRU that reads one pixel at a time.")
  parser.add_argument("--version", action="version", version=f"pixelrnn-jax {__version__}")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  # -v also after the subcommand; SUPPRESS keeps the top-level value when absent.
  verbose = argparse.ArgumentParser(add_help=False)
  verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging")
  commands = parser.add_subparsers(dest="command", required=True)
  add_command = lambda name, **kw: commands.add_parser(name, parents=[verbose], **kw)  # noqa: E731

  train = add_command("train", help="train (or resume) a run in --workdir")
  add_train_flags(train)

  evaluate = add_command("evaluate", help="score a checkpoint on a split")
  evaluate.add_argument("--checkpoint", required=True,
                        help="pretrained:NAME (shipped weights: pixel, permuted), a run"
                             " directory (its best checkpoint) or a checkpoint file")
  evaluate.add_argument("--split", choices=("valid", "test"), default="valid")
  evaluate.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  evaluate.add_argument("--order", default=None,
                        help="pixel|permuted|row (default: the checkpoint's)")
  evaluate.add_argument("--batch-size", type=int, default=1000)
  evaluate.add_argument("--devices", type=int, default=1,
                        help="split each batch across N devices (host CPU devices on CPU)")
  evaluate.add_argument("--verify-data", action=argparse.BooleanOptionalAction,
                        default=None, help="check IDX checksums (default: as trained)")
  evaluate.add_argument("--json", action="store_true", help="print one JSON object")
  evaluate.add_argument("--early-exit", default=None, metavar="THRESHOLDS",
                        help="comma-separated confidence thresholds, e.g. 0.9,0.99: accuracy"
                             " against mean pixels read for each")

  predict = add_command(
      "predict", help="classify images, optionally stopping early once confident")
  predict.add_argument("--checkpoint", required=True,
                       help="pretrained:NAME (shipped weights: pixel, permuted), a run"
                            " directory (its best checkpoint) or a checkpoint file")
  predict.add_argument("inputs", nargs="+", metavar="IMAGE",
                       help="digit images (PNG, JPEG, ...; any size, either polarity, RGBA,"
                            " 16-bit) or .npy arrays, or example indices with --split")
  predict.add_argument("--confidence", type=float, default=1.0,
                       help="stop reading pixels once the top probability reaches this"
                            " (default 1.0: read all)")
  predict.add_argument("--split", choices=("valid", "test"), default=None,
                       help="read IMAGE arguments as indices into this MNIST split")
  predict.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  predict.add_argument("--json", action="store_true", help="one JSON object per input")
  predict.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                       help="make the digit light on dark: auto (when the border is light),"
                            " yes or no (default auto)")
  predict.add_argument("--show", default=None, metavar="DIR",
                       help="write DIR/<input>_seen.png: each input beside the 28x28 the model read")

  plot = add_command("plot", help="write PNG pictures of a training run")
  plot.add_argument("run_dir", help="a training run directory")
  plot.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  plot.add_argument("--examples", type=int, default=500,
                    help="valid images used for the per-pixel, early-exit and gradient pictures")
  plot.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
  return parser


def _check_positive(flag: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{flag} {value}: expected a positive integer")


def _evaluate(args) -> int:
  _check_positive("--devices", args.devices)
  _check_positive("--batch-size", args.batch_size)
  thresholds = _parse_thresholds(args.early_exit) if args.early_exit else ()
  _use_cpu_devices(args.devices)
  from pixelrnn_jax import data, evaluation, train  # pylint: disable=import-outside-toplevel
  params, config, info = train.load_model(args.checkpoint)
  order = data.check_order(args.order or config.order)
  if data.sequence_shape(order)[1] != params.in_dim:
    raise ValueError(f"--order {order} feeds {data.sequence_shape(order)[1]} values per"
                     f" step but the checkpoint was trained on {config.order}"
                     f" ({params.in_dim} per step)")
  if order != config.order:
    logging.getLogger(__name__).warning(
        "evaluating a model trained on %s order in %s order (--order): expect a much lower"
        " accuracy", config.order, order)
  images, labels = data.load_mnist(args.split, data_dir=args.data_dir or config.data_dir,
                                   verify=config.verify_data if args.verify_data is None
                                   else args.verify_data)
  result = evaluation.evaluate(params, images, labels, order=order,
                               batch_size=args.batch_size, early_exit_thresholds=thresholds,
                               devices=args.devices)
  result.update(split=args.split, order=order, checkpoint=info["path"], step=info["step"])
  if args.json:
    print(json.dumps(result))
    return 0
  curve = result["accuracy_per_step"]
  stride = max(1, len(curve) // 28)
  print(f"{info['path']} (step {info['step']}), {args.split}, {order} order,"
        f" {result['num_examples']} examples")
  print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}")
  print("accuracy after t steps: " + "  ".join(
      f"{t}:{curve[t - 1]:.3f}" for t in range(stride, len(curve) + 1, stride)))
  for row in result.get("early_exit", []):
    print(f"early exit at confidence {row['threshold']:g}: accuracy {row['accuracy']:.4f},"
          f" mean pixels read {row['mean_steps']:.1f} of {len(curve)}")
  return 0


def _parse_thresholds(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError as error:
    raise ValueError(f"--early-exit {text!r}: expected numbers like 0.9,0.99") from error
  bad = [v for v in values if not 0 < v <= 1]
  if not values or bad:
    raise ValueError(f"--early-exit {text!r}: thresholds must be probabilities in (0, 1]")
  return values


def _predict(args) -> int:
  """Answers every usable input, in input order; an unusable one gets its own error
  line (and exit code 1), and the others are still answered."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from pixelrnn_jax import data, early_exit, images, train  # pylint: disable=import-outside-toplevel
  if not 0 < args.confidence <= 1:
    raise ValueError(f"--confidence {args.confidence}: expected a probability in (0, 1]")
  params, config, _ = train.load_model(args.checkpoint)
  show = None
  if args.show:
    from pathlib import Path  # pylint: disable=import-outside-toplevel
    show = Path(args.show)
    show.mkdir(parents=True, exist_ok=True)
  split_images = split_labels = None
  if args.split:
    split_images, split_labels = data.load_mnist(
        args.split, data_dir=args.data_dir or config.data_dir, verify=config.verify_data)
  prepared = []  # per input: (name, original, digit, label) or (name, error message)
  for name in args.inputs:
    try:
      if args.split:
        if not name.isdigit() or int(name) >= len(split_images):
          raise images.ImageError(f"expected an index 0..{len(split_images) - 1}"
                                  f" into {args.split}")
        original, label = split_images[int(name)], int(split_labels[int(name)])
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
    out = {key: np.asarray(value) for key, value in
           early_exit.predict(params, pixels, threshold=args.confidence).items()}
  total, in_dim = data.sequence_shape(config.order)
  unit = "pixels" if in_dim == 1 else "rows"
  shown_names: set[str] = set()
  i = 0
  for item in prepared:
    if len(item) == 2:
      name, message = item
      print(json.dumps({"input": name, "error": message}) if args.json
            else f"{name}: error: {message}", file=sys.stdout if args.json else sys.stderr)
      continue
    name, original, digit, label = item
    top3 = np.argsort(-out["probabilities"][i])[:3]
    row = {"input": name, "label": int(out["label"][i]),
           "probability": float(out["probability"][i]),
           "top3": [{"label": int(c), "probability": float(out["probabilities"][i][c])}
                    for c in top3],
           "inverted": digit.inverted, "resized": digit.resized,
           "pixels_read": int(out["steps"][i]) * in_dim, "pixels_total": total * in_dim}
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
      row["shown"] = str(images.save_side_by_side(original, digit.pixels,
                                                  show / f"{unique}_seen.png"))
    if args.json:
      print(json.dumps(row))
    else:
      truth = "" if label is None else f" (true {label})"
      done = [what for what, flag in (("inverted", digit.inverted),
                                      ("resized and centred", digit.resized)) if flag]
      others = ", ".join(f"{t['label']}: {t['probability']:.3f}" for t in row["top3"][1:])
      print(f"{name}: {row['label']}{truth} p={row['probability']:.4f} ({others}) after"
            f" {out['steps'][i - 1]}/{total} {unit}" + (f"; {', '.join(done)}" if done else ""))
  return 1 if len(usable) < len(prepared) else 0


def _safe_stem(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.rsplit("/", 1)[-1].rsplit(".", 1)[0]) or "input"


def _plot(args) -> int:
  _check_positive("--examples", args.examples)
  from pixelrnn_jax import plots  # pylint: disable=import-outside-toplevel
  for path in plots.plot_run(args.run_dir, data_dir=args.data_dir, examples=args.examples,
                             out_dir=args.out):
    print(path)
  return 0


def _exit_on_signal(command: str):
  """A handler that ends the command at once with one line: outside the training
  loop (which installs its own, saving a checkpoint first) there is nothing to save,
  and an exception raised mid-import could be swallowed by library code."""

  def handler(signum, frame):
    del frame
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    sys.stdout.flush()
    message = f"{what} ({signal.Signals(signum).name})"
    print(f"{command}: {message}", file=sys.stderr, flush=True)
    if _in_multi_process_run():  # before the training loop: the other processes stop too
      from pixelrnn_jax import distributed  # pylint: disable=import-outside-toplevel
      distributed.announce_failure(message)
    os._exit(128 + signum)  # pylint: disable=protected-access

  return handler


def setup_logging(verbose: bool) -> None:
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("jax", "absl"):  # -v is for this package's messages, not JAX's compiler
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
  """The ``pixelrnn-jax`` command; returns its exit code.

  Exit codes: 0 done; 1 the run failed (non-finite loss) or some predict
  inputs were unusable; 2 bad flags, data or files (one line on stderr);
  130 / 143 stopped by SIGINT / SIGTERM (one line; training saves first).
  """
  argv = sys.argv[1:] if argv is None else argv
  named = [word for word in argv if word in ("train", "evaluate", "predict", "plot")]
  command = " ".join(["pixelrnn-jax", *named[:1]])  # for messages before the flags are parsed
  previous = {}
  for signum in (signal.SIGINT, signal.SIGTERM):
    try:
      previous[signum] = signal.signal(signum, _exit_on_signal(command))
    except ValueError:  # not the main thread
      pass
  try:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from pixelrnn_jax import train  # pylint: disable=import-outside-toplevel
    handlers = {"train": run_training, "evaluate": _evaluate, "predict": _predict,
                "plot": _plot}
    try:
      return handlers[args.command](args)
    except (ValueError, OSError, ImportError) as error:  # bad flags, data, files, paths
      return _fail(command, _one_line(error), 2)
    except (train.NonFiniteLossError, train.distributed.PeerError) as error:
      return _fail(command, str(error), 1)
    except Exception as error:  # pylint: disable=broad-except
      if not _in_multi_process_run():
        raise  # a bug: its traceback helps more than a line
      return _fail(command, f"{type(error).__name__}: {_one_line(error)}", 1)
  except KeyboardInterrupt:  # a second Ctrl-C during training
    return _fail(command, "interrupted (SIGINT)", 130, prefix="")
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _in_multi_process_run() -> bool:
  """Whether this process has joined a multi-process run. Safe in a signal handler that
  interrupts an import: it reads a flag and imports nothing."""
  distributed = sys.modules.get("pixelrnn_jax.distributed")
  return distributed is not None and distributed.joined()


def _fail(command: str, message: str, code: int, *, prefix: str = "error: ") -> int:
  """Prints the one line of a failed command; a process of a multi-process run then tells
  the others and ends at once (a normal exit would wait at JAX's shutdown barrier for
  peers that may be gone, then abort)."""
  print(f"{command}: {prefix}{message}", file=sys.stderr, flush=True)
  if _in_multi_process_run():
    from pixelrnn_jax import distributed  # pylint: disable=import-outside-toplevel
    distributed.announce_failure(message)
    distributed.leave(code)
  return code


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


if __name__ == "__main__":
  sys.exit(main())
