"""The one configuration object of a training run.

Defaults are the original notebook's recipe: GRU-64 (TF1 cell, tanh), Adam
1e-3, batch 512, 10000 steps, pixel order, cross-entropy on the last step.

A leaf: it imports nothing of the package. Each field carries its metadata
(:func:`knob`): the ``--help`` text (why the default), whether it may change
when a run is resumed, whether it may differ between the processes of one
run, and its allowed range; ``Literal`` types list the choices, which the CLI
turns into ``choices=``. Adding a knob is one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any
from typing import Literal

Cell = Literal["tf1", "reset_after"]
Activation = Literal["tanh", "relu", "softsign", "hard_tanh"]
GateBiasInit = Literal["constant", "chrono", "uniform"]
RecurrentInit = Literal["glorot", "orthogonal"]
Impl = Literal["fused", "scan"]
Order = Literal["pixel", "permuted", "row"]
LrSchedule = Literal["constant", "warmup_cosine", "warmup_step"]
StepWeighting = Literal["uniform", "linear"]
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max (a leaf: no numpy here)
DISTILL_TEMPERATURE = 2.0  # Hinton et al. 2015 used 1-20; 2 measured as well as 4 here


def knob(
  default: Any,
  why: str,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  resumable: bool = False,
  per_process: bool = False,
) -> Any:
  """A Config field with its metadata.

  Args:
    default: the notebook's value.
    why: why the default; the ``--help`` text.
    low, high: the allowed range of a number (None: unbounded); ``low_open`` /
      ``high_open`` exclude the bound itself.
    resumable: may change when a run is resumed (how far and how often, not
      what is computed).
    per_process: may differ between the processes of one multi-process run.
  """
  return dataclasses.field(
    default=default,
    metadata={
      "help": why,
      "low": low,
      "high": high,
      "low_open": low_open,
      "high_open": high_open,
      "resumable": resumable,
      "per_process": per_process,
    },
  )


@dataclasses.dataclass(frozen=True)
class Config:
  """A training run; every field can be set from the CLI (``--field-name``)."""

  # --- model
  num_units: int = knob(64, "GRU width; the notebook's 64 gives 13,322 weights", low=1)
  cell: Cell = knob("tf1", "tf1 (the notebook's GRUCell) or reset_after (cuDNN form)")
  activation: Activation = knob("tanh", "candidate nonlinearity; tanh as TF1's default")
  gate_bias_init: GateBiasInit = knob(
    "constant", "update-gate bias: constant 1.0 (TF1), chrono or uniform (long memory)"
  )
  recurrent_init: RecurrentInit = knob(
    "glorot", "h-rows of the kernels: glorot (TF1) or orthogonal blocks"
  )
  init_from: str | None = knob(
    None,
    "fine-tune: start from the weights of this model (a run directory, step directory,"
    " weights file or pretrained:NAME of the same --num-units, --cell, --activation,"
    " --standardize, and --order row or not) with a fresh optimiser and EMA; read once,"
    " at the start (a resume reads its checkpoint); None = random init (the notebook)",
  )
  impl: Impl = knob(
    "fused",
    "scan core: fused (hand-written backward, fast) or scan (autodiff reference)",
    resumable=True,
  )

  # --- data
  order: Order = knob("pixel", "pixel (784 x 1, the notebook), permuted (psMNIST) or row (28 x 28)")
  data_dir: str | None = knob(
    None,
    "IDX directory; None tries $PIXELRNN_JAX_MNIST_DIR, cache, downloads",
    resumable=True,
    per_process=True,
  )
  verify_data: bool = knob(
    True,
    "check IDX files against the original MNIST SHA-256; off for your own data",
    resumable=True,
    per_process=True,
  )
  standardize: bool = knob(False, "(x - mean) / std instead of [0, 1]; the notebook used [0, 1]")
  max_shift: int = knob(
    0,
    "shift each training image by up to N pixels in x and y"
    " (background-padded), before the order's permutation; 0 = off",
    low=0,
    high=13,
  )
  max_rotation: float = knob(
    0.0,
    "rotate each training image by a random angle in [-N, N] degrees about its centre"
    " (bilinear, background-filled), before shifts and the order's permutation; 0 = off",
    low=0,
    high=180,
  )
  max_scale: float = knob(
    0.0,
    "scale each training image by a random factor in [1 - N, 1 + N] about its centre,"
    " with the rotation; N in [0, 1); 0 = off",
    low=0,
    high=1,
    high_open=True,
  )
  elastic_alpha: float = knob(
    0.0,
    "elastic distortion (Simard et al. 2003): move each training image's pixels by a"
    " random field, uniform noise smoothed by a Gaussian of --elastic-sigma pixels,"
    " times N (at sigma 4: N 16 moves pixels 0.85 px RMS, Simard's 34 1.8 px); with"
    " the rotation, before shifts and the order's permutation; 0 = off",
    low=0,
    high=100,
  )
  elastic_sigma: float = knob(
    4.0,
    "smoothness of the elastic distortion's field, in pixels (0.5 to 28, the image);"
    " Simard et al.'s 4",
    low=0.5,
    high=28,
  )

  # --- optimisation
  steps: int = knob(
    10_000, "optimiser steps; the notebook ran 10000 iterations", low=1, resumable=True
  )
  batch_size: int = knob(512, "global batch, split across devices; the notebook's 512", low=1)
  learning_rate: float = knob(
    1e-3, "Adam peak learning rate; the notebook's 1e-3", low=0, low_open=True
  )
  lr_schedule: LrSchedule = knob(
    "constant", "constant (the notebook), warmup_cosine (decays to 0 at `steps`) or warmup_step"
  )
  warmup_steps: int = knob(0, "linear warm-up length for warmup_cosine and warmup_step", low=0)
  lr_drop_at: float = knob(
    0.8,
    "warmup_step: fraction of `steps` after which the lr is divided by 10",
    low=0,
    high=1,
    low_open=True,
  )
  clip_norm: float | None = knob(
    None, "global-norm gradient clipping; None = off (the notebook)", low=0, low_open=True
  )
  weight_decay: float = knob(
    0.0, "decoupled weight decay (AdamW) on every weight; 0 = plain Adam (the notebook)", low=0
  )
  sam_rho: float = knob(
    0.0,
    "sharpness-aware minimisation (SAM, Foret et al. 2021): take each step's gradient at"
    " the weights moved by this radius rho along the normalised gradient (0 to 1, e.g."
    " 0.05; Foret et al. searched 0.01-0.5; two gradients a step); 0 = off (the notebook)",
    low=0,
    high=1,
  )
  label_smoothing: float = knob(
    0.0,
    "train towards (1 - a) one-hot + a / 10 instead of the label alone (Szegedy"
    " 2016); the valid loss stays the plain cross-entropy; 0 = off (the notebook)",
    low=0,
    high=1,
    high_open=True,
  )
  distill_from: str | None = knob(
    None,
    "knowledge distillation (Hinton et al. 2015): also learn the answers of these models"
    " (comma-separated run directories, weights files or pretrained:NAMEs of this --order;"
    " their ensemble, the mean of their log-probabilities, on each training batch as the"
    " run sees it); read at every start and checked on resume; None = off (the notebook)",
  )
  distill_weight: float = knob(
    0.0,
    "weight w of the distillation term: loss = (1 - w) * cross-entropy + w * T^2 *"
    " KL(teachers || model) at --distill-temperature T; needs --distill-from, which needs"
    " it above 0; 0 = off",
    low=0,
    high=1,
  )
  distill_temperature: float = knob(
    DISTILL_TEMPERATURE,
    "softmax temperature T of the distillation term, teachers and model alike (Hinton"
    " et al. 2015); 1 = the models' own probabilities",
    low=0,
    low_open=True,
  )
  distill_rotations: str | None = knob(
    None,
    "the teachers' test-time augmentation (pixelrnn_jax/tta.py): each teacher also reads"
    " each training batch turned by +- each of these degrees (comma-separated, e.g. 3 or"
    " 3,6), and their answer is the mean over these views; needs --distill-from;"
    " None = the batch as it is",
  )
  per_step_loss: float = knob(
    0.0,
    "weight of the per-step cross-entropy (every step's answer, for anytime reading)"
    " added to the last-step loss; 0 = off (the notebook)",
    low=0,
  )
  per_step_weighting: StepWeighting = knob(
    "uniform",
    "how --per-step-loss weighs the steps: uniform (the mean over all T), or linear"
    " (step t weighs t, so the end of the image counts most)",
  )
  recurrent_dropout: float = knob(
    0.0,
    "drop probability of the candidate's units, one mask per sequence (Semeniuta"
    " 2016); 0 = off (the notebook)",
    low=0,
    high=1,
    high_open=True,
  )
  ema_decay: float | None = knob(
    None,
    "evaluate and keep as best an EMA of the weights with this decay (e.g. 0.999);"
    " None = off (the notebook)",
    low=0,
    high=1,
    low_open=True,
    high_open=True,
  )

  # --- runtime
  devices: int = knob(
    1, "devices the batch is split across (pmap), per process; CPU host devices on CPU", low=1
  )
  num_processes: int | None = knob(
    None,
    "processes of a multi-process run (jax.distributed); None = 1, or the cluster job's tasks",
    low=1,
  )
  process_id: int | None = knob(
    None,
    "this process's rank, 0 .. num_processes - 1; process 0 hosts the coordinator",
    low=0,
    resumable=True,
    per_process=True,
  )
  coordinator_address: str | None = knob(
    None,
    "HOST:PORT of process 0, reachable from every process ([v6addr]:PORT for IPv6)",
    resumable=True,
  )
  distributed_timeout: int = knob(
    300,
    "seconds to wait for every process to join, or for a silent peer",
    low=1,
    resumable=True,
    per_process=True,
  )
  seed: int = knob(0, "one seed for init, data order and dropout: same seed, same run", low=0)
  log_every: int = knob(50, "steps between metric lines in metrics.jsonl", low=1, resumable=True)
  eval_every: int = knob(
    1000, "steps between valid evaluations (best checkpoint selection)", low=1, resumable=True
  )
  checkpoint_every: int = knob(500, "steps between checkpoints", low=1, resumable=True)
  keep_checkpoints: int = knob(
    3, "newest step checkpoints kept; the best on valid is kept apart", low=1, resumable=True
  )
  eval_batch_size: int = knob(
    1000, "evaluation batch; any size, the whole split is scored exactly", low=1, resumable=True
  )

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field and the fix."""
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(self):
      _check_field(field, hints[field.name], getattr(self, field.name))
    if self.warmup_steps and self.warmup_steps >= self.steps:
      raise ValueError(
        f"warmup_steps={self.warmup_steps}: expected 0 <= warmup_steps < steps ({self.steps});"
        " a short run of a recipe needs its warm-up shortened too, e.g. --warmup-steps"
        f" {self.steps // 10}"
      )
    if self.lr_schedule == "warmup_step" and (
      round(self.lr_drop_at * self.steps) <= self.warmup_steps
    ):
      raise ValueError(
        f"lr_drop_at={self.lr_drop_at!r}: expected a fraction in (0, 1] of"
        f" steps ({self.steps}) that falls after warmup_steps"
        f" ({self.warmup_steps})"
      )
    if (self.distill_from is None) != (self.distill_weight == 0):
      raise ValueError(
        f"distill_weight={self.distill_weight!r} with distill_from={self.distill_from!r}:"
        " distillation needs both, e.g. --distill-from pretrained:pixel --distill-weight 0.5"
        " (or neither)"
      )
    if self.distill_from is not None:
      _check_teacher_list(self.distill_from)
    if self.distill_from is None and self.distill_temperature != DISTILL_TEMPERATURE:
      raise ValueError(
        f"distill_temperature={self.distill_temperature!r} with distill_from=None: the"
        " temperature is distillation's; add --distill-from and --distill-weight, or drop it"
      )
    if self.distill_rotations is not None:
      if self.distill_from is None:
        raise ValueError(
          f"distill_rotations={self.distill_rotations!r} with distill_from=None: the"
          " rotations are the teachers' views; add --distill-from and --distill-weight, or"
          " drop it"
        )
      rotation_views(self.distill_rotations, flag="--distill-rotations")
    if None not in (self.num_processes, self.process_id) and not (
      self.process_id < self.num_processes
    ):
      raise ValueError(
        f"process_id={self.process_id}: expected 0 .. num_processes - 1 ({self.num_processes - 1})"
      )
    if self.coordinator_address is not None:
      check_address(self.coordinator_address)
    shards = self.devices * (self.num_processes or 1)
    if self.batch_size % shards:
      across = (
        f"devices={self.devices} x num_processes={self.num_processes}"
        if (self.num_processes or 1) > 1
        else f"devices={self.devices}"
      )
      raise ValueError(
        f"batch_size={self.batch_size} does not divide across {across}; use a multiple of {shards}"
      )

  def replace(self, **changes: Any) -> Config:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> Config:
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f"unknown config fields {sorted(unknown)}")
    return cls(**values)


