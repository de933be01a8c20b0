"""KV-cache generation for `Qwen25VL`: host preparation, then one jitted prefill + decode loop.

The whole generation is a single compiled function (`decode`), so a call costs one dispatch and one
host transfer at the end (no per-token host sync). Inside it:

1. **Prefill.** The vision tower runs once; the whole (left-padded) prompt is written into a KV cache
   of `prompt_len` slots with causal attention, and only the last position's logits are projected
   (`logits_for="last"`). Pixel values are used here and nowhere else.
2. **Groups.** With `group_size` G > 1 (GRPO rollouts, `eemo_jax.rl.rollout`), the prompt's KV cache,
   its padding mask, its last logits and its next M-RoPE positions are then repeated G times along
   the batch axis (prompt i's samples at rows i*G .. i*G+G-1, as TRL's RepeatSampler lays them out),
   so the vision tower and the prefill run once per prompt, not once per sample. The cache gets
   `max_new_tokens` more slots here.
3. **Decode.** A `lax.while_loop` feeds one token per step until every row has emitted an EOS or
   `max_new_tokens` tokens exist. Two counters (spec §6.2): generated token k is fed back at cache
   slot `L + k` with M-RoPE position `next_pos + k`, where `next_pos` is the last prompt token's
   position + 1 (per axis, as HF `generate` does). The two differ because image tokens share
   positions and left padding occupies slots but no positions. Finished rows keep running (batch
   shapes are static) but emit `pad_token_id`, as HF does.
4. **One key per row.** Row r's token k is drawn with `fold_in(split(key, rows)[r], k)`, so a row's
   samples depend on its key, its prompt and the model, never on the other rows: the prefix-shared
   group draws exactly the tokens of a batch that repeats each prompt G times.
5. **Layer loop.** On accelerators a step scans the stacked layers, as the prefill does. On the CPU the
   layers are unrolled over per-layer copies of their weights and per-layer cache buffers, made once
   before the loop (`TextModel.unstacked_layers`, `StepCache`): XLA:CPU copied every layer's weights
   and cache out of the stacked arrays before using them, every step (`small`'s greedy step: 15.1 -> 11.1 ms,
   both in one run; `benchmarks/results/model_throughput.zen4.json`). There, with few rows, the weight
   matmuls and attention's products with the cache are `eemo_jax.kernels.row_matmul`'s, on weights packed
   once per call before the loop (`small`'s greedy step: 10.0-11.4 ms on XLA's dot, 5.2-6.0 ms with the
   kernels, three runs; unless `row_kernel=False`, or the rows are sharded).

The cache is created inside the compiled function and carried by the while loop, which updates it
in place; it never crosses the jit boundary, so there is nothing to donate.

The compiled function takes the model as `nnx.split` state with the `GraphDef` static, so it is pure
and `jax.jit` caches it: a second call with the same shapes and static options does not recompile.
Temperature, top-p, the EOS ids, the pad id and the key are traced, so changing them is free. The
static options are max_new_tokens, the group size, greedy or not, top_k (it fixes the `lax.top_k`
shape), whether top-p is on (it needs a sort of the vocabulary) and whether log-probs are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from eemo_jax.kernels import row_matmul
from eemo_jax.model.attention import causal_mask
from eemo_jax.model.qwen25vl import ModelInputs, Qwen25VL, prepare_inputs
from eemo_jax.model.rope import mrope_cos_sin
from eemo_jax.model.text import KVCache, StepCache

_NO_EOS = -1  # pads the EOS id array (never a token), so it never has length 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. `temperature == 0` means greedy (argmax), as HF `do_sample=False`.

  Applied in HF's order: temperature, then top-k, then top-p on the top-k survivors' probabilities.
  `top_k == 0` and `top_p == 1.0` disable those filters.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


# --------------------------------------------------------------------------------------------------
# Sampling from logits (pure; unit-tested against NumPy)
# --------------------------------------------------------------------------------------------------


def sample_logits(logits: jax.Array, rng: jax.Array, temperature=1.0, top_k: int = 0, top_p=1.0) -> jax.Array:
  """Draws one token per row from `logits` (batch, vocab) -> (batch,) int32.

  `temperature` and `top_p` may be traced; a Python `temperature == 0` means argmax (no key used).
  `top_k` is a Python int because it fixes a shape: with it, only the k largest logits are kept
  (`lax.top_k`, no full sort); without it, top-p needs one descending sort of the vocabulary.
  Top-p keeps the smallest prefix of the sorted candidates whose probability reaches `top_p`
  (a token is kept when the mass strictly before it is < top_p), so at least one token survives.
  Ties are broken towards the lower token id.
  """
  logits = logits.astype(jnp.float32)
  if _is_static(temperature) and temperature == 0:
    return argmax(logits)
  logits = logits / jnp.asarray(temperature, jnp.float32)
  vocab = logits.shape[-1]
  use_top_p = not (_is_static(top_p) and top_p >= 1.0)
  if 0 < top_k < vocab:
    values, index = jax.lax.top_k(logits, top_k)  # (batch, k), descending
  elif use_top_p:
    index = jnp.argsort(-logits, axis=-1, stable=True)  # (batch, vocab), descending
    values = jnp.take_along_axis(logits, index, axis=-1)
  else:
    return _categorical(rng, logits)
  if use_top_p:
    values = _top_p_filter(values, top_p)
  choice = _categorical(rng, values)  # (batch,) index into the candidates
  return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` as int32 (the first maximum; NaN counts as the maximum), in two plain
  reductions: XLA:CPU's (value, index) reduction over a (4, 32000) batch of logits cost about 6% of
  `small`'s greedy decode step (11.0 -> 10.3 ms, measured side by side); a max and a masked min do not."""
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  best = jnp.max(x, axis=-1, keepdims=True)
  return jnp.min(jnp.where((x == best) | jnp.isnan(x), iota, x.shape[-1]), axis=-1)


