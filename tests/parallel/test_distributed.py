"""When a command joins other processes, and with which settings: checked against JAX's own cluster detection.

`jax.distributed.initialize` is replaced by a recorder: the decision is what is tested here, the joining
itself by tests/parallel/test_multihost.py with two real processes.
"""

import argparse
import importlib.util

import jax
import pytest
from jax._src import clusters

from eemo_jax import cli
from eemo_jax.parallel import distributed
from eemo_jax.parallel.distributed import ProcessSettings, ProcessSetupError

# Every variable a cluster environment of JAX (or our override) reads: cleared before each test, so the
# machine the tests run on (a CI job under SLURM or Kubernetes) does not leak into them.
CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "TPU_SKIP_MDS_QUERY", "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")


@pytest.fixture(autouse=True)
def plain_machine(monkeypatch):
  for variable in CLUSTER_VARIABLES:
    monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def joined(monkeypatch) -> list[dict]:
  """The calls of `jax.distributed.initialize` (their keyword arguments); none reaches JAX."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


def _set(monkeypatch, **variables):
  for name, value in variables.items():
    monkeypatch.setenv(name, str(value))


def slurm(tasks: int, **extra) -> dict:
  """What `srun --ntasks=<tasks>` sets (SLURM_STEP_NODELIST only inside a job step, not in the batch script)."""
  return dict(SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="node[001-004]", SLURM_NTASKS=tasks, SLURM_PROCID=0,
              SLURM_LOCALID=0, **extra)


def open_mpi(size: int) -> dict:
  return dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911", OMPI_COMM_WORLD_SIZE=size,
              OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_LOCAL_RANK=0)


def gke_tpu(workers: int, slices: int) -> dict:
  """A GKE TPU pod's variables. MEGASCALE_* and TPU_SKIP_MDS_QUERY are set so that JAX's detection asks no
  metadata server here (JAX tries the gcloud TPU VM's, which this machine has not, before GKE's variables)."""
  return dict(TPU_WORKER_HOSTNAMES=",".join(["localhost"] * workers), TPU_WORKER_ID=0, MEGASCALE_NUM_SLICES=slices,
              MEGASCALE_SLICE_ID=0, MEGASCALE_COORDINATOR_ADDRESS="localhost", TPU_SKIP_MDS_QUERY=1)


def _on_cloud_tpu_vm(monkeypatch):
  """As `import jax` leaves things on a TPU VM (JAX's TPU cluster envs read their own copy of the flag)."""
  from jax._src import cloud_tpu_init
  from jax._src.clusters import cloud_tpu_cluster
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)


def _jax_process_count() -> int | None:
  """How many processes JAX's own detection (what `initialize()` without arguments uses) finds; None: none."""
  _, count, _, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5)
  return count


# --------------------------------------------------------------------------------------------------
# The environment alone
# --------------------------------------------------------------------------------------------------


ENVIRONMENTS = {
    "plain machine": {},
    "srun, 4 tasks": slurm(4),
    "srun, 1 task": slurm(1),
    "sbatch script, no job step": {k: v for k, v in slurm(4).items() if k != "SLURM_STEP_NODELIST"},
    "mpirun -n 2": open_mpi(2),
    "mpirun -n 1": open_mpi(1),
    "GKE TPU slice, 4 workers x 2 slices": gke_tpu(workers=4, slices=2),
    "GKE TPU, one worker": gke_tpu(workers=1, slices=1),
}


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_joins_exactly_when_jax_finds_several_processes(name, monkeypatch, joined):
  """The decision agrees with JAX's own cluster detection: join (with no settings: JAX detects them again)
  when it counts more than one process, run alone when it counts one or finds no cluster."""
  _set(monkeypatch, **ENVIRONMENTS[name])
  if name.startswith("GKE"):
    _on_cloud_tpu_vm(monkeypatch)
  jax_count = _jax_process_count()
  start = distributed.initialize_from_environment()
  if jax_count is not None and jax_count > 1:
    assert start is not None and joined == [{}], (name, jax_count)
    assert distributed.detected_cluster()[1] == jax_count
  else:
    assert start is None and joined == [], (name, jax_count)


def test_tpu_worker_hostnames_off_a_tpu_vm_is_not_a_job(monkeypatch, joined):
  """GKE's variable on a machine without TPUs (copied into a CPU pod): JAX would not use it, nor do we."""
  _set(monkeypatch, TPU_WORKER_HOSTNAMES="a,b", MEGASCALE_NUM_SLICES=1)
  assert distributed.initialize_from_environment() is None and joined == []


