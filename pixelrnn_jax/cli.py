"""The ``pixelrnn-jax`` command: the parser, flags mapped onto Config, exit codes.

    pixelrnn-jax train --workdir runs/notebook [--order row --steps 300 ...]
    pixelrnn-jax evaluate --checkpoint runs/notebook --split valid [--json]
    pixelrnn-jax predict --checkpoint pretrained:pixel digit.png
    pixelrnn-jax plot runs/notebook
    pixelrnn-jax export runs/notebook --out models/notebook.msgpack
    pixelrnn-jax serve [--checkpoint pretrained:pixel ...] [--port 8000]

The commands' bodies are in ``commands``. Exit codes: 0 done; 1 the run
failed (non-finite loss, a lost peer) or some predict inputs were unusable;
2 bad flags, data or files (one line on stderr); 130 / 143 stopped by
SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import signal
import sys
import time
import typing
from pathlib import Path

# Only the standard library at import time: main() must be running (and
# catching Ctrl-C) before JAX is imported, which takes seconds.

COMMANDS = ("train", "evaluate", "predict", "plot", "export", "serve")


def _config():
  """The config module (a leaf of the package: standard library only)."""
  from pixelrnn_jax.training import config  # noqa: PLC0415

  return config


def _run_dir():
  """The run-directory module (loads JAX: only once a run directory is there)."""
  from pixelrnn_jax.training import run_dir  # noqa: PLC0415

  return run_dir


def _parse_optional_float(text: str) -> float | None:
  return None if text.lower() in ("none", "off") else float(text)


def _parse_optional_int(text: str) -> int | None:
  return None if text.lower() in ("none", "off") else int(text)


def _parse_optional_str(text: str) -> str | None:
  return None if text.lower() in ("none", "off") else text


# argparse names the type in its error ("invalid int value: 'two'").
_parse_optional_float.__name__, _parse_optional_int.__name__ = "float", "int"
_parse_optional_str.__name__ = "str"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """``--recipe`` plus one flag per Config field (``--batch-size`` for ``batch_size``).

  The flag's type and choices come from the field's type, its help from the
  field's metadata. A flag that is given overrides the recipe's value; the
  others keep it.
  """
  config_lib = _config()
  hints = typing.get_type_hints(config_lib.Config)
  parser.add_argument(
    "--recipe",
    choices=sorted(config_lib.RECIPES),
    default=None,
    help="named starting config; flags override it (default: the run's own config.json"
    " when --workdir holds a run, else notebook)",
  )
  for field in dataclasses.fields(config_lib.Config):
    flag = "--" + field.name.replace("_", "-")
    kind = hints[field.name]
    optional = type(None) in typing.get_args(kind)
    base = config_lib.base_type(kind)
    common = dict(
      default=argparse.SUPPRESS,
      dest=field.name,
      help=f"{field.metadata['help']} (notebook: {field.default})",
    )
    if base is bool:
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif config_lib.choices(field.name):
      parser.add_argument(flag, type=base, choices=config_lib.choices(field.name), **common)
    elif optional and base is float:
      parser.add_argument(flag, type=_parse_optional_float, metavar="FLOAT|none", **common)
    elif optional and base is int:
      parser.add_argument(flag, type=_parse_optional_int, metavar="INT|none", **common)
    elif optional and base is str:
      metavar = f"{field.name.upper()}|none"
      parser.add_argument(flag, type=_parse_optional_str, metavar=metavar, **common)
    else:
      parser.add_argument(flag, type=base, **common)
  parser.add_argument(
    "--lr",
    type=float,
    dest="learning_rate",
    default=argparse.SUPPRESS,
    help="alias of --learning-rate",
  )
  parser.add_argument(
    "--units", type=int, dest="num_units", default=argparse.SUPPRESS, help="alias of --num-units"
  )


def add_train_flags(parser: argparse.ArgumentParser) -> None:
  """The ``train`` command's flags: --workdir, progress, and the Config flags."""
  parser.add_argument(
    "--workdir",
    required=True,
    help="run directory: config, metrics, checkpoints; resumed if it has checkpoints",
  )
  parser.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="a progress bar (default: only when stderr is a terminal;"
    " otherwise one log line per --log-every steps)",
  )
  add_config_flags(parser)


