"""Multi-process startup: joins this process to a jax.distributed job described by the environment.

The same training command runs on every host (or several times on one machine);
only the environment differs:

  JAXLLM_COORDINATOR=HOST:PORT  JAXLLM_NUM_PROCESSES=N  JAXLLM_PROCESS_ID=I
      explicit: any cluster, or N processes on one machine (CPU uses gloo collectives).
  JAXLLM_DISTRIBUTED=auto
      jax.distributed.initialize() with no arguments: JAX reads the topology of a
      TPU pod slice, a SLURM allocation, Open MPI, ... itself.

Neither set: a single process. After initialization each process sees its own
devices as `jax.local_devices()` and all of them as `jax.devices()`.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

from jaxllm.config import ConfigError

COORDINATOR = "JAXLLM_COORDINATOR"
NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
PROCESS_ID = "JAXLLM_PROCESS_ID"
AUTO = "JAXLLM_DISTRIBUTED"


def _int_env(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ[name])
  except KeyError:
    raise ConfigError(f"{COORDINATOR} is set, so {name} must be too "
                      f"({NUM_PROCESSES}=N processes in all, {PROCESS_ID}=0..N-1).") from None
  except ValueError:
    raise ConfigError(f"{name}={environ[name]!r} is not an integer.") from None


def initialize(environ: Mapping[str, str] = os.environ) -> bool:
  """Initializes jax.distributed if the environment asks for it; True if it did.

  Must run before anything touches a device.
  """
  coordinator = environ.get(COORDINATOR, "")
  auto = environ.get(AUTO, "").lower() in ("1", "true", "auto")
  if not coordinator and not auto:
    return False
  if coordinator:
    num_processes, process_id = _int_env(environ, NUM_PROCESSES), _int_env(environ, PROCESS_ID)
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"{PROCESS_ID}={process_id} must be in 0..{num_processes - 1} "
                        f"({NUM_PROCESSES}={num_processes}).")
  # Collectives between CPU processes need a backend (gloo is the default on newer jax only).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return True
