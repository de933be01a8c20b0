"""The decode benchmark's bandwidth fraction pairs each round's step with the same round's read bandwidth.

The benchmark itself (minutes on `small`) is not run here; its limits phase runs in the GRPO and eval benchmark
tests, which share `machine_limits` and the read probe."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import model_throughput as bench  # noqa: E402


def test_paired_fraction_divides_each_round_by_its_own_bandwidth():
  weight_bytes, probe_bytes = 160e6, 512 * 2**20
  steps = [5e-3, 8e-3, 4e-3]  # seconds per decode step in rounds 0, 1, 2
  probes = {"jax_sum": [0.020, 0.010, 0.012], "torch_sum": [0.016, 0.011, 0.020]}  # seconds per sum
  got = bench.paired_bw_fraction(weight_bytes, steps, probes, probe_bytes)

  bw = [probe_bytes / 0.016 / 1e9, probe_bytes / 0.010 / 1e9, probe_bytes / 0.012 / 1e9]  # the faster probe
  fr = [weight_bytes / s / 1e9 / b for s, b in zip(steps, bw)]
  assert got["median"] == pytest.approx(sorted(fr)[1], rel=1e-12)
  assert got["read_bandwidth_gbs"] == pytest.approx(sorted(bw)[1], rel=1e-12)
  assert got["iqr"] == pytest.approx(list(np.percentile(fr, [25, 75])), rel=1e-12) and got["rounds"] == 3
  # Not the same as dividing the median step's rate by the median bandwidth: the pairing is the point.
  assert got["median"] != pytest.approx(weight_bytes / 5e-3 / 1e9 / got["read_bandwidth_gbs"], rel=1e-3)
