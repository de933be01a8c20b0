"""Two real JAX processes on this CPU, as two hosts of a pod run `eemo-jax train`.

Each process has 4 fake CPU devices (8 in the job) and reads its own share of the data; they meet through
`jax.distributed.initialize` on a localhost coordinator and compute collectives with gloo. The job is
SIGKILLed mid-run once a checkpoint is complete, resumed by the same command, and its per-step losses are
those of one process driving 8 devices over the same global batches. A resume by another number of
processes is refused in one line (the data iterator's position is saved per process).

The tiny recipe shortened: 8 steps of 8 rows, a checkpoint every 2, no evaluation, head dropout off (see
`_overrides`). No compilation cache: JAX writes it from process 0 only, so on the resume process 0 would load
the step while process 1 compiled it, and gloo gives up on a peer that is 30 s late to a collective.
"""

import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_assets import Assets, build_assets

from eemo_jax import cli
from eemo_jax.config import load_config
from eemo_jax.train.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_demo.py")
STEPS = 8
PROCESSES = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
  return build_assets(str(tmp_path_factory.mktemp("assets")), num_train=32, num_test=8)


def _overrides(assets: Assets, run_dir) -> list[str]:
  """The tiny recipe, shortened. Head dropout is off: its masks are drawn over the rows of the global batch,
  whose order differs between the runs compared (2 processes: process 0's rows, then process 1's), so with
  dropout the same example would meet another mask. The per-step example sets are the same either way."""
  fields = {"train.run_dir": str(run_dir), "train.steps": STEPS, "train.checkpoint_every": 2,
            "train.global_batch_size": 8, "train.log_every": 1, "data.data_dir": assets.data_dir,
            "data.dataset_config": assets.dataset_config, "data.tokenizer_dir": assets.tokenizer_dir,
            "eval.batches": 0, "mesh.fsdp": 8, "head.projection_dropout": 0.0, "head.attention_dropout": 0.0,
            "head.classifier_dropout": 0.0}
  return [f"--config.{k}={v}" for k, v in fields.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_job(assets, run_dir, logs) -> list[subprocess.Popen]:
  """`eemo-jax train` as each of two hosts runs it, with the coordinator given on the command line."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  precision = jax.config.jax_default_matmul_precision  # the reference's, computed in this process
  if precision is not None:
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
  processes = []
  for index in range(PROCESSES):
    command = [sys.executable, "-m", "eemo_jax.cli", "train", "--config", TINY, *_overrides(assets, run_dir),
               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(PROCESSES),
               "--process-id", str(index)]
    with open(logs[index], "w") as log:
      processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
  return processes


@contextlib.contextmanager
def _reaped(processes: list[subprocess.Popen]):
  """Kills whatever is still running of `processes` when the block ends (a failed assertion included)."""
  try:
    yield
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def _complete_checkpoints(run_dir) -> list[int]:
  """Steps whose checkpoint is complete: Orbax gives a step folder its plain name once every process's part
  is written (before that it is `<step>.orbax-checkpoint-tmp-*`)."""
  folder = run_dir / "checkpoints"
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if folder.is_dir() else []


def _rows(run_dir, *, offset: int = 0) -> dict[int, dict]:
  """The train rows of metrics.jsonl from byte `offset` on, by step (each step once: one writer per job)."""
  with open(run_dir / "metrics.jsonl", "rb") as f:
    f.seek(offset)
    lines = f.read().decode().split("\n")[:-1]  # a line the kill cut short has no newline yet
  rows = [json.loads(line) for line in lines]
  steps = [row["step"] for row in rows if row["split"] == "train"]
  assert len(steps) == len(set(steps)), f"a step logged twice by one start of the job: {steps}"
  return {row["step"]: row for row in rows if row["split"] == "train"}


@dataclasses.dataclass
class Job:
  run_dir: object
  before_kill: dict[int, dict]  # metrics rows of the killed start
  killed_after: list[int]  # complete checkpoints when the job was killed
  resumed: dict[int, dict]  # metrics rows of the resumed start
  logs: list[str]  # each process's output of the resumed start


@pytest.fixture(scope="module")
def job(assets, tmp_path_factory) -> Job:
  """The two-process job: started, SIGKILLed (both processes) once a checkpoint is complete, started again."""
  root = tmp_path_factory.mktemp("job")
  run_dir = root / "run"
  logs = [root / f"killed.{i}.log" for i in range(PROCESSES)]
  processes = _start_job(assets, run_dir, logs)
  with _reaped(processes):
    hang_guard = time.time() + 600  # a job that neither checkpoints nor ends would otherwise hold CI forever
    while not _complete_checkpoints(run_dir):
      for p, log in zip(processes, logs):
        assert p.poll() is None, f"a process ended before the first checkpoint:\n{log.read_text()}"
      assert time.time() < hang_guard, "no checkpoint after 600 s:\n" + "\n".join(log.read_text() for log in logs)
      time.sleep(0.02)
    for p in processes:
      os.kill(p.pid, signal.SIGKILL)
    assert [p.wait() for p in processes] == [-signal.SIGKILL] * PROCESSES
  killed_after = _complete_checkpoints(run_dir)
  before_kill = _rows(run_dir)
  assert max(before_kill) < STEPS, "the job finished before it was killed"

  offset = os.path.getsize(run_dir / "metrics.jsonl")
  logs = [root / f"resumed.{i}.log" for i in range(PROCESSES)]
  processes = _start_job(assets, run_dir, logs)
  with _reaped(processes):
    codes = [p.wait(timeout=600) for p in processes]
  texts = [log.read_text() for log in logs]
  assert codes == [0] * PROCESSES, "\n\n".join(texts)
  return Job(run_dir, before_kill, killed_after, _rows(run_dir, offset=offset), texts)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict[int, dict]:
  """The same run by one process driving 8 devices (this one), uninterrupted."""
  run_dir = tmp_path_factory.mktemp("reference") / "run"
  assert jax.process_count() == 1 and jax.device_count() == 8
  train(load_config(TINY, _overrides(assets, run_dir)), progress_stream=io.StringIO())
  return _rows(run_dir)


def test_two_processes_resume_after_sigkill_with_the_losses_of_one_process(job, reference):
  """Every step of the job (before the kill, and after the resume) has the loss of one process over 8
  devices. Both runs see the same examples in each step, in fp32 with full-precision matmuls; only the
  order of sums differs (the rows sit in another order, each process lays out its own images, gradients
  are reduced across processes by gloo), which moves the losses by float rounding: 1-2 float32 ulps
  (at most 1.8e-7 relative over the 8 steps when this test was written), grown by the optimizer's updates
  on a longer run. 1e-5 relative bounds that with room, while a wrong batch, a lost or duplicated row or a
  mis-restored state changes the loss in the second or third digit.
  A step computed both before the kill and after the resume is the same computation on the same mesh:
  equal bit for bit."""
  resumed_from = min(job.resumed) - 1
  assert resumed_from in job.killed_after and resumed_from >= 2
  assert sorted(job.resumed) == list(range(resumed_from + 1, STEPS + 1))
  assert f"resumed {job.run_dir} at step {resumed_from} (checkpoint {resumed_from})" in job.logs[0]
  steps = {**job.before_kill, **job.resumed}
  assert sorted(steps) == list(range(1, STEPS + 1))
  for step, row in steps.items():
    for key in ("loss", "lm_loss", "ces_loss", "grad_norm"):
      np.testing.assert_allclose(row[key], reference[step][key], rtol=1e-5, atol=0, err_msg=f"{key} at step {step}")
    assert row["lr"] == reference[step]["lr"]
  for step in set(job.before_kill) & set(job.resumed):
    assert job.resumed[step]["loss"] == job.before_kill[step]["loss"], step


def test_each_process_announces_itself_and_only_process_0_reports(job):
  for index, text in enumerate(job.logs):
    assert f"process {index} of {PROCESSES}: 4 local cpu devices, 8 in the job" in text, text
  assert f"step {STEPS}/{STEPS}" in job.logs[0] and "done: " in job.logs[0]
  assert "step " not in job.logs[1] and "done: " not in job.logs[1], job.logs[1]


def test_a_resume_by_another_number_of_processes_is_refused_in_one_line(assets, job, capsys):
  """The job's checkpoint resumed by one process: exit 2, one line that says to resume with 2 processes,
  and the run directory as it was (the checkpoint is not taken for damaged and moved aside)."""
  before = {p: p.read_bytes() for p in job.run_dir.rglob("*") if p.is_file()}
  assert cli.main(["train", "--config", TINY, *_overrides(assets, job.run_dir)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert err.startswith(f"eemo-jax train: checkpoint {STEPS} of {job.run_dir} was saved by 2 JAX processes and "
                        "this run has 1: "), err
  assert "--num-processes 2" in err
  assert {p: p.read_bytes() for p in job.run_dir.rglob("*") if p.is_file()} == before
