"""The pmapped step, the training loop, checkpoints, resume, signals and the CLI."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelrnn_jax import checkpoints
from pixelrnn_jax import cli
from pixelrnn_jax import inference
from pixelrnn_jax import preprocessing
from pixelrnn_jax.training import batches as batches_lib
from pixelrnn_jax.training import config as config_lib
from pixelrnn_jax.training import loop
from pixelrnn_jax.training import step as step_lib
from tests import helpers
from tests.helpers import SMALL
from tests.helpers import corrupt_step
from tests.helpers import synthetic_digits as _synthetic
from tests.helpers import write_fake_idx


def _params_after_one_step(config, x, y, num_devices):
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.init_train_state(config, jax.random.key(0), optimizer)
  step = step_lib.make_train_step(optimizer)
  per = x.shape[0] // num_devices
  new_state, metrics = step(
    step_lib.replicate(state, num_devices),
    x.reshape(num_devices, per, *x.shape[1:]),
    y.reshape(num_devices, per),
  )
  return state, step_lib.unreplicate(new_state), jax.device_get(metrics)


def test_pmapped_step_on_two_devices_equals_one_device():
  assert jax.local_device_count() >= 2
  config = config_lib.Config(**{**SMALL, "order": "pixel"})
  images, labels = _synthetic(16, 3)
  x = preprocessing.to_sequences(images, "pixel")[:, :100]  # a short sequence keeps it fast
  before, one, m1 = _params_after_one_step(config, x, labels, 1)
  _, two, m2 = _params_after_one_step(config, x, labels, 2)
  chex.assert_trees_all_close(one.params, two.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1["loss"][0], m2["loss"][0], rtol=1e-5)
  np.testing.assert_array_equal(m2["loss"][0], m2["loss"][1])  # averaged over devices
  assert int(one.step) == 1
  for path, old, new in zip(
    jax.tree_util.tree_leaves_with_path(before.params),
    jax.tree_util.tree_leaves(before.params),
    jax.tree_util.tree_leaves(one.params),
  ):
    assert not np.allclose(old, new), f"{path[0]} did not change"


def test_loss_falls_on_a_fixed_batch():
  config = config_lib.Config(**{**SMALL, "learning_rate": 3e-2})
  optimizer = step_lib.make_optimizer(config)
  state = step_lib.replicate(step_lib.init_train_state(config, jax.random.key(0), optimizer), 1)
  step = step_lib.make_train_step(optimizer)
  images, labels = _synthetic(16, 4)
  x, y = preprocessing.to_sequences(images, "row")[None], labels[None]
  losses = []
  for _ in range(60):
    state, metrics = step(state, x, y)
    losses.append(float(metrics["loss"][0]))
  assert losses[-1] < 0.5 * losses[0]


def test_per_step_loss_option_changes_the_loss():
  params = step_lib.init_params(config_lib.Config(**SMALL), jax.random.key(0))
  images, labels = _synthetic(8, 5)
  x = preprocessing.to_sequences(images, "row")
  plain, logits = step_lib.loss_fn(params, x, labels)
  both, _ = step_lib.loss_fn(params, x, labels, per_step_loss=0.5)
  from pixelrnn_jax import gru_classifier

  np.testing.assert_allclose(
    both, plain + 0.5 * gru_classifier.cross_entropy_per_step(logits, labels), rtol=1e-6
  )


def test_optimizer_options_live_in_optax():
  config = config_lib.Config(
    **{**SMALL, "steps": 100, "lr_schedule": "warmup_cosine", "warmup_steps": 10, "clip_norm": 1e-3}
  )
  optimizer = step_lib.make_optimizer(config)
  params = step_lib.init_params(config, jax.random.key(0))
  state = optimizer.init(params)
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e3), params)
  updates, state = optimizer.update(huge, state, params)
  # Step 0 of the warm-up has learning rate 0.
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  updates, _ = optimizer.update(huge, state, params)
  # Adam normalises the gradient; the update is bounded by lr(1) = 1e-4.
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) <= 1.01e-4


def test_evaluate_on_two_devices_equals_one_device():
  params = step_lib.init_params(config_lib.Config(**SMALL), jax.random.key(1))
  images, labels = _synthetic(37, 6)
  one = inference.evaluate(
    params, images, labels, order="row", batch_size=10, early_exit_thresholds=(0.2,)
  )
  two = inference.evaluate(
    params, images, labels, order="row", batch_size=10, early_exit_thresholds=(0.2,), devices=2
  )
  assert one["accuracy"] == two["accuracy"]
  (row_one,), (row_two,) = one["early_exit"], two["early_exit"]
  assert (row_one["accuracy"], row_one["mean_steps"]) == (
    row_two["accuracy"],
    row_two["mean_steps"],
  )
  np.testing.assert_allclose(row_one["ece"], row_two["ece"], rtol=1e-5)  # summed in another order
  for t, ece in one["calibration_error"].items():
    np.testing.assert_allclose(ece, two["calibration_error"][t], rtol=1e-5)
  np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-6)
  np.testing.assert_array_equal(one["accuracy_per_step"], two["accuracy_per_step"])


def test_evaluate_is_exact_over_an_uneven_split():
  params = step_lib.init_params(config_lib.Config(**SMALL), jax.random.key(1))
  images, labels = _synthetic(37, 6)
  result = inference.evaluate(params, images, labels, order="row", batch_size=10)
  from pixelrnn_jax import gru_classifier

  logits = gru_classifier.apply(params, preprocessing.to_sequences(images, "row"))
  assert result["num_examples"] == 37
  np.testing.assert_allclose(result["accuracy"], gru_classifier.accuracy(logits, labels))
  np.testing.assert_allclose(
    result["loss"], gru_classifier.cross_entropy(logits, labels), rtol=1e-5
  )
  np.testing.assert_allclose(
    result["accuracy_per_step"], gru_classifier.accuracy_per_step(logits, labels)
  )


# ---------------------------------------------------------------------------- the loop


def _final_state(workdir):
  """(state dict, meta) of the run's newest checkpoint."""
  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
  state, meta = manager.restore(manager.latest_step())
  manager.close()
  return state, meta


