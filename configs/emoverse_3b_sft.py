"""EmoVerse stage 1: full SFT of Qwen2.5-VL-3B on the B-A-S attribution answers, vision tower frozen.

    eemo-jax train --config configs/emoverse_3b_sft.py \
        --config.model.init_from=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/emoverse_sft

Stage 2 (configs/emoverse_3b_head.py) starts from this run's directory (`model.init_from`, default
runs/emoverse_3b_sft: its newest checkpoint); the run also exports its final model as an HF folder to
`<train.run_dir>/export` (train.export_dir follows train.run_dir unless set), the stage-1 model the authors
release and evaluate.

The authors' run is `training/scripts/sft_7b_lora.sh` (alkaline-acid/EmoVerse at 4dd30d3; papers.md §2.3):
its data set `emo_200704` is the released export's (MODEL_RELEASE.md), and despite the name it is full SFT
of the 3B (L10) through `qwenvl/train/train_qwen_lora.py`, which calls `set_model` (L261), not LoRA, and
trains with the HF Trainer (L273). Values, with the line they come from:
- trainable parts: vision tower frozen, merger and LLM trained: `--tune_mm_vision False`, `--tune_mm_mlp True`,
  `--tune_mm_llm True` (L28-30);
- lr 5e-6 (`lr=5e-6`, L12), constant: `--lr_scheduler_type "constant"` (L47). The HF Trainer's "constant"
  is `get_constant_schedule`, which takes no warmup (`get_scheduler` returns it before reading the warmup;
  transformers 5.23 optimization.py L1014-1015, 4.50 L566-567), so the script's `--warmup_ratio 0.03` (L45)
  has no effect and warmup_ratio is 0 here;
- global batch 32 = `NPROC_PER_NODE=2` (L3) x `batch_size=4` (L13) x `grad_accum_steps=4` (L14). Accumulation
  only bounds memory, so the 32 rows are one microbatch here (2 per chip of the v5e 4x4 `aot` target);
- 1 epoch (`--num_train_epochs 1`, L33); weight decay 0 (L44) and max_grad_norm 1 (L46), base's values;
  AdamW (`optim="adamw_torch"`, training/qwenvl/train/argument.py L31) with the HF defaults β (0.9, 0.999),
  ε 1e-8, base's values;
- pixels between 784 and 200704 (`--min_pixels 784`, L38; `--max_pixels 200704`, L37);
- seq_len 1024 is this project's bucket, not the script's: it truncates at `--model_max_length 8192` (L49).
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
  c.data.min_pixels = 784
  c.data.max_pixels = 200704
  c.eval.split = "test"
  c.optimizer.learning_rate = 5e-6
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_ratio = 0.0  # the HF Trainer's "constant" has no warmup
  c.optimizer.accum_steps = 1
  c.train.global_batch_size = 32
  c.train.epochs = 1.0
  c.train.run_dir = "runs/emoverse_3b_sft"
  c.train.export_dir = c.train.get_ref("run_dir") + "/export"  # follows --config.train.run_dir
  c.aot.topology = "v5e:4x4"
  return c
