"""Knowledge distillation (``Config.distill_from``): the soft-target term against its
definition (Hinton et al. 2015) in NumPy, the teachers' ensemble against the models
themselves, and the runs: what they record, resume, and refuse."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from pixelrnn_jax import gru_classifier
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import run_dir
from pixelrnn_jax.training import step as step_lib
from pixelrnn_jax.training import teachers as teachers_lib
from tests import helpers
from tests.helpers import SMALL


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_distillation(student, teacher, t):
  """Hinton et al. 2015: T^2 KL(p || q), p = softmax(teacher / T), q = softmax(student / T)."""
  log_p, log_q = _log_softmax(teacher / t), _log_softmax(student / t)
  return t**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()


@settings(max_examples=30)
@given(
  seed=st.integers(0, 2**16),
  temperature=st.floats(0.25, 20.0),
  scale=st.floats(0.1, 30.0),
  shift=st.floats(-50.0, 50.0),
)
def test_the_distillation_term_is_t_squared_times_the_kl_of_the_softened_answers(
  seed, temperature, scale, shift
):
  rng = np.random.default_rng(seed)
  logits = scale * rng.standard_normal((6, 3, 10))
  teacher = scale * rng.standard_normal((6, 10))
  want = _numpy_distillation(logits[:, -1], teacher, temperature)
  got = gru_classifier.distillation_loss(
    jnp.asarray(logits), jnp.asarray(teacher + shift), temperature=temperature
  )  # a constant per row (log-probabilities instead of logits) changes nothing
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)
  # Its gradient is Hinton's (section 2.1): T (q - p) per example, here / batch.
  grad = jax.grad(
    lambda z: gru_classifier.distillation_loss(z, jnp.asarray(teacher), temperature=temperature)
  )(jnp.asarray(logits, jnp.float32))
  q, p = (
    np.exp(_log_softmax(logits[:, -1] / temperature)),
    np.exp(_log_softmax(teacher / temperature)),
  )
  np.testing.assert_allclose(grad[:, -1], temperature * (q - p) / 6, atol=2e-6)
  np.testing.assert_array_equal(grad[:, :-1], 0.0)  # only the last step's answer is taught


def test_the_distillation_term_is_zero_at_the_teachers_answer_and_refuses_bad_shapes():
  teacher = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10)), jnp.float32)
  logits = jnp.broadcast_to(teacher[:, None] + 3.0, (4, 2, 10))
  assert float(gru_classifier.distillation_loss(logits, teacher, temperature=2.0)) == pytest.approx(
    0.0, abs=1e-6
  )
  with pytest.raises(ValueError, match=r"teacher_logits have shape \(4, 9\).*expected"):
    gru_classifier.distillation_loss(logits, teacher[:, :9])
  with pytest.raises(ValueError, match="temperature=0"):
    gru_classifier.distillation_loss(logits, teacher, temperature=0)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_loss_mixes_the_cross_entropy_and_the_distillation_term(weight):
  config = config_lib.Config(**{**SMALL, "devices": 1})
  params = step_lib.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((5, 28, 28), dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, 10, 5))
  teacher = jnp.asarray(rng.standard_normal((5, 10)), jnp.float32)
  loss, logits = step_lib.loss_fn(
    params, x, labels, teacher_logits=teacher, distill_weight=weight, distill_temperature=3.0
  )
  z = np.asarray(logits[:, -1], np.float64)
  ce = -_log_softmax(z)[np.arange(5), np.asarray(labels)].mean()
  soft = _numpy_distillation(z, np.asarray(teacher, np.float64), 3.0)
  np.testing.assert_allclose(float(loss), (1 - weight) * ce + weight * soft, rtol=1e-5)


# ---------------------------------------------------------------- the teachers


@pytest.fixture
def teacher_run(tmp_path, toy_data):
  """A small trained run: the teacher."""
  workdir = tmp_path / "teacher"
  loop.train_and_evaluate(config_lib.Config(**{**SMALL, "seed": 5}), workdir, progress=False)
  return workdir


def test_the_ensemble_is_the_mean_of_the_teachers_log_probabilities_on_the_runs_inputs(
  teacher_run, tmp_path
):
  other = tmp_path / "other"
  loop.train_and_evaluate(config_lib.Config(**{**SMALL, "seed": 6}), other, progress=False)
  images = np.random.default_rng(2).random((7, 28, 28), dtype=np.float32)
  for standardize in (False, True):
    config = config_lib.Config(
      **{
        **SMALL,
        "standardize": standardize,
        "distill_from": f"{teacher_run},{other}",
        "distill_weight": 0.5,
      }
    )
    teachers = teachers_lib.read(config)
    x = preprocessing.to_sequences(images, "row")
    if standardize:  # the run's batches are standardised; the teachers read [0, 1] images
      x = preprocessing.standardize(x)
    got = np.asarray(teachers.ensemble_logits(jnp.asarray(x)))
    answers = [
      _log_softmax(np.asarray(gru_classifier.apply(gru_classifier.load(s), images)[:, -1]))
      for s in (teacher_run, other)
    ]
    np.testing.assert_allclose(got, np.mean(answers, axis=0), atol=2e-5)
  assert [r["step"] for r in teachers.records] == [
    helpers.load_model(s)[2]["step"] for s in (teacher_run, other)
  ]


def test_a_teacher_that_is_the_model_itself_teaches_nothing(teacher_run):
  """At weight 1, a run whose teacher is its own starting model has loss 0 and gradient 0."""
  config = config_lib.Config(
    **{
      **SMALL,
      "devices": 1,
      "init_from": str(teacher_run),
      "distill_from": str(teacher_run),
      "distill_weight": 1.0,
    }
  )
  optimizer = step_lib.make_optimizer(config)
  state = run_dir.warm_start(
    config, step_lib.init_train_state(config, jax.random.key(0), optimizer), optimizer
  )[0]
  x = np.random.default_rng(3).random((1, 8, 28, 28), dtype=np.float32)
  labels = np.zeros((1, 8), np.int32)
  train_step = step_lib.make_train_step(
    optimizer, teachers=teachers_lib.read(config), distill_weight=1.0, distill_temperature=2.0
  )
  _, metrics = train_step(step_lib.replicate(state, 1), x, labels)
  assert float(metrics["loss"][0]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics["grad_norm"][0]) < 1e-5


@pytest.mark.parametrize(
  ("changes", "match"),
  [
    ({"distill_weight": 0.5}, "distillation needs both"),
    ({"distill_from": "pretrained:pixel"}, "distillation needs both"),
    ({"distill_from": " , ", "distill_weight": 0.5}, "expected one or more models"),
    ({"distill_from": "pretrained:pixel", "distill_weight": 1.5}, r"distill_weight=1.5"),
    ({"distill_temperature": 0.0}, "distill_temperature=0.0"),
    ({"distill_temperature": 4.0}, "with distill_from=None: the temperature is distillation's"),
    (
      {"distill_from": "pretrained:pixel,,pretrained:anytime", "distill_weight": 0.5},
      "element 2 is empty",
    ),
    (
      {"distill_from": "pretrained:pixel, pretrained:pixel", "distill_weight": 0.5},
      "pretrained:pixel is given twice",
    ),
  ],
)
def test_a_half_given_or_out_of_range_distillation_is_refused_naming_the_fix(changes, match):
  with pytest.raises(ValueError, match=match):
    config_lib.Config(**{**SMALL, **changes})


def test_a_teacher_of_another_order_or_a_missing_one_is_refused_before_the_data(
  tmp_path, monkeypatch
):
  def no_data(config, split):
    raise AssertionError("the data were read")

  monkeypatch.setattr(loop, "_load_split", no_data)

  def config(distill_from):
    return config_lib.Config(
      **{**SMALL, "order": "pixel", "distill_from": distill_from, "distill_weight": 0.5}
    )

  with pytest.raises(
    ValueError, match="--distill-from pretrained:permuted: a model of --order permuted"
  ):
    loop.train_and_evaluate(config("pretrained:permuted"), tmp_path / "a")
  with pytest.raises(FileNotFoundError, match="--distill-from .*nowhere: .*no such weights file"):
    loop.train_and_evaluate(config(f"pretrained:pixel,{tmp_path}/nowhere"), tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- runs


def test_a_distilled_run_records_its_teachers_resumes_bit_exact_and_refuses_changed_ones(
  teacher_run, tmp_path, monkeypatch, caplog
):
  from pixelrnn_jax.training import export as export_lib

  monkeypatch.setattr(
    export_lib.data, "load_mnist", lambda split, **kwargs: helpers.synthetic_digits(40, 1)
  )
  weights = tmp_path / "teacher.msgpack"
  export_lib.export(teacher_run, weights, early_exit=False)
  config = config_lib.Config(
    **{
      **SMALL,
      "steps": 8,
      "devices": 2,
      "max_shift": 1,
      "distill_from": str(weights),
      "distill_weight": 0.7,
      "distill_temperature": 4.0,
    }
  )
  straight = loop.train_and_evaluate(config, tmp_path / "straight", progress=False)
  loop.train_and_evaluate(config.replace(steps=4), tmp_path / "resumed", progress=False)
  with caplog.at_level(logging.INFO, logger="pixelrnn_jax.training.loop"):
    resumed = loop.train_and_evaluate(config, tmp_path / "resumed", progress=False)
  assert f"distilling from {weights} (step" in caplog.text  # a resume says so too
  assert straight["valid"] == resumed["valid"]
  records = run_dir.metrics_records(tmp_path / "resumed")
  (record,) = [r for r in records if r.get("event") == "distill_from"]
  saved = helpers.load_model(weights)[2]
  assert record["teachers"][0]["source"] == str(weights)
  assert record["teachers"][0]["step"] == saved["step"]
  # The student's card names its teachers.
  card = export_lib.export(tmp_path / "straight", tmp_path / "student.msgpack", early_exit=False)
  assert card["source"]["distill_from"] == record["teachers"]
  # The same relative teacher path given from another directory names another file:
  # the resume is refused as a changed --distill-from (both paths shown), not a missing file.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  with pytest.raises(ValueError, match="different config .*--distill-from: .*elsewhere"):
    loop.train_and_evaluate(
      config.replace(steps=10, distill_from="teacher.msgpack"),
      tmp_path / "resumed",
      progress=False,
    )
  monkeypatch.chdir(tmp_path)
  # The teacher's weights change under the run: its resume is refused, nothing lost.
  other = tmp_path / "other"
  loop.train_and_evaluate(config_lib.Config(**{**SMALL, "seed": 9}), other, progress=False)
  export_lib.export(other, tmp_path / "other.msgpack", early_exit=False)
  shutil.copy(tmp_path / "other.msgpack", weights)
  shutil.copy(tmp_path / "other.json", weights.with_suffix(".json"))
  before = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
  with pytest.raises(ValueError, match="its weights changed since .*resumed started"):
    loop.train_and_evaluate(config.replace(steps=10), tmp_path / "resumed", progress=False)
  assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == before
  assert json.loads((tmp_path / "resumed" / "config.json").read_text())["distill_weight"] == 0.7