def _step_names(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("devices", [1, 2])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, toy_data, devices):
  config = config_lib.Config(**{**SMALL, "devices": devices, "steps": 12, "checkpoint_every": 5})
  straight = loop.train_and_evaluate(config, tmp_path / "straight", progress=False)
  # "Interrupted" after 5 steps, then resumed with the full step count.
  loop.train_and_evaluate(config.replace(steps=5), tmp_path / "resumed", progress=False)
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed", progress=False)
  assert straight["step"] == resumed["step"] == 12
  a, a_meta = _final_state(tmp_path / "straight")
  b, b_meta = _final_state(tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert a_meta == b_meta
  assert straight["valid"] == resumed["valid"]


def test_the_final_evaluation_reuses_the_last_steps_and_runs_when_there_is_none(
  tmp_path, toy_data, monkeypatch
):
  calls = []
  real = inference.evaluate

  def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(loop.inference, "evaluate", counted)
  config = config_lib.Config(**SMALL)  # 6 steps, evaluated at 3 and 6
  summary = loop.train_and_evaluate(config, tmp_path / "a", progress=False)
  assert len(calls) == 2
  valid = [
    r
    for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    if r.get("split") == "valid"
  ]
  assert summary["valid"]["accuracy"] == valid[-1]["accuracy"]
  # A finished run trains nothing, and is evaluated once.
  calls.clear()
  again = loop.train_and_evaluate(config, tmp_path / "a", progress=False)
  assert len(calls) == 1 and again["valid"] == summary["valid"]


def test_run_directory_contents(tmp_path, toy_data):
  config = config_lib.Config(**SMALL)
  summary = loop.train_and_evaluate(config, tmp_path, progress=False)
  resolved = config.replace(num_processes=1, process_id=0)  # as it ran
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(resolved.to_json())
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "split" not in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  assert {"loss", "accuracy", "steps_per_s", "samples_per_s"} <= set(train_lines[0])
  assert [l["step"] for l in lines if l.get("split") == "valid"] == [3, 6]
  eval_json = json.loads((tmp_path / "eval.json").read_text())
  assert len(eval_json["accuracy_per_step"]) == 28
  assert eval_json["accuracy"] == summary["valid"]["accuracy"]

  # Saved: every 2 steps, at each evaluation (3, 6) and the end; kept: the newest
  # keep_checkpoints (3) and the best on valid (the earliest among ties).
  def best_step():
    valid = [
      (-r["accuracy"], r["step"])
      for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
      if r.get("split") == "valid"
    ]
    return min(valid)[1]

  assert _step_names(tmp_path) == sorted({3, 4, 6, best_step()})
  assert summary["best_checkpoint"] == str(tmp_path.absolute() / "checkpoints" / str(best_step()))
  loop.train_and_evaluate(config.replace(steps=10, keep_checkpoints=2), tmp_path, progress=False)
  assert _step_names(tmp_path) == sorted({9, 10, best_step()})
  assert helpers.load_model(tmp_path)[2]["step"] == best_step()


def _flip_a_byte(workdir, step):
  """Flips one byte in the largest array file of a step: the files still parse."""
  files = [
    p
    for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
    if p.is_file() and p.parent.name == "d"
  ]
  path = max(files, key=lambda p: p.stat().st_size)
  blob = bytearray(path.read_bytes())
  blob[len(blob) // 2] ^= 0x01
  path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", [corrupt_step, _flip_a_byte])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, toy_data, caplog, damage):
  config = config_lib.Config(**{**SMALL, "eval_every": 100})
  straight = loop.train_and_evaluate(config, tmp_path / "straight", progress=False)
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config, workdir, progress=False)
  assert _step_names(workdir) == [2, 4, 6]
  damage(workdir, 6)
  manager = checkpoints.RunCheckpoints(workdir / "checkpoints", read_only=True)
  with pytest.raises(checkpoints.CheckpointError, match="6"):
    manager.restore(6)
  # The same command resumes from step 4, sets step 6 aside and computes it again.
  resumed = loop.train_and_evaluate(config, workdir, progress=False)
  assert "skipping" in caplog.text and "moved the unreadable checkpoint" in caplog.text
  assert (workdir / "unreadable" / "6").is_dir() and _step_names(workdir) == [2, 4, 6]
  assert resumed["valid"] == straight["valid"]


def test_a_run_whose_checkpoints_are_all_unreadable_stops_with_exit_2(tmp_path, toy_data, capsys):
  config = config_lib.Config(**SMALL)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  for step in _step_names(tmp_path):
    corrupt_step(tmp_path, step)
  with pytest.raises(checkpoints.CheckpointError, match="none of the checkpoints"):
    loop.train_and_evaluate(config, tmp_path, progress=False)
  assert all((tmp_path / "checkpoints" / str(s)).is_dir() for s in (3, 4, 6))  # nothing moved
  code = cli.main(
    [
      "train",
      "--workdir",
      str(tmp_path),
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "6",
      "--eval-every",
      "3",
      "--log-every",
      "2",
      "--checkpoint-every",
      "2",
      "--eval-batch-size",
      "64",
    ]
  )
  assert code == 2 and "none of the checkpoints" in capsys.readouterr().err


def test_non_finite_loss_stops_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
  images, labels = _synthetic(160, 0)
  poisoned = images.copy()
  poisoned[:] = np.nan
  calls = {"n": 0}
  real_next = batches_lib.Batches.__next__

  def next_batch(self):  # the fifth batch is all NaN
    calls["n"] += 1
    x, y = real_next(self)
    return (np.full_like(x, np.nan), y) if calls["n"] == 5 else (x, y)

  monkeypatch.setattr(loop, "_load_split", lambda c, s: (images, labels))
  monkeypatch.setattr(batches_lib.Batches, "__next__", next_batch)
  config = config_lib.Config(**SMALL)
  with pytest.raises(loop.NonFiniteLossError, match=r"step 5: loss nan.*is \S*checkpoints/4; "):
    loop.train_and_evaluate(config, tmp_path, progress=False)
  state, _ = _final_state(tmp_path)
  assert int(state["step"]) == 4
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_the_nan_stop_names_the_last_checkpoint_as_finite_and_the_best_by_accuracy(tmp_path):
  """Before: "the last good checkpoint", of a run whose loss was 2e31 from step 5 on."""
  config = config_lib.Config(learning_rate=1e30)
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop._check_finite(
      30,
      {"loss": 2e31, "grad_norm": float("nan")},
      tmp_path,
      config,
      lambda: "ckpt/20 (15.52% valid)",
    )
  message = str(error.value)
  assert "good" not in message and "The last checkpoint, with finite weights" in message
  assert "; the best by valid accuracy is ckpt/20 (15.52% valid). Try a lower --lr" in message


@pytest.mark.parametrize("sam_rho", [0.0, 0.5])
def test_the_nan_stop_and_the_divergence_warning_name_the_knobs_to_lower(tmp_path, sam_rho):
  config = config_lib.Config(learning_rate=3e-3, sam_rho=sam_rho)
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop._check_finite(7, {"loss": float("nan"), "grad_norm": 1.0}, tmp_path, config)
  warning = loop._diverging({"loss": 1e4, "step": 7}, config)
  for text in (str(error.value), warning):
    assert "lower --lr (now 0.003)" in text
    assert ("--sam-rho (now 0.5)" in text) == bool(sam_rho), text


def test_resume_with_a_different_config_is_refused(tmp_path, toy_data):
  loop.train_and_evaluate(config_lib.Config(**SMALL), tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"different config \(--num-units: 8 -> 16\)"):
    loop.train_and_evaluate(
      config_lib.Config(**{**SMALL, "num_units": 16}), tmp_path, progress=False
    )


def test_resume_with_more_steps_warns_that_the_cosine_schedule_stretches(
  tmp_path, toy_data, caplog
):
  config = config_lib.Config(
    **{**SMALL, "lr_schedule": "warmup_cosine", "warmup_steps": 2, "learning_rate": 1e-2}
  )
  loop.train_and_evaluate(config, tmp_path, progress=False)
  longer = config.replace(steps=12)
  # The numbers the warning must give: lr at step 6 under both schedules.
  before = float(step_lib.make_schedule(config)(6))
  after = float(step_lib.make_schedule(longer)(6))
  assert before == 0.0 and after > 0.004
  with caplog.at_level(logging.WARNING, logger="pixelrnn_jax"):
    summary = loop.train_and_evaluate(longer, tmp_path, progress=False)
  assert summary["step"] == 12
  warnings = [r.getMessage() for r in caplog.records if "reshapes" in r.getMessage()]
  assert len(warnings) == 1
  assert "step 6 with steps 6 -> 12" in warnings[0]
  assert f"from {before:.3g} to {after:.3g}" in warnings[0]


def test_shortening_a_step_schedule_before_its_drop_says_the_run_is_unchanged(
  tmp_path, toy_data, caplog
):
  config = config_lib.Config(
    **{**SMALL, "steps": 20, "lr_schedule": "warmup_step", "warmup_steps": 1}
  )
  loop.train_and_evaluate(config.replace(steps=4), tmp_path, progress=False)
  # As if a 20-step run had been stopped at step 4 (its drop at 16, still ahead) ...
  recorded = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**recorded, "steps": 20}))
  shorter = config.replace(steps=10)  # ... and resumed as a 10-step run: drop at 8 > 4
  with caplog.at_level(logging.WARNING, logger="pixelrnn_jax"):
    loop.train_and_evaluate(shorter, tmp_path, progress=False)
  warnings = [r.getMessage() for r in caplog.records if "reshapes" in r.getMessage()]
  assert len(warnings) == 1 and "drops tenfold at step 8" in warnings[0]
  assert "the steps taken so far had the same rates" in warnings[0]
  assert warnings[0].endswith("equals a fresh run with --steps 10")


