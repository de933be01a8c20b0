"""CPU decode steps with the row kernel (`eemo_jax.kernels.row_matmul`) against the same steps on XLA's dot.

The kernel changes only the order of fp32 sums, so on the same model, prompts and keys the two decodes must
choose the same tokens and give the same sampling log-probs to within fp32 rounding. Each case also checks
that the kernel really is in the compiled decode (and absent from the `row_kernel=False` one), so a silent
fallback cannot make the comparison vacuous.
"""

from __future__ import annotations

import dataclasses
import re

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


def _decode_call(model, batch, *, row_kernel, greedy, group_size=1):
  inputs = prepare_inputs(model.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"])
  graphdef, state = nnx.split(model)
  args = (graphdef, state, inputs, jax.random.key(7), np.float32(1.0), np.float32(1.0), np.array([-1], np.int32),
          np.int32(0))
  kw = dict(max_new_tokens=NEW, group_size=group_size, greedy=greedy, top_k=0, use_top_p=False,
            with_logprobs=True, layer_loop="unrolled", row_kernel=row_kernel)
  return args, kw


def _decode(model, batch, **options):
  args, kw = _decode_call(model, batch, **options)
  program = sampler._decode_jit.lower(*args, **kw).as_text()
  return sampler._decode_jit(*args, **kw), program


def _custom_calls(program: str) -> list[tuple[str, str]]:
  """(target, operand types) of every custom call in lowered StableHLO text."""
  return re.findall(r"stablehlo\.custom_call @(\w+)\(.*?\).*?: \((.*?)\) ->", program)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied_embedding"])
@pytest.mark.parametrize("greedy,group_size", [(True, 1), (False, 3)], ids=["greedy", "sampled_groups"])
def test_row_kernel_decode_equals_xla_dot_decode(tied, greedy, group_size):
  model = _model(tied)
  # Left-padded rows with images of two sizes and a text-only row: 3 prompts (x3 samples = 9 decode rows).
  batch = make_batch([[(1, 4, 6)], [(1, 8, 4), (1, 2, 2)], []], pad="left", seed=5)
  with_kernel, program = _decode(model, batch, row_kernel=True, greedy=greedy, group_size=group_size)
  with_dot, program_dot = _decode(model, batch, row_kernel=False, greedy=greedy, group_size=group_size)
  targets = {target for target, _ in _custom_calls(program)}
  # Weights with a multiple of 64 columns go packed (tiles), the others (the tiny model's k/v and MLP
  # projections) unpacked; attention reads the KV cache through the batched kernels; a tied head is (vocab, hidden).
  assert {"eemo_row_matmul_tiles", "eemo_row_matmul_pack_tiles", "eemo_row_matmul", "eemo_row_matmul_transposed"} \
      <= targets
  vocab, hidden = model.config.text.vocab_size, model.config.text.hidden_size
  head = [types for target, types in _custom_calls(program) if f"tensor<{vocab}x{hidden}xf32>" in types]
  assert bool(head) == tied
  assert "eemo_row_matmul" not in program_dot
  np.testing.assert_array_equal(np.asarray(with_kernel.tokens), np.asarray(with_dot.tokens))
  np.testing.assert_allclose(np.asarray(with_kernel.logprobs), np.asarray(with_dot.logprobs), rtol=0, atol=1e-5)
  assert int(with_kernel.steps) == int(with_dot.steps) == NEW


def test_weights_are_packed_once_outside_the_decode_loop():
  """The packing copies are loop-invariant custom calls: XLA runs them before the while loop, whose body
  streams the packed weights (were they packed in the body, every step would copy every weight)."""
  args, kw = _decode_call(_model(False), make_batch([[(1, 4, 6)], []], pad="left", seed=5), row_kernel=True,
                          greedy=True)
  compiled = sampler._decode_jit.lower(*args, **kw).compile().as_text()
  bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", compiled))
  computations = {m.group(1): m.group(0) for m in re.finditer(r"^%?([\w.\-]+) \(.*?^}", compiled, re.M | re.S)}
  body = "".join(computations[name] for name in bodies)
  assert "eemo_row_matmul_tiles" in body and "eemo_row_matmul_pack_tiles" not in body
  assert "eemo_row_matmul_pack_tiles" in compiled


def test_more_rows_than_the_kernel_takes_use_xla_dot():
  """17 decode rows: the kernel's limit is 16, so the weight matmuls compile to XLA's dot and still decode;
  attention (per row and KV head, 2 query heads each) still uses the kernel."""
  model = _model(False)
  batch = make_batch([[]] * 17, pad="left", seed=6)
  out, program = _decode(model, batch, row_kernel=True, greedy=True)
  calls = _custom_calls(program)
  assert calls and all(types.startswith("tensor<17x2x") for _, types in calls), calls
  reference, _ = _decode(model, batch, row_kernel=False, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
