"""Model internals: attention against JAX's reference, exact local window attention, remat,
the jitted path, and compile size independent of depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eemo_jax.model import config as cfglib
from eemo_jax.model.attention import attention, causal_chunk_bounds, causal_mask, segment_mask
from eemo_jax.model.layers import layer_runs
from eemo_jax.model.qwen25vl import Qwen25VL, prepare_inputs
from hf_fixtures import make_batch


def test_gqa_attention_matches_jax_reference():
  rs = np.random.RandomState(0)
  q = jnp.asarray(rs.randn(2, 7, 8, 16), jnp.float32)
  k = jnp.asarray(rs.randn(2, 7, 2, 16), jnp.float32)
  v = jnp.asarray(rs.randn(2, 7, 2, 16), jnp.float32)
  pad = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
  mask = causal_mask(pad, jnp.arange(7), 7)  # (batch, 1, q, kv)
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  ours = attention(q, k, v, mask)
  valid = np.asarray(pad, bool)  # fully masked (padding) query rows are arbitrary in both
  np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(expected)[valid], atol=1e-5)


def _reference_attention(q, k, v, mask):
  """Textbook attention (HF eager's repeat_kv, masked fill, softmax), left to JAX's autodiff."""
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
  scores = jnp.einsum("bqhd,bshd->bhqs", q, k) * q.shape[-1] ** -0.5
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
  return jnp.einsum("bhqs,bshd->bqhd", probs, v)


@pytest.mark.parametrize("kind", ["causal_padded", "segments"])
def test_attention_gradients_match_autodiff_of_reference(kind):
  """The hand-written backward pass equals autodiff of the textbook form, also for fully masked rows."""
  rs = np.random.RandomState(1)
  if kind == "causal_padded":
    q, k, v = (jnp.asarray(rs.randn(2, 9, h, 8), jnp.float32) for h in (6, 2, 2))
    pad = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    mask = causal_mask(pad, jnp.arange(9), 9)  # row 0 of batch 0 sees nothing
  else:
    q, k, v = (jnp.asarray(rs.randn(3, 8, 2, 8), jnp.float32) for _ in range(3))
    mask = segment_mask(jnp.asarray([[0, 0, 1, 1, 1, -1, -1, -1], [2] * 8, [3, 3, 3, 3, 4, 4, 4, 4]]))
  d_out = jnp.asarray(rs.randn(*q.shape), jnp.float32)  # nonzero on padding rows too

  def grads(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * d_out), argnums=(0, 1, 2))(q, k, v)

  for ours, expected in zip(grads(attention), grads(_reference_attention)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [9, 80, 130, 203])
def test_causal_chunked_attention_matches_reference(length):
  """causal=True (query chunks over the keys up to their end) gives the textbook values and gradients,
  with left and right padding and packed segments, for 1 to 4 chunks."""
  rs = np.random.RandomState(length)
  q, k, v = (jnp.asarray(rs.randn(3, length, h, 8), jnp.float32) for h in (4, 2, 2))
  segments = np.ones((3, length), np.int32)
  segments[0, :length // 3] = 0  # left padding
  segments[1, -length // 4:] = 0  # right padding
  segments[2] = 1 + np.arange(length) * 3 // length  # three packed examples
  mask = causal_mask(jnp.asarray(segments), jnp.arange(length), length)
  d_out = jnp.asarray(rs.randn(*q.shape), jnp.float32)
  valid = segments != 0  # padding query rows see every earlier key in both, but are not compared

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * d_out * valid[:, :, None, None])

  chunked = lambda q, k, v, m: attention(q, k, v, m, causal=True)
  np.testing.assert_allclose(np.asarray(chunked(q, k, v, mask))[valid],
                             np.asarray(_reference_attention(q, k, v, mask))[valid], rtol=1e-5, atol=1e-5)
  for ours, expected in zip(jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v),
                            jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_causal_chunks_skip_the_blocks_above_the_diagonal():
  """The compiled causal attention computes about 2/3 of the (130, 130) scores, not all of them."""
  assert causal_chunk_bounds(9) == [0, 9]
  assert causal_chunk_bounds(130) == [0, 48, 96, 130]
  assert causal_chunk_bounds(2048) == [0, 512, 1024, 1536, 2048]
  for length in range(1, 600, 7):
    bounds = causal_chunk_bounds(length)
    assert bounds[0] == 0 and bounds[-1] == length and all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(b % 8 == 0 for b in bounds[1:-1])
  q = jnp.zeros((2, 130, 4, 8))
  k = jnp.zeros((2, 130, 2, 8))
  mask = causal_mask(jnp.ones((2, 130), jnp.int32), jnp.arange(130), 130)

  def score_elements(causal):
    jaxpr = jax.make_jaxpr(lambda q, k: attention(q, k, k, mask, causal=causal))(q, k)
    return sum(np.prod(e.outvars[0].aval.shape) for e in _all_eqns(jaxpr.jaxpr)
               if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] != 8)

  full = score_elements(False)
  assert full == 2 * 4 * 130 * 130
  assert score_elements(True) == 2 * 4 * (48 * 48 + 48 * 96 + 34 * 130)  # 67% of full


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_causal_attention_needs_as_many_queries_as_keys():
  q = jnp.zeros((1, 2, 2, 4))
  k = jnp.zeros((1, 5, 2, 4))
  with pytest.raises(ValueError, match="KV cache"):
    attention(q, k, k, jnp.ones((1, 1, 2, 5), bool), causal=True)


def test_attention_backward_in_bfloat16_and_under_remat():
  """bf16 operands give bf16 gradients close to the fp32 ones; the custom backward composes with remat."""
  rs = np.random.RandomState(2)
  q, k, v = (jnp.asarray(rs.randn(2, 16, h, 16), jnp.float32) for h in (4, 2, 2))
  mask = causal_mask(jnp.ones((2, 16), jnp.int32), jnp.arange(16), 16)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, mask).astype(jnp.float32) ** 2)

  fp32 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  bf16 = jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  remat = jax.grad(jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable), argnums=(0, 1, 2))(q, k, v)
  for a, b, c in zip(fp32, bf16, remat):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a), rtol=0.05, atol=0.05 * float(jnp.abs(a).max()))
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_unknown_attention_implementation_explains():
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="cudnn"):
    attention(x, x, x, jnp.ones((1, 1, 2, 2), bool), implementation="flash")


def test_grouped_segment_attention_equals_dense_block_diagonal():
  """Attention within groups of slots (the vision windows / bins) equals one dense masked attention."""
  rs = np.random.RandomState(0)
  seg = np.array([[0, 0, 0, -1], [1, 1, 2, 2], [-1, -1, -1, -1]], np.int32)  # (groups, group size)
  q, k, v = (jnp.asarray(rs.randn(1, seg.size, 2, 8), jnp.float32) for _ in range(3))
  grouped = attention(*(x.reshape(3, 4, 2, 8) for x in (q, k, v)), segment_mask(jnp.asarray(seg)))
  flat = np.where(seg >= 0, seg, 100 + np.arange(3)[:, None]).reshape(1, -1)  # padding: one segment per group
  dense = attention(q, k, v, segment_mask(jnp.asarray(flat)))
  np.testing.assert_allclose(np.asarray(grouped).reshape(dense.shape), np.asarray(dense), atol=1e-6)


def _loss_and_grads(model, inputs):
  graphdef, state = nnx.split(model)

  def loss(state):
    m = nnx.merge(graphdef, state)
    out = m(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 3])

  return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.slow  # tests/train/test_step_parity.py::test_every_remat_policy_gives_the_gradients_of_no_remat covers
# every policy (full, dots, dots_no_batch) through the train step, to 1e-6
def test_remat_policies_give_the_same_loss_and_gradients():
  config = cfglib.tiny()
  batch = make_batch([[(1, 10, 12)], [(1, 4, 6)]])
  inputs = prepare_inputs(config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"])
  base_loss, base_grads = _loss_and_grads(Qwen25VL(config, rngs=nnx.Rngs(0)), inputs)
  for policy in ("full", "dots"):
    loss, grads = _loss_and_grads(Qwen25VL(config, remat=policy, rngs=nnx.Rngs(0)), inputs)
    assert abs(float(loss - base_loss)) < 1e-6
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unknown_remat_policy_explains():
  model = Qwen25VL(cfglib.tiny(), remat="sometimes", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat"):
    model(np.zeros((1, 4), np.int32))


def test_jitted_forward_with_host_inputs_equals_hf_style_call():
  config = cfglib.tiny()
  model = Qwen25VL(config, rngs=nnx.Rngs(1))
  batch = make_batch([[(1, 16, 16)], [(1, 4, 6)]], pad="left")
  eager = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]).logits
  inputs = prepare_inputs(config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"], patch_budget=512)

  @nnx.jit
  def forward(m, x):
    return m(x.input_ids, x.attention_mask, position_ids=x.position_ids, vision=x.vision).logits

  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(forward(model, inputs))[valid], np.asarray(eager)[valid], atol=1e-5)


def test_vision_groups_equal_each_group_run_alone():
  """Two data loaders (e.g. two hosts) lay out their own rows' images; concatenated as groups of one global
  batch, each row gets its own image features, as if each half ran alone."""
  config = cfglib.tiny()
  model = Qwen25VL(config, rngs=nnx.Rngs(2))
  halves = [make_batch([[(1, 8, 8)], [(1, 4, 6), (1, 4, 4)]], seed=3), make_batch([[(1, 16, 8)], [(1, 4, 4)]], seed=4)]
  length = max(h["input_ids"].shape[1] for h in halves)
  for h in halves:  # one padded length for the global batch (left padding)
    extra = length - h["input_ids"].shape[1]
    h["input_ids"], h["attention_mask"] = (np.pad(h[k], ((0, 0), (extra, 0))) for k in ("input_ids", "attention_mask"))
  parts = [prepare_inputs(config, h["input_ids"], h["attention_mask"], h["pixel_values"], h["image_grid_thw"],
                          patch_budget=512, frame_budget=256) for h in halves]

  @nnx.jit
  def forward(m, x):
    return m(x.input_ids, x.attention_mask, position_ids=x.position_ids, vision=x.vision).logits

  alone = [np.asarray(forward(model, p)) for p in parts]
  cat = lambda *xs, axis=0: np.concatenate(xs, axis=axis)  # noqa: E731
  vision = jax.tree.map(cat, parts[0].vision, parts[1].vision).replace(groups=2)
  joined = parts[0].replace(input_ids=cat(parts[0].input_ids, parts[1].input_ids),
                            attention_mask=cat(parts[0].attention_mask, parts[1].attention_mask),
                            position_ids=cat(parts[0].position_ids, parts[1].position_ids, axis=1), vision=vision)
  together = np.asarray(forward(model, joined))
  np.testing.assert_allclose(together, cat(*alone), atol=1e-5)
  ungrouped = np.asarray(forward(model, joined.replace(vision=vision.replace(groups=1))))
  assert np.abs(ungrouped - cat(*alone)).max() > 1e-3  # without groups the second half reads the wrong features


def test_traced_image_grid_gives_a_clear_error():
  config = cfglib.tiny()
  model = Qwen25VL(config, rngs=nnx.Rngs(0))
  batch = make_batch([[(1, 4, 4)]])

  @nnx.jit
  def forward(m, ids, mask, pixels, grid):
    return m(ids, mask, pixels, grid).logits

  with pytest.raises(ValueError, match="prepare_inputs"):
    forward(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])


def _hlo_size(depth, layers):
  base = cfglib.tiny()
  # Full attention every 4th block, as Qwen2.5-VL does every 8th: the pattern repeats, its period is scanned.
  vision = {**base.vision.__dict__, "depth": depth, "fullatt_block_indexes": tuple(range(3, depth, 4))}
  config = base.replace(vision=cfglib.VisionConfig(**vision),
                        text=cfglib.TextConfig(**{**base.text.__dict__, "num_hidden_layers": layers}))
  model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  batch = make_batch([[(1, 4, 4)]])
  inputs = prepare_inputs(config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"])

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    return m(x.input_ids, x.attention_mask, position_ids=x.position_ids, vision=x.vision).logits

  return len(jax.jit(forward).lower(state, inputs).as_text())


def test_program_size_does_not_grow_with_depth():
  """Layers are scanned: 4x the depth must not give a bigger program (compile time stays flat)."""
  shallow, deep = _hlo_size(8, 2), _hlo_size(32, 8)
  assert deep <= shallow * 1.02, (shallow, deep)


@pytest.mark.parametrize("kinds, period, runs", [
    ([0] * 7 + [1] + [0] * 7 + [1] + [0] * 7 + [1] + [0] * 7 + [1], 8, [(0, 7, 0), (7, 8, 1)]),  # Qwen2.5-VL 3B/7B
    ([0, 1, 0], 3, [(0, 1, 0), (1, 2, 1), (2, 3, 0)]),  # not periodic: the whole depth is one period
    ([0, 0, 0, 0], 1, [(0, 1, 0)]),
    ([1, 0, 1, 0], 2, [(0, 1, 1), (1, 2, 0)]),
])
def test_layer_runs_finds_the_shortest_period_and_its_runs(kinds, period, runs):
  assert layer_runs(kinds) == (period, runs)
