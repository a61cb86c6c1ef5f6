"""Every recipe option sets what it claims."""

import dataclasses
import typing

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import gru_classifier
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import step as step_lib


def test_chrono_update_gate_bias():
  params = gru_classifier.init(
    jax.random.key(0), num_units=512, gate_bias_init="chrono", max_steps=784
  )
  reset, update = np.asarray(params.gates.bias[:512]), np.asarray(params.gates.bias[512:])
  np.testing.assert_array_equal(reset, 1.0)
  # log U[1, 783]: exp(b) uniform on [1, 783].
  assert update.min() >= 0.0 and update.max() <= np.log(783) + 1e-5
  scales = np.exp(update)
  np.testing.assert_allclose(scales.mean(), 392, rtol=0.08)
  assert abs(np.median(update) - np.log(392)) < 0.2


def test_uniform_update_gate_bias():
  params = gru_classifier.init(
    jax.random.key(0), num_units=512, gate_bias_init="uniform", max_steps=100
  )
  update = np.asarray(params.gates.bias[512:], np.float64)
  gate = 1 / (1 + np.exp(-update))  # sigmoid(b) ~ U[1/100, 99/100]
  assert gate.min() >= 0.01 - 1e-6 and gate.max() <= 0.99 + 1e-6
  np.testing.assert_allclose(gate.mean(), 0.5, atol=0.04)


def test_orthogonal_recurrent_blocks():
  units = 16
  params = gru_classifier.init(
    jax.random.key(0), num_units=units, in_dim=3, recurrent_init="orthogonal"
  )
  glorot = gru_classifier.init(jax.random.key(0), num_units=units, in_dim=3)
  blocks = [
    params.gates.kernel[3:, :units],
    params.gates.kernel[3:, units:],
    params.candidate.kernel[3:],
  ]
  for block in blocks:
    np.testing.assert_allclose(block.T @ block, np.eye(units), atol=1e-5)
  # The input rows keep the Glorot draw.
  np.testing.assert_array_equal(params.gates.kernel[:3], glorot.gates.kernel[:3])


def test_defaults_stay_tf1():
  params = gru_classifier.init(jax.random.key(0))
  np.testing.assert_array_equal(params.gates.bias, 1.0)


def test_config_passes_options_and_sequence_length():
  config = config_lib.Config(order="row", gate_bias_init="chrono", num_units=256)
  params = step_lib.init_params(config, jax.random.key(0))
  assert params.gates.bias[256:].max() <= np.log(27) + 1e-5  # row order: T = 28


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(gate_bias_init="zeros"), "gate_bias_init='zeros'"),
    (dict(recurrent_init="identity"), "recurrent_init='identity'"),
    (dict(weight_decay=-1e-4), r"weight_decay=-0.0001: expected a finite number >= 0"),
    (dict(weight_decay=float("inf")), r"weight_decay=inf: expected a finite number >= 0"),
    (dict(elastic_sigma=1e6), r"elastic_sigma=1000000.0: expected a number in \[0.5, 28\]"),
    (dict(elastic_alpha=1e9), r"elastic_alpha=1000000000.0: expected a number in \[0, 100\]"),
    (dict(max_shift=14), r"max_shift=14: expected an integer in \[0, 13\]"),
    (dict(max_shift=-1), r"max_shift=-1"),
    (dict(seed=-1), r"seed=-1: expected >= 0"),
    (dict(sam_rho=2.0), r"sam_rho=2.0: expected a number in \[0, 1\]"),
    (dict(learning_rate=1e300), r"learning_rate=1e\+300: beyond float32's range"),
    (dict(per_step_weighting="quadratic"), r"per_step_weighting='quadratic'"),
  ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    config_lib.Config(**kwargs)


FLOAT_FIELDS = [
  field.name
  for field in dataclasses.fields(config_lib.Config)
  if config_lib.base_type(typing.get_type_hints(config_lib.Config)[field.name]) is float
]