def test_an_indexed_kubernetes_job_joins_when_jax_can_read_it(monkeypatch, joined):
  """JAX counts a Job's pods through the Kubernetes API (the `kubernetes` package); without the package, or
  in a pod that is not an indexed Job, JAX cannot join it, so the process runs alone."""
  _set(monkeypatch, KUBERNETES_SERVICE_HOST="10.0.0.1")
  assert distributed.initialize_from_environment() is None  # a plain pod
  _set(monkeypatch, JOB_COMPLETION_INDEX=3)
  assert importlib.util.find_spec("kubernetes") is None
  assert distributed.initialize_from_environment() is None  # JAX would warn that `kubernetes` is missing
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "kubernetes" else real_find_spec(name, *a))
  start = distributed.initialize_from_environment()
  assert start.found_by == "the Kubernetes Job" and joined == [{}]


# --------------------------------------------------------------------------------------------------
# Explicit settings: flags over JAX_* over the cluster
# --------------------------------------------------------------------------------------------------


def _args(**flags) -> argparse.Namespace:
  return argparse.Namespace(**{"coordinator_address": None, "num_processes": None, "process_id": None, **flags})


def test_the_jax_environment_variables_start_a_job_on_a_plain_machine(monkeypatch, joined):
  _set(monkeypatch, JAX_COORDINATOR_ADDRESS="10.0.0.2:1234", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1)
  start = distributed.initialize_from_environment(distributed.explicit_settings(_args()))
  assert joined == [dict(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)]
  assert start.found_by == "--coordinator-address, --num-processes, --process-id"


def test_flags_override_the_environment_field_by_field(monkeypatch, joined):
  _set(monkeypatch, JAX_COORDINATOR_ADDRESS="10.0.0.2:1234", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1)
  settings = distributed.explicit_settings(_args(num_processes=4, process_id=3))
  assert settings == ProcessSettings("10.0.0.2:1234", 4, 3)
  distributed.initialize_from_environment(settings)
  assert joined == [dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)]


def test_explicit_settings_override_the_cluster_and_leave_it_the_rest(monkeypatch, joined):
  """Under srun, `--coordinator-address` alone moves the coordinator; SLURM still gives count and index
  (JAX fills what is not passed), as JAX's detection confirms."""
  _set(monkeypatch, **slurm(4))
  start = distributed.initialize_from_environment(ProcessSettings(coordinator_address="login1:5555"))
  assert joined == [dict(coordinator_address="login1:5555")] and start.found_by == "--coordinator-address and SLURM"
  address, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params("login1:5555", None, None,
                                                                                      None, None, 5)
  assert (address, count, index) == ("login1:5555", 4, 0)


def test_one_process_explicitly_runs_alone_even_in_a_cluster(monkeypatch, joined):
  _set(monkeypatch, **slurm(4))
  assert distributed.initialize_from_environment(ProcessSettings(num_processes=1)) is None and joined == []


@pytest.mark.parametrize("settings, message", [
    (ProcessSettings(num_processes=2, process_id=0), "--num-processes, --process-id given, but not "
                                                     "--coordinator-address (JAX_COORDINATOR_ADDRESS)"),
    (ProcessSettings(coordinator_address="h:1"), "but not --num-processes, --process-id (JAX_NUM_PROCESSES, "
                                                 "JAX_PROCESS_ID)"),
    (ProcessSettings("h:1", 2, 2), "the process id 2 is not a process of the job (0 .. 1)"),
    (ProcessSettings("h:1", 0, 0), "the number of processes must be at least 1, not 0"),
])
def test_settings_that_cannot_work_are_refused_before_anything_starts(settings, message, joined):
  with pytest.raises(ProcessSetupError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
    distributed.initialize_from_environment(settings)
  assert joined == []


def test_a_malformed_variable_names_itself(monkeypatch):
  _set(monkeypatch, JAX_NUM_PROCESSES="two")
  with pytest.raises(ProcessSetupError, match=r"JAX_NUM_PROCESSES='two' must be a whole number"):
    distributed.explicit_settings(_args())


def test_train_takes_the_flags_and_refuses_an_incomplete_set_in_one_line(capsys, joined):
  """The command's flags reach the decision; a user error is one line and exit 2, before JAX starts."""
  import os
  tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_demo.py")
  assert cli.main(["train", "--config", tiny, "--num-processes", "2", "--process-id", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("eemo-jax train: --num-processes, --process-id given, but not "
                                                 "--coordinator-address"), err
  assert cli.main(["grpo", "--config", tiny, "--coordinator-address", "h:1"]) == 2
  assert capsys.readouterr().err.startswith("eemo-jax grpo: --coordinator-address given, but not --num-processes")
  assert joined == []