def _check_teacher_list(distill_from: str) -> None:
  """Refuses an empty list, an empty entry or a teacher named twice."""
  parts = [part.strip() for part in distill_from.split(",")]
  if not any(parts):
    raise ValueError(
      f"distill_from={distill_from!r}: expected one or more models, comma-separated,"
      " e.g. pretrained:pixel,runs/my-run"
    )
  for position, part in enumerate(parts, start=1):
    if not part:
      raise ValueError(
        f"distill_from={distill_from!r}: element {position} is empty; expected models"
        " separated by single commas, e.g. pretrained:pixel,runs/my-run"
      )
    if part in parts[: position - 1]:
      raise ValueError(
        f"distill_from={distill_from!r}: {part} is given twice; give each teacher once"
        " (a teacher named twice would only count double)"
      )


def teacher_sources(distill_from: str | None) -> list[str]:
  """The models ``Config.distill_from`` names, in order: its comma-separated entries."""
  if distill_from is None:
    return []
  return [part.strip() for part in distill_from.split(",") if part.strip()]


def _choices(kind) -> tuple | None:
  """The values of a Literal type (also inside ``X | None``), else None."""
  if typing.get_origin(kind) is Literal:
    return typing.get_args(kind)
  for part in typing.get_args(kind):
    if typing.get_origin(part) is Literal:
      return typing.get_args(part)
  return None


