"""Start a command and SIGKILL it at a chosen moment: the harness of the tests that kill a run and resume it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_once(command: Sequence[str], log_path, ready: Callable[[], bool], *, cwd=None, env=None,
              timeout: float = 400) -> None:
  """Runs `command` (output to `log_path`) and SIGKILLs it as soon as `ready()` holds; returns once it is dead.

  Polls every 20 ms, so the kill lands within a step of the moment `ready` describes. Fails, with the end of the
  log, if the command ends by itself first or `ready` does not hold within `timeout` seconds."""
  with open(log_path, "w") as log:
    victim = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + timeout
    while True:
      assert victim.poll() is None, "the run ended before it could be killed:\n" + _tail(log_path)
      assert time.time() < deadline, f"not ready to be killed after {timeout:.0f} s:\n" + _tail(log_path)
      if ready():
        os.kill(victim.pid, signal.SIGKILL)
        break
      time.sleep(0.02)
    assert victim.wait(timeout=60) == -signal.SIGKILL
  finally:
    if victim.poll() is None:
      victim.kill()
      victim.wait()


def _tail(path, chars: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]
