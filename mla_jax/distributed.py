"""Multi-process runs through `jax.distributed`.

One call, `initialize(...)`, before JAX touches a device:
* explicit: `coordinator_address`, `num_processes`, `process_id` (flags);
* from the environment: under SLURM (or another cluster JAX can detect) with
  more than one task, JAX reads everything itself;
* otherwise a single process, and nothing happens.

On CPUs the processes talk through gloo collectives, and `local_device_count`
sets how many CPU devices each process exposes (set per process: an inherited
`XLA_FLAGS` device count would be wrong for the others).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading

import jax


@dataclasses.dataclass(frozen=True)
class Topology:
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int


def _slurm_tasks() -> int:
  try:
    return int(os.environ.get("SLURM_NTASKS", "1"))
  except ValueError:
    return 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               timeout_s: int = 120) -> Topology:
  """Start jax.distributed if this run spans several processes; return the topology."""
  if local_device_count:
    if local_device_count < 1:
      raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
    jax.config.update("jax_num_cpu_devices", local_device_count)
  explicit = num_processes is not None and num_processes > 1
  if explicit:
    missing = [name for name, v in (("coordinator_address", coordinator_address),
                                    ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"--num_processes={num_processes} also needs --{' and --'.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  if explicit or _slurm_tasks() > 1:
    # CPU devices of different processes reach each other through gloo; GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX aborts the whole process (a C++ check failure) when joining times out.
    # A watchdog with a slightly shorter deadline says what happened in one line
    # and exits first; nothing has been read or written yet, so nothing is lost.
    where = coordinator_address or "the coordinator SLURM names"
    joined = threading.Event()

    def watchdog():
      if not joined.wait(timeout_s):
        sys.stderr.write(f"error: could not join the run at {where} within {timeout_s}s: check that "
                         "every process was started with the same --coordinator_address and "
                         "--num_processes, and that process 0's address is reachable from this "
                         "host (--distributed_timeout sets the wait)\n")
        sys.stderr.flush()
        os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    kwargs = dict(initialization_timeout=timeout_s + 60)
    if explicit:
      kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
    try:
      jax.distributed.initialize(**kwargs)
    except Exception as e:  # a bad address and the like fail at once, as exceptions
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"could not join the run at {where} ({msg}); check --coordinator_address") from None
    finally:
      joined.set()
  return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def check_mesh_covers_devices(mesh_size: int) -> None:
  """In a multi-process run the mesh must use every device of every process."""
  if jax.process_count() > 1 and mesh_size != jax.device_count():
    raise ValueError(f"the mesh has {mesh_size} devices but the {jax.process_count()} processes have "
                     f"{jax.device_count()} ({jax.local_device_count()} each); give a --mesh whose "
                     f"sizes multiply to {jax.device_count()}")
