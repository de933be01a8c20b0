"""Teacher-forced per-token log-probs of completions, with their prompts and images: GRPO's training forward.

A group batch holds P prompts and their G completions each (prompt p's completions at rows p*G .. p*G+G-1,
as the rollout lays them out). The vision tower and the prompt's token embeddings are computed once per
prompt and repeated G times (the gradient of the G copies adds up in the shared computation, which is
exact); each of the P*G rows then runs the decoder over prompt + completion. The LM head is applied to
the completion positions only, chunk by chunk (`losses.map_sequence_chunks`), so (rows, length, vocab)
logits never exist at once.

Log-probs are of the temperature-scaled distribution, `log_softmax(logits / T)[token]`, as TRL computes
them and as the rollout samples: with the same weights the two agree (tests/rl/test_logprobs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from eemo_jax.model.qwen25vl import Qwen25VL
from eemo_jax.model.vision import VisionInputs
from eemo_jax.train.losses import map_sequence_chunks


@struct.dataclass
class GroupBatch:
  """The prompts of a rollout and their completions, for the policy's (and reference's) forward.

  P prompts, R = P * group_size completion rows, L the prompt bucket, T the completion length.
  """
  prompt_ids: jax.Array  # (P, L) int32, left-padded
  prompt_mask: jax.Array  # (P, L) int32, 1 for real tokens
  prompt_positions: jax.Array  # (3, P, L) int32 M-RoPE positions of the prompt
  next_positions: jax.Array  # (3, P) int32 position of each prompt's first completion token
  completion_ids: jax.Array  # (R, T) int32, padding after EOS
  completion_mask: jax.Array  # (R, T) int32, 1 up to and including the first EOS
  vision: VisionInputs | None = None  # the P prompts' images

  @property
  def group_size(self) -> int:
    return self.completion_ids.shape[0] // self.prompt_ids.shape[0]


def completion_hidden(model: Qwen25VL, batch: GroupBatch, *, constrain=None) -> jax.Array:
  """Final hidden states at the positions that predict the completion tokens: (R, T, hidden).

  `constrain` (optional) puts a sharding constraint on batch-major activations after the repeat.
  """
  g = batch.group_size
  length = batch.prompt_ids.shape[1]
  steps = batch.completion_ids.shape[1]
  prompt = model.embed(batch.prompt_ids, batch.vision)  # (P, L, hidden), images once per prompt
  prompt = jnp.repeat(prompt, g, axis=0)  # (R, L, hidden)
  completion = model.language_model.embed_tokens(batch.completion_ids, model.dtype)  # (R, T, hidden)
  embeds = jnp.concatenate([prompt, completion.astype(prompt.dtype)], axis=1)  # (R, L + T, hidden)
  if constrain is not None:
    embeds = constrain(embeds)
  mask = jnp.concatenate([jnp.repeat(batch.prompt_mask, g, axis=0), batch.completion_mask.astype(jnp.int32)],
                         axis=1)  # (R, L + T)
  offsets = jnp.arange(steps, dtype=jnp.int32)
  completion_pos = batch.next_positions[:, :, None] + offsets  # (3, P, T)
  positions = jnp.repeat(jnp.concatenate([batch.prompt_positions, completion_pos], axis=2), g, axis=1)
  ids = jnp.zeros(mask.shape, jnp.int32)  # shape only: the embeddings are given
  out = model(ids, mask, position_ids=positions, inputs_embeds=embeds, logits_for="last")
  # Position L-1+k predicts completion token k.
  return out.last_hidden_state[:, length - 1:length - 1 + steps]


def token_logprobs(hidden: jax.Array, tokens: jax.Array, project, *, temperature: float = 1.0,
                   chunk_size: int = 256, entropy: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """(log p(token), entropy) per position, fp32, from hidden states (rows, T, hidden) and tokens (rows, T).

  `project` maps (rows, chunk, hidden) to logits; the distribution is softmax(logits / temperature).
  """
  steps = tokens.shape[1]
  inv_t = 1.0 / float(temperature)

  def per_chunk(h, t):
    logits = project(h).astype(jnp.float32) * inv_t  # (rows, chunk, vocab)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    out = (picked - log_z,)
    if entropy:
      probs = jax.nn.softmax(logits, axis=-1)
      out += (log_z - jnp.sum(probs * logits, axis=-1),)
    return out

  chunks = map_sequence_chunks(per_chunk, hidden, tokens, chunk_size=chunk_size, fill=0)

  def unchunk(x):  # (chunks, rows, chunk) -> (rows, T)
    return x.swapaxes(0, 1).reshape(x.shape[1], -1)[:, :steps]

  logp = unchunk(chunks[0])
  return logp, (unchunk(chunks[1]) if entropy else None)


def completion_logprobs(model: Qwen25VL, batch: GroupBatch, *, temperature: float = 1.0, chunk_size: int = 256,
                        entropy: bool = True, constrain=None) -> tuple[jax.Array, jax.Array | None]:
  """Per-token log-probs (and entropies) of the batch's completions under `model`: (R, T) fp32 each.

  Masked positions hold the values of the padding tokens; the losses mask them out.
  """
  hidden = completion_hidden(model, batch, constrain=constrain)
  return token_logprobs(hidden, batch.completion_ids, model.logits, temperature=temperature, chunk_size=chunk_size,
                        entropy=entropy)