def config_from_flags(args: argparse.Namespace):
  """The starting Config with every given flag applied (validated): ``--recipe``'s;
  without it, the run's own ``config.json`` when ``--workdir`` holds one (so
  ``train --workdir RUN`` alone resumes it as it was), else the notebook recipe.

  Raises:
    ValueError: naming the flag (``--batch-size 10``), not the field; or a
      ``config.json`` that cannot be read.
  """
  config_lib = _config()
  given = {
    field.name: getattr(args, field.name)
    for field in dataclasses.fields(config_lib.Config)
    if hasattr(args, field.name)
  }
  start = config_lib.RECIPES[args.recipe or "notebook"]
  workdir = getattr(args, "workdir", None)
  saved = Path(workdir, "config.json") if workdir else None
  if args.recipe is None and saved is not None and (saved.is_file() or saved.parent.is_dir()):
    # config.json, or (missing or unreadable) the newest readable checkpoint's config.
    found = _run_dir().run_config(saved.parent)
    values, saved = found if found is not None else (None, saved)
    try:
      if values is None and saved.is_file():
        values = json.loads(saved.read_text())
      if values is not None:
        start = config_lib.Config.from_dict(values)
        # Which process this is, is this process's own (process 0 wrote config.json).
        start = start.replace(process_id=config_lib.Config().process_id)
    except (ValueError, TypeError, AttributeError) as error:
      raise ValueError(
        f"{saved}: not a readable run config ({_one_line(error)}); give --recipe to start"
        " from a named config"
      ) from error
    if saved.name != "config.json":
      logging.getLogger(__name__).warning(
        "%s is missing or unreadable: resuming with the config saved in checkpoint %s",
        saved.parent.parent / "config.json",
        saved,
      )
  try:
    config = start.replace(**given)
  except ValueError as error:
    raise ValueError(flags_named(str(error))) from error
  if start is not config_lib.RECIPES[args.recipe or "notebook"] and saved.name == "config.json":
    # said once the flags fit (a checkpoint's config was said above)
    logging.getLogger(__name__).info("starting from the run's %s (no --recipe given)", saved)
  return config


class OneLineParser(argparse.ArgumentParser):
  """A parser whose errors are one line, and which names a misspelt flag (and the
  closest real ones) before anything else, in its own usage: argparse would report a
  missing required flag first, or a command's unknown flag in the top-level usage.

  Flags are taken as spelt, never by prefix (``allow_abbrev=False``): ``--step 5``
  is an unknown flag with ``--steps`` suggested, and a flag added later cannot make
  someone's abbreviation ambiguous. A negative number, ``-inf`` or ``-nan`` is a value.
  """

  def __init__(self, *args, **kwargs):
    self.flags = {"-v": False, "--verbose": False}  # flag -> takes a value; from the parent
    self.commands: dict[str, argparse.ArgumentParser] = {}  # the top level's, by name
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)
    # argparse takes "-inf", "-nan" and "-1e-3" for flags ("expected one argument");
    # they are values, which the config then checks and names.
    self._negative_number_matcher = re.compile(rf"^(?:{_NUMBER.pattern})$", re.IGNORECASE)

  def error(self, message: str):
    """One line and exit code 2 (argparse prints the whole usage first); the usage is
    one ``--help`` away."""
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

  @contextlib.contextmanager
  def refusing_bad_inputs(self):
    """Inside it, a file the flags name that is missing or unreadable, or data or a
    model that do not fit (``OSError``, ``ValueError``: ``DataNotFoundError``,
    ``CheckpointError`` and ``ImageError`` are among them), ends the script as a bad
    flag does: one line, exit 2. Wrap the loading of what the flags name, not the work."""
    try:
      yield
    except (OSError, ValueError) as error:
      self.error(flags_named(str(error)))

  def check_output_file(self, flag: str, path: str, suffix: str) -> Path:
    """``path``, a file the script writes when its work is done, checked before the
    work: a name ending in ``suffix`` (e.g. ``".png"``), not a directory, in a
    directory that exists. Otherwise one line naming the flag, exit 2."""
    out = Path(path)
    if out.suffix.lower() != suffix or out.is_dir():
      self.error(f"{flag} {path}: expected a file name ending in {suffix}")
    if not out.resolve().parent.is_dir():
      self.error(f"{flag} {path}: its directory does not exist")
    return out

  def add_argument(self, *args, **kwargs):
    action = super().add_argument(*args, **kwargs)
    for flag in action.option_strings:
      self.flags[flag] = action.nargs != 0
    return action

  def parse_known_args(self, args=None, namespace=None):
    words = list(args or [])
    spelt = {}  # an action's dest -> how it was first spelt, to catch --lr 1 --learning-rate 2
    i = 0
    while i < len(words):
      word = words[i]
      i += 1
      if word == "--":
        break
      name = word.split("=", 1)[0]
      if not name.startswith("-") or name == "-" or _NUMBER.fullmatch(name):
        if self._subparsers is not None:  # the command's name; what follows is its to check
          if word not in COMMANDS:
            self.error(f"unknown command {word!r}{_did_you_mean(word, COMMANDS)}")
          break
        continue  # a value, a positional, "-" or a negative number
      if name not in self.flags:
        spelled = name if name.startswith("--") else "-" + name  # -early for --early
        self.error(f"unknown flag {name}{_did_you_mean(spelled, self.flags)}")
      action = self._option_string_actions.get(name)
      if action is not None and not isinstance(action, argparse._AppendAction):  # noqa: SLF001
        first = spelt.setdefault(action.dest, name)
        if first != name:  # argparse would silently keep the last one
          self.error(f"{first} and {name} are the same flag: give it once")
      if self.flags[name] and "=" not in word:
        i += 1  # its value, which may itself start with "--" (--notes "--recipe ...")
    return super().parse_known_args(args, namespace)

  def parse_args(self, args=None, namespace=None):
    """As argparse's, but words left over after a command are reported by that command's
    parser, in its usage (argparse reports them in the top-level one)."""
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
      command = self.commands.get(getattr(namespace, "command", None), self)
      command.error(f"unrecognized arguments: {' '.join(extras)}")
    return namespace