def test_resume_with_more_steps_and_a_constant_rate_does_not_warn(tmp_path, toy_data, caplog):
  config = config_lib.Config(**SMALL)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  with caplog.at_level(logging.WARNING, logger="pixelrnn_jax"):
    loop.train_and_evaluate(config.replace(steps=8), tmp_path, progress=False)
  assert not [r for r in caplog.records if "reshapes" in r.getMessage()]


def test_a_run_from_before_a_new_config_field_still_resumes(tmp_path, toy_data):
  config = config_lib.Config(**SMALL)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["weight_decay"], saved["max_shift"]  # fields added later, at their defaults
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert loop.train_and_evaluate(config.replace(steps=8), tmp_path, progress=False)["step"] == 8
  with pytest.raises(ValueError, match=r"different config \(--max-shift: 0 -> 1\)"):
    loop.train_and_evaluate(config.replace(steps=10, max_shift=1), tmp_path, progress=False)


def test_too_many_devices_is_a_clear_error(tmp_path, toy_data):
  config = config_lib.Config(**{**SMALL, "devices": 8})
  with pytest.raises(ValueError, match=r"devices=8 but JAX sees 2 cpu device"):
    loop.train_and_evaluate(config, tmp_path, progress=False)


# ---------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
  "flags, match",
  [
    (["--steps", "-5"], r"error: --steps -5: expected a positive integer"),
    (
      ["--batch-size", "15", "--devices", "2"],
      r"--batch-size 15 does not divide across --devices 2",
    ),
    (["--order", "diagonal"], r"--order: invalid choice: 'diagonal'"),
    (["--cell", "lstm"], r"--cell: invalid choice: 'lstm'"),
    (["--lr", "0"], r"--learning-rate 0.0: expected a finite number > 0"),
    (["--clip-norm", "-1"], r"--clip-norm -1.0"),
    (["--lr-schedule", "step"], r"--lr-schedule: invalid choice: 'step'"),
    (["--warmup-steps", "50", "--steps", "10"], r"--warmup-steps 50"),
    (["--ema-decay", "1"], r"--ema-decay 1.0: expected a number in \(0, 1\)"),
    (["--recurrent-dropout", "1"], r"--recurrent-dropout 1.0: expected a number in \[0, 1\)"),
  ],
)
def test_config_errors_fail_before_any_work(tmp_path, flags, match, capsys):
  workdir = tmp_path / "run"
  try:
    code = cli.main(["train", "--workdir", str(workdir), *flags])
  except SystemExit as error:  # a choice argparse itself refuses
    code = error.code
  assert code == 2
  assert re.search(match, capsys.readouterr().err)
  assert not workdir.exists()


