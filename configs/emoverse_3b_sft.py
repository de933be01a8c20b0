"""EmoVerse stage 1: full SFT of Qwen2.5-VL-3B on the B-A-S attribution answers, vision tower frozen.

    eemo-jax train --config configs/emoverse_3b_sft.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/emoverse_sft

From the authors' `training/scripts/sft_7b_lora.sh` run (papers.md §2.3): vision tower frozen, merger
and LLM trained (`tune_mm_vision False, tune_mm_mlp True, tune_mm_llm True`), lr 5e-6, 1 epoch, cosine
with warmup 0.03, batch 4 x grad-accum 4 per GPU (x 8 GPUs = 128), max_pixels 200704.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_3b"
  c.trainable.freeze = ("visual/(patch_embed|blocks)/.*",)  # the merger trains
  c.data.dataset = "emoverse"
  c.data.dataset_config = ""
  c.data.task = "emoverse_bas"
  c.data.seq_len = 1024
  c.data.max_pixels = 200704
  c.eval.split = "test"
  c.optimizer.learning_rate = 5e-6
  c.optimizer.warmup_ratio = 0.03
  c.optimizer.accum_steps = 4
  c.train.global_batch_size = 128
  c.train.epochs = 1.0
  c.train.run_dir = "runs/emoverse_3b_sft"
  c.aot.topology = "v5e:4x4"
  return c
