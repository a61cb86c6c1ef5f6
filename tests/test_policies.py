"""Policies a planted bug could change unnoticed: which fields every process must
share, gradient clipping inside the optimiser, and which checkpoints are kept."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pixelrnn_jax import checkpoints
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import step as step_lib

# The only fields that may differ between the processes of one run: where this
# process finds its data, how it checks it, how long it waits, and its rank.
PER_PROCESS = {"process_id", "data_dir", "verify_data", "distributed_timeout"}


def _another_value(field: dataclasses.Field, value):
  """A different valid value for ``field``."""
  choices = config_lib.choices(field.name)
  if choices:
    return next(c for c in choices if c != value)
  if isinstance(value, bool):
    return not value
  if field.name == "coordinator_address":
    return "10.0.0.9:1234"
  if field.name == "init_from":
    return "pretrained:pixel"
  if field.name == "distill_from":
    return "pretrained:pixel-v1"
  if field.name == "distill_rotations":
    return "3"
  if field.name in ("num_processes", "devices", "batch_size"):
    return 4 if field.name != "batch_size" else 1024
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value / 2 if value else 0.5
  if value is None:  # optional numbers: clip_norm, ema_decay
    return 0.5
  return str(value) + "x"


def test_exactly_the_per_process_fields_may_differ_between_processes():
  assert set(config_lib.PER_PROCESS_FIELDS) == PER_PROCESS


@pytest.mark.parametrize(
  "field",
  [f for f in dataclasses.fields(config_lib.Config) if f.name not in PER_PROCESS],
  ids=lambda f: f.name,
)
def test_every_run_defining_field_is_compared_across_processes(field):
  base = config_lib.Config(
    warmup_steps=0, num_processes=2, process_id=0, coordinator_address="10.0.0.1:1234"
  )
  if field.name.startswith("distill_"):  # its fields come together
    base = base.replace(distill_from="pretrained:pixel", distill_weight=0.5)
  changed = base.replace(**{field.name: _another_value(field, getattr(base, field.name))})
  assert config_lib.run_identity(changed) != config_lib.run_identity(base), field.name


def test_per_process_fields_do_not_break_the_identity():
  base = config_lib.Config(num_processes=2, process_id=0, coordinator_address="h:1")
  other = base.replace(
    process_id=1, data_dir="/elsewhere", verify_data=False, distributed_timeout=9
  )
  assert config_lib.run_identity(other) == config_lib.run_identity(base)


def _adam_numpy(grads, lr, clip=None, b1=0.9, b2=0.999, eps=1e-8):
  """Adam (Kingma & Ba 2015, Alg. 1) after global-norm clipping, in NumPy: the updates."""
  m = v = 0.0
  updates = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if clip is not None:
      g = g * min(1.0, clip / np.linalg.norm(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return updates


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_global_norm_clipping_happens_before_adam(clip_norm):
  """Two gradients of different size: Adam alone ignores a common scale, but not a
  change of scale between steps, so the second update shows whether they were clipped."""
  config = config_lib.Config(learning_rate=0.1, clip_norm=clip_norm)
  optimizer = step_lib.make_optimizer(config)
  params = {"w": jnp.zeros(3)}
  state = optimizer.init(params)
  grads = [np.array([3.0, -4.0, 0.0]), np.array([0.03, 0.2, -0.1])]  # norms 5 and 0.23
  expected = _adam_numpy(grads, 0.1, clip_norm)
  for g, want in zip(grads, expected):
    updates, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
    np.testing.assert_allclose(updates["w"], want, rtol=2e-5, atol=1e-7)
  clipped, plain = _adam_numpy(grads, 0.1, 1.0)[1], _adam_numpy(grads, 0.1, None)[1]
  assert not np.allclose(clipped, plain, rtol=1e-3)  # the two cases differ at step 2


def test_keep_best_retention_with_chosen_metrics(tmp_path):
  """The newest ``keep`` steps and the best on valid are kept; among equal accuracies
  the earliest step is the best."""
  manager = checkpoints.RunCheckpoints(tmp_path, keep=2)
  accuracies = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.9, 5: 0.6, 6: None, 7: 0.8}
  state = {"w": np.zeros(2, np.float32)}
  for step, accuracy in accuracies.items():
    manager.save(step, state, {"step": step}, valid_accuracy=accuracy)
  assert manager.steps() == [2, 6, 7]
  assert manager.best_step() == 2
  manager.close()
  # A later, better step takes over; the old best goes once it is not among the newest.
  manager = checkpoints.RunCheckpoints(tmp_path, keep=2)
  manager.save(8, state, {"step": 8}, valid_accuracy=0.95)
  manager.save(9, state, {"step": 9}, valid_accuracy=0.1)
  assert manager.best_step() == 8
  assert manager.steps() == [8, 9]
  manager.close()
