"""KV-cache generation for `Qwen25VL`: host preparation, then one jitted prefill + decode loop.

The whole generation is a single compiled function, so a call costs one dispatch and one host
transfer at the end (no per-token host sync). Inside it:

1. **Prefill.** The vision tower runs once; the whole (left-padded) prompt is written into a KV cache
   preallocated for `prompt_len + max_new_tokens` slots, and only the last position's logits are
   projected (`logits_for="last"`). Pixel values are used here and nowhere else.
2. **Decode.** A `lax.while_loop` feeds one token per step until every row has emitted an EOS or
   `max_new_tokens` tokens exist. Two counters (spec §6.2): generated token k is fed back at cache
   slot `L + k` with M-RoPE position `next_pos + k`, where `next_pos` is the last prompt token's
   position + 1 (per axis, as HF `generate` does). The two differ because image tokens share
   positions and left padding occupies slots but no positions. Finished rows keep running (batch
   shapes are static) but emit `pad_token_id`, as HF does.

The cache is created inside the compiled function and carried by the while loop, which updates it
in place; it never crosses the jit boundary, so there is nothing to donate.

The compiled function takes the model as `nnx.split` state with the `GraphDef` static, so it is pure
and `jax.jit` caches it: a second call with the same shapes and static options does not recompile.
Temperature, top-p, the EOS ids, the pad id and the key are traced, so changing them is free. The
static options are max_new_tokens, greedy or not, top_k (it fixes the `lax.top_k` shape) and
whether top-p is on (it needs a sort of the vocabulary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eemo_jax.model.qwen25vl import ModelInputs, Qwen25VL, prepare_inputs
from eemo_jax.model.text import KVCache

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
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.asarray(temperature, jnp.float32)
  vocab = logits.shape[-1]
  use_top_p = not (_is_static(top_p) and top_p >= 1.0)
  if 0 < top_k < vocab:
    values, index = jax.lax.top_k(logits, top_k)  # (batch, k), descending
  elif use_top_p:
    index = jnp.argsort(-logits, axis=-1, stable=True)  # (batch, vocab), descending
    values = jnp.take_along_axis(logits, index, axis=-1)
  else:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  if use_top_p:
    values = _top_p_filter(values, top_p)
  choice = jax.random.categorical(rng, values, axis=-1)  # (batch,) index into the candidates
  return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


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


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p"))
def _generate_compiled(graphdef, state, inputs: ModelInputs, next_pos, rng, temperature, top_p, eos_ids,
                       pad_id, *, max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool):
  """Prefill, then decode until all rows are done. Returns (tokens (batch, new), steps run).

  inputs.position_ids: (3, batch, L) prompt positions; next_pos: (3, batch) position of the first
  generated token; eos_ids: (n_eos,) int32 (-1 = none); temperature, top_p, pad_id: scalars.
  """
  model: Qwen25VL = nnx.merge(graphdef, state)
  batch, prompt_len = inputs.input_ids.shape
  max_len = prompt_len + max_new_tokens
  cache = KVCache.zeros(model.config.text, batch, max_len, model.dtype)  # (layers, batch, max_len, kv, hd)
  # Prompt slots keep their padding mask; generated slots are all real (the causal mask hides future ones).
  cache_mask = jnp.concatenate([inputs.attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)

  def choose(logits, step):
    """(batch, 1, vocab) logits -> (batch,) token, with this step's own key."""
    if greedy:
      return sample_logits(logits[:, -1], rng, 0)
    return sample_logits(logits[:, -1], jax.random.fold_in(rng, step), temperature, top_k,
                         top_p if use_top_p else 1.0)

  out = model(inputs.input_ids, cache_mask, position_ids=inputs.position_ids, vision=inputs.vision,
              cache=cache, cache_index=0, logits_for="last")
  first = choose(out.logits, 0)
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  carry = (jnp.int32(1), first, jnp.isin(first, eos_ids), tokens, out.cache)

  def cond(carry):
    step, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    """Feeds token step-1 (slot L+step-1, position next_pos+step-1) and picks token `step`."""
    step, last, done, tokens, cache = carry
    positions = (next_pos + step - 1)[:, :, None]  # (3, batch, 1)
    out = model(last[:, None], cache_mask, position_ids=positions, cache=cache,
                cache_index=prompt_len + step - 1, logits_for="last")
    token = jnp.where(done, pad_id, choose(out.logits, step))  # finished rows emit padding, as HF
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    return step + 1, token, done | jnp.isin(token, eos_ids), tokens, out.cache

  steps, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, steps


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def generate(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             rng: jax.Array | None = None, patch_budget: int | None = None, frame_budget: int | None = None,
             mm_token_type_ids=None, return_steps: bool = False) -> np.ndarray | tuple[np.ndarray, int]:
  """Generates up to `max_new_tokens` tokens per row; greedy (= HF `do_sample=False`) when temperature is 0.

  Args take the HF processor's names and layout. The batch must be **left-padded** (each row's
  last token real), as for HF decoder-only generation.
  eos_token_id: int or list; default `model.config.eos_token_id`. A row stops after its first EOS
    (kept in the output); later entries are `pad_token_id`.
  pad_token_id: default `model.config.pad_token_id`, else the first EOS id, else 0.
  rng: a JAX key for sampling; default `jax.random.key(0)` (so unseeded calls repeat).
  patch_budget, frame_budget: the vision tower's static slot counts (`positions.vision_layout`); fix
    both for one compile across many image sizes.
  mm_token_type_ids: optional, as the processor returns it; derived from the image-pad ids otherwise.
  return_steps: also return how many tokens were decoded before every row was done (for benchmarks).

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
  tokens, steps = _generate_compiled(
      graphdef, state, inputs, next_positions(inputs.position_ids),
      _typed_key(None if cfg.greedy else rng), np.float32(cfg.temperature or 1.0), np.float32(cfg.top_p),
      eos, np.int32(pad), max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
      top_k=0 if cfg.greedy else cfg.top_k, use_top_p=not cfg.greedy and cfg.top_p < 1.0)
  tokens = np.asarray(tokens)  # the only host sync
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
  return _generate_compiled._cache_size()
