"""CPU decode steps with the row kernel (`eemo_jax.kernels.row_matmul`) against the same steps on XLA's dot.

The kernel changes only the order of fp32 sums, so on the same model, prompts and keys the two decodes must
choose the same tokens and give the same sampling log-probs to within fp32 rounding. Each case also checks
that the kernel really is in the compiled decode (and absent from the `row_kernel=False` one), so a silent
fallback cannot make the comparison vacuous.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import make_batch

from eemo_jax.generate import sampler
from eemo_jax.kernels import row_matmul
from eemo_jax.model.config import tiny
from eemo_jax.model.qwen25vl import Qwen25VL, prepare_inputs

pytestmark = pytest.mark.skipif(not row_matmul.available(), reason="no C++ compiler: the kernel cannot be built here")

NEW = 12


def _model(tied: bool) -> Qwen25VL:
  return Qwen25VL(dataclasses.replace(tiny(), tie_word_embeddings=tied), rngs=nnx.Rngs(3))


def _decode(model, batch, *, row_kernel, greedy, group_size=1):
  inputs = prepare_inputs(model.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"])
  graphdef, state = nnx.split(model)
  args = (graphdef, state, inputs, jax.random.key(7), np.float32(1.0), np.float32(1.0), np.array([-1], np.int32),
          np.int32(0))
  kw = dict(max_new_tokens=NEW, group_size=group_size, greedy=greedy, top_k=0, use_top_p=False,
            with_logprobs=True, layer_loop="unrolled", row_kernel=row_kernel)
  program = sampler._decode_jit.lower(*args, **kw).as_text()
  return sampler._decode_jit(*args, **kw), program


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied_embedding"])
@pytest.mark.parametrize("greedy,group_size", [(True, 1), (False, 3)], ids=["greedy", "sampled_groups"])
def test_row_kernel_decode_equals_xla_dot_decode(tied, greedy, group_size):
  model = _model(tied)
  # Left-padded rows with images of two sizes and a text-only row: 3 prompts (x3 samples = 9 decode rows).
  batch = make_batch([[(1, 4, 6)], [(1, 8, 4), (1, 2, 2)], []], pad="left", seed=5)
  with_kernel, program = _decode(model, batch, row_kernel=True, greedy=greedy, group_size=group_size)
  with_dot, program_dot = _decode(model, batch, row_kernel=False, greedy=greedy, group_size=group_size)
  assert "eemo_row_matmul_transposed" in program if tied else "eemo_row_matmul" in program
  assert "eemo_row_matmul" not in program_dot
  np.testing.assert_array_equal(np.asarray(with_kernel.tokens), np.asarray(with_dot.tokens))
  np.testing.assert_allclose(np.asarray(with_kernel.logprobs), np.asarray(with_dot.logprobs), rtol=0, atol=1e-5)
  assert int(with_kernel.steps) == int(with_dot.steps) == NEW


def test_more_rows_than_the_kernel_takes_use_xla_dot():
  """17 decode rows: the kernel's limit is 16, so the steps compile to XLA's dot and still decode."""
  model = _model(False)
  batch = make_batch([[]] * 17, pad="left", seed=6)
  out, program = _decode(model, batch, row_kernel=True, greedy=True)
  assert "eemo_row_matmul" not in program
  reference, _ = _decode(model, batch, row_kernel=False, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
