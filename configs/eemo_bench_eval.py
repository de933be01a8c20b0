"""EEmo-Bench and EEmo-Logic's cross-domain sets: greedy answers of a trained model, scored as the benchmark.

    python -c "from data_pipeline.builders import build; from eemo_jax.eval import BENCH_DATA; \
        build('eemo_bench', '/data/tfds', manual_dir=BENCH_DATA, config='single', image_root='/data/ebench/images')"
    eemo-jax eval --config configs/eemo_bench_eval.py --hf-dir /models/eemo_7b_grpo/export --out runs/eval/single \
        --config.data.data_dir=/data/tfds --config.data.dataset_config=single

`data.dataset_config` picks the set: single (perception, ranking, V/A/D, description of one image), pair
(perception and description of image pairs), artemis or artphoto (dominant emotion). The prompts are the
EEmo-Logic inference format under its Stage-2 system message (`data.task = eemo_tasks`, as GRPO sees them);
V/A/D items also get the level-probability score. The model comes from --hf-dir / --checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_7b"
  c.model.dtype = "bfloat16"
  c.data.dataset = "eemo_bench"
  c.data.dataset_config = "single"
  c.data.task = "eemo_tasks"
  c.data.prompt_only = True
  c.data.shuffle = False
  c.data.seq_len = 2048  # the prompt bucket: two images at max_pixels and the question fit
  c.data.min_pixels = 256 * 28 * 28
  c.data.max_pixels = 1280 * 28 * 28  # as EEmo-Logic's inference scripts
  c.train.global_batch_size = 16  # prompts per generation batch (every device of the host shares them)
  c.eval.split = "test"
  return c