def _categorical(rng, logits) -> jax.Array:
  """`jax.random.categorical(rng, logits, axis=-1)` as int32: the same Gumbel draw, with `argmax` above."""
  return argmax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))


def _top_p_filter(sorted_logits: jax.Array, top_p) -> jax.Array:
  """Masks (with -inf) the sorted candidates beyond the nucleus; the first one is always kept."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # (batch, n) probability of the better candidates
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  return jnp.where(keep, sorted_logits, -jnp.inf)


def _is_static(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating))


# --------------------------------------------------------------------------------------------------
# The compiled prefill + decode
# --------------------------------------------------------------------------------------------------

# `constrain(x, logical_axes) -> x` puts a sharding constraint on an array (`eemo_jax.rl.rollout` passes
# one built from its mesh and rules); None leaves the placement to XLA.
Constrain = Callable[[jax.Array, tuple], jax.Array]


@struct.dataclass
class Decoded:
  """What `decode` returns; rows = prompts * group_size, prompt i's samples at rows i*G .. i*G+G-1."""
  tokens: jax.Array  # (rows, max_new_tokens) int32; pad_id after a row's first EOS
  steps: jax.Array  # () int32 tokens decoded before every row was done (<= max_new_tokens)
  # (rows, max_new_tokens) float32 log_softmax(logits / temperature)[token] (temperature 1 when greedy), 0
  # after the first EOS; None unless with_logprobs
  logprobs: jax.Array | None = None


