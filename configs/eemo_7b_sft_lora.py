"""EEmo-Logic stage 1: LoRA instruction tuning of Qwen2.5-VL-7B on EEmoDB-QA, adapters on both towers.

    eemo-jax train --config configs/eemo_7b_sft_lora.py \
        --config.model.init_from=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/eemo_lora

Stage 2 (configs/eemo_7b_grpo.py) starts from this run's directory (`model.init_from`, default
runs/eemo_7b_sft_lora: its newest checkpoint, the adapters merged); the run also exports the merged model as
an HF folder to `<train.run_dir>/export` (train.export_dir follows train.run_dir unless set), as the authors'
scripts/merge_lora.sh does.

The authors' `train/Stage_1/scripts/finetune_lora_vision.sh` (workerred/EEmo-Logic at b353f32; papers.md §3.4),
trained by the HF Trainer (`QwenTrainer`, train/Stage_1/src/train/train_sft.py L212; transformers 4.51.3,
train/Stage_1/requirements.txt L99). Values, with the line they come from:
- LoRA r 64 / alpha 64 / dropout 0.05 (L30-32) on every linear layer (`--num_lora_modules -1`, L33) of the
  LLM and the ViT (`--vision_lora True`, L27), lm_head and embeddings excluded (L29); base weights frozen
  (`--freeze_vision_tower/llm/merger True`, L39-41); the adapters are merged on export (scripts/merge_lora.sh);
- lr 2e-4 (L51), cosine (`--lr_scheduler_type "cosine"`, L54) with warmup ratio 0.03 (L53): the Trainer warms
  up over ceil(0.03 x steps) steps (`TrainingArguments.get_warmup_steps`), as `optimizer_settings` counts;
- weight decay 0.1 (L52); AdamW β (0.9, 0.999), ε 1e-8 (`adamw_torch`, train/Stage_1/src/train/params.py
  L15-18); max_grad_norm not passed: the Trainer's default 1.0, base's value;
- global batch 128 (`GLOBAL_BATCH_SIZE=128`, L16) = 4 per device (L17) x 8 devices (L18) x accumulation 4
  (L19); 1 epoch (L46);
- pixels between 256 and 1280 x 28 x 28 (L49-50);
- seq_len 2048: not in the release (inferred: a bucket for 1280 image tokens and the QA text; the script
  passes no `--max_seq_length`, whose default is 32768, params.py L25-26).
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
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_ratio = 0.03
  c.optimizer.weight_decay = 0.1
  c.optimizer.accum_steps = 4
  c.train.global_batch_size = 128
  c.train.epochs = 1.0
  c.train.run_dir = "runs/eemo_7b_sft_lora"
  c.train.export_dir = c.train.get_ref("run_dir") + "/export"  # follows --config.train.run_dir
  c.aot.topology = "v5p:2x2x2"
  return c
