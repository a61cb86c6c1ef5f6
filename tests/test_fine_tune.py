"""Fine-tuning (``Config.init_from``): a run that starts from a saved model's weights."""

import json
import shutil

import jax
import numpy as np
import pytest

from pixelrnn_jax import checkpoints
from pixelrnn_jax import model_io
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import run_dir
from pixelrnn_jax.training import step as step_lib
from tests.helpers import SMALL


@pytest.fixture
def source_run(tmp_path, toy_data):
  """A small trained run with an EMA: the model to fine-tune from."""
  workdir = tmp_path / "source"
  loop.train_and_evaluate(config_lib.Config(**{**SMALL, "ema_decay": 0.9}), workdir, progress=False)
  return workdir


def _fresh_state(config, tmp_path):
  optimizer = step_lib.make_optimizer(config)
  workdir = tmp_path / "empty"
  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", keep=2)
  try:
    return run_dir.init_or_restore(config, optimizer, manager, workdir)[0], optimizer
  finally:
    manager.close()


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_a_fine_tuned_run_starts_from_the_models_weights_with_a_fresh_optimiser(
  source_run, tmp_path, ema_decay
):
  config = config_lib.Config(
    **{**SMALL, "init_from": str(source_run), "ema_decay": ema_decay, "seed": 3}
  )
  state, optimizer = _fresh_state(config, tmp_path)
  saved = model_io.read(source_run)  # the source's selected checkpoint, its EMA weights
  got = jax.tree.map(np.asarray, state.params)
  assert jax.tree.structure(got) == jax.tree.structure(
    step_lib.init_params(config, jax.random.key(0))
  )
  np.testing.assert_array_equal(got.gates.kernel, saved.arrays["gates"]["kernel"])
  np.testing.assert_array_equal(got.output.bias, saved.arrays["output"]["bias"])
  np.testing.assert_array_equal(got.candidate.kernel, saved.arrays["candidate"]["kernel"])
  random = step_lib.init_train_state(config, jax.random.key(0), optimizer).params
  assert not np.array_equal(got.gates.kernel, random.gates.kernel)
  # Adam's moments and count start at zero, as for a new run.
  fresh = optimizer.init(state.params)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 0
  # metrics.jsonl says where the weights came from, with a digest of them.
  (record,) = map(json.loads, (tmp_path / "empty" / "metrics.jsonl").read_text().splitlines())
  assert record == {
    "event": "init_from",
    "source": str(checkpoints.chosen_step(source_run / "checkpoints")),
    "source_step": saved.step,
    "params_sha256": checkpoints.state_digest(saved.arrays),
  }
  assert run_dir.read_metrics(tmp_path / "empty") == ([], [])
  if ema_decay is None:
    assert state.ema_params is None
  else:
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True):
      np.testing.assert_array_equal(a, b)


def test_the_first_evaluation_of_a_fine_tune_at_rate_zero_is_the_sources(source_run, tmp_path):
  # Adam with a zero learning rate leaves the weights alone: the fine-tuned
  # run must then score exactly what the source model scores.
  config = config_lib.Config(
    **{**SMALL, "init_from": str(source_run), "learning_rate": 1e-30, "steps": 1, "eval_every": 1}
  )
  tuned = loop.train_and_evaluate(config, tmp_path / "tuned", progress=False)
  best = checkpoints.chosen_step(source_run / "checkpoints")
  source_best = [
    r["accuracy"]
    for r in map(json.loads, (source_run / "metrics.jsonl").read_text().splitlines())
    if r.get("split") == "valid" and r["step"] == int(best.name)
  ]
  assert tuned["valid"]["accuracy"] == pytest.approx(source_best[0], abs=1e-9)