def decode(graphdef, state, inputs: ModelInputs, rng, temperature, top_p, eos_ids, pad_id, *, max_new_tokens: int,
           group_size: int = 1, greedy: bool, top_k: int, use_top_p: bool, with_logprobs: bool = False,
           constrain: Constrain | None = None, layer_loop: str | None = None,
           row_kernel: bool | None = None) -> Decoded:
  """Prefill each prompt once, repeat its state `group_size` times, decode until all rows are done.

  graphdef, state: `nnx.split` of a `Qwen25VL` (state may be a tuple of states for `nnx.merge`).
  inputs: left-padded prompts, `input_ids` (batch, L), `position_ids` (3, batch, L), images in `vision`.
  rng: a typed key, split into one key per row; temperature (1 when greedy), top_p, pad_id: scalars;
  eos_ids: (n_eos,) int32, -1 = none. layer_loop: "scan" or "unrolled" decode steps (`_layer_loop`;
  None chooses by backend). row_kernel: whether the unrolled loop's few-row fp32 matmuls use the CPU row
  kernel (`eemo_jax.kernels.row_matmul`; it has no sharding rule); None: when nothing is `constrain`ed.
  Pure and traceable: callers jit it (`_decode_jit` below, or
  `eemo_jax.rl.rollout.make_rollout_fn` with shardings).
  """
  states = state if isinstance(state, (tuple, list)) else (state,)
  model: Qwen25VL = _without_dropout(nnx.merge(graphdef, *states))
  pin = constrain or (lambda x, axes: x)
  batch, prompt_len = inputs.input_ids.shape
  rows = batch * group_size
  next_pos = inputs.position_ids[:, :, -1] + 1  # (3, batch): the last prompt token is text (spec §6.1)

  # Prefill into a cache of exactly the prompt's slots: query i sits at slot i, so attention is causal.
  prefill_cache = KVCache.zeros(model.config.text, batch, prompt_len, model.dtype)
  out = model(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision,
              cache=prefill_cache, cache_index=0, logits_for="last")

  def share(x, axis):  # (.., batch, ..) -> (.., rows, ..): each prompt's copies on consecutive rows
    return x if group_size == 1 else jnp.repeat(x, group_size, axis=axis)

  cache = out.cache.grow(max_new_tokens, repeats=group_size)  # (layers, rows, kv_heads, L + new, head_dim)
  cache = KVCache(k=pin(cache.k, (None, "act_batch", None, None, None)),
                  v=pin(cache.v, (None, "act_batch", None, None, None)))
  step_layers = None
  row_kernel = constrain is None if row_kernel is None else row_kernel
  if _layer_loop(layer_loop) == "unrolled":
    cache, step_layers = StepCache.from_stacked(cache), model.language_model.unstacked_layers()
  # Prompt slots keep their padding mask; generated slots are all real (the causal mask hides future ones).
  cache_mask = jnp.concatenate([inputs.attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  cache_mask = pin(share(cache_mask, 0), ("act_batch", None))  # (rows, L + new)
  next_pos = pin(share(next_pos, 1), (None, "act_batch"))  # (3, rows)
  logits = pin(share(out.logits[:, -1], 0), ("act_batch", None))  # (rows, vocab)
  row_keys = jax.random.split(rng, rows)  # (rows,) one stream per row

  def choose(logits, step):
    """(rows, vocab) logits -> (rows,) tokens and their log-probs (or None), row r with its own key."""
    logits = logits.astype(jnp.float32)
    if greedy:
      token = sample_logits(logits, None, 0)
    else:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
      draw = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else 1.0)
      token = jax.vmap(lambda key, row: draw(row[None], key)[0])(keys, logits)
    if not with_logprobs:
      return token, None
    scaled = logits / temperature  # the full distribution, before top-k/top-p (what TRL's log-probs see)
    chosen = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    return token, chosen - jax.nn.logsumexp(scaled, axis=-1)

  def record(table, values, step):  # table (rows, new) gets values (rows,) in column `step`
    return None if table is None else jax.lax.dynamic_update_slice_in_dim(table, values[:, None], step, axis=1)

  first, first_lp = choose(logits, 0)
  tokens = pin(jnp.full((rows, max_new_tokens), pad_id, jnp.int32), ("act_batch", None))
  logprobs = pin(jnp.zeros((rows, max_new_tokens), jnp.float32), ("act_batch", None)) if with_logprobs else None
  carry = (jnp.int32(1), first, jnp.isin(first, eos_ids), record(tokens, first, 0), record(logprobs, first_lp, 0),
           cache)

  def cond(carry):
    step, _, done, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    """Feeds token step-1 (slot L+step-1, position next_pos+step-1) and picks token `step`."""
    step, last, done, tokens, logprobs, cache = carry
    positions = (next_pos + step - 1)[:, :, None]  # (3, rows, 1)
    logits, cache = _decode_step(model, last, positions, cache_mask, cache, prompt_len + step - 1, step_layers,
                                 row_kernel)
    token, lp = choose(logits, step)
    token = jnp.where(done, pad_id, token)  # finished rows emit padding, as HF
    if lp is not None:
      lp = jnp.where(done, 0.0, lp)
    return (step + 1, token, done | jnp.isin(token, eos_ids), record(tokens, token, step), record(logprobs, lp, step),
            cache)

  steps, _, _, tokens, logprobs, _ = jax.lax.while_loop(cond, body, carry)
  return Decoded(tokens=tokens, steps=steps, logprobs=logprobs)


_decode_jit = jax.jit(decode, static_argnums=0, static_argnames=(
    "max_new_tokens", "group_size", "greedy", "top_k", "use_top_p", "with_logprobs", "constrain", "layer_loop",
    "row_kernel"))


def _decode_step(model: Qwen25VL, token, positions, cache_mask, cache, slot, step_layers, row_kernel: bool):
  """Feeds (rows,) tokens at cache slot `slot`, M-RoPE positions (3, rows, 1): (rows, vocab) logits, new cache.

  With `step_layers` (the unrolled loop) the layers run one by one on their own weight and cache
  buffers (`TextModel.step`), computing what `model(...)` computes with a stacked cache, and with
  `row_kernel` their few-row fp32 matmuls stream the weights through `row_matmul` (module docstring, 5).
  """
  if step_layers is None:
    out = model(token[:, None], cache_mask, position_ids=positions, cache=cache, cache_index=slot, logits_for="last")
    return out.logits[:, -1], out.cache
  text, cfg = model.language_model, model.config.text
  embeds = text.embed_tokens(token[:, None], model.dtype)  # (rows, 1, hidden)
  cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, model.dtype)
  mask = causal_mask(cache_mask, slot + jnp.arange(1), cache_mask.shape[1])  # (rows, 1, 1, max_len)
  with row_matmul.in_decode_steps(row_kernel):
    hidden, cache = text.step(embeds, cos, sin, mask, cache=cache, slot=slot, layers=step_layers)
    return model.logits(hidden[:, -1]), cache


