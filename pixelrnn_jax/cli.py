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
import re
import sys
import typing

from pixelrnn_jax import config as config_lib

# Exit codes: 1 = the run failed, 2 = bad flags or input, 128 + n = stopped by signal n.
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _field_help() -> dict[str, str]:
  """The why-comment of each Config field, as its --help text."""
  source = inspect.getsource(config_lib.Config)
  return dict(re.findall(r"^\s+(\w+): [^=]+=[^#]*#\s*(.+)$", source, re.MULTILINE))


def _parse_optional_float(text: str) -> float | None:
  return None if text.lower() in ("none", "off") else float(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per Config field (``--batch-size`` for ``batch_size``), defaults from Config."""
  helps = _field_help()
  hints = typing.get_type_hints(config_lib.Config)
  for field in dataclasses.fields(config_lib.Config):
    flag = "--" + field.name.replace("_", "-")
    kind = hints[field.name]
    text = f"{helps.get(field.name, '')} (default: {field.default})"
    if kind is bool:
      parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                          default=field.default, help=text)
    elif kind in (int, float, str):
      parser.add_argument(flag, type=kind, default=field.default, help=text)
    elif kind == (float | None):
      parser.add_argument(flag, type=_parse_optional_float, default=field.default,
                          metavar="FLOAT|none", help=text)
    else:  # str | None
      parser.add_argument(flag, type=str, default=field.default, help=text)
  parser.set_defaults(lr=None)
  parser.add_argument("--lr", type=float, dest="lr", help="alias of --learning-rate")
  parser.add_argument("--units", type=int, dest="units", help="alias of --num-units")


def config_from_flags(args: argparse.Namespace) -> config_lib.Config:
  values = {field.name: getattr(args, field.name)
            for field in dataclasses.fields(config_lib.Config)}
  if getattr(args, "lr", None) is not None:
    values["learning_rate"] = args.lr
  if getattr(args, "units", None) is not None:
    values["num_units"] = args.units
  return config_lib.Config(**values)


def _use_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` JAX devices; must run before JAX starts."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass  # the backend is already up (e.g. called from Python); train checks the count


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="pixelrnn-jax",
      description="Sequential MNIST with a GRU that reads one pixel at a time.")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser("train", help="train (or resume) a run in --workdir")
  train.add_argument("--workdir", required=True,
                     help="run directory: config, metrics, checkpoints; resumed if it has checkpoints")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_config_flags(train)

  evaluate = commands.add_parser("evaluate", help="score a checkpoint on a split")
  evaluate.add_argument("--checkpoint", required=True,
                        help="a checkpoint file, or a run directory (its best checkpoint)")
  evaluate.add_argument("--split", choices=("valid", "test"), default="valid")
  evaluate.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  evaluate.add_argument("--order", default=None,
                        help="pixel|permuted|row (default: the checkpoint's)")
  evaluate.add_argument("--batch-size", type=int, default=1000)
  evaluate.add_argument("--verify-data", action=argparse.BooleanOptionalAction,
                        default=None, help="check IDX checksums (default: as trained)")
  evaluate.add_argument("--json", action="store_true", help="print one JSON object")
  return parser


def _train(args) -> int:
  config = config_from_flags(args)  # bad values fail here, before any work
  _use_cpu_devices(config.devices)
  from pixelrnn_jax import train  # pylint: disable=import-outside-toplevel
  summary = train.train_and_evaluate(config, args.workdir, progress=not args.no_progress)
  valid = summary["valid"]
  print(f"step {summary['step']}/{config.steps}: valid accuracy {valid['accuracy']:.4f},"
        f" loss {valid['loss']:.4f}, best {summary['best_valid_accuracy']:.4f},"
        f" {summary['seconds']:.0f} s; run directory {args.workdir}")
  return _SIGNAL_EXIT.get(summary["stopped"], 0)


def _evaluate(args) -> int:
  from pixelrnn_jax import data, evaluation, train  # pylint: disable=import-outside-toplevel
  params, config, info = train.load_model(args.checkpoint)
  order = data.check_order(args.order or config.order)
  if data.sequence_shape(order)[1] != params.in_dim:
    raise ValueError(f"--order {order} feeds {data.sequence_shape(order)[1]} values per"
                     f" step but the checkpoint was trained on {config.order}"
                     f" ({params.in_dim} per step)")
  images, labels = data.load_mnist(args.split, data_dir=args.data_dir or config.data_dir,
                                   standardize=config.standardize,
                                   verify=config.verify_data if args.verify_data is None
                                   else args.verify_data)
  result = evaluation.evaluate(params, images, labels, order=order,
                               batch_size=args.batch_size)
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
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("jax._src.xla_bridge", "absl"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from pixelrnn_jax import checkpoint, data, train  # pylint: disable=import-outside-toplevel
  try:
    return _train(args) if args.command == "train" else _evaluate(args)
  except (ValueError, FileNotFoundError) as error:  # bad flags, data, checkpoints
    print(f"pixelrnn-jax {args.command}: error: {error}", file=sys.stderr)
    return 2
  except train.NonFiniteLossError as error:
    print(f"pixelrnn-jax {args.command}: error: {error}", file=sys.stderr)
    return 1
  del checkpoint, data


if __name__ == "__main__":
  sys.exit(main())
