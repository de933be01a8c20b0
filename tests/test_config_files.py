"""The experiment configs in configs/: each loads, builds its train state abstractly, and trains what its paper says.

A recipe that cannot build its state, or that trains the wrong parameters, only shows up hours into a
job on a pod; here every recipe's state is traced with `jax.eval_shape` (nothing allocated, seconds
even for the 7B) and its parameter counts are checked against closed-form counts of the architecture.
"""

import glob
import os
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from eemo_jax.config import ConfigError, load_config
from eemo_jax.model.config import preset
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.rl import run as grpo_run
from eemo_jax.train import freeze, run
from eemo_jax.train.optimizer import make_optimizer
from eemo_jax.train.state import abstract_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py")) if not p.endswith("base.py"))
TINY = os.path.join(CONFIGS, "tiny_demo.py")

# Qwen2.5-VL-{3B,7B}-Instruct as published (safetensors totals on the Hub).
QWEN25VL_3B_PARAMS = 3_754_622_976
QWEN25VL_7B_PARAMS = 8_292_166_656


# --------------------------------------------------------------------------------------------------
# Closed-form parameter counts (independent of the modules, so a wrong module or filter shows up)
# --------------------------------------------------------------------------------------------------


def _linear(d_in, d_out, bias=True):
  return d_in * d_out + (d_out if bias else 0)


def _vision_linears(arch):
  """(in, out) of every Linear of the vision tower: per block, then the merger's two."""
  v = arch.vision
  block = [(v.hidden_size, 3 * v.hidden_size), (v.hidden_size, v.hidden_size),
           (v.hidden_size, v.intermediate_size), (v.hidden_size, v.intermediate_size),
           (v.intermediate_size, v.hidden_size)]
  merged = v.hidden_size * v.spatial_merge_size**2
  return block * v.depth, [(merged, merged), (merged, v.out_hidden_size)]


def _text_layer_linears(arch):
  t = arch.text
  kv = t.num_key_value_heads * t.head_dim
  return [(t.hidden_size, t.hidden_size), (t.hidden_size, kv), (t.hidden_size, kv), (t.hidden_size, t.hidden_size),
          (t.hidden_size, t.intermediate_size), (t.hidden_size, t.intermediate_size),
          (t.intermediate_size, t.hidden_size)]


def vision_tower_params(arch) -> int:
  """Patch embedding (a bias-free Conv3d) and the blocks: what `tune_mm_vision False` freezes."""
  v = arch.vision
  blocks, _ = _vision_linears(arch)
  patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * v.hidden_size
  return patch_embed + sum(_linear(i, o) for i, o in blocks) + 2 * v.hidden_size * v.depth


def text_layer_params(arch) -> int:
  """One decoder layer: q/k/v with bias, o without, the SwiGLU MLP without bias, two RMSNorms."""
  t = arch.text
  q, k, v, o, *mlp = _text_layer_linears(arch)
  return (_linear(*q) + _linear(*k) + _linear(*v) + _linear(*o, bias=False)
          + sum(_linear(i, out, bias=False) for i, out in mlp) + 2 * t.hidden_size)


def backbone_params(arch) -> int:
  v, t = arch.vision, arch.text
  _, merger = _vision_linears(arch)
  vision = vision_tower_params(arch) + v.hidden_size + sum(_linear(i, o) for i, o in merger)
  embed = t.vocab_size * t.hidden_size
  text = embed + t.num_hidden_layers * text_layer_params(arch) + t.hidden_size
  return vision + text + (0 if arch.tie_word_embeddings else embed)


def lora_params(arch, rank: int) -> int:
  """Adapters on every Linear of both towers (merger included; lm_head and embeddings excluded)."""
  blocks, merger = _vision_linears(arch)
  shapes = blocks + merger + _text_layer_linears(arch) * arch.text.num_hidden_layers
  return sum(rank * (i + o) for i, o in shapes)