def test_bad_flag_type_is_an_argparse_error(tmp_path):
  with pytest.raises(SystemExit) as info:
    cli.main(["train", "--workdir", str(tmp_path), "--steps", "ten"])
  assert info.value.code == 2


def test_flags_map_onto_config():
  args = cli.build_parser().parse_args(
    [
      "train",
      "--workdir",
      "w",
      "--units",
      "32",
      "--lr",
      "0.01",
      "--clip-norm",
      "none",
      "--order",
      "permuted",
      "--standardize",
      "--per-step-loss",
      "0.1",
    ]
  )
  config = cli.config_from_flags(args)
  assert config == config_lib.Config(
    num_units=32,
    learning_rate=0.01,
    clip_norm=None,
    order="permuted",
    standardize=True,
    per_step_loss=0.1,
  )
  assert config_lib.Config() == cli.config_from_flags(
    cli.build_parser().parse_args(["train", "--workdir", "w"])
  )
  tuned = cli.config_from_flags(
    cli.build_parser().parse_args(
      ["train", "--workdir", "w", "--recipe", "tuned", "--steps", "700"]
    )
  )
  assert tuned == config_lib.RECIPES["tuned"].replace(steps=700)


def test_notebook_defaults():
  config = config_lib.Config()
  assert (
    config.num_units,
    config.cell,
    config.learning_rate,
    config.batch_size,
    config.steps,
    config.order,
  ) == (64, "tf1", 1e-3, 512, 10_000, "pixel")