def base_type(kind) -> type:
  """``int`` for ``int | None``, ``str`` for a Literal of strings, and so on."""
  choices = _choices(kind)
  if choices is not None:
    return type(choices[0])
  if isinstance(kind, types.UnionType):
    return next(part for part in typing.get_args(kind) if part is not type(None))
  return kind


def choices(field_name: str) -> tuple | None:
  """The allowed values of a Literal-typed field, else None."""
  return _choices(typing.get_type_hints(Config)[field_name])


def _check_field(field: dataclasses.Field, kind, value) -> None:
  """One generic check driven by the field's type and metadata."""
  if value is None and isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind):
    return
  allowed = _choices(kind)
  if allowed is not None:
    if value not in allowed:
      raise ValueError(f"{field.name}={value!r}: expected one of {allowed}")
    return
  expected = base_type(kind)
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
    raise ValueError(
      f"{field.name}={value!r}: expected {expected.__name__}"
      + (" or None" if isinstance(kind, types.UnionType) else "")
    )
  if expected in (int, float):
    meta = field.metadata
    low, high = meta["low"], meta["high"]
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high or (expected is float and not math.isfinite(value)):
      raise ValueError(f"{field.name}={value!r}: expected {_range_text(meta, expected)}")
    if expected is float and abs(value) > FLOAT32_MAX:  # the step computes in float32
      raise ValueError(
        f"{field.name}={value!r}: beyond float32's range (|x| <= {FLOAT32_MAX:.3g}), in"
        f" which the run computes; expected {_range_text(meta, expected)} within it"
      )


