"""Architecture config: presets against transformers, HF config round trips, loud failures."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from eemo_jax.hf.load import abstract_model
from eemo_jax.model import config as cfglib
from hf_fixtures import tiny_hf_config


def _hf_param_count(hf_dict):
  """transformers' parameter count for a config, built on the meta device (no memory)."""
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  with torch.device("meta"):
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_dict))
  return sum(p.numel() for p in model.parameters())  # tied weights are listed once


@pytest.mark.parametrize("name,expected_billions", [("qwen25vl_3b", 3.75), ("qwen25vl_7b", 8.29)])
def test_preset_parameter_count_equals_transformers(name, expected_billions):
  config = cfglib.preset(name)
  model = abstract_model(config, dtype="bfloat16")
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "eval_shape must allocate nothing"
  ours = sum(int(np.prod(x.shape)) for x in leaves)
  assert ours == _hf_param_count(config.to_hf())
  assert abs(ours / 1e9 - expected_billions) < 0.01


def test_from_hf_to_hf_round_trip_through_transformers():
  from transformers import Qwen2_5_VLConfig
  hf = tiny_hf_config(tie=True, fullatt=(0, 2), window_size=56).to_dict()
  ours = cfglib.Qwen25VLConfig.from_hf(hf)
  assert ours.tie_word_embeddings and ours.vision.fullatt_block_indexes == (0, 2)
  assert ours.vision.window_size == 56 and ours.text.mrope_section == (2, 3, 3)
  through_transformers = cfglib.Qwen25VLConfig.from_hf(Qwen2_5_VLConfig(**ours.to_hf()).to_dict())
  through_json = cfglib.Qwen25VLConfig.from_hf(json.loads(json.dumps(ours.to_hf())))
  assert through_transformers == ours == through_json


def test_flat_4x_hub_config_is_read():
  """Hub config.json files keep the text fields at the root and use legacy rope_scaling."""
  flat = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
      "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "max_position_embeddings": 128000,
      "max_window_layers": 70, "sliding_window": 32768, "use_sliding_window": False, "hidden_act": "silu",
      "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
      "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "attention_dropout": 0.0,
      "initializer_range": 0.02, "transformers_version": "4.41.2", "use_cache": True,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                        "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2},
  }
  assert cfglib.Qwen25VLConfig.from_hf(flat) == cfglib.qwen25vl_3b()


@pytest.mark.parametrize("where,field", [("text_config", "foo_bar"), ("vision_config", "qk_norm"), (None, "magic")])
def test_unknown_field_fails_naming_it(where, field):
  hf = tiny_hf_config().to_dict()
  (hf[where] if where else hf)[field] = 1
  with pytest.raises(ValueError, match=field):
    cfglib.Qwen25VLConfig.from_hf(hf)


def test_rope_scaling_is_refused():
  hf = tiny_hf_config().to_dict()
  hf["text_config"]["rope_parameters"]["factor"] = 4.0
  with pytest.raises(ValueError, match="factor"):
    cfglib.Qwen25VLConfig.from_hf(hf)


@pytest.mark.parametrize("change,message", [
    (dict(mrope_section=(2, 3, 4)), "mrope_section"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_invalid_text_config_explains(change, message):
  with pytest.raises(ValueError, match=message):
    cfglib.tiny().replace(text=cfglib.tiny().text.__class__(**{**cfglib.tiny().text.__dict__, **change}))


def test_mismatched_tower_widths_explain():
  tiny = cfglib.tiny()
  with pytest.raises(ValueError, match="out_hidden_size"):
    tiny.replace(vision=cfglib.VisionConfig(**{**tiny.vision.__dict__, "out_hidden_size": 32}))