@pytest.mark.parametrize(
  ("change", "named"),
  [
    ({"num_units": 6}, "--num-units 8 there, --num-units 6 here"),
    ({"cell": "reset_after"}, "--cell tf1 there, --cell reset_after here"),
    ({"activation": "relu"}, "--activation tanh there, --activation relu here"),
    ({"standardize": True}, "--no-standardize there, --standardize here"),
    ({"order": "pixel"}, "--order row there, --order pixel here"),
  ],
)
def test_a_model_of_another_shape_or_scaling_is_refused_naming_the_flag(
  source_run, tmp_path, change, named
):
  config = config_lib.Config(**{**SMALL, "init_from": str(source_run), **change})
  with pytest.raises(ValueError, match="--init-from ") as error:
    _fresh_state(config, tmp_path)
  assert named in str(error.value)
  assert "or without --init-from" in str(error.value)  # the fix
  # ... and before the data are read, leaving no run directory behind.
  with pytest.raises(ValueError, match=named.replace("-", r"\-")):
    loop.train_and_evaluate(config, tmp_path / "refused", progress=False)
  assert not (tmp_path / "refused").exists()


def test_an_unfit_shipped_model_names_the_recipe_that_has_its_model():
  config = config_lib.Config(init_from="pretrained:pixel")  # the notebook: not standardised
  with pytest.raises(ValueError, match="--standardize there, --no-standardize here") as error:
    run_dir.read_init_model(config)
  assert "(--recipe tuned has its model)" in str(error.value)
  assert run_dir.read_init_model(config_lib.RECIPES["tuned"].replace(init_from="pretrained:pixel"))


def test_the_card_of_a_weights_file_is_refused_naming_the_weights(tmp_path):
  card = tmp_path / "model.json"
  (tmp_path / "model.msgpack").write_bytes(b"weights")
  card.write_text("{}")
  config = config_lib.Config(**{**SMALL, "init_from": str(card)})
  with pytest.raises(checkpoints.CheckpointError, match="is the card of .*model.msgpack"):
    run_dir.read_init_model(config)


def test_init_from_none_on_the_command_line_is_a_random_init():
  from pixelrnn_jax import cli

  for word in ("none", "None", "off"):
    args = cli.build_parser().parse_args(["train", "--init-from", word, "--workdir", "x"])
    assert cli.config_from_flags(args).init_from is None


def test_a_missing_model_fails_before_the_data_is_read_or_the_workdir_made(tmp_path, monkeypatch):
  def no_data(config, split):
    raise AssertionError("the data was read before the model was checked")

  monkeypatch.setattr(loop, "_load_split", no_data)
  config = config_lib.Config(**{**SMALL, "init_from": str(tmp_path / "no-such-run")})
  with pytest.raises(FileNotFoundError, match="no-such-run"):
    loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()
  with pytest.raises(FileNotFoundError, match="no pretrained weights named 'nope'"):
    loop.train_and_evaluate(config.replace(init_from="pretrained:nope"), tmp_path / "run")