@settings(max_examples=60, deadline=None)
@given(
  name=st.sampled_from(FLOAT_FIELDS),
  value=st.floats(min_value=float(np.finfo(np.float32).max), exclude_min=True),
  sign=st.sampled_from([1.0, -1.0]),
)
def test_every_float_field_refuses_what_float32_cannot_hold(name, value, sign):
  """A float knob is applied in float32 (--lr 1e300 overflowed to a NaN step): beyond
  float32's range it is refused by name, whatever the field's own bounds."""
  with pytest.raises(ValueError, match=rf"^{name}="):
    config_lib.Config(**{name: sign * value})


def test_recipes_are_valid_and_the_notebook_one_is_the_default():
  assert config_lib.RECIPES["notebook"] == config_lib.Config()
  tuned = config_lib.RECIPES["tuned"]
  assert (tuned.gate_bias_init, tuned.recurrent_init, tuned.clip_norm, tuned.max_shift) == (
    "chrono",
    "orthogonal",
    1.0,
    1,
  )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_weight_decay_shrinks_every_weight_by_lr_times_decay(weight_decay):
  # With a zero gradient Adam moves nothing, so the update is the decay alone:
  # AdamW's p <- p - lr * wd * p (Loshchilov & Hutter), on every leaf.
  config = config_lib.Config(learning_rate=1e-2, weight_decay=weight_decay, num_units=4)
  params = step_lib.init_params(config, jax.random.key(0))
  optimizer = step_lib.make_optimizer(config)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    np.testing.assert_allclose(
      update, -1e-2 * weight_decay * np.asarray(param), rtol=1e-6, atol=1e-12
    )


def test_warmup_step_schedule_warms_up_holds_then_divides_by_ten():
  config = config_lib.Config(
    lr_schedule="warmup_step", learning_rate=4e-3, warmup_steps=10, lr_drop_at=0.75, steps=100
  )
  schedule = step_lib.make_schedule(config)
  lr = np.array([float(schedule(t)) for t in range(101)])
  np.testing.assert_allclose(lr[:11], 4e-3 * np.arange(11) / 10, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(lr[10:75], 4e-3, rtol=1e-6)
  np.testing.assert_allclose(lr[75:], 4e-4, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(lr_drop_at=0.0), r"lr_drop_at=0.0: expected a number in \(0, 1\]"),
    (dict(lr_drop_at=1.5), r"lr_drop_at=1.5"),
    (
      dict(lr_schedule="warmup_step", warmup_steps=90, lr_drop_at=0.5, steps=100),
      r"falls after warmup_steps \(90\)",
    ),
  ],
)
def test_bad_step_schedules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    config_lib.Config(**kwargs)


def test_the_permuted_recipe_sets_what_it_claims():
  recipe = config_lib.RECIPES["tuned-permuted"]
  expected = dict(
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
    max_shift=1,
    ema_decay=0.999,
    recurrent_dropout=0.0,
    weight_decay=0.0,
    num_units=64,
    cell="tf1",
  )
  assert {name: getattr(recipe, name) for name in expected} == expected
  lr = step_lib.make_schedule(recipe)
  assert float(lr(11199)) == pytest.approx(5e-3) and float(lr(11200)) == pytest.approx(5e-4)
  # What the fields set reaches the model and the optimiser.
  params = step_lib.init_params(recipe, jax.random.key(0))
  assert params.gates.kernel.shape == (1 + 64, 128)  # one permuted pixel per step
  assert gru_classifier.count_params(params) == 13_322


def test_the_anytime_recipe_is_tuned_with_ema_and_the_end_weighted_per_step_loss():
  tuned, anytime = config_lib.RECIPES["tuned"], config_lib.RECIPES["tuned-anytime"]
  changed = {
    name: getattr(anytime, name)
    for name in config_lib.Config.__dataclass_fields__
    if getattr(anytime, name) != getattr(tuned, name)
  }
  assert changed == {
    "steps": 14_000,
    "ema_decay": 0.999,
    "per_step_loss": 0.3,
    "per_step_weighting": "linear",
  }
