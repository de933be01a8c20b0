"""The status lines of the slow steps: printed whole by the commands, silent in library use."""

import io
import logging

import jax
import jax.numpy as jnp
import pytest

from eemo_jax import status


def test_lines_are_printed_as_they_are_only_inside_the_block(capsys):
  stream = io.StringIO()
  status.log.info("before")
  with status.printed(stream):
    status.log.info("read %s (%s) %d/%d in %.1f s", "model.safetensors", "1.2 MB", 1, 1, 0.31)
  status.log.info("after")
  assert stream.getvalue() == "read model.safetensors (1.2 MB) 1/1 in 0.3 s\n"
  assert capsys.readouterr().err == ""  # library use: nothing reaches stderr (nor the root logger's handlers)
  assert status.log.handlers == [] and status.log.propagate and status.log.level == logging.NOTSET


def test_disabled_prints_nothing():
  stream = io.StringIO()
  with status.printed(stream, enabled=False):  # a process other than 0
    status.log.info("compiling train step…")
  assert stream.getvalue() == ""


def test_compile_timed_surrounds_the_compile_with_its_lines(monkeypatch):
  stream = io.StringIO()
  clock = iter([10.0, 51.25])
  monkeypatch.setattr(status.time, "perf_counter", lambda: next(clock))
  lowered = jax.jit(lambda x: 2 * x).lower(jnp.ones(3))
  compiled = []
  with status.printed(stream):
    seconds = status.compile_timed("double", lambda: compiled.append(lowered.compile()))
  assert seconds == 41.25 and len(compiled) == 1
  assert stream.getvalue().splitlines() == ["compiling double…", "compiled double in 41.2 s"]


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (875_000, "875.0 kB"),
                                     (1_234_567, "1.2 MB"), (3_968_000_000, "4.0 GB"),
                                     (15_230_000_000, "15.2 GB"), (2 * 10**12, "2000.0 GB")])
def test_format_bytes(n, text):
  assert status.format_bytes(n) == text