def test_a_relative_init_from_is_recorded_as_an_absolute_path(source_run, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_lib.Config(**{**SMALL, "init_from": "source", "steps": 1})
  loop.train_and_evaluate(config, tmp_path / "tuned", progress=False)
  recorded = json.loads((tmp_path / "tuned" / "config.json").read_text())["init_from"]
  assert recorded == str(source_run.resolve())


def test_resume_of_a_fine_tune_is_bit_exact_and_does_not_reload_the_model(source_run, tmp_path):
  config = config_lib.Config(
    **{**SMALL, "init_from": str(source_run), "steps": 8, "checkpoint_every": 2, "max_shift": 1}
  )
  straight = loop.train_and_evaluate(config, tmp_path / "straight", progress=False)
  loop.train_and_evaluate(config.replace(steps=2), tmp_path / "resumed", progress=False)
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed", progress=False)
  assert straight["valid"] == resumed["valid"]
  # The record of the starting weights survives the resume.
  assert run_dir.init_from_record(tmp_path / "resumed") == run_dir.init_from_record(
    tmp_path / "straight"
  )
  # (the source's step is past the resume's: a record keyed "step" was dropped with
  # the records after the resumed step)
  assert run_dir.init_from_record(tmp_path / "resumed")["source_step"] > 2

  def latest(workdir):
    manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
    try:
      return manager.restore(manager.latest_step())[0]
    finally:
      manager.close()

  for a, b in zip(
    jax.tree.leaves(latest(tmp_path / "straight")),
    jax.tree.leaves(latest(tmp_path / "resumed")),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def test_a_fine_tune_resumes_after_its_source_is_gone(source_run, tmp_path):
  config = config_lib.Config(**{**SMALL, "init_from": str(source_run), "steps": 4})
  loop.train_and_evaluate(config, tmp_path / "tuned", progress=False)
  shutil.rmtree(source_run)
  resumed = loop.train_and_evaluate(config.replace(steps=6), tmp_path / "tuned", progress=False)
  assert resumed["step"] == 6
  # A fresh start still needs it.
  with pytest.raises(FileNotFoundError, match="--init-from: .*no such weights file"):
    loop.train_and_evaluate(config, tmp_path / "fresh", progress=False)


def test_the_export_card_of_a_fine_tuned_run_says_what_it_started_from(
  source_run, tmp_path, monkeypatch
):
  from pixelrnn_jax.training import export as export_lib
  from tests.helpers import synthetic_digits

  monkeypatch.setattr(
    export_lib.data, "load_mnist", lambda split, **kwargs: synthetic_digits(40, 1)
  )
  config = config_lib.Config(**{**SMALL, "init_from": str(source_run), "steps": 2})
  loop.train_and_evaluate(config, tmp_path / "tuned", progress=False)
  card = export_lib.export(tmp_path / "tuned", tmp_path / "tuned.msgpack", early_exit=False)
  assert card["source"]["init_from"] == run_dir.init_from_record(tmp_path / "tuned")
  assert card["source"]["init_from"]["source"] == str(
    checkpoints.chosen_step(source_run / "checkpoints")
  )
  plain = export_lib.export(source_run, tmp_path / "source.msgpack", early_exit=False)
  assert "init_from" not in plain["source"]
  # The source's card and the fine-tune's record name the same weights.
  assert card["source"]["init_from"]["params_sha256"] == plain["params_sha256"]
  assert card["params_sha256"] != plain["params_sha256"]


def test_a_fine_tune_of_shipped_weights_records_their_name_and_their_cards_digest(tmp_path):
  config = config_lib.RECIPES["tuned"].replace(init_from="pretrained:pixel-v1")
  _fresh_state(config, tmp_path)
  (record,) = map(json.loads, (tmp_path / "empty" / "metrics.jsonl").read_text().splitlines())
  card = model_io.card("pixel-v1")
  assert record["source"] == "pretrained:pixel-v1"  # not this machine's installation path
  assert record["params_sha256"] == card["params_sha256"]
  assert record["source_step"] == card["source"]["step"]


def test_a_restart_after_an_attempt_killed_before_its_first_checkpoint_records_it_once(
  source_run, tmp_path
):
  """SIGKILL before the first save leaves metrics.jsonl without a checkpoint: starting
  again trains from step 0, so the unsaved attempt's records go (one init_from, no
  step twice)."""
  config = config_lib.Config(**{**SMALL, "init_from": str(source_run)})
  _fresh_state(config, tmp_path)  # the killed attempt: its init_from record ...
  run_dir.append_metrics(tmp_path / "empty", {"step": 1, "loss": 2.3, "accuracy": 0.1})
  loop.train_and_evaluate(config, tmp_path / "empty", progress=False)
  lines = [json.loads(x) for x in (tmp_path / "empty" / "metrics.jsonl").read_text().splitlines()]
  assert [x["event"] for x in lines if "event" in x] == ["init_from"]
  steps = [(x["step"], x.get("split")) for x in lines if "step" in x]
  assert len(steps) == len(set(steps)), steps


def test_a_model_of_the_other_pixel_order_is_taken_with_one_warning(tmp_path, toy_data, caplog):
  """Pixel and permuted orders read 784 pixels of one value each: a pixel-order model
  may start a psMNIST run (the README says so), with the warning said once, not once
  when the trainer checks the model before the data and again when it loads it."""
  small = {**SMALL, "order": "pixel", "steps": 1, "eval_every": 1}
  loop.train_and_evaluate(config_lib.Config(**small), tmp_path / "pixel", progress=False)
  caplog.set_level("WARNING")
  tuned = config_lib.Config(**{**small, "order": "permuted", "init_from": str(tmp_path / "pixel")})
  loop.train_and_evaluate(tuned, tmp_path / "permuted", progress=False)
  said = [
    r
    for r in caplog.records
    if "was trained on pixel order and fine-tunes on permuted" in r.message
  ]
  assert len(said) == 1, caplog.text
