"""Smoke test: the benchmark's smallest shape runs, so the script cannot rot."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
  spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_smallest_shape_for_pixelrnn_jax(throughput, tmp_path):
  report = throughput.main(
    [
      "--only",
      "pixelrnn_jax",
      "--steps",
      "16",
      "--batch",
      "8",
      "--rounds",
      "1",
      "--iters",
      "1",
      "--devices",
      "1",
      "--no-memory",
      "--no-scaling",
      "--json",
      str(tmp_path / "r.json"),
    ]
  )
  names = set(report["main"]["step_s"])
  assert {"pixelrnn_jax tf1 (fused)", "pixelrnn_jax tf1 (scan)"} <= names
  assert all(t["train"][0] > 0 for t in report["main"]["step_s"].values())
  assert (tmp_path / "r.json").stat().st_size > 100


def test_flop_count_matches_the_hand_count(throughput):
  # GRU-64, T=784, batch 512: 2*512*784*(65*192 + 64*10) forward, x3 for a train step.
  assert throughput.train_step_flops(batch=512, steps=784, units=64) == 3 * 2 * 512 * 784 * (
    65 * 192 + 640
  )
