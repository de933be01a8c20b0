"""Which functions XLA compiles inside a block, from JAX's compile log: for tests that a compile done ahead
(to time it) is the one the first call runs, not followed by a second."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def compiles_logged() -> Iterator[list[str]]:
  """Yields a list that receives the name of each function compiled inside the block (`train_step`)."""
  names: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      found = re.match(r"Compiling (?:jit\()?(\w+)", record.getMessage())
      if found:
        names.append(found.group(1))

  handler = Collect()
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield names
  finally:
    logging.getLogger("jax").removeHandler(handler)
