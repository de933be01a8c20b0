"""Trainable / frozen selection: frozen parameters and frozen layer slices stay bit-identical over
several steps with weight decay, trainable ones move, and the trainable counts equal transformers'
`requires_grad` counts for the same selection (or the LoRA + head shapes)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_batch, tiny_hf_config

from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.heads import EmotionHead, EmotionModel, HeadConfig
from eemo_jax.model.lora import LoraConfig, apply_lora, lora_filter
from eemo_jax.model.qwen25vl import Qwen25VL, prepare_inputs
from eemo_jax.train import freeze
from eemo_jax.train.losses import IGNORE_INDEX
from eemo_jax.train.optimizer import OptimizerConfig, make_optimizer
from eemo_jax.train.state import create_train_state
from eemo_jax.train.step import Batch, emotion_forward, jit_train_step, make_train_step, stack_microbatches

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT_LAYERS, K = 3, 2  # train the last 2 of 3 decoder layers: slice 0 frozen
HF_CONFIG = tiny_hf_config(text_layers=TEXT_LAYERS)
CONFIG = Qwen25VLConfig.from_hf(HF_CONFIG.to_dict())
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1)
STEPS = 3
# Same comparisons with or without LLVM's optimisations; this compiles faster (see test_sharded_step.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def sft_batch(with_ces: bool = False) -> Batch:
  raw = make_batch([[(1, 4, 6)], [(1, 2, 2)]], pad="right", seed=2)
  labels = np.where(raw["attention_mask"] == 1, raw["input_ids"], IGNORE_INDEX)
  inputs = prepare_inputs(CONFIG, raw["input_ids"], raw["attention_mask"], raw["pixel_values"], raw["image_grid_thw"])
  extra = dict(ces_label=np.array([3, 5], np.int32)) if with_ces else {}
  return stack_microbatches([Batch.from_inputs(inputs, labels, **extra)])


def torch_trainable_count(frozen_prefixes: tuple[str, ...]) -> int:
  """transformers' own parameter list, with requires_grad off under the given name prefixes."""
  model = transformers.Qwen2_5_VLForConditionalGeneration(HF_CONFIG)
  for name, p in model.named_parameters():
    if name.startswith(frozen_prefixes):
      p.requires_grad_(False)
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_vision_tower_frozen_count_matches_transformers():
  """EmoVerse stage 1: ViT frozen, patch merger and LLM trained."""
  model = nnx.eval_shape(lambda: Qwen25VL(CONFIG, rngs=nnx.Rngs(0)))
  _, params, _ = freeze.split_trainable(model, freeze.freeze_vision_tower())
  expected = torch_trainable_count(("model.visual.patch_embed", "model.visual.blocks"))
  assert freeze.count_trainable(params, freeze.freeze_vision_tower()) == expected


def run_steps(model, trainable, batch, **step_kwargs):
  """(host params before, graphdef, state after STEPS donated steps)."""
  before = jax.device_get(nnx.state(model))
  optimizer = make_optimizer(OPT)
  graphdef, state = create_train_state(model, optimizer, trainable=trainable)
  step = jit_train_step(make_train_step(graphdef, optimizer, trainable=trainable, **step_kwargs), state, batch)
  compiled = step.lower(state, batch).compile(FAST_COMPILE)
  for _ in range(STEPS):
    state, metrics = compiled(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  return before, graphdef, jax.device_get(state)


def flat(state) -> dict:
  """'/'-joined path -> host array, for the parameters (Param variables) of a state."""
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)
          if isinstance(v, nnx.Param)}


@functools.cache
def last_layers_run():
  trainable = freeze.last_text_layers(K, "lm_head/.*")
  model = Qwen25VL(CONFIG, rngs=nnx.Rngs(0))
  return trainable, *run_steps(model, trainable, sft_batch())


def test_last_k_text_layers_count_matches_transformers():
  """EmoVerse stage 2 style: only the last K decoder layers (and here the LM head) train."""
  trainable, _, _, state = last_layers_run()
  frozen_layers = tuple(f"model.language_model.layers.{i}." for i in range(TEXT_LAYERS - K))
  expected = torch_trainable_count(("model.visual", "model.language_model.embed_tokens", "model.language_model.norm",
                                    *frozen_layers))
  assert freeze.count_trainable(state.params, trainable) == expected