def flags_named(message: str) -> str:
  """A library message in the command's words: each ``field=value`` of a ``Config``
  field becomes ``--field value`` ("batch_size=10 does not divide across devices=4" ->
  "--batch-size 10 does not divide across --devices 4")."""
  names = "|".join(sorted((f.name for f in dataclasses.fields(_config().Config)), key=len)[::-1])
  return re.sub(
    rf"(?<![\w.-])({names})=", lambda m: "--" + m.group(1).replace("_", "-") + " ", message
  )


def number(minimum: float | None = None, maximum: float | None = None, *, kind=int):
  """An argparse ``type`` for a numeric flag: a finite ``kind`` (int or float) within
  [minimum, maximum] (either end may be None: open). A value outside it, a word or
  ``inf`` / ``nan`` is one line naming the flag, the value and what it takes
  (``argument --count: expected an integer >= 1, got '0'``)."""
  what = "an integer" if kind is int else "a finite number"
  if minimum is not None and maximum is not None:
    expected = f"{what} from {minimum:g} to {maximum:g}"
  elif minimum is not None:
    expected = f"{what} >= {minimum:g}"
  elif maximum is not None:
    expected = f"{what} <= {maximum:g}"
  else:
    expected = what

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if (
      value is None
      or not math.isfinite(value)
      or (minimum is not None and value < minimum)
      or (maximum is not None and value > maximum)
    ):
      raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value

  parse.__name__ = expected  # argparse names a type by it in some messages
  parse.minimum, parse.maximum, parse.kind = minimum, maximum, kind
  return parse


def _did_you_mean(word: str, choices) -> str:
  """'; did you mean X or Y?': the choices that ``word`` begins (--raw: --raw-confidence)
  if any (--ord: --order, not --workdir too), else the closest spellings; --help only
  when it is the closest."""
  starts = [c for c in choices if c.startswith(word) and len(word.lstrip("-")) > 2]
  if starts:
    return f"; did you mean {' or '.join(starts[:3])}?"

  def likeness(choice: str) -> float:  # without the dashes every flag shares
    return difflib.SequenceMatcher(None, word.lstrip("-"), choice.lstrip("-")).ratio()

  close = sorted((c for c in choices if likeness(c) >= 0.6), key=likeness, reverse=True)
  # Only those nearly as close as the closest: --orde named --workdir and --lr too.
  close = [c for c in close if likeness(c) >= likeness(close[0]) - 0.15][:3] if close else []
  if close and close[0] != "--help":
    close = [c for c in close if c not in ("-h", "--help")]
  return f"; did you mean {' or '.join(close)}?" if close else ""


_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+|-inf|-nan", re.IGNORECASE)


