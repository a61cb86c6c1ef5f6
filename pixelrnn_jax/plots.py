"""``pixelrnn-jax plot RUN_DIR``: PNG pictures of a run (headless, matplotlib Agg).

* ``learning_curves.png``: training loss, training and valid accuracy vs step;
* ``accuracy_per_pixel.png``: valid accuracy if the prediction were made after t pixels;
* ``early_exit.png``: accuracy against mean pixels read, per confidence threshold;
* ``gradient_norms.png``: ``||dL/dh_t||`` over t at initialisation and at each
  kept checkpoint (the vanishing gradient behind the notebook's 2.30 plateau).

``pixelrnn-jax plot --early-exit SOURCE ...`` draws instead
``early_exit_comparison.png``: the accuracy / pixels-read trade-off of several
models (a curve over confidence thresholds for each, as trained and with its
card's per-step temperature), with each card's recorded threshold marked.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import jax
import numpy as np

from pixelrnn_jax import calibration
from pixelrnn_jax import data
from pixelrnn_jax import diagnostics
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import model_io
from pixelrnn_jax import preprocessing
from pixelrnn_jax.checkpoints import CheckpointError
from pixelrnn_jax.training import run_dir as run_dir_lib
from pixelrnn_jax.training import step as step_lib

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def _pyplot():
  try:
    import matplotlib  # noqa: PLC0415 (optional extra)
  except ImportError as error:
    raise ImportError(
      "plotting needs matplotlib: pip install -e '.[plot]' in the source checkout"
      " (or pip install matplotlib)"
    ) from error
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (optional extra)

  return plt


def loss_label(run_dir: Path) -> tuple[str, float | None]:
  """What a run's logged training loss is, and its value at chance.

  The last step's cross-entropy (chance: ln 10), plus ``W x`` the per-step term
  where the run's config.json has ``per_step_loss`` W > 0 (both terms at chance
  are ln 10, the per-step weights summing to 1: ``(1 + W) ln 10``). A distilled
  run (``distill_weight`` w > 0) logs ``(1 - w) x that + w x`` the distillation
  term, whose value at chance depends on its teachers: chance is None; with
  ``distill_rotations`` the label names the teachers' views.
  """
  try:
    config = json.loads((Path(run_dir) / run_dir_lib.CONFIG).read_text())
  except (OSError, ValueError):
    config = {}
  weight = config.get("per_step_loss") or 0.0
  label, chance = "last step", float(np.log(10))
  if weight:
    weighting = config.get("per_step_weighting", "uniform")
    label = f"last step + {weight:g} x per-step, {weighting}"
    chance = float((1 + weight) * np.log(10))
  distill = config.get("distill_weight") or 0.0
  if distill:
    temperature = config.get("distill_temperature", 1.0)
    label = f"{1 - distill:g} x ({label}) + {distill:g} x T^2 KL at T={temperature:g}"
    if config.get("distill_rotations"):
      label += f", teachers over views turned by +-{config['distill_rotations']} degrees"
    chance = None
  return label, chance


SPARSE_POINTS = 30  # a curve of fewer points gets a marker on each (one point is no line)


def _style(points: list) -> str:
  return "o-" if len(points) < SPARSE_POINTS else "-"


def learning_curves(run_dir: Path, out: Path) -> Path | None:
  """Loss, accuracy and error rate against the step, from the run's metrics.jsonl;
  None (and a warning) when it records no step: nothing to draw."""
  train_lines, valid_lines = run_dir_lib.read_metrics(run_dir)
  if not train_lines and not valid_lines:
    log.warning(
      "%s: %s (a run stopped before its first log line, or a copy without it): no"
      " learning curves drawn",
      run_dir,
      f"no training or valid metrics in {run_dir_lib.METRICS}"
      if (run_dir / run_dir_lib.METRICS).exists()
      else f"no {run_dir_lib.METRICS}",
    )
    return None
  plt = _pyplot()
  fig, (loss_ax, acc_ax, err_ax) = plt.subplots(1, 3, figsize=(16, 4))
  losses = [l["loss"] for l in train_lines]
  train_style = _style(train_lines)
  loss_ax.plot([l["step"] for l in train_lines], losses, train_style, ms=4)
  objective, chance = loss_label(run_dir)
  # A run that starts far below chance (a fine-tune) would be a flat line at 0 on
  # the scale of chance: its losses get a log axis of their own instead.
  fine = bool(losses) and (chance is None or max(losses) < chance / 4)
  if fine:
    loss_ax.set_yscale("log")
  else:
    loss_ax.axhline(chance, color="grey", ls=":", label=f"{chance:.2f} (chance)")
    loss_ax.legend()
  # The objective goes in the title (wrapped): a distilled run's does not fit an axis label.
  loss_ax.set(
    xlabel="step",
    ylabel=f"training loss{' (log scale)' if fine else ''}",
    title=textwrap.fill(f"loss: {objective}", width=56),
  )
  acc_ax.plot(
    [l["step"] for l in train_lines],
    [l["accuracy"] for l in train_lines],
    train_style,
    ms=4,
    label="train (batch)",
  )
  acc_ax.plot(
    [l["step"] for l in valid_lines], [l["accuracy"] for l in valid_lines], "o-", label="valid"
  )
  acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=None if fine else (0, 1))
  acc_ax.legend()
  # Late progress (97.7% -> 98.1%) is invisible on a linear accuracy axis.
  errors = [100 * (1 - l["accuracy"]) for l in train_lines]
  err_ax.semilogy(
    [l["step"] for l in train_lines],
    np.maximum(errors, 1e-2),
    train_style,
    ms=4,
    label="train (batch)",
    alpha=0.6,
  )
  title = "error rate"
  if valid_lines:
    valid_errors = [100 * (1 - l["accuracy"]) for l in valid_lines]
    err_ax.semilogy(
      [l["step"] for l in valid_lines], np.maximum(valid_errors, 1e-2), "o-", label="valid"
    )
    best = max(valid_lines, key=lambda l: l["accuracy"])
    title = (
      f"error rate (best valid {100 * (1 - best['accuracy']):.2f}%,"
      f" i.e. {100 * best['accuracy']:.2f}% accuracy, at step {best['step']})"
    )
  err_ax.set(xlabel="step", ylabel="error (%, log scale)", title=textwrap.fill(title, width=56))
  err_ax.grid(alpha=0.3, which="both")
  err_ax.legend()
  for ax in (loss_ax, acc_ax, err_ax):  # a short run's axis would tick at step 39.5
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  fig.suptitle(run_dir.name)
  return _save(fig, out / "learning_curves.png")


def accuracy_per_pixel(curve, out: Path, title: str, unit: str = "pixels") -> Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(np.arange(1, len(curve) + 1), curve)
  ax.set(xlabel=f"{unit} read", ylabel="valid accuracy", title=title, ylim=(0, 1))
  ax.grid(alpha=0.3)
  return _save(fig, out / "accuracy_per_pixel.png")


def threshold_labels(rows: list[dict]) -> dict[tuple[float, float], str]:
  """(mean steps, accuracy) -> the label of the thresholds that land there: thresholds
  that give the same point share one label ("0.99-1"), instead of overprinting."""
  points: dict[tuple[float, float], list[float]] = {}
  for r in rows:
    points.setdefault((r["mean_steps"], r["accuracy"]), []).append(r["threshold"])
  return {
    point: f"{ts[0]:g}" if len(ts) == 1 else f"{min(ts):g}-{max(ts):g}"
    for point, ts in points.items()
  }


# Where a point's label may go, in points from it (the text's near corner): right-below
# first (under the rising curve), then right-above, left-above, left-below, further
# below, further above.
LABEL_OFFSETS = ((5, -5), (5, 5), (-5, 5), (-5, -5), (5, -15), (5, 15))


LABEL_GAP = 2.0  # pixels kept clear around each label and each marker
MARKER_RADIUS = 4.0  # pixels: a point's marker, which no label may cover


def place_labels(
  ax, labels: dict[tuple[float, float], str], fontsize: int = 8, avoid: tuple = ()
) -> list[str]:
  """Annotates each (x, y) point of ``ax`` with its label at the first of
  ``LABEL_OFFSETS`` where the text lies inside the axes, ``LABEL_GAP`` pixels
  clear of every label already placed, of every point's marker and of the
  artists in ``avoid``; a label with no such place is left out. Returns the
  labels left out."""
  from matplotlib.transforms import Bbox  # noqa: PLC0415 (matplotlib loads on first use)

  renderer = ax.figure.canvas.get_renderer()
  frame = ax.get_window_extent(renderer)
  taken = [artist.get_window_extent(renderer) for artist in avoid]
  for px, py in ax.transData.transform(list(labels)) if labels else ():
    r = MARKER_RADIUS
    taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
  left_out = []
  for (x, y), text in labels.items():
    for dx, dy in LABEL_OFFSETS:
      label = ax.annotate(
        text,
        (x, y),
        textcoords="offset points",
        xytext=(dx, dy),
        fontsize=fontsize,
        ha="left" if dx >= 0 else "right",
        va="top" if dy < 0 else "bottom",
      )
      box = label.get_window_extent(renderer)
      inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
      clear = not any(box.padded(LABEL_GAP).overlaps(other) for other in taken)
      if inside and box.y1 <= frame.y1 and clear:
        taken.append(box)
        break
      label.remove()
    else:
      left_out.append(text)
  return left_out


def early_exit_tradeoff(
  rows: list[dict], total: int, out: Path, title: str, unit: str = "pixels"
) -> Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["mean_steps"] for r in rows], [r["accuracy"] for r in rows], "o-")
  ax.set(xlabel=f"mean {unit} read (of {total})", ylabel="valid accuracy", title=title)
  fig.tight_layout()  # the axes' final place, before the labels are fitted into it
  note = ax.text(
    0.99,
    0.02,
    "at each point: the exit threshold p",
    transform=ax.transAxes,
    ha="right",
    fontsize=8,
    color="0.4",
  )
  unlabelled = place_labels(ax, threshold_labels(rows), avoid=[note])
  if unlabelled:
    named = ", ".join(unlabelled[:3]) + (
      f" and {len(unlabelled) - 3} more" if len(unlabelled) > 3 else ""
    )
    note.set_text(f"{note.get_text()} ({named} not labelled: no room)")
  ax.grid(alpha=0.3)
  return _save(fig, out / "early_exit.png")


def gradient_norms(curves: dict[str, np.ndarray], out: Path, title: str) -> Path:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, curve in curves.items():
    ax.semilogy(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-30), label=label)
  ax.set(xlabel="step t", ylabel="mean ||dL/dh_t||", title=title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, out / "gradient_norms.png")


def readable_log_ticks(ax) -> None:
  """Plain-number ticks (0.02, 0.03, 0.05; 1, 2, 5) on a log y axis that spans at most
  3 decades, where matplotlib would label one power of ten or none (``4 x 10^-2``);
  wider axes keep matplotlib's powers of ten."""
  from matplotlib import ticker  # noqa: PLC0415 (matplotlib loads on first use)

  if ax.get_yscale() != "log":
    return
  low, high = sorted(ax.get_ylim())
  if not 0 < low < high:
    return
  decades = np.log10(high / low)
  if decades > 3:
    return
  if decades <= 1:  # evenly spaced round numbers read best within one decade
    locator = ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
  else:  # 1, 2, 5 in each decade
    locator = ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=40)
  ax.yaxis.set_major_locator(locator)
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.6g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  for ax in fig.axes:
    readable_log_ticks(ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)
  return path


