"""Several models on the valid digits: each alone, their weight average, their ensemble.

    python benchmarks/ensembles.py --data-dir ../shared/mnist \
        --checkpoint pretrained:pixel-v1 --checkpoint pretrained:pixel \
        --checkpoint runs/ft-affine-seed1/checkpoints/2000

For valid digits 0..count-1 and every ``--checkpoint`` (anything
``--checkpoint`` takes), prints:

- each model's accuracy and loss on its own;
- the *weight average* ("model soup", Wortsman et al. 2022, "Model soups:
  averaging weights of multiple fine-tuned models improves accuracy without
  increasing inference time"): one model of the same size whose every weight
  is the mean of the models' weights (only for models of one shape, order,
  cell and activation; meaningful for fine-tunes of one start);
- the *ensemble*: the mean of the models' last-step log-probabilities
  (renormalised: a normalised geometric mean of their probabilities), which
  costs one model per member at inference;
- with ``--tta-rotations D[,D]``: the ensemble over the models *and* the digit
  turned by 0 and +-each D degrees (``pixelrnn_jax.tta``; models of one order);
- how many digits every model gets wrong, and how many at least one gets
  right (an upper bound for any selection among them); ``--missed PNG``
  draws the digits every model gets wrong, each with its label and the
  ensemble's answer.

A small model's ceiling question: if N models together reach X%, one model of
the same size is unlikely to beat X% by training longer on the same data.
"""

from __future__ import annotations

import jax
import numpy as np

from pixelrnn_jax import cli
from pixelrnn_jax import commands
from pixelrnn_jax import data
from pixelrnn_jax import gru_classifier
from pixelrnn_jax import inference
from pixelrnn_jax import plots
from pixelrnn_jax import tta
from pixelrnn_jax.training import config as config_lib


def weight_average(models: list[gru_classifier.Params]) -> gru_classifier.Params:
  """The mean of the models' weights, leaf by leaf.

  Raises:
    ValueError: the models differ in shape, cell, activation or order.
  """
  first = jax.tree.structure(models[0])
  shapes = [leaf.shape for leaf in jax.tree.leaves(models[0])]
  for model in models[1:]:
    if jax.tree.structure(model) != first or [x.shape for x in jax.tree.leaves(model)] != shapes:
      raise ValueError(
        "the models differ in cell, activation, order or width; a weight average needs"
        " models of one architecture (fine-tunes of one start)"
      )
  return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *models)


def last_step_log_probs(model: gru_classifier.Params, images: np.ndarray, batch: int = 500):
  """<float32>[N, classes]: log-softmax of the last step's logits, in batches."""
  run = jax.jit(lambda p, x: jax.nn.log_softmax(gru_classifier.apply(p, x)[:, -1]))
  return np.concatenate(
    [np.asarray(run(model, images[i : i + batch])) for i in range(0, len(images), batch)]
  )


def score(log_probs: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy and mean cross-entropy (nats) of normalised <float>[N, classes] log-probabilities."""
  return {
    "accuracy": float((log_probs.argmax(-1) == labels).mean()),
    "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
  }


def draw_missed(digits, labels, answers, indices, out: str) -> None:
  """A grid of ``digits[indices]``, each titled with its index, label and the answer."""
  plt = plots._pyplot()  # noqa: SLF001 (the package's headless matplotlib)
  columns = 10
  rows = max(1, -(-len(indices) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, i in zip(axes.ravel(), indices):
    ax.imshow(digits[i], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"#{i}: {labels[i]} (ens. {answers[i]})", fontsize=7)
  fig.suptitle(
    f"{len(indices)} valid digits every model gets wrong: #index: label (the ensemble's"
    " answer, which can be right when the models are wrong in different ways)",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  print(f"wrote {out}")


def main(argv: list[str] | None = None) -> dict:
  parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--count", type=cli.number(1), default=5000, help="valid digits 0..count-1")
  parser.add_argument(
    "--checkpoint", action="append", required=True, help="a model (repeat the flag: two or more)"
  )
  parser.add_argument("--devices", type=cli.number(1), default=1)
  parser.add_argument("--missed", default=None, metavar="PNG", help="draw the digits all miss")
  cli.add_tta_flag(parser, "also score the ensemble by")
  args = parser.parse_args(argv)
  if len(args.checkpoint) < 2:
    parser.error("--checkpoint: give two or more models")
  try:
    views = None if args.tta_rotations is None else config_lib.rotation_views(args.tta_rotations)
  except ValueError as error:
    parser.error(str(error))
  if args.missed:
    parser.check_output_file("--missed", args.missed, ".png")
  commands.use_cpu_devices(args.devices)  # host CPU devices, before JAX starts
  try:
    models = [gru_classifier.load(name) for name in args.checkpoint]
    digits, labels = data.load_mnist("valid", data_dir=args.data_dir)
  except (OSError, ValueError) as error:  # CheckpointError is a ValueError
    parser.error(str(error))
  digits, labels = digits[: args.count], labels[: args.count]
  width = max(len(name) for name in args.checkpoint)
  print(f"{len(digits)} valid digits (0..{len(digits) - 1})", flush=True)
  table = {}
  for name, model in zip(args.checkpoint, models):
    result = inference.evaluate(model, digits, labels, devices=args.devices)
    table[name] = {"accuracy": result["accuracy"], "loss": result["loss"]}
    print(f"{name:<{width}}  {result['accuracy']:.2%}  loss {result['loss']:.4f}", flush=True)
  try:
    average = weight_average(models)
  except ValueError as error:
    print(f"weight average: skipped ({error})")
  else:
    result = inference.evaluate(average, digits, labels, devices=args.devices)
    table["weight average"] = {"accuracy": result["accuracy"], "loss": result["loss"]}
    print(f"weight average: {result['accuracy']:.2%}  loss {result['loss']:.4f}", flush=True)
  log_probs = np.stack([last_step_log_probs(model, digits) for model in models])
  ensemble = np.asarray(jax.nn.log_softmax(log_probs.mean(axis=0)))  # normalised
  right = log_probs.argmax(-1) == labels  # [models, N]
  table["ensemble"] = score(ensemble, labels)
  table["all wrong"] = int((~right.any(axis=0)).sum())
  table["some right"] = float(right.any(axis=0).mean())
  print(
    f"ensemble (mean log-probability): {table['ensemble']['accuracy']:.2%}"
    f"  loss {table['ensemble']['loss']:.4f}"
  )
  print(
    f"every model wrong: {table['all wrong']} digits; at least one right: {table['some right']:.2%}"
  )
  if views is not None:
    orders = sorted({model.order for model in models})
    if len(orders) > 1:
      print(f"ensemble over turned views: skipped (models of orders {', '.join(orders)})")
    else:
      turned = np.concatenate(
        [
          np.asarray(tta.log_probs(models, digits[i : i + 1000], views, orders[0]))
          for i in range(0, len(digits), 1000)
        ]
      )
      name = f"ensemble over views {', '.join(f'{v:+g}' for v in views)}"
      result = table["ensemble over views"] = score(turned, labels)
      print(f"{name}: {result['accuracy']:.2%}  loss {result['loss']:.4f}", flush=True)
  if args.missed:
    missed = np.flatnonzero(~right.any(axis=0))
    draw_missed(digits, labels, ensemble.argmax(-1), missed, args.missed)
  return table


if __name__ == "__main__":
  main()