def _range_text(meta, expected) -> str:
  low, high = meta["low"], meta["high"]
  if expected is int and low == 1 and high is None:
    return "a positive integer"
  kind = "an integer" if expected is int else "a number"
  if low is not None and high is not None:
    opening, closing = "(" if meta["low_open"] else "[", ")" if meta["high_open"] else "]"
    return f"{kind} in {opening}{low:g}, {high:g}{closing}"
  finite = "a finite number " if expected is float else ""  # inf passes a one-sided bound
  if low is not None:
    return f"{finite}{'>' if meta['low_open'] else '>='} {low:g}"
  return f"{finite}{'<' if meta['high_open'] else '<='} {high:g}"


def check_address(address: str) -> tuple[str, int]:
  """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port).

  Raises:
    ValueError: naming the address and the expected form; an IPv6 address
      without brackets (``::1:8476``) is ambiguous and refused.
  """
  host, _, port = address.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  elif ":" in host:
    raise ValueError(
      f"coordinator_address={address!r}: an IPv6 address needs brackets, e.g. [{host}]:{port}"
    )
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f"coordinator_address={address!r}: expected HOST:PORT of process 0,"
      " e.g. 10.0.0.1:12345, node001:12345 or [::1]:12345"
    )
  return host, int(port)


def field_help(name: str) -> str:
  return next(f.metadata["help"] for f in dataclasses.fields(Config) if f.name == name)


