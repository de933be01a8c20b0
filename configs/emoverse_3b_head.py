"""EmoVerse stage 2: the CES/DES head on the stage-1 model; backbone frozen except the last 2 LLM layers.

    eemo-jax train --config configs/emoverse_3b_head.py \
        --config.model.hf_dir=/path/to/stage1_export \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/emoverse_head

The authors' `training/scripts/classify.sh` (papers.md §2.2-2.3, head variant 1): mean of the last 4
hidden states -> MLP -> 8-head self-attention -> mean pool = DES (1024 for 3B) -> MLP = CES; CE on the
8 Mikels classes; `unfreeze_last_layers true` (last 2 layers); lr 1e-5, 3 epochs, weight decay 0.01,
warmup 0.05, batch 4 per GPU x 8 GPUs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_3b"
  c.head.kind = "pooled"
  c.trainable.last_text_layers = 2
  c.data.dataset = "emoverse"
  c.data.dataset_config = ""
  c.data.task = "emoverse_ces"
  c.data.seq_len = 512
  c.data.max_pixels = 200704
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_ratio = 0.05
  c.optimizer.weight_decay = 0.01
  c.loss.lm_weight = 0.0  # the head's cross-entropy only, as the authors train it
  c.loss.ces_weight = 1.0
  c.train.global_batch_size = 32
  c.train.epochs = 3.0
  c.train.run_dir = "runs/emoverse_3b_head"
  c.aot.topology = "v5e:4x4"
  return c