def plot_run(
  run_dir: str | Path,
  *,
  data_dir: str | None = None,
  examples: int = 500,
  out_dir: str | Path | None = None,
) -> list[Path]:
  """Writes every picture of a run; returns their paths.

  The valid-split pictures use the run's best checkpoint (else its newest) on
  the first ``examples`` valid images.
  """
  run_dir = Path(run_dir)
  out = Path(out_dir) if out_dir else run_dir / "plots"
  saved = model_io.read(run_dir)  # a directory that is no run fails here, before any PNG
  params, config = gru_classifier.from_saved(saved), run_dir_lib.saved_config(saved)
  written = [path for path in [learning_curves(run_dir, out)] if path is not None]
  images, labels = data.load_mnist(
    "valid", data_dir=data_dir or config.data_dir, verify=config.verify_data
  )
  images, labels = images[:examples], labels[:examples]
  result = inference.evaluate(params, images, labels, early_exit_thresholds=THRESHOLDS)
  name = f"{run_dir.name}, step {saved.step}, {len(labels)} valid images"
  total, in_dim = preprocessing.sequence_shape(config.order)
  unit = "pixels" if in_dim == 1 else "rows"
  written.append(accuracy_per_pixel(result["accuracy_per_step"], out, name, unit))
  written.append(early_exit_tradeoff(result["early_exit"], total, out, name, unit))
  x, y = images[:100], labels[:100]  # [0, 1] images: every model below reads its own order
  init_key = jax.random.split(jax.random.key(config.seed))[0]

  def initial(config):
    return step_lib.as_model(step_lib.init_params(config, init_key), config)

  curves = {"initialisation": np.asarray(diagnostics.hidden_gradient_norms(initial(config), x, y))}
  notebook_init = config.replace(gate_bias_init="constant", recurrent_init="glorot")
  if notebook_init != config:  # the contrast that explains the notebook's plateau
    curves["notebook (TF1) initialisation"] = np.asarray(
      diagnostics.hidden_gradient_norms(initial(notebook_init), x, y)
    )
  for path in model_io.step_sources(run_dir):
    try:
      ckpt_params = gru_classifier.load(path)
    except (CheckpointError, ValueError) as error:
      log.warning("skipping %s: %s", path, error)
      continue
    curves[f"step {path.name}"] = np.asarray(diagnostics.hidden_gradient_norms(ckpt_params, x, y))
  written.append(gradient_norms(curves, out, f"{run_dir.name}: gradient reaching h_t"))
  return written


