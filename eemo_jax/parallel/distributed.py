"""Joining a multi-process JAX job: the same command on every host (launch/ has the recipes).

JAX finds the other processes of a job by itself on a Cloud TPU VM slice (the TPU metadata, or GKE's
TPU_WORKER_HOSTNAMES), under SLURM (`srun`), Open MPI (`mpirun`) and in an indexed Kubernetes Job:
`jax.distributed.initialize()` with no arguments asks those environments (jax/_src/clusters/). We call it
only when the same signals say this process is one of several: on a plain machine the call has nothing to
find and raises, and a one-process group would only start a coordinator service for nothing.

Explicit settings override what JAX would detect, field by field: the command's `--coordinator-address`,
`--num-processes`, `--process-id`, then JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. A field
left unset is JAX's to detect, so under SLURM `--coordinator-address` alone moves the coordinator and keeps
SLURM's count and index; outside a cluster JAX knows, all three must be given.

This module imports JAX only inside its functions: the commands add its flags to their parsers, and
`eemo-jax --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import sys


class ProcessSetupError(ValueError):
  """The multi-process settings are incomplete or contradict each other; the message says what to set."""


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
  """Explicit coordinator settings; None fields are left to JAX's cluster detection."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def given(self) -> dict[str, str | int]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Start:
  """How this process joins its job: `jax.distributed.initialize(**arguments)`.

  `found_by` names where the settings come from, for the line printed before joining: the explicit ones (as
  flags; each may have come from its JAX_* variable) and/or the cluster JAX detects.
  """
  found_by: str
  arguments: dict[str, str | int]


# Flag (argparse dest), environment variable, and type of each explicit setting.
_SETTINGS = (("coordinator_address", "JAX_COORDINATOR_ADDRESS", str),
             ("num_processes", "JAX_NUM_PROCESSES", int),
             ("process_id", "JAX_PROCESS_ID", int))


def add_process_arguments(parser) -> None:
  """The flags that override the job's process layout (train and grpo)."""
  group = parser.add_argument_group(
      "multi-process jobs", "JAX finds the processes itself on a TPU VM slice, under SLURM, Open MPI and in an "
      "indexed Kubernetes Job. These flags (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) "
      "override it; elsewhere give all three on every process")
  group.add_argument("--coordinator-address", metavar="HOST:PORT",
                     help="process 0's host and a free port, the same on every process")
  group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (1: run alone)")
  group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def explicit_settings(args=None) -> ProcessSettings:
  """The command's flags, each falling back to its JAX_* environment variable."""
  environ = os.environ
  values = {}
  for field, variable, kind in _SETTINGS:
    value = getattr(args, field, None)
    if value is None and environ.get(variable, "").strip():
      try:
        value = kind(environ[variable].strip())
      except ValueError:
        raise ProcessSetupError(f"{variable}={environ[variable]!r} must be a whole number") from None
    values[field] = value
  return ProcessSettings(**values)


def detected_cluster() -> tuple[str, int | None] | None:
  """(name, process count) of the cluster environment JAX's `initialize()` would use; None on a plain machine.

  The checks are those of JAX's cluster envs, in JAX's order (but GKE's TPU variables before the TPU VM's
  metadata server), read without starting anything: environment variables, and on a Cloud TPU VM its
  metadata server (what JAX reads there too). The count is None for a Kubernetes Job, which only its API
  knows; an indexed Job is taken to be several processes.
  """
  environ = os.environ
  if "OMPI_MCA_orte_hnp_uri" in environ:
    return "Open MPI", int(environ.get("OMPI_COMM_WORLD_SIZE", "1"))
  if all(v in environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                "SLURM_LOCALID")):
    return "SLURM", int(environ["SLURM_NTASKS"])
  tpu_processes = cloud_tpu_process_count()
  if tpu_processes is not None:
    return "the Cloud TPU VM slice", tpu_processes
  if ("KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ
      and importlib.util.find_spec("kubernetes") is not None):
    return "the Kubernetes Job", None
  return None


def cloud_tpu_process_count() -> int | None:
  """The processes of this Cloud TPU VM's slice as JAX counts them (all slices of a multislice job); None off
  a TPU VM. JAX's own TPU cluster envs, so the count is the one `initialize()` will use."""
  from jax._src import cloud_tpu_init
  if not cloud_tpu_init.running_in_cloud_tpu_vm:  # set by `import jax` where it found TPU chips and libtpu
    return None
  from jax._src.clusters import GceTpuCluster, GkeTpuCluster
  for cluster in (GkeTpuCluster, GceTpuCluster):
    if cluster.is_env_present():
      return int(cluster.get_process_count())
  return None


def plan_start(explicit: ProcessSettings) -> Start | None:
  """How this process joins its job, or None when it runs alone."""
  if explicit.num_processes is not None and explicit.num_processes < 1:
    raise ProcessSetupError(f"the number of processes must be at least 1, not {explicit.num_processes}")
  if explicit.process_id is not None and not 0 <= explicit.process_id < (explicit.num_processes or sys.maxsize):
    limit = f" (0 .. {explicit.num_processes - 1})" if explicit.num_processes else ""
    raise ProcessSetupError(f"the process id {explicit.process_id} is not a process of the job{limit}")
  if explicit.num_processes == 1:
    return None
  cluster = detected_cluster()
  given = explicit.given()
  if given:
    missing = [field for field, _, _ in _SETTINGS if field not in given]
    if missing and cluster is None:
      variables = ", ".join(v for f, v, _ in _SETTINGS if f in missing)
      raise ProcessSetupError(f"{_flags(given)} given, but not {_flags(missing)} ({variables}), and no cluster JAX "
                              "detects (TPU VM slice, SLURM, Open MPI, Kubernetes) supplies them: give all three on "
                              "every process")
    return Start(_flags(given) + (f" and {cluster[0]}" if missing else ""), given)
  if cluster is not None and (cluster[1] is None or cluster[1] > 1):
    return Start(cluster[0], {})
  return None


def _flags(fields) -> str:
  """`--num-processes, --process-id`: the settings named as the command's flags (or their JAX_* variables)."""
  return ", ".join(f"--{field.replace('_', '-')}" for field in fields)


def initialize_from_environment(explicit: ProcessSettings | None = None) -> Start | None:
  """Joins the job's other processes when there are any (`jax.distributed.initialize`); returns how, or None.

  Must run before anything starts JAX's backend. Raises `ProcessSetupError` for settings that cannot work.
  """
  start = plan_start(explicit_settings() if explicit is None else explicit)
  if start is not None:
    import jax
    print(f"joining the job's other processes (settings from {start.found_by})", file=sys.stderr, flush=True)
    jax.distributed.initialize(**start.arguments)
  return start


def announce_process(stream=None) -> None:
  """In a job of several processes, each prints once who it is and what it drives (stderr by default), so a
  host that did not join, or joined with the wrong devices, shows in every host's log."""
  import jax
  if jax.process_count() > 1:
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
          f"{jax.default_backend()} devices, {jax.device_count()} in the job", file=stream or sys.stderr, flush=True)


class _Discard(io.TextIOBase):
  """A text stream that drops what is written (and is no terminal)."""

  def write(self, text: str) -> int:
    return len(text)


def main_process_stream(stream):
  """`stream` on process 0, a stream that drops everything on the others: a job prints one progress line,
  not one per host. (None stays None: the caller's default stream.)"""
  import jax
  return stream if jax.process_index() == 0 else _Discard()