def test_evaluate_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
  assert "no such weights file or run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


def test_cli_end_to_end_on_real_mnist_row_order(tmp_path, mnist_dir, capsys):
  workdir = tmp_path / "row"
  start = time.monotonic()
  code = cli.main(
    [
      "train",
      "--workdir",
      str(workdir),
      "--data-dir",
      mnist_dir,
      "--order",
      "row",
      "--steps",
      "300",
      "--batch-size",
      "128",
      "--lr",
      "3e-3",
      "--eval-every",
      "300",
      "--no-progress",
    ]
  )
  assert code == 0
  assert time.monotonic() - start < 45
  final = json.loads((workdir / "eval.json").read_text())
  assert final["accuracy"] > 0.90
  capsys.readouterr()
  assert (
    cli.main(
      [
        "evaluate",
        "--checkpoint",
        str(workdir),
        "--split",
        "valid",
        "--data-dir",
        mnist_dir,
        "--json",
      ]
    )
    == 0
  )
  result = json.loads(capsys.readouterr().out)
  assert result["order"] == "row" and result["step"] == 300
  assert result["accuracy"] == final["accuracy"]
  np.testing.assert_allclose(result["loss"], final["loss"], rtol=1e-6)
  assert len(result["accuracy_per_step"]) == 28


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, signum, code):
  write_fake_idx(tmp_path)
  workdir = tmp_path / "run"
  env = {**os.environ, "PIXELRNN_JAX_CACHE": str(tmp_path / "cache")}
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "pixelrnn_jax",
      "train",
      "--workdir",
      str(workdir),
      "--data-dir",
      str(tmp_path),
      "--no-verify-data",
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "100000",
      "--log-every",
      "5",
      "--checkpoint-every",
      "1000000",
      "--eval-every",
      "1000000",
      "--no-progress",
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 60
  while not (metrics.exists() and metrics.read_text().strip()):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.2)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == code, stderr
  assert "Traceback" not in stderr
  assert f"{signal.Signals(signum).name} received" in stderr
  params, config, info = helpers.load_model(workdir)
  assert 5 <= info["step"] < 100000 and config.num_units == 8
  assert params.gates.kernel.shape == (28 + 8, 16)


