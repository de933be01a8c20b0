"""Status lines of the slow steps before a run's first step: reading the weights, compiling the steps.

On a real model these take minutes each, and a command that prints nothing meanwhile looks hung. The
modules that do the work log one whole line per event to the `eemo_jax.status` logger; the commands
print them (`printed`, on JAX process 0 only), library use stays silent (the logger's INFO records go
nowhere unless a caller listens).

    with status.printed(enabled=jax.process_index() == 0):
      train(config)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("eemo_jax.status")


@contextlib.contextmanager
def printed(stream=None, *, enabled: bool = True) -> Iterator[None]:
  """While the block runs, prints each status line to `stream` (default: stderr at entry), as it is, flushed.

  The lines stay out of the root logger's handlers (absl and TFDS install some), so each is printed once
  and without a `INFO:name:` prefix.
  """
  if not enabled:
    yield
    return
  handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  level, propagate = log.level, log.propagate
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  try:
    yield
  finally:
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def compile_timed(name: str, lowered_compile) -> float:
  """Runs `lowered_compile()` (a `.lower(...).compile()`) between the lines `compiling NAME…` and
  `compiled NAME in S s`; returns S."""
  log.info("compiling %s…", name)
  started = time.perf_counter()
  lowered_compile()
  seconds = time.perf_counter() - started
  log.info("compiled %s in %.1f s", name, seconds)
  return seconds


def format_bytes(n: int) -> str:
  """Decimal units, as the Hub and `du -h --si` show checkpoint sizes: 612 B, 3.9 kB, 15.2 GB."""
  if n < 1000:
    return f"{n} B"
  value = n / 1000
  for unit in ("kB", "MB"):
    if round(value, 1) < 1000:
      return f"{value:.1f} {unit}"
    value /= 1000
  return f"{value:.1f} GB"