def test_frozen_params_and_layer_slices_are_bit_identical():
  """Vision, embeddings and final norm (frozen whole) and decoder layer 0 (a frozen slice of the
  stacked arrays) are unchanged to the bit after weight-decayed steps; layers 1-2 and lm_head move;
  the Adam moments of the frozen slice are exactly zero."""
  _, before, _, state = last_layers_run()
  before = flat(before)
  frozen, params = flat(state.frozen), flat(state.params)
  assert any(k.startswith("visual/") for k in frozen) and "language_model/embed_tokens/embedding" in frozen
  for path, value in frozen.items():
    assert np.array_equal(value, before[path]), path
  assert set(params) == {k for k in before if k.startswith("language_model/layers/")} | {"lm_head/kernel"}
  adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
  mu, nu = flat(adam.mu), flat(adam.nu)
  for path, value in params.items():
    if path == "lm_head/kernel":
      assert not np.array_equal(value, before[path])
      continue
    frozen_slice, trained = slice(0, TEXT_LAYERS - K), slice(TEXT_LAYERS - K, None)
    assert np.array_equal(value[frozen_slice], before[path][frozen_slice]), path
    assert not np.any(mu[path][frozen_slice]) and not np.any(nu[path][frozen_slice]), path
    for layer in range(TEXT_LAYERS - K, TEXT_LAYERS):
      assert not np.array_equal(value[layer], before[path][layer]), (path, layer)
    assert np.any(nu[path][trained]), path


LORA = LoraConfig(rank=2, alpha=4.0, dropout=0.1, targets=("q_proj", "v_proj"))
HEAD = HeadConfig.pooled(CONFIG.text.hidden_size, num_hidden_layers_mean=2)


@functools.cache
def lora_head_run():
  backbone = Qwen25VL(CONFIG, rngs=nnx.Rngs(0))
  apply_lora(backbone, LORA, nnx.Rngs(1))
  model = EmotionModel(backbone, EmotionHead(HEAD, rngs=nnx.Rngs(2)))
  trainable = freeze.only(lora_filter, "head/.*")
  return trainable, *run_steps(model, trainable, sft_batch(with_ces=True), forward=emotion_forward)


def test_only_lora_and_head_train():
  """LoRA factors and the emotion head move; every base weight of the backbone is bit-identical."""
  trainable, before, _, state = lora_head_run()
  before, frozen, params = flat(before), flat(state.frozen), flat(state.params)
  assert params and all("/lora/" in k or k.startswith("head/") for k in params)
  for path, value in frozen.items():
    if path.startswith("backbone/") and "lora" not in path:
      assert np.array_equal(value, before[path]), path
  for path, value in params.items():
    assert not np.array_equal(value, before[path]), path  # B starts at 0, so A's and B's gradients are live

  # Trainable scalars: rank·(in + out) per adapted q/v projection and layer, plus the head's layers.
  text = CONFIG.text
  head_dim = text.hidden_size // text.num_attention_heads
  lora = TEXT_LAYERS * LORA.rank * ((text.hidden_size + text.num_attention_heads * head_dim)
                                    + (text.hidden_size + text.num_key_value_heads * head_dim))
  h, d, c = HEAD.hidden_size, HEAD.des_dim, HEAD.classifier_hidden
  head = (h * h + h) + (h * d + d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * c + c) + (c * 8 + 8)
  assert freeze.count_trainable(state.params, trainable) == lora + head


def test_selection_errors_explain():
  model = nnx.eval_shape(lambda: Qwen25VL(CONFIG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="No parameter is trainable"):
    freeze.split_trainable(model, freeze.only("no_such_module/.*"))
  with pytest.raises(ValueError, match="k must be >= 1"):
    freeze.last_text_layers(0)
  _, params, _ = freeze.split_trainable(model, freeze.last_text_layers(TEXT_LAYERS + 1))
  with pytest.raises(ValueError, match="4 trained layers"):
    freeze.update_mask(params, freeze.last_text_layers(TEXT_LAYERS + 1))