def test_example_script_trains_through_the_library(tmp_path):
  write_fake_idx(tmp_path)
  script = Path(__file__).resolve().parents[1] / "examples" / "train_mnist.py"
  result = subprocess.run(
    [
      sys.executable,
      str(script),
      "--workdir",
      str(tmp_path / "run"),
      "--data-dir",
      str(tmp_path),
      "--no-verify-data",
      "--order",
      "row",
      "--units",
      "8",
      "--batch-size",
      "16",
      "--steps",
      "3",
      "--eval-every",
      "3",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PIXELRNN_JAX_CACHE": str(tmp_path / "cache")},
  )
  assert result.returncode == 0, result.stderr
  assert json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == 3


def test_steps_below_the_runs_step_is_a_clear_error_that_keeps_the_run(tmp_path, toy_data, capsys):
  config = config_lib.Config(**SMALL)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match=r"already at step 6; --steps 4 is below it"):
    loop.train_and_evaluate(config.replace(steps=4), tmp_path, progress=False)
  assert (tmp_path / "config.json").read_text() == before
  assert _step_names(tmp_path)[-1] == 6


def test_a_half_written_checkpoint_is_ignored_on_resume(tmp_path, toy_data):
  """Orbax writes a step to ``<step>.orbax-checkpoint-tmp`` and renames it when complete;
  a process killed mid-save leaves only that directory, which resuming passes over."""
  config = config_lib.Config(**SMALL)
  straight = loop.train_and_evaluate(config.replace(steps=8), tmp_path / "straight", progress=False)
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config, workdir, progress=False)
  partial = workdir / "checkpoints" / "8.orbax-checkpoint-tmp"
  shutil.copytree(workdir / "checkpoints" / "6", partial)
  for path in partial.rglob("*"):
    if path.is_file() and path.stat().st_size > 100:
      path.write_bytes(path.read_bytes()[:50])  # cut off mid-write
  resumed = loop.train_and_evaluate(config.replace(steps=8), workdir, progress=False)
  assert resumed["valid"] == straight["valid"]
  assert not partial.exists() and 8 in _step_names(workdir)


@pytest.mark.parametrize("cores", [1, 4])
def test_more_cpu_devices_than_cores_is_warned_of(cores, monkeypatch, caplog):
  """``--devices 64`` on 2 cores ran at a fraction of the speed, without a word."""
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 JAX devices")
  monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
  loop._check_devices(config_lib.Config(devices=2))
  warned = "devices=2 on 1 CPU cores: the devices share the cores" in caplog.text
  assert warned == (cores == 1)
