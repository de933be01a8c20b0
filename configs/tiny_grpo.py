"""GRPO on CPU in minutes: the tiny Qwen2.5-VL on the synthetic EEmo tasks (all five task types).

    eemo-jax grpo --config configs/tiny_grpo.py --config.train.run_dir=runs/tiny_grpo \
        --config.data.data_dir=runs/demo/data --config.data.tokenizer_dir=runs/demo/tokenizer \
        [--config.model.hf_dir=runs/demo/export_eemo]

From random weights the rewards stay near zero (no answer is well formed); start from an SFT export of
the same tasks (`model.hf_dir`), as `eemo-jax demo` does, to see the mean reward rise. The data set is
`data_pipeline.builders.build("synthetic", data_dir, config="eemo")`.
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
  c.data.dataset = "synthetic"
  c.data.dataset_config = "eemo"
  c.data.task = "eemo_tasks"
  c.data.prompt_only = True
  c.data.seq_len = 448  # the prompt bucket: the synthetic prompts take 230-400 tokens (pairs the most)
  c.data.min_pixels = 56 * 56
  c.data.max_pixels = 112 * 112
  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_ratio = 0.0
  c.optimizer.accum_steps = 1
  c.mesh.fsdp = -1
  c.grpo.num_generations = 4
  c.grpo.max_completion_length = 48
  c.grpo.temperature = 1.0
  c.grpo.sample_every = 5
  c.eval.batches = 4  # held-out rewards before the first step and at the end (eval.every: also in between)
  c.eval.every = 0
  c.train.run_dir = "runs/tiny_grpo"
  c.train.global_batch_size = 16  # 4 prompts x 4 completions
  c.train.steps = 20
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  c.aot.topology = "v5e:2x2"
  return c
