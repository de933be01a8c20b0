"""EEmo-Logic stage 2: GRPO of the stage-1 model on EEmoDB-Assess, LoRA, the authors' released loss.

    eemo-jax grpo --config configs/eemo_7b_grpo.py \
        --config.model.init_from=gs://bucket/runs/eemo_lora \
        --config.data.data_dir=/path/to/tfds --config.train.run_dir=gs://bucket/runs/eemo_grpo

`model.init_from` defaults to stage 1's default run directory (configs/eemo_7b_sft_lora.py,
runs/eemo_7b_sft_lora): its newest checkpoint with the LoRA adapters merged into the weights, and the
architecture and tokenizer stage 1 recorded. Set it to wherever stage 1 ran (or to its HF export).

From the authors' `train/Stage_2/finetune_grpo.sh` and trainer (workerred/EEmo-Logic at b353f32; papers.md §3.5;
L<n> alone is a line of finetune_grpo.sh). The script's entry point is sanitised (`main` is a placeholder,
src/open_r1/grpo_emotion.py L387-389) and its GRPOConfig comes from a package `tl_grpo` that is not released
(grpo_emotion.py L33), so what the script does not pass is inferred from the pinned trl 0.15.1 and transformers 4.50.0
(train/Stage_2/requirements.txt L258, L256):
- start from stage 1 with its adapters merged (`model.init_from`, what `eemo_7b_sft_lora`'s merged export
  holds); new LoRA adapters of rank 64 / alpha 64 on every linear layer as in stage 1, base weights frozen, so
  the reference policy is the same weights with the adapters switched off (no second copy);
- G = 8 (`--num_generations 8`, L57), completions up to 1024 tokens (`--max_completion_length 1024`, L56),
  temperature 1.0: the HF-generate trainer's hard-coded `temperature=1  # HACK`
  (src/open_r1/trainer/grpo_trainer_video_qa.py L334); the vLLM trainer that `--use_vllm true` (L71) suggests
  samples at `args.temperature` (vllm_grpo_trainer_video_tg.py L445), trl 0.15.1's default 0.9, and which
  trainer ran is not in the release;
- beta 0.04 and lr 1e-6: not passed by the script (inferred: trl 0.15.1's GRPOConfig defaults,
  trl/trainer/grpo_config.py L206-207 and L213-214);
- the schedule: no `--lr_scheduler_type` or warmup is passed, and trl 0.15.1's GRPOConfig sets neither
  (inferred: transformers 4.50.0's TrainingArguments defaults, training_args.py L921-922 `"linear"`, L933-934
  warmup_ratio 0.0, L936 warmup_steps 0), so HF's linear decay to 0 with no warmup; weight decay 0.0 and
  max_grad_norm 1.0 likewise (training_args.py L910, L914), base's values;
- 32 completions (4 prompts) per optimizer step: 1 prompt per device (`--per_device_train_batch_size 1`,
  L58), each sampled G times (grpo_trainer_video_qa.py L335 and L623; vllm_grpo_trainer_video_tg.py L580),
  x 2 processes (`torchrun --nproc_per_node 2`, L43; the `NUM_DEVICES=7` of L26 is unused) x accumulation 2
  (L59); here in 4 micro-batches of one prompt group, since accumulation only bounds memory;
- 1 epoch (`--num_train_epochs 1`, L66);
- the released loss: advantage over the summed rewards / (group std + 1e-4), per-token
  `-(exp(logp - logp.detach()) * A - beta * k3)`, the token mean of each completion then the batch mean,
  k3 not weighted by the ratio, one iteration (no clipping takes effect): `rl.losses.EEMO_LOGIC_LOSS` =
  loss_type grpo, use_bias_correction_kl False, with advantages.EEMO_LOGIC_ADVANTAGE (group scaling of the sum);
- rewards: the prompt's answer format, and each row's own task reward (`eemo_task`: dominant emotion with
  the similarity matrix of its option set, as released; ranking, V/A/D and choice rewards from the formulas of
  papers.md §3.5/§5, which the authors did not release); summed, as the release sums its rewards;
- the Stage-2 system prompt "You are an emotion analysis expert." (the prompt-only pipeline adds it).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config(arg=None):
  c = base.get_config()
  c.model.preset = "qwen25vl_7b"  # the architecture AOT compiles for; a run takes stage 1's
  c.model.init_from = "runs/eemo_7b_sft_lora"  # stage 1's train.run_dir
  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.lora.dropout = 0.05
  c.trainable.adapters_only = True
  c.data.dataset = "eemo"
  c.data.dataset_config = "assess"
  c.data.task = "eemo_tasks"
  c.data.prompt_only = True
  c.data.seq_len = 2048  # the prompt bucket (the release allows 8192 prompt tokens; images up to 1280 x 28^2 px)
  c.data.min_pixels = 256 * 28 * 28
  c.data.max_pixels = 1280 * 28 * 28
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_ratio = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.accum_steps = 4
  c.grpo.num_generations = 8
  c.grpo.max_completion_length = 1024
  c.grpo.temperature = 1.0
  c.grpo.beta = 0.04
  c.grpo.loss_type = "grpo"  # rl.losses.EEMO_LOGIC_LOSS
  c.grpo.use_bias_correction_kl = False
  c.grpo.importance_sampling_level = "token"
  c.grpo.scale_rewards = "group"  # rl.advantages.EEMO_LOGIC_ADVANTAGE
  c.grpo.aggregation = "sum_then_normalize"
  c.grpo.rewards = (("format", 1.0), ("eemo_task", 1.0))
  c.train.global_batch_size = 32  # completions
  c.train.epochs = 1.0
  c.train.run_dir = "runs/eemo_7b_grpo"
  c.aot.topology = "v5p:2x2x2"
  return c