def test_closed_form_counts_match_the_published_checkpoints():
  """Anchors the formulas the recipe checks below rely on."""
  assert backbone_params(preset("qwen25vl_3b")) == QWEN25VL_3B_PARAMS
  assert backbone_params(preset("qwen25vl_7b")) == QWEN25VL_7B_PARAMS


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_the_recipes_are_found():
  assert set(RECIPES) >= {"tiny_demo.py", "emoverse_3b_sft.py", "emoverse_3b_head.py", "eemo_7b_sft_lora.py"}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_locked_and_fills_the_library_types(name):
  config = load_config(os.path.join(CONFIGS, name))
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  with pytest.raises(AttributeError):
    config.train.new_field = 1  # a recipe or caller cannot add fields by accident
  arch = preset(config.model.preset)
  # PipelineConfig validates task, budgets, pixels and the batch split; GRPO recipes take generation prompts
  if config.data.prompt_only:
    settings = grpo_run.grpo_settings(config)
    grpo_run.check_reference_policy(config, grpo_run.loss_settings(config, settings))
    assert grpo_run.prompt_pipeline_config(config, arch, settings).prompt_only
  else:
    run.pipeline_config(config, arch)
    run.loss_settings(config)
  run.optimizer_settings(config, 100)
  assert config.train.run_dir and config.train.global_batch_size % config.optimizer.accum_steps == 0


def test_override_typo_names_the_valid_keys_and_the_close_one():
  with pytest.raises(ConfigError) as info:
    load_config(TINY, ["--config.optimizer.learning_rat=1e-3"])
  message = str(info.value)
  assert "'learning_rat'" in message and "Did you mean learning_rate" in message
  assert "Valid keys of optimizer:" in message
  for key in ("accum_steps", "b1", "max_grad_norm", "warmup_ratio", "weight_decay"):
    assert key in message

  with pytest.raises(ConfigError, match=r"config has no field 'optimzer'\. Did you mean optimizer\?"):
    load_config(TINY, ["--config.optimzer.learning_rate=1e-3"])


def test_overrides_are_parsed_by_the_type_they_replace():
  config = load_config(TINY, ["--config.train.steps=7", "--config.optimizer.learning_rate=1",
                              "--config.train.async_checkpoints=false", "--config.mesh.fsdp=-1",
                              "--config.trainable.freeze=('visual/.*', 'head/.*')", "data.seq_len=96"])
  assert config.train.steps == 7 and isinstance(config.train.steps, int)
  assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
  assert config.train.async_checkpoints is False and config.mesh.fsdp == -1
  assert config.trainable.freeze == ("visual/.*", "head/.*") and config.data.seq_len == 96
  with pytest.raises(ConfigError, match="train.steps is an int; 'ten' is not one"):
    load_config(TINY, ["--config.train.steps=ten"])
  with pytest.raises(ConfigError, match="train.async_checkpoints is a bool"):
    load_config(TINY, ["--config.train.async_checkpoints=maybe"])
  with pytest.raises(ConfigError, match="optimizer is a section"):
    load_config(TINY, ["--config.optimizer=1"])
  with pytest.raises(ConfigError, match="must look like --config.section.key=value"):
    load_config(TINY, ["--config.train.steps"])


