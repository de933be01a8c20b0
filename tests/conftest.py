"""Test setup: 8 fake CPU devices for mesh tests, full-precision matmuls for parity."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The test environment has libtpu (for `eemo-jax aot`); the tests themselves run on CPU only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch's idle OpenMP threads spin while XLA computes; tiny reference models need one thread.
  import torch

  torch.set_num_threads(1)
except ImportError:
  pass