def add_tta_flag(parser: argparse.ArgumentParser, what: str) -> None:
  """Adds ``--tta-rotations DEGREES`` (parsed by ``config.rotation_views``) to ``parser``;
  ``what`` begins its help (evaluate, predict, benchmarks/ensembles.py)."""
  parser.add_argument(
    "--tta-rotations",
    default=None,
    metavar="DEGREES",
    help=f"{what} the mean of the model's last-step log-probabilities over the digit and"
    " its copies turned by +- each of these degrees, e.g. 3 or 3,6 (one read per view;"
    " for models trained with --max-rotation: pretrained:pixel 99.02%% alone, 99.14%% with"
    " 6 on valid)",
  )


def build_parser() -> argparse.ArgumentParser:
  """The ``pixelrnn-jax`` parser with every command and flag."""
  from pixelrnn_jax import __version__  # noqa: PLC0415

  parser = OneLineParser(
    prog="pixelrnn-jax", description="Sequential MNIST with a GRU that reads one pixel at a time."
  )
  parser.add_argument("--version", action="version", version=f"pixelrnn-jax {__version__}")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  # -v also after the subcommand; SUPPRESS keeps the top-level value when absent.
  verbose = argparse.ArgumentParser(add_help=False)
  verbose.add_argument(
    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
  )
  commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
  parser.commands = commands.choices

  def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, parents=[verbose], **kwargs)

  train = add_command("train", help="train (or resume) a run in --workdir")
  add_train_flags(train)

  evaluate = add_command("evaluate", help="score a checkpoint on a split")
  evaluate.add_argument(
    "--checkpoint",
    required=True,
    help="pretrained:NAME (shipped weights: pixel, anytime, permuted), a run"
    " directory (its best checkpoint) or a checkpoint file",
  )
  evaluate.add_argument("--split", choices=("valid", "test"), default="valid")
  evaluate.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  evaluate.add_argument(
    "--order",
    default=None,
    choices=_config().choices("order"),
    help="read the images in this order (default: the checkpoint's)",
  )
  evaluate.add_argument("--batch-size", type=int, default=1000)
  evaluate.add_argument(
    "--devices",
    type=int,
    default=1,
    help="split each batch across N devices (host CPU devices on CPU)",
  )
  evaluate.add_argument(
    "--verify-data",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="check IDX checksums (default: as trained)",
  )
  evaluate.add_argument("--json", action="store_true", help="print one JSON object")
  evaluate.add_argument(
    "--early-exit",
    default=None,
    metavar="THRESHOLDS",
    help="comma-separated confidence thresholds, e.g. 0.9,0.99: accuracy, mean pixels"
    " read and ECE for each (confidences use the card's per-step temperature, if any)",
  )
  evaluate.add_argument(
    "--raw-confidence",
    action="store_true",
    help="ignore the card's per-step temperature: confidences as trained",
  )
  add_tta_flag(evaluate, "also score the test-time augmentation by rotation:")

  predict = add_command("predict", help="classify images, optionally stopping early once confident")
  predict.add_argument(
    "--checkpoint",
    required=True,
    help="pretrained:NAME (shipped weights: pixel, anytime, permuted), a run"
    " directory (its best checkpoint) or a checkpoint file",
  )
  predict.add_argument(
    "inputs",
    nargs="+",
    metavar="IMAGE",
    help="digit images (PNG, JPEG, ...; any size, either polarity, RGBA,"
    " 16-bit) or .npy arrays, or example indices with --split",
  )
  predict.add_argument(
    "--confidence",
    type=float,
    default=None,
    metavar="P",
    help="stop reading once the top probability reaches P (default: read every pixel)."
    " When the model's card records a per-step temperature (pretrained models, exports),"
    " P is compared with the calibrated probability; without one, models are"
    " over-confident on partial digits (pretrained:pixel-v1 at P 0.99: 64.2%% valid accuracy"
    " uncalibrated, 98.40%% calibrated, reading 630 of 784 pixels; 98.80%% reading all)."
    " See --early",
  )
  predict.add_argument(
    "--early",
    action="store_true",
    help="stop at the threshold recorded in the model's card (chosen on valid digits to"
    " lose at most a quarter of a point of accuracy, the card's max_drop); see"
    " docs/results.md, 'Anytime reading'",
  )
  predict.add_argument(
    "--raw-confidence",
    action="store_true",
    help="probabilities as trained, ignoring the card's per-step temperature (the answers"
    " are the same; only how sure they are, and where --confidence stops, change)",
  )
  predict.add_argument(
    "--split",
    choices=("valid", "test"),
    default=None,
    help="read IMAGE arguments as indices into this MNIST split",
  )
  predict.add_argument(
    "--data-dir", default=None, help="directory of MNIST IDX files (read with --split)"
  )
  predict.add_argument("--json", action="store_true", help="one JSON object per input")
  predict.add_argument(
    "--invert",
    choices=("auto", "yes", "no"),
    default="auto",
    help="make the digit light on dark: auto (when the border is light), yes or no (default auto)",
  )
  predict.add_argument(
    "--show",
    default=None,
    metavar="DIR",
    help="write DIR/<input>_seen.png: each input beside the 28x28 the model read",
  )
  add_tta_flag(
    predict,
    "answer by test-time augmentation (reads every pixel of every view; not with"
    " --early or --confidence; probabilities uncalibrated):",
  )

  plot = add_command("plot", help="write PNG pictures of a training run")
  plot.add_argument("run_dir", nargs="?", default=None, help="a training run directory")
  plot.add_argument(
    "--early-exit",
    action="append",
    default=None,
    metavar="SOURCE",
    help="instead of a run's pictures, draw the accuracy / pixels-read trade-off of these"
    " models (repeat the flag; pretrained:NAME, exported files, runs) into --out",
  )
  plot.add_argument("--data-dir", default=None, help="directory of MNIST IDX files")
  plot.add_argument(
    "--examples",
    type=int,
    default=500,
    help="valid images used for the per-pixel, early-exit and gradient pictures",
  )
  plot.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")

  export = add_command("export", help="write a run's best weights and their card to a file")
  export.add_argument("run", help="a run directory (its best checkpoint) or a step directory")
  export.add_argument(
    "--out",
    required=True,
    metavar="FILE.msgpack",
    help="the weights file to write; its card goes beside it as FILE.json",
  )
  export.add_argument(
    "--data-dir", default=None, help="directory of MNIST IDX files for the valid evaluation"
  )
  export.add_argument(
    "--notes", default=None, help="free text for the card (default: the source card's)"
  )
  export.add_argument(
    "--wall-time-s",
    type=float,
    default=None,
    metavar="SECONDS",
    help="the run's training time for the card: the sum of the seconds on the 'done:' lines"
    " of each of its train commands (default: the source card's, else none)",
  )
  export.add_argument(
    "--early-exit",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="fit a per-step temperature and record the early-exit threshold (default: yes)",
  )
  export.add_argument(
    "--max-drop",
    type=float,
    default=None,
    metavar="POINTS",
    help="accuracy points the recorded threshold may lose against reading every pixel,"
    " on the valid images it is chosen on (default 0.25)",
  )

  serve = add_command(
    "serve",
    help="a web page to draw a digit and watch the GRU read it, and a JSON API"
    " (pip install -e '.[serve]')",
  )
  serve.add_argument(
    "--checkpoint",
    action="append",
    default=None,
    metavar="SOURCE",
    help="a model to serve, named by its source (pretrained:NAME as NAME); repeat for"
    " several, the first is the default (default: pretrained:pixel, pretrained:anytime and"
    " pretrained:permuted)",
  )
  serve.add_argument(
    "--host",
    default="127.0.0.1",
    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)",
  )
  serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
  serve.add_argument(
    "--max-upload-mb",
    type=float,
    default=10.0,
    help="larger request bodies are refused with 413 before they are read (default 10)",
  )
  serve.add_argument(
    "--workers",
    type=int,
    default=_cores(),
    help=f"requests decoded and answered at once, each in a worker process with its own"
    f" copy of the models (default: the cores, {_cores()} here)",
  )
  serve.add_argument(
    "--max-batch",
    type=int,
    default=16,
    help="requests that wait while every worker is busy are answered together, up to this"
    " many in one pass of the model (default 16; 1: one at a time)",
  )
  serve.add_argument(
    "--threads",
    action="store_true",
    help="use worker threads of the server's process instead (less memory, faster start;"
    " fewer requests/s: decoding holds Python's GIL)",
  )
  return parser


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
      sys.modules["pixelrnn_jax.training.peers"].announce_failure(message)
    os._exit(128 + signum)

  return handler


