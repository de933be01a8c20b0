"""EmoVerse stage 2: the CES/DES head on the stage-1 model; backbone frozen except the last 2 LLM layers.

    eemo-jax train --config configs/emoverse_3b_head.py \
        --config.model.init_from=gs://bucket/runs/emoverse_sft \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/emoverse_head

`model.init_from` defaults to stage 1's default run directory (configs/emoverse_3b_sft.py, runs/emoverse_3b_sft):
its newest checkpoint, with the architecture and tokenizer stage 1 recorded; the pooled head starts fresh, as
stage 1 trains none. Set it to wherever stage 1 ran (or to RUN_DIR/checkpoints/N, or stage 1's HF export).

The authors' `training/scripts/classify.sh` (alkaline-acid/EmoVerse at 4dd30d3; papers.md §2.2-2.3, head
variant 1), which runs its own loop in `training/qwenvl/train/train_qwen_classify.py` (not the HF Trainer).
Values, with the line they come from:
- the model: stage 1's checkpoint (`--model_name_or_path .../checkpoint-6000`, L23) with the head of
  `--feature_fusion attention` (L43): mean of the last 4 hidden states -> MLP -> 8-head self-attention ->
  mean pool = DES (1024 for 3B) -> MLP = CES; CE on the 8 Mikels classes (`nn.CrossEntropyLoss`,
  train_qwen_classify.py L235), so no LM loss;
- backbone frozen except the last 2 LLM layers: `--unfreeze_last_layers true` (L42; 2 layers in
  qwenvl/model/qwen_classify.py L157-160);
- lr 1e-5 (L30), constant: train_qwen_classify.py L271-276 builds `get_scheduler(name="constant", ...)`,
  which ignores the `num_warmup_steps` it is given (transformers 5.23 optimization.py L1014-1015), so
  `--warmup_ratio 0.05` (L33) has no effect and warmup_ratio is 0 here;
- weight decay 0.01 (L32) in `torch.optim.AdamW` with torch's β (0.9, 0.999) and ε 1e-8 (train_qwen_classify.py
  L236-240); it decays every trainable parameter, where this project leaves biases and norms undecayed;
- max_grad_norm 1.0 (`clip_grad_norm_(..., max_norm=1.0)`, train_qwen_classify.py L312), base's value;
- global batch 32 = `GPUS_PER_NODE=8` (L4) x `--per_device_train_batch_size 4` (L27) x
  `--gradient_accumulation_steps 1` (L29); 3 epochs (L31);
- max_pixels 200704: not in the release (inferred: stage 1's, sft_7b_lora.sh L37, which keeps an image within
  seq_len 512). train_qwen_classify.py's 576 x 28 x 28 / 16 x 28 x 28 (L62-63) are set as attributes of the
  processor (qwen_classify.py L15-18), which Qwen2_5_VLProcessor does not read (transformers 4.50 and 5.23),
  so the authors' images had the limits of Qwen2.5-VL-3B-Instruct's own processor (L224), and only images over
  3210 x 2120 pixels were skipped (L61, L121).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_3b"  # the architecture AOT compiles for; a run takes stage 1's
  c.model.init_from = "runs/emoverse_3b_sft"  # stage 1's train.run_dir
  c.head.kind = "pooled"
  c.trainable.last_text_layers = 2
  c.data.dataset = "emoverse"
  c.data.dataset_config = ""
  c.data.task = "emoverse_ces"
  c.data.seq_len = 512
  c.data.max_pixels = 200704
  c.optimizer.learning_rate = 1e-5
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_ratio = 0.0  # get_scheduler("constant") has no warmup
  c.optimizer.weight_decay = 0.01
  c.loss.lm_weight = 0.0  # the head's cross-entropy only, as the authors train it
  c.loss.ces_weight = 1.0
  c.train.global_batch_size = 32
  c.train.epochs = 3.0
  c.train.run_dir = "runs/emoverse_3b_head"
  c.aot.topology = "v5e:4x4"
  return c