def _recipe_with(tmp_path, body: str) -> str:
  """A recipe in its own folder that imports configs/base.py the way the recipes in configs/ do."""
  path = tmp_path / "my_recipe.py"
  path.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {CONFIGS!r})
      import base  # noqa: E402


      def get_config(arg=None):
        c = base.get_config()
      {textwrap.indent(textwrap.dedent(body), '  ')}
        return c
      """))
  return str(path)


def test_a_recipe_like_the_real_ones_loads(tmp_path):
  """The control for the typo test below: the same file with the field spelled right."""
  config = load_config(_recipe_with(tmp_path, "c.optimizer.learning_rate = 3e-4"))
  assert config.optimizer.learning_rate == 3e-4


def test_recipe_typo_fails_as_a_config_error_naming_the_close_key(tmp_path):
  """A misspelled assignment in a recipe must not add a field (base locks its config); it is a config
  error the user fixes, like a typo in an override, so the CLI reports it instead of a traceback."""
  path = _recipe_with(tmp_path, "c.optimizer.learning_rat = 3e-4")
  with pytest.raises(ConfigError) as info:
    load_config(path)
  message = str(info.value)
  assert "learning_rat" in message and "learning_rate" in message


# --------------------------------------------------------------------------------------------------
# Every recipe's train state, abstractly
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  folder = str(tmp_path_factory.mktemp("tokenizer"))
  build_offline_tokenizer(folder)
  return load_tokenizer(folder)


def _params(state) -> dict[str, tuple[int, ...]]:
  """Path -> shape of the nnx.Params (base weights, LoRA factors, head) in a state; RNG variables excluded."""
  return {freeze.path_string(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)
          if isinstance(v, nnx.Param)}


def _count(shapes) -> int:
  return sum(int(np.prod(s)) for s in shapes.values())


def _abstract_state(config, tokenizer):
  """What `run.train` builds, traced only: the arch (preset; the tokenizer's vocabulary for the tiny one),
  head, trainable set, optimizer, on an 8-device FSDP mesh."""
  if config.model.preset == "tiny":
    arch = run.model_config(config, tokenizer)
  else:  # a real run reads the HF folder's config; its preset is the published architecture
    arch = preset(config.model.preset)
  head = run.head_config(config, arch, tokenizer)
  trainable = run.trainable_set(config, head is not None)
  optimizer = make_optimizer(run.optimizer_settings(config, 100))
  mesh = make_mesh({"fsdp": 8})
  rules = tuple(tuple(r) for r in config.rules)
  _, state = abstract_train_state(lambda: run.build_model(config, arch, head), optimizer, mesh, rules,
                                  trainable=trainable, seed=int(config.train.seed))
  return arch, head, trainable, mesh, state


def _check_abstract(state, mesh):
  """Nothing allocated: every leaf is a ShapeDtypeStruct with a sharding on the mesh; the Adam moments
  mirror the trainable parameters exactly (two float32 copies), and trainable weights are float32."""
  leaves = jax.tree.leaves(state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh for x in leaves)
  params = jax.tree.leaves(state.params)
  assert all(x.dtype == np.float32 for x in params)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape != ()]
  assert sorted(x.shape for x in moments) == sorted([x.shape for x in params] * 2)


def _trained_elements(state, trainable) -> int:
  """Elements the optimizer changes: whole trainable params, and only the masked-in slices of stacked ones."""
  mask = freeze.update_mask(state.params, trainable)
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), state.params)
  fraction = jax.tree.map(lambda m: float(np.mean(m)), mask)
  return int(round(sum(s * f for s, f in zip(jax.tree.leaves(sizes), jax.tree.leaves(fraction)))))


def test_tiny_demo_trains_everything(tokenizer):
  config = load_config(TINY)
  arch, head, trainable, mesh, state = _abstract_state(config, tokenizer)
  _check_abstract(state, mesh)
  assert arch.text.vocab_size >= tokenizer.vocab_size and head.kind == "pooled"
  trainable_shapes, frozen_shapes = _params(state.params), _params(state.frozen)
  assert not frozen_shapes
  head_count = _count({p: s for p, s in trainable_shapes.items() if p.startswith("head/")})
  assert head_count > 0
  assert _count(trainable_shapes) == backbone_params(arch) + head_count
  assert _trained_elements(state, trainable) == _count(trainable_shapes)


def test_emoverse_3b_sft_freezes_the_vit_but_not_the_merger():
  config = load_config(os.path.join(CONFIGS, "emoverse_3b_sft.py"))
  arch, head, trainable, mesh, state = _abstract_state(config, None)
  _check_abstract(state, mesh)
  assert head is None
  trainable_shapes, frozen_shapes = _params(state.params), _params(state.frozen)
  assert _count(trainable_shapes) + _count(frozen_shapes) == QWEN25VL_3B_PARAMS
  assert _count(frozen_shapes) == vision_tower_params(arch)
  assert all(p.startswith(("backbone/visual/patch_embed/", "backbone/visual/blocks/")) for p in frozen_shapes)
  assert any(p.startswith("backbone/visual/merger/") for p in trainable_shapes)
  assert any(p.startswith("backbone/language_model/embed_tokens/") for p in trainable_shapes)
  assert _trained_elements(state, trainable) == QWEN25VL_3B_PARAMS - vision_tower_params(arch)


def test_emoverse_3b_head_trains_the_last_two_text_layers_and_the_head():
  config = load_config(os.path.join(CONFIGS, "emoverse_3b_head.py"))
  arch, head, trainable, mesh, state = _abstract_state(config, None)
  _check_abstract(state, mesh)
  assert head is not None and head.kind == "pooled" and head.hidden_size == arch.text.hidden_size
  trainable_shapes, frozen_shapes = _params(state.params), _params(state.frozen)
  head_shapes = {p: s for p, s in trainable_shapes.items() if p.startswith("head/")}
  assert head_shapes and not any(p.startswith("head/") for p in frozen_shapes)
  # Stacked text layers stay whole in the trainable state; the update mask keeps only the last 2 slices.
  assert all(p.startswith("head/") or p.startswith("backbone/language_model/layers/") for p in trainable_shapes)
  assert _count(trainable_shapes) + _count(frozen_shapes) == QWEN25VL_3B_PARAMS + _count(head_shapes)
  layers = arch.text.num_hidden_layers
  assert _count(trainable_shapes) - _count(head_shapes) == layers * text_layer_params(arch)
  assert _trained_elements(state, trainable) == 2 * text_layer_params(arch) + _count(head_shapes)


def test_eemo_7b_sft_lora_trains_only_the_adapters():
  config = load_config(os.path.join(CONFIGS, "eemo_7b_sft_lora.py"))
  arch, head, trainable, mesh, state = _abstract_state(config, None)
  _check_abstract(state, mesh)
  assert head is None
  trainable_shapes, frozen_shapes = _params(state.params), _params(state.frozen)
  assert trainable_shapes and all(p.endswith(("/lora_a", "/lora_b")) for p in trainable_shapes)
  assert _count(frozen_shapes) == QWEN25VL_7B_PARAMS
  assert _count(trainable_shapes) == lora_params(arch, config.lora.rank)
  assert not any("embed" in p or p.startswith("backbone/lm_head") for p in trainable_shapes)
  assert _trained_elements(state, trainable) == _count(trainable_shapes)


# --------------------------------------------------------------------------------------------------
# The stages chain with the shipped defaults
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage1, stage2", [("emoverse_3b_sft.py", "emoverse_3b_head.py"),
                                            ("eemo_7b_sft_lora.py", "eemo_7b_grpo.py")])
def test_stage2_starts_where_stage1_runs_and_stage1_exports(stage1, stage2):
  """Stage 2's `model.init_from` is stage 1's default run directory, and stage 1 exports its model under its
  run directory, wherever `--config.train.run_dir` puts it (unless `train.export_dir` is set)."""
  first, second = load_config(os.path.join(CONFIGS, stage1)), load_config(os.path.join(CONFIGS, stage2))
  assert second.model.init_from == first.train.run_dir and not second.model.hf_dir
  assert first.train.export_dir == f"{first.train.run_dir}/export"
  moved = load_config(os.path.join(CONFIGS, stage1), ["--config.train.run_dir=gs://bucket/runs/x"])
  assert moved.train.export_dir == "gs://bucket/runs/x/export"
  chosen = load_config(os.path.join(CONFIGS, stage1),
                       ["--config.train.run_dir=gs://b/x", "--config.train.export_dir=/e"])
  assert (chosen.train.run_dir, chosen.train.export_dir) == ("gs://b/x", "/e")