def setup_logging(verbose: bool) -> None:
  logging.basicConfig(
    level=logging.DEBUG if verbose else logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
  )
  for noisy in ("jax", "absl"):  # -v is for this package's messages, not JAX's compiler
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
  """The ``pixelrnn-jax`` command; returns its exit code.

  Exit codes: 0 done; 1 the run failed (non-finite loss) or some predict
  inputs were unusable; 2 bad flags, data or files (one line on stderr);
  130 / 143 stopped by SIGINT / SIGTERM (one line; training saves first).
  """
  argv = sys.argv[1:] if argv is None else argv
  if not argv:  # a first try: the commands and what they do, not "required: command"
    build_parser().print_help()
    return 0
  named = [word for word in argv if word in COMMANDS]
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
    try:
      from pixelrnn_jax import commands  # noqa: PLC0415 (after Ctrl-C handling is set up)

      if args.command == "train":
        config = config_from_flags(args)  # bad values fail here, before any work
        return commands.train(args, config)
      return getattr(commands, args.command)(args)
    except BrokenPipeError:  # stdout's reader went away (| head): stop quietly, as cat does
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
      return 128 + signal.SIGPIPE
    except (ValueError, OSError, ImportError) as error:  # bad flags, data, files, paths
      if "RESOURCE_EXHAUSTED" in str(error):  # XLA's allocation failure can come as these too
        return _out_of_memory(command, error)
      if type(error).__name__ == "CheckpointWriteError":  # see checkpoints.CheckpointWriteError
        time.sleep(0.5)  # tensorstore's late tracebacks first, so the one line stays whole and last
        code = _fail(command, _one_line(error), 2)
        sys.stderr.flush()
        os._exit(code)
      return _fail(command, _one_line(error), 2)
    except Exception as error:
      if _is_run_failure(error):  # a NaN loss, a lost peer: the run failed, not the input
        return _fail(command, str(error), 1)
      if "RESOURCE_EXHAUSTED" in str(error):  # XLA could not allocate: the sizes asked for
        return _out_of_memory(command, error)
      if not _in_multi_process_run():
        raise  # a bug: its traceback helps more than a line
      return _fail(command, f"{type(error).__name__}: {_one_line(error)}", 1)
  except KeyboardInterrupt:  # a second Ctrl-C during training
    return _fail(command, "interrupted (SIGINT)", 130, prefix="")
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def run(argv: list[str] | None = None) -> typing.NoReturn:
  """The ``pixelrnn-jax`` program: :func:`main`, then exit with its code.

  Once the command has returned, what it made is written, and SIGINT / SIGTERM
  are ignored: as Python finalizes, it puts their handlers back to the default
  action, and a late second Ctrl-C would kill the finished process (exit -2,
  no line) instead of letting it end with its own code. A process of a
  multi-process run still answers them while it waits for its peers at exit
  (``training/peers.py``).
  """
  try:
    code = main(argv)
  finally:
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, signal.SIG_IGN)
  sys.exit(code)


