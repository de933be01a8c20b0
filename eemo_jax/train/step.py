"""The pure SFT step: microbatches scanned inside one jitted call, one optimizer update per call.

    graphdef, state = create_train_state(factory, make_optimizer(cfg), mesh)
    train_step = make_train_step(graphdef, make_optimizer(cfg), schedule=learning_rate_schedule(cfg))
    step = jit_train_step(train_step, state, batch, mesh)   # batch: stack_microbatches([...])
    state, metrics = step(state, batch)

Precision: parameters are fp32 master weights; the model computes in its own `dtype` (build it with
dtype=bfloat16, param_dtype=float32) and casts each parameter at use, so the FSDP all-gathers and the
matmuls run in bf16 while gradients, the accumulation over microbatches and Adam stay in fp32. The
LM loss is taken on fp32 logits (losses.py).

Batch layout: a `Batch` of host (numpy) or global arrays. The train step takes a *stacked* batch,
every field with a leading microbatch axis of length `accum_steps`; each microbatch carries its own
vision inputs (made by `prepare_inputs` with a fixed patch budget), since the vision tower runs all
images of a microbatch as one sequence.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eemo_jax.model.heads import EmotionModel
from eemo_jax.model.lora import reseed_lora_dropout
from eemo_jax.model.qwen25vl import ModelInputs, Qwen25VL
from eemo_jax.model.vision import VisionInputs
from eemo_jax.parallel.sharding import DEFAULT_RULES, spec_for, state_shardings
from eemo_jax.train import losses
from eemo_jax.train.freeze import Trainable, apply_masked_updates, mask_tree, update_mask
from eemo_jax.train.losses import IGNORE_INDEX, Denominators, LossConfig, LossSums
from eemo_jax.train.state import TrainState, train_state_shardings


@struct.dataclass
class Batch:
  """One (micro)batch. Shapes below are per microbatch; a stacked batch adds a leading axis."""
  input_ids: jax.Array  # (batch, seq) int32
  attention_mask: jax.Array  # (batch, seq) int32, 1 for real tokens
  labels: jax.Array  # (batch, seq) int32, unshifted; IGNORE_INDEX (-100) where no loss is taken
  position_ids: jax.Array  # (3, batch, seq) int32, M-RoPE t/h/w (prepare_inputs)
  vision: VisionInputs | None = None  # the images of this microbatch, in one static-shape layout
  ces_label: jax.Array | None = None  # (batch,) int32 emotion category, IGNORE_INDEX if none
  des_target: jax.Array | None = None  # (batch, des_dim) float, a target DES vector
  des_mask: jax.Array | None = None  # (batch,) bool, True where des_target is present

  @classmethod
  def from_inputs(cls, inputs: ModelInputs, labels, **extra) -> Batch:
    return cls(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, labels=np.asarray(labels, np.int32),
               position_ids=inputs.position_ids, vision=inputs.vision, **extra)


# Logical axes of each field (per microbatch); every vision array is split along its first axis
# (slots or attention groups), so each data shard embeds its own share of the patches.
_FIELD_AXES = {
    "input_ids": ("act_batch", "act_seq"),
    "attention_mask": ("act_batch", "act_seq"),
    "labels": ("act_batch", "act_seq"),
    "position_ids": (None, "act_batch", "act_seq"),
    "ces_label": ("act_batch",),
    "des_target": ("act_batch", None),
    "des_mask": ("act_batch",),
}


def stack_microbatches(batches: Sequence[Batch]) -> Batch:
  """Microbatches (same shapes, same patch budget) -> one batch with a leading microbatch axis."""
  structures = {jax.tree.structure(b) for b in batches}
  if len(structures) != 1:
    raise ValueError("microbatches differ in which fields they have (vision, ces_label, des_target); "
                     "give every microbatch the same fields")
  try:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)
  except ValueError as e:
    raise ValueError(f"microbatches differ in shape ({e}); pad them to the same sequence length and "
                     "prepare their images with the same patch_budget") from None


def batch_shardings(batch: Batch, mesh: Mesh, rules=DEFAULT_RULES, *, stacked: bool = True):
  """NamedShardings for a batch: the batch axis over (`data`, `fsdp`), vision slots likewise."""
  lead = (None,) if stacked else ()

  def field(name, value):
    if value is None:
      return None
    if name == "vision":
      return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(
          lead + ("act_vision",) + (None,) * (a.ndim - 1 - len(lead)), a.shape, mesh, rules)), value)
    return NamedSharding(mesh, spec_for(lead + _FIELD_AXES[name], value.shape, mesh, rules))

  return Batch(**{f.name: field(f.name, getattr(batch, f.name)) for f in dataclasses.fields(Batch)})


@dataclasses.dataclass
class ForwardOutput:
  """What the losses need from a forward pass (a plain container inside the traced step)."""
  hidden: jax.Array  # (batch, seq, hidden), after the final norm
  project: Callable[[jax.Array], jax.Array]  # hidden (batch, chunk, hidden) -> logits (batch, chunk, vocab)
  ces_logits: jax.Array | None = None  # (batch, num_classes)
  des: jax.Array | None = None  # (batch, des_dim)


Forward = Callable[[nnx.Module, Batch, jax.Array], ForwardOutput]


def reseed_dropout(model: nnx.Module, rng: jax.Array) -> None:
  """Fresh dropout masks from the step's key: every nnx RNG stream (head dropout) and LoRA dropout.

  The merged model lives only inside the step, so RNG counters advanced by a forward pass would be
  lost; reseeding from `fold_in(state.rng, step, microbatch)` instead makes the masks a function of
  the step alone (reproducible on resume, independent of the sharding).
  """
  tags = {var.get_metadata()["tag"] for _, var in nnx.to_flat_state(nnx.state(model, nnx.RngKey))}
  if tags:
    stream_rng = jax.random.fold_in(rng, 0)
    nnx.reseed(model, policy=_fold_in_path, **{tag: stream_rng for tag in sorted(tags)})
  reseed_lora_dropout(model, jax.random.fold_in(rng, 1))


def _fold_in_path(path, key, shape):
  """A distinct key per RNG stream (each dropout layer has its own), stable across runs."""
  del shape
  return jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF)


def lm_forward(model: Qwen25VL, batch: Batch, rng: jax.Array) -> ForwardOutput:
  """The Qwen2.5-VL language model (optionally with LoRA). Logits are left to the chunked loss:
  only the last position is projected here, which XLA then drops as unused."""
  reseed_dropout(model, rng)
  out = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids, vision=batch.vision,
              logits_for="last")
  return ForwardOutput(hidden=out.last_hidden_state, project=model.logits)


def emotion_forward(model: EmotionModel, batch: Batch, rng: jax.Array) -> ForwardOutput:
  """An `EmotionModel` (backbone + EmoVerse head): LM hidden states, CES logits and DES.

  Calls the two parts itself because the loss needs the backbone's final hidden states, which
  `EmotionModel.__call__` does not return.
  """
  reseed_dropout(model, rng)
  out = model.backbone(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids, vision=batch.vision,
                       logits_for="last", hf_hidden_states=model.head.config.hidden_states_needed)
  head = model.head(out.hidden_states, batch.attention_mask, batch.input_ids)
  return ForwardOutput(hidden=out.last_hidden_state, project=model.backbone.logits, ces_logits=head.ces_logits,
                       des=head.des)


def objective_sums(out: ForwardOutput, batch: Batch, config: LossConfig) -> LossSums:
  sums = LossSums.zeros()
  if config.lm_weight:
    nll, correct, tokens = losses.lm_loss_sums(out.hidden, batch.labels, out.project, chunk_size=config.chunk_size)
    sums = sums.replace(lm_nll=nll, lm_correct=correct, lm_tokens=tokens)
  if out.ces_logits is not None and batch.ces_label is not None:
    nll, correct, count = losses.cross_entropy_sums(out.ces_logits, batch.ces_label)
    sums = sums.replace(ces_nll=nll, ces_correct=correct, ces_count=count)
  if config.des_weight and out.des is not None and batch.des_target is not None:
    mask = batch.des_mask if batch.des_mask is not None else jnp.ones(batch.des_target.shape[:-1], bool)
    total, count = losses.des_loss_sums(out.des, batch.des_target, mask, config.des_kind)
    sums = sums.replace(des_loss=total, des_count=count)
  return sums


def window_denominators(batch: Batch) -> Denominators:
  """Counts over every microbatch of a stacked batch: the denominators of the token / example means."""
  lm = (losses.shift_labels(batch.labels) != IGNORE_INDEX).sum()
  ces = (batch.ces_label != IGNORE_INDEX).sum() if batch.ces_label is not None else 0
  if batch.des_target is None:
    des = 0
  else:
    des = batch.des_mask.sum() if batch.des_mask is not None else np.prod(batch.des_target.shape[:-1])
  return Denominators(*(jnp.asarray(c, jnp.float32) for c in (lm, ces, des)))


def _constrain_batch_major(x: jax.Array, mesh: Mesh | None, rules) -> jax.Array:
  if mesh is None:
    return x
  axes = ("act_batch",) + ("act_seq", "act_embed")[:x.ndim - 1] + (None,) * max(0, x.ndim - 3)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))


def make_loss_fn(graphdef: nnx.GraphDef, *, loss_config: LossConfig = LossConfig(), forward: Forward = lm_forward,
                 mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`loss_fn(params, frozen, batch, denominators, rng) -> (loss, LossSums)` for one microbatch.

  The loss is the microbatch's share of the window mean (sums over the window-wide counts), so the
  gradients of the microbatches add up to the gradient of the whole window's loss.
  """

  def loss_fn(params, frozen, batch: Batch, denominators: Denominators, rng):
    # Fresh Variable objects for the frozen state: `frozen` is closed over from outer traces, and the
    # forward pass reseeds the dropout keys in it, which NNX allows only at the current trace level.
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
    out = forward(model, batch, rng)
    out.hidden = _constrain_batch_major(out.hidden, mesh, rules)
    sums = objective_sums(out, batch, loss_config)
    return losses.total_loss(sums, denominators, loss_config), sums

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    trainable: Trainable = Trainable(), loss_config: LossConfig = LossConfig(),
                    schedule: optax.Schedule | None = None, forward: Forward = lm_forward,
                    mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`train_step(state, stacked_batch) -> (state, metrics)`, pure; the model graphdef closed over.

  `trainable` must be the selection the state was created with (its per-layer slices are masked
  here). With a mesh, gradients are kept in their parameters' shardings and the hidden states
  batch-sharded. Metrics: loss, lm_loss, token_accuracy, tokens, ces_loss, ces_accuracy, des_loss,
  grad_norm (before clipping), lr (with a schedule).
  """
  loss_fn = make_loss_fn(graphdef, loss_config=loss_config, forward=forward, mesh=mesh, rules=rules)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    mask = update_mask(state.params, trainable)  # from shapes: numpy constants
    denominators = window_denominators(batch)
    rng = jax.random.fold_in(state.rng, state.step)
    param_shardings = state_shardings(state.params, mesh, rules) if mesh is not None else None

    def microbatch(carry, xs):
      grads, sums = carry
      index, mb = xs
      (_, mb_sums), mb_grads = grad_fn(state.params, state.frozen, mb, denominators, jax.random.fold_in(rng, index))
      grads = jax.tree.map(jnp.add, grads, mb_grads)
      if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return (grads, sums + mb_sums), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    num_micro = batch.input_ids.shape[0]
    (grads, sums), _ = jax.lax.scan(microbatch, (zeros, LossSums.zeros()), (jnp.arange(num_micro), batch))
    grads = mask_tree(grads, mask)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_masked_updates(state.params, mask_tree(updates, mask), mask)
    metrics = losses.metrics_from_sums(sums, loss_config)
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, *, loss_config: LossConfig = LossConfig(), forward: Forward = lm_forward,
                   mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`eval_step(state, batch) -> LossSums` on one (unstacked) batch. Add the sums over an eval set and
  call `losses.metrics_from_sums` once, so the means are over all tokens, not over batches."""

  def eval_step(state: TrainState, batch: Batch) -> LossSums:
    out = forward(_without_dropout(nnx.merge(graphdef, state.params, state.frozen)), batch, state.rng)
    out.hidden = _constrain_batch_major(out.hidden, mesh, rules)
    return objective_sums(out, batch, loss_config)

  return eval_step


def _without_dropout(model: nnx.Module) -> nnx.Module:
  """The model with every dropout (nnx.Dropout, LoRA) off; the model itself when it has none."""
  if any(isinstance(node, nnx.Module) and hasattr(node, "deterministic") for _, node in nnx.iter_graph(model)):
    return nnx.view(model, deterministic=True)
  return model


def jit_train_step(train_step, state: TrainState, batch: Batch, mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`jax.jit` of the step with the state donated and, with a mesh, explicit in/out shardings.

  `state` and `batch` (concrete or `jax.ShapeDtypeStruct`s) give the structure and shapes the
  shardings are computed for; the batch is stacked (leading microbatch axis).
  """
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  state_sh = train_state_shardings(state, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_sh, batch_shardings(batch, mesh, rules)),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


def jit_eval_step(eval_step, state: TrainState, batch: Batch, mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`jax.jit` of the eval step (unstacked batch); nothing donated, the sums come back replicated."""
  if mesh is None:
    return jax.jit(eval_step)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_step, in_shardings=(train_state_shardings(state, mesh, rules),
                                          batch_shardings(batch, mesh, rules, stacked=False)),
                 out_shardings=replicated)