def _layer_loop(choice: str | None) -> str:
  """How decode steps run the layers: "scan" (stacked weights and cache, one compiled layer) on
  accelerators, where the per-layer slices fuse into the matmuls; "unrolled" on the CPU, where XLA
  copies every sliced weight before its matmul, every step (see `TextModel.unstacked_layers`).
  None: by the default backend (`default_layer_loop`)."""
  choice = choice or default_layer_loop(jax.default_backend())
  if choice not in ("scan", "unrolled"):
    raise ValueError(f"layer_loop must be 'scan' or 'unrolled' (None: by backend), got {choice!r}")
  return choice


def default_layer_loop(platform: str) -> str:
  """The decode steps' layer loop for a device platform ("cpu", "tpu", "gpu"): see `_layer_loop`."""
  return "unrolled" if platform == "cpu" else "scan"


def _without_dropout(model: nnx.Module) -> nnx.Module:
  """The model with every dropout (LoRA adapters) off, for sampling; the model itself when it has none."""
  if any(isinstance(node, nnx.Module) and hasattr(node, "deterministic") for _, node in nnx.iter_graph(model)):
    return nnx.view(model, deterministic=True)
  return model


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def generate(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             rng: jax.Array | None = None, patch_budget: int | None = None, frame_budget: int | None = None,
             mm_token_type_ids=None, return_steps: bool = False,
             row_kernel: bool = True) -> np.ndarray | tuple[np.ndarray, int]:
  """Generates up to `max_new_tokens` tokens per row; greedy (= HF `do_sample=False`) when temperature is 0.

  Args take the HF processor's names and layout. The batch must be **left-padded** (each row's
  last token real), as for HF decoder-only generation.
  eos_token_id: int or list; default `model.config.eos_token_id`. A row stops after its first EOS
    (kept in the output); later entries are `pad_token_id`.
  pad_token_id: default `model.config.pad_token_id`, else the first EOS id, else 0.
  rng: a JAX key for sampling, split into one stream per row (a row's samples do not depend on the
    other rows); default `jax.random.key(0)` (so unseeded calls repeat).
  patch_budget, frame_budget: the vision tower's static slot counts (`positions.vision_layout`); fix
    both for one compile across many image sizes.
  mm_token_type_ids: optional, as the processor returns it; derived from the image-pad ids otherwise.
  return_steps: also return how many tokens were decoded before every row was done (for benchmarks).
  row_kernel: False keeps XLA's dot in the CPU decode steps instead of the row kernel (for comparisons).

  Returns (batch, max_new_tokens) int32 numpy array of generated ids only (no prompt).
  A new prompt length, patch budget or batch size compiles once more; bucket them for serving.
  """
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                       top_p=float(top_p))
  inputs = prepare_inputs(model.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                          mm_token_type_ids=mm_token_type_ids, patch_budget=patch_budget,
                          frame_budget=frame_budget, dtype=np.dtype(model.dtype))
  _check_left_padded(inputs.attention_mask)
  eos = _eos_ids(model.config.eos_token_id if eos_token_id is None else eos_token_id)
  pad = _pad_id(pad_token_id, model.config.pad_token_id, eos)
  graphdef, state = nnx.split(model)
  out = _decode_jit(
      graphdef, state, inputs, _typed_key(None if cfg.greedy else rng), np.float32(cfg.temperature or 1.0),
      np.float32(cfg.top_p), eos, np.int32(pad), max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
      top_k=0 if cfg.greedy else cfg.top_k, use_top_p=not cfg.greedy and cfg.top_p < 1.0, row_kernel=row_kernel)
  tokens, steps = np.asarray(out.tokens), out.steps  # the only host sync
  return (tokens, int(steps)) if return_steps else tokens


