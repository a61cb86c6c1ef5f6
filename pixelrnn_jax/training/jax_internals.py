"""The JAX internals that multi-process runs need, in one place.

Each is a private JAX module (``jax._src``): they may move between JAX
releases, and this is the only file to change when they do.
"""

from __future__ import annotations


def cluster_environments() -> list:
  """JAX's cluster detectors (SLURM, Open MPI, ...): what ``jax.distributed.initialize()``
  with no arguments consults."""
  from jax._src import clusters  # noqa: PLC0415

  return list(clusters.ClusterEnv._cluster_types)  # noqa: SLF001


def backends_are_initialized() -> bool:
  """Whether JAX has started a backend (joining must come before)."""
  from jax._src import xla_bridge  # noqa: PLC0415

  return xla_bridge.backends_are_initialized()


def coordination_state():
  """JAX's distributed global state: ``client``, ``process_id``, ``num_processes``.

  Read without starting a backend (``jax.process_index()`` would start one).
  """
  from jax._src import distributed as jax_distributed  # noqa: PLC0415

  return jax_distributed.global_state