def early_exit_comparison(
  sources: list[str], *, data_dir: str | None = None, examples: int = 5000, out_dir: str | Path
) -> Path:
  """``early_exit_comparison.png``: accuracy against mean pixels read for each model.

  Each source (``pretrained:NAME``, an exported file, a run) gets a dashed
  curve with its confidences as trained and, when its card records an
  early-exit rule, a solid curve with the rule's per-step temperature and a
  star at the recorded threshold; thresholds ``calibration.THRESHOLD_GRID``,
  on the first ``examples`` valid images. The accuracy axis spans from 8
  points below the least accurate model's full read to 100%.

  Raises:
    FileNotFoundError, CheckpointError: a source that cannot be read.
  """
  plt = _pyplot()
  images = labels = None
  lines = []  # (label, xs, ys, style, source index), then the stars
  stars = []
  floors = []
  for index, source in enumerate(sources):
    saved = model_io.read(source)
    params, config = gru_classifier.from_saved(saved), run_dir_lib.saved_config(saved)
    if images is None:
      images, labels = data.load_mnist(
        "valid", data_dir=data_dir or config.data_dir, verify=config.verify_data
      )
      images, labels = images[:examples], labels[:examples]
    total, in_dim = preprocessing.sequence_shape(config.order)
    logits = inference.all_logits(params, images)
    correct = logits.argmax(-1) == labels[:, None]
    read_all = 100 * correct[:, -1].mean()
    floors.append(read_all)
    rule = calibration.EarlyExit.from_card(saved.card)
    curves = [("as trained", calibration.identity(), "--")]
    if rule is not None:
      curves.append(("calibrated", rule.calibration, "-"))
    for label, fitted, style in curves:
      scaled = logits / fitted.temperatures(total)[:, None]
      top = np.asarray(jax.nn.softmax(scaled, axis=-1).max(axis=-1))
      rows = calibration.early_exit_table(top, correct, calibration.THRESHOLD_GRID)
      lines.append(
        (
          f"{source}, {label} (read all: {read_all:.2f}%)",
          [r["mean_steps"] * in_dim for r in rows],
          [100 * r["accuracy"] for r in rows],
          style,
          index,
        )
      )
      if label == "calibrated":
        (chosen,) = calibration.early_exit_table(top, correct, [rule.threshold])
        pixels, accuracy = chosen["mean_steps"] * in_dim, 100 * chosen["accuracy"]
        stars.append(
          (
            f"{source}: recorded threshold {rule.threshold:.4g} ({accuracy:.2f}%,"
            f" {pixels:.0f} pixels)",
            pixels,
            accuracy,
            index,
          )
        )
  bottom = max(0.0, min(floors) - 8)
  shown = [x for _, xs, ys, _, _ in lines for x, y in zip(xs, ys) if y >= bottom]
  fig, ax = plt.subplots(figsize=(11, 5))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for label, xs, ys, style, index in lines:
    ax.plot(xs, ys, style, color=colours[index % len(colours)], label=label)
  for label, x, y, index in stars:
    ax.plot(x, y, "*", ms=14, color=colours[index % len(colours)], label=label)
  ax.set(
    xlabel="mean pixels read (of 784)",
    ylabel="valid accuracy (%)",
    title=f"Early exit: accuracy against pixels read, first {len(labels)} valid images",
    ylim=(bottom, 100),
    xlim=(max(0, min(shown + [784]) - 20), 790),
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  return _save(fig, Path(out_dir) / "early_exit_comparison.png")
