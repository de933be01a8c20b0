"""The embedded default: a tiny Qwen2.5-VL with the EmoVerse head on the synthetic data set, on CPU.

    eemo-jax train --config configs/tiny_demo.py --config.train.run_dir=runs/tiny

`eemo-jax demo` runs this recipe end to end (data, tokenizer, SFT, evaluation, HF export and check).
The data are synthetic (data_pipeline/synthetic.py): drawn images whose colours and shapes carry the label.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "tiny"
  c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower
  c.model.remat = "none"
  c.head.kind = "pooled"
  c.head.classifier_hidden = 32
  c.head.num_attention_heads = 2
  c.head.num_hidden_layers_mean = 3  # the tiny decoder has 2 layers: embeddings + 2 outputs
  c.data.task = "emoverse_ces"
  c.data.seq_len = 128
  c.data.min_pixels = 56 * 56
  c.data.max_pixels = 112 * 112
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_ratio = 0.05
  c.optimizer.weight_decay = 0.01
  c.loss.lm_weight = 1.0
  c.loss.ces_weight = 1.0
  c.mesh.fsdp = -1  # every device of the host on fsdp (one on a plain CPU)
  c.train.run_dir = "runs/tiny_demo"
  c.train.global_batch_size = 16
  c.train.epochs = 3.0
  c.train.log_every = 5
  c.train.checkpoint_every = 100
  c.eval.every = 50
  c.eval.batches = 25  # the whole 400-image test split
  c.aot.topology = "v5e:2x2"
  return c
