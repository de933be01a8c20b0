"""Test setup: 8 fake CPU devices for mesh tests, full-precision matmuls for parity, and one XLA compilation
cache for the whole run."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The test environment has libtpu (for `eemo-jax aot`); the tests themselves run on CPU only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same tiny models' programs again in test after test, and in the
# runs the tests start as subprocesses (a killed run and its resume compile the same step). One persistent
# compilation cache, fresh for each pytest run and removed after it, serves them all: the process that loads
# this file first (pytest itself, or the xdist controller) makes it, and the xdist workers and every subprocess
# inherit it through the environment. A cache given in the environment is used as it is and kept.
_RUN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _RUN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="eemo-jax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_COMPILATION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch's idle OpenMP threads spin while XLA computes; tiny reference models need one thread.
  import torch

  torch.set_num_threads(1)
except ImportError:
  pass


def pytest_unconfigure(config):
  if _RUN_COMPILATION_CACHE is not None:
    shutil.rmtree(_RUN_COMPILATION_CACHE, ignore_errors=True)