# Fields that may change on resume, and fields that may differ between the
# processes of one run: read off the fields' metadata.
RESUMABLE_CHANGES = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resumable"])
PER_PROCESS_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["per_process"])


def run_identity(config: Config) -> dict[str, Any]:
  """The fields every process of one run must share: all but ``PER_PROCESS_FIELDS``, as JSON."""
  return {k: v for k, v in json.loads(config.to_json()).items() if k not in PER_PROCESS_FIELDS}


# Chosen for long memory over 784 steps (see README "Results"): the update
# gate starts at chrono time scales up to the sequence length, orthogonal
# recurrent blocks, standardised pixels, clipped gradients, warm-up then
# cosine decay; random 1-pixel shifts against the overfitting measured
# without them (`--max-shift 0 --steps 10000` is the earlier version).
_TUNED = Config(
  gate_bias_init="chrono",
  recurrent_init="orthogonal",
  standardize=True,
  clip_norm=1.0,
  lr_schedule="warmup_cosine",
  learning_rate=2e-3,
  warmup_steps=300,
  steps=24_000,
  batch_size=256,
  eval_every=500,
  max_shift=1,
)


# Named starting points for `--recipe`; flags override single fields.
RECIPES = {
  # The original TF1 notebook: TF1 init, Adam 1e-3, batch 512, 10000 steps.
  "notebook": Config(),
  "tuned": _TUNED,  # see above
  # Anytime reading (pixel order): `tuned` with a 14,000-step cosine, an EMA of
  # the weights, and the per-step loss at 0.3 weighted towards the end of the
  # image, so the answer after a partial digit is already right and its
  # confidence means something (early exit; pilots in docs/results.md).
  "tuned-anytime": _TUNED.replace(
    steps=14_000, ema_decay=0.999, per_step_loss=0.3, per_step_weighting="linear"
  ),
  # psMNIST (permuted order): a higher constant learning rate with looser
  # clipping learns far faster than the cosine recipe (pilot, README
  # "Results"); one late divide-by-10 drop as in the published curves; random
  # 1-pixel shifts of the image (before the permutation) and an EMA of the
  # weights against the overfitting measured without them (docs/results.md;
  # `--max-shift 0 --ema-decay none --steps 16000` is the earlier version).
  "tuned-permuted": Config(
    order="permuted",
    gate_bias_init="chrono",
    recurrent_init="orthogonal",
    standardize=True,
    clip_norm=5.0,
    lr_schedule="warmup_step",
    learning_rate=5e-3,
    warmup_steps=100,
    lr_drop_at=0.8,
    steps=14_000,
    batch_size=256,
    eval_every=500,
    max_shift=1,
    ema_decay=0.999,
  ),
}


MAX_VIEW_DEGREES = 45.0


def number_list(text: str, flag: str, expected: str) -> list[tuple[int, str, float]]:
  """A flag's comma-separated numbers: ``(position from 1, the text, the value)`` each.

  Raises:
    ValueError: naming ``flag``, its text and the first element that is empty or
      not a number, then what is ``expected`` (e.g. "numbers like 0.9,0.99").
  """
  numbers = []
  for position, part in enumerate(text.split(","), start=1):
    try:
      numbers.append((position, part.strip(), float(part)))
    except ValueError:
      what = "is empty" if not part.strip() else f"{part.strip()!r} is not a number"
      raise ValueError(f"{flag} {text!r}: element {position} {what}; expected {expected}") from None
  return numbers


def rotation_views(text: str, *, flag: str = "--tta-rotations") -> tuple[float, ...]:
  """``"3,6"`` -> ``(0.0, -3.0, 3.0, -6.0, 6.0)``: the unturned view, then -d and +d
  for each comma-separated angle d in degrees (test-time augmentation, ``tta.py``).

  Raises:
    ValueError: naming ``flag``, its text and the first element that is empty, not
      a number, not in (0, 45], or repeated.
  """
  views = [0.0]
  for position, part, value in number_list(text, flag, "angles in degrees like 3 or 3,6"):
    if not 0 < value <= MAX_VIEW_DEGREES:
      raise ValueError(
        f"{flag} {text!r}: element {position} ({part.strip()}) must be an angle in"
        f" (0, {MAX_VIEW_DEGREES:g}] degrees; each d adds the views turned by -d and +d"
      )
    if value in views:
      raise ValueError(f"{flag} {text!r}: {part.strip()} is given twice; give each angle once")
    views += [-value, value]
  return tuple(views)
