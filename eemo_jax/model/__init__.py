"""Qwen2.5-VL in Flax NNX: config, vision tower, text decoder, the composed model."""

from eemo_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig, preset
from eemo_jax.model.qwen25vl import ModelInputs, ModelOutput, Qwen25VL, prepare_inputs
from eemo_jax.model.text import KVCache
from eemo_jax.model.vision import VisionInputs, prepare_vision

__all__ = ["KVCache", "ModelInputs", "ModelOutput", "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig",
           "VisionInputs", "preset", "prepare_inputs", "prepare_vision"]
