"""`eemo-jax aot` compiles the real train step for a TPU topology on this CPU machine (libtpu, no TPU)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _aot(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  return subprocess.run([sys.executable, "-m", "eemo_jax.cli", "aot", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_tiny_config_compiles_for_a_v5e_slice_and_fits():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v5e:2x2", "--config.mesh.fsdp=-1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "4 x TPU v5 lite" in out and "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
  for line in ("arguments", "temporaries", "total"):
    assert line in out
  assert "fits" in out and "DOES NOT FIT" not in out


def test_unknown_topology_explains():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v9z:1x1")
  assert result.returncode == 2
  assert "cannot describe TPU topology 'v9z:1x1'" in result.stderr


def test_a_batch_the_mesh_cannot_shard_is_refused():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v5e:2x2", "--config.mesh.fsdp=-1",
                "--config.train.global_batch_size=6")
  assert result.returncode == 2
  assert "6 rows, which the mesh's data x fsdp = 4 devices do not divide" in result.stderr


def test_a_grpo_config_compiles_the_rollout_and_the_update_step():
  """For a GRPO config both of `eemo-jax grpo`'s programs are compiled and reported: the rollout of one
  micro-batch of prompts (prefill once per prompt, G completions decoded) and the update step."""
  result = _aot("--config", "configs/tiny_grpo.py", "--topology", "v5e:2x2")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "rollout (4 prompts x 4 completions of 48 tokens)" in out
  assert "update step (1 x 16 completions of 48 tokens after 448-token prompts)" in out
  assert out.count("fits (") == 2 and "DOES NOT FIT" not in out