def next_positions(position_ids: np.ndarray) -> np.ndarray:
  """(3, batch, L) prompt positions -> (3, batch) M-RoPE position of the first generated token.

  HF `generate` continues from the last prompt column + 1 on each axis; with left padding that is
  the last real token. It is text (the assistant header), so the three axes agree and equal
  max(valid positions) + 1.
  """
  return (np.asarray(position_ids)[:, :, -1] + 1).astype(np.int32)


def _check_left_padded(mask: np.ndarray) -> None:
  """Each row must be 0...0 1...1 with at least one real token: decoding continues from column L-1."""
  mask = np.asarray(mask).astype(bool)
  ok = mask[:, -1] & np.all(mask[:, 1:] >= mask[:, :-1], axis=1)
  if not np.all(ok):
    rows = np.flatnonzero(~ok).tolist()
    raise ValueError(f"generate needs left-padded prompts (padding before the tokens, last column real); rows "
                     f"{rows} of attention_mask are right-padded or have holes. Left-pad them, e.g. "
                     "tokenizer.padding_side = 'left' / processor.tokenizer.padding_side = 'left'.")


def _typed_key(rng) -> jax.Array:
  """A new-style key, so that legacy uint32 keys and greedy calls share the compiled function."""
  if rng is None:
    return jax.random.key(0)
  rng = jnp.asarray(rng)
  return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def _eos_ids(eos) -> np.ndarray:
  """(n_eos,) int32, padded with -1 to a multiple of 4 so that usual EOS lists share one compile."""
  ids = [] if eos is None else [int(eos)] if np.ndim(eos) == 0 else [int(e) for e in eos]
  ids = ids or [_NO_EOS]
  return np.asarray(ids + [_NO_EOS] * (-len(ids) % 4), np.int32)


def _pad_id(pad_token_id, config_pad, eos: np.ndarray) -> int:
  for candidate in (pad_token_id, config_pad):
    if candidate is not None:
      return int(candidate)
  return int(eos[0]) if eos[0] != _NO_EOS else 0


def compiled_variants() -> int:
  """How many versions of the generation function jit has compiled (for recompilation checks)."""
  return _decode_jit._cache_size()
