"""Several processes (hosts) as one JAX job: `jax.distributed`.

Each process runs the same program on its local devices; the mesh spans
the devices of all of them (`jax.devices()` after `initialize`). A process
is told where the coordinator is by flags (`--coordinator host:port
--num-processes N --process-id I`), by the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or by a
cluster jax detects itself (SLURM, Open MPI, Kubernetes...). Inputs are
built with `jax.make_array_from_callback` (`shard.batch_placer`), so each
process moves only its share of a batch to its devices.
"""

from __future__ import annotations

import logging
import os

import jax

from palu_jax.errors import ConfigError

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "KUBERNETES_SERVICE_HOST")


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-process job when one is configured; returns whether
  it did (False: a single process, nothing to do). Call it before any
  other jax work."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = _env_int("JAX_PROCESS_ID")
  cluster = any(k in os.environ for k in _CLUSTER_ENV)
  if coordinator is None and not cluster:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ConfigError("coordinator", "--num-processes/--process-id need "
                        "a coordinator address (--coordinator host:port)")
    return False
  if coordinator is not None:
    if ":" not in coordinator:
      raise ConfigError("coordinator", f"{coordinator!r} is not host:port")
    if num_processes is None or process_id is None:
      raise ConfigError("coordinator", "a coordinator needs --num-processes "
                        "and --process-id (or JAX_NUM_PROCESSES and "
                        "JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ConfigError("process_id", f"{process_id} is not in "
                        f"0..{num_processes - 1}")
  if jax.config.jax_platforms in ("cpu",) or os.environ.get(
      "JAX_PLATFORMS") == "cpu":
    # CPU devices of different processes talk through gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)
  log.info("process %d of %d: %d local, %d global devices",
           jax.process_index(), jax.process_count(),
           len(jax.local_devices()), len(jax.devices()))
  return True


def _env_int(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise ConfigError(name, f"must be an integer, got "
                      f"{os.environ[name]!r}") from None