def _out_of_memory(command: str, error: Exception) -> int:
  """XLA could not allocate what the flags ask for: one line naming the flags that shrink it
  (exit 1, whatever exception type carried it)."""
  said = _one_line(error).split("RESOURCE_EXHAUSTED: ", 1)[-1].rstrip(".")
  return _fail(command, f"{said}: a smaller --units, --batch-size or --eval-batch-size fits", 1)


def _in_multi_process_run() -> bool:
  """Whether this process has joined a multi-process run. Safe in a signal handler that
  interrupts an import: it reads a flag and imports nothing."""
  peers = sys.modules.get("pixelrnn_jax.training.peers")
  return peers is not None and peers.joined()


def _is_run_failure(error: Exception) -> bool:
  """A run that failed (NaN loss, a lost peer), told apart without importing the trainer."""
  loop, peers = (sys.modules.get(f"pixelrnn_jax.training.{name}") for name in ("loop", "peers"))
  return (loop is not None and isinstance(error, loop.NonFiniteLossError)) or (
    peers is not None and isinstance(error, peers.PeerError)
  )


def _fail(command: str, message: str, code: int, *, prefix: str = "error: ") -> int:
  """Prints the one line of a failed command; a process of a multi-process run then tells
  the others and ends at once (a normal exit would wait at JAX's shutdown barrier for
  peers that may be gone, then abort)."""
  print(f"{command}: {prefix}{message}", file=sys.stderr, flush=True)
  if _in_multi_process_run():
    peers = sys.modules["pixelrnn_jax.training.peers"]
    peers.announce_failure(message)
    peers.leave(code)
  return code


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


if __name__ == "__main__":
  run()
