"""Rotary tables (`eemo_jax.model.rope`) against transformers 5.23's own rotary modules."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from eemo_jax.model.rope import inverse_frequencies, vision_cos_sin

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
qwen = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")


def test_vision_cos_sin_matches_hf_rotary_embedding():
  """The table-and-gather form gives HF's per-patch cos/sin, and exactly the per-patch fp32 values."""
  head_dim, theta = 16, 10000.0
  cfg = transformers.Qwen2_5_VLVisionConfig(hidden_size=32, num_heads=2, depth=1, out_hidden_size=32)
  hf_rope = qwen.Qwen2_5_VLVisionRotaryEmbedding(cfg)
  rs = np.random.RandomState(0)
  positions = rs.randint(0, 40, size=(60, 2)).astype(np.int32)  # (patches, 2) row, column ids
  positions[-5:] = 0  # padding slots
  cos, sin = vision_cos_sin(jnp.asarray(positions), head_dim, theta)
  hf_cos, hf_sin = hf_rope(torch.zeros(1), torch.from_numpy(positions.astype(np.int64)))
  np.testing.assert_allclose(np.asarray(cos), hf_cos.numpy(), rtol=0, atol=2e-7)
  np.testing.assert_allclose(np.asarray(sin), hf_sin.numpy(), rtol=0, atol=2e-7)

  angles = jnp.asarray(positions, jnp.float32)[:, :, None] * inverse_frequencies(head_dim // 2, theta)
  half = angles.reshape(len(positions), -1)  # (patches, head_dim/2): row frequencies, then column ones
  per_patch = jnp.concatenate([half, half], axis=-1)
  np.testing.assert_array_equal(np.asarray(cos), np.asarray(jnp.cos(per_patch)))
  np.testing.assert_array_equal(np.asarray(sin), np.asarray(jnp.sin(per_patch)))
