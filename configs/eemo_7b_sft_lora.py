"""EEmo-Logic stage 1: LoRA instruction tuning of Qwen2.5-VL-7B on EEmoDB-QA, adapters on both towers.

    eemo-jax train --config configs/eemo_7b_sft_lora.py \
        --config.model.hf_dir=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/eemo_lora

The authors' `train/Stage_1/scripts/finetune_lora_vision.sh` (papers.md §3.4): LoRA r 64 / alpha 64 /
dropout 0.05 on every linear layer of the LLM and the ViT (lm_head and embeddings excluded), base
weights frozen, lr 2e-4, weight decay 0.1, warmup 0.03, cosine, 1 epoch, global batch 128, pixels
between 256 and 1280 x 28 x 28; the adapters are merged on export.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_7b"
  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.lora.dropout = 0.05
  c.trainable.adapters_only = True
  c.data.dataset = "eemo"
  c.data.dataset_config = "qa"
  c.data.task = "eemo_qa"
  c.data.seq_len = 2048
  c.data.min_pixels = 256 * 28 * 28
  c.data.max_pixels = 1280 * 28 * 28
  c.optimizer.learning_rate = 2e-4
  c.optimizer.warmup_ratio = 0.03
  c.optimizer.weight_decay = 0.1
  c.optimizer.accum_steps = 4
  c.train.global_batch_size = 128
  c.train.epochs = 1.0
  c.train.run_dir = "runs/eemo_7b_sft_lora"
  c.aot.topology = "v5p:2x2x2"
  return c
